"""The ONNX graph of a saved model (`onnx_graph`) as an OpenVINO IR: model.xml beside model.bin (docs/method.md §7).

  python -m experiments.export --model RUN --format openvino --out model.xml [--fp16]

The IR is the same graph (inputs, outputs, every constant) read by OpenVINO's ONNX front end, with float32
weights, or float16 ones with --fp16 (half the file; OpenVINO widens them again when it compiles for a CPU).
Its metadata are the ONNX file's metadata_props (`onnx_graph.metadata`: threshold, sizes, preprocessing, map
settings), plus `weights` and, for an int8 IR (`quantize.py`), its accuracy figures, all strings in the IR's
rt_info under the section `efficientad` (no sidecar file): `read_metadata` reads them back, as does
`openvino.Core().read_model(xml).get_rt_info(["efficientad", key])`.
"""

from __future__ import annotations

import pathlib
import shutil
import tempfile
from typing import Any

from efficientad_jax.serving import backends, onnx_graph

RT_INFO = "efficientad"  # the rt_info section that holds the metadata


def to_openvino(model: Any, source: str = "model", weights: str = "float32", extra: dict | None = None) -> Any:
  """The `openvino.Model` of a loaded model (`saved_model.LoadedModel`), its metadata in rt_info."""
  onnx_graph.check_exportable(model, source)
  core = backends.openvino_core(why="--format openvino")
  ov_model = backends.read_openvino(core, model, None)
  set_metadata(ov_model, {**onnx_graph.metadata(model, source, onnx_graph.DEFAULT_OPSET), "weights": weights})
  if extra:
    set_metadata(ov_model, extra)
  return ov_model


def set_metadata(ov_model: Any, meta: dict[str, str]) -> None:
  for key, value in meta.items():
    ov_model.set_rt_info(str(value), [RT_INFO, key])


def read_metadata(xml: str | pathlib.Path) -> dict[str, str]:
  """The metadata of an IR written by `write_ir` ({} for an IR without them)."""
  ov_model = backends.openvino_core().read_model(str(xml))
  info = ov_model.get_rt_info()
  if RT_INFO not in info:
    return {}
  return {key: value.astype(str) for key, value in info[RT_INFO].items()}


def write_ir(ov_model: Any, out: str | pathlib.Path, fp16: bool = False) -> pathlib.Path:
  """Writes out (.xml) and its .bin beside it; a reader never sees a half-written pair (.bin moved first)."""
  import openvino as ov

  out = pathlib.Path(out)
  if out.suffix != ".xml":
    raise backends.BackendError(f"{out}: an OpenVINO IR is written as NAME.xml (with NAME.bin beside it) (--out)")
  out.parent.mkdir(parents=True, exist_ok=True)
  with tempfile.TemporaryDirectory(dir=out.parent, prefix=".ir-") as tmp:
    tmp_xml = pathlib.Path(tmp) / out.name
    ov.save_model(ov_model, str(tmp_xml), compress_to_fp16=fp16)
    shutil.move(tmp_xml.with_suffix(".bin"), out.with_suffix(".bin"))
    shutil.move(tmp_xml, out)
  return out


def export_openvino(model_path: str | pathlib.Path, out: str | pathlib.Path, fp16: bool = False) -> pathlib.Path:
  """Loads RUN (or RUN/model) and writes its IR to `out` (.xml) and the .bin beside it."""
  from efficientad_jax.serving import saved_model

  source = str(saved_model.model_dir(model_path))
  model = saved_model.load(model_path)
  return write_ir(to_openvino(model, source, "float16" if fp16 else "float32"), out, fp16)
