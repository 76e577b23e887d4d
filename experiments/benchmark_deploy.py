"""`experiments.benchmark --mode deploy`: the CPU deployment backends side by side (serving/backends.py).

  python -m experiments.benchmark --mode deploy --out deploy.json            # PDN-S, PDN-M, 256², batch 1 and 8
  python -m experiments.benchmark --mode deploy --tiny --out tmp.json        # 64², PDN-S, batch 1 and 2 (CI)

For each PDN size: one saved model with random parameters (teacher statistics and map quantiles calibrated on
random images, `benchmark.plausible_detector`), then preprocessed host images [B, S, S, 3] -> host anomaly map
[B, S, S] and score [B] through each contender: jax float32 (the predict path), onnxruntime float32 and
OpenVINO float32 (the ONNX graph, `backends.make`), OpenVINO int8 (`quantize.quantize`) and onnxruntime int8
(`onnx_int8.quantize_onnx`, static QDQ), both calibrated here on the same random images (their timing, not their
accuracy, which `export --int8` measures on a run's own test images), and the PyTorch reference path
(`torch_reference.torch_predict_fn`: eval, no_grad) where torch is installed. The contenders run in turn within
each round, after a short pause each (`torch_reference._interleaved_medians`), so a shared machine's load hits
them alike; medians. Each runtime uses all cores (its default).
"""

from __future__ import annotations

import importlib.metadata
import logging
import os
import pathlib
import platform
import tempfile
from collections.abc import Callable

import jax
import numpy as np

from efficientad_jax import config as config_lib
from efficientad_jax.config import Config, ImageSize, ModelConfig
from efficientad_jax.serving import backends, onnx_graph, onnx_int8, openvino_ir, quantize, saved_model

CPU_FLAGS = ("avx2", "avx512f", "avx512_vnni", "avx512_bf16", "amx_bf16", "amx_int8", "avx_vnni")
PACKAGES = ("jax", "onnxruntime", "openvino", "nncf", "torch")
CALIBRATION_IMAGES = 8  # int8 timing only: random images are enough to set the ranges


def cpu() -> dict:
  """The CPU model and the instruction-set flags the runtimes' kernels choose between (Linux /proc/cpuinfo)."""
  info = {"machine": platform.machine(), "model": platform.processor() or "unknown", "flags": []}
  if hasattr(os, "getloadavg"):  # other processes' load shifts every contender's time (ratios suffer less)
    info["load_average_1m_at_start"] = os.getloadavg()[0]
  try:
    text = pathlib.Path("/proc/cpuinfo").read_text()
  except OSError:
    return info
  for line in text.splitlines():
    key, _, value = line.partition(":")
    if key.strip() == "model name":
      info["model"] = value.strip()
    if key.strip() == "flags":
      info["flags"] = [f for f in CPU_FLAGS if f in value.split()]
      break
  return info


def versions() -> dict:
  out = {}
  for name in PACKAGES:
    try:
      out[name] = importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
      out[name] = None
  return out


def random_model(size: str, image_size: ImageSize, folder: pathlib.Path, seed: int) -> saved_model.LoadedModel:
  """A saved and loaded model with random networks, calibrated on random images (what backends.make takes)."""
  from experiments import benchmark

  cfg = Config(model=ModelConfig(size=size, image_size=image_size))
  detector = benchmark.plausible_detector(cfg.model, jax.random.key(seed))
  meta = {"config": config_lib.to_dict(cfg), "threshold": 0.5, "image_size": list(image_size), "model_size": size}
  saved_model.save(folder / size / "model", "efficientad", detector, meta)
  return saved_model.load(folder / size)


def contenders(model: saved_model.LoadedModel, size: str, calibration: np.ndarray) -> dict[str, Callable]:
  """{name: fn(host images [B, S, S, 3]) -> host (maps, scores)}; a backend whose package is missing is left out."""
  h, w = model.image_size
  runners = {"jax fp32": backends.make(model, "jax")}
  for name in ("onnxruntime", "openvino"):
    try:
      runners[f"{name} fp32"] = backends.make(model, name)
    except backends.BackendError as e:
      logging.warning("%s left out: %s", name, e)
  if "openvino fp32" in runners:
    try:
      int8 = quantize.quantize(openvino_ir.to_openvino(model), calibration)
      runners["openvino int8"] = backends.openvino_runner(model, int8, backends.openvino_core())
    except backends.BackendError as e:
      logging.warning("openvino int8 left out: %s", e)
  if "onnxruntime fp32" in runners:
    qdq = onnx_int8.quantize_onnx(onnx_graph.to_onnx(model), calibration)
    runners["onnxruntime int8"] = backends.onnxruntime_runner(model, qdq.SerializeToString())
  fns = {name: (lambda x, r=r: r(x, (h, w))) for name, r in runners.items()}
  try:
    from experiments import torch_reference

    if h == w:  # the reference path is written for square images
      torch_fn = torch_reference.torch_predict_fn(size, h)
      fns["pytorch fp32"] = lambda x: torch_fn(np.ascontiguousarray(x.transpose(0, 3, 1, 2)))
  except SystemExit as e:  # torch_reference exits with a message when torch is missing
    logging.warning("pytorch left out: %s", e)
  return fns


def bench_deploy(args) -> list[dict]:
  """One row per (PDN size, batch size): median ms per call and per image of each contender, ratios to jax."""
  from experiments import torch_reference

  rng = np.random.default_rng(args.seed)
  s = args.image_size  # (H, W)
  calibration = rng.normal(size=(CALIBRATION_IMAGES if not args.tiny else 2, *s, 3)).astype(np.float32)
  rows = []
  with tempfile.TemporaryDirectory() as tmp:
    for size in args.sizes:
      model = random_model(size, s, pathlib.Path(tmp), args.seed)
      fns = contenders(model, size, calibration)
      for b in args.batch_sizes:
        x = rng.normal(size=(b, *s, 3)).astype(np.float32)
        medians = torch_reference._interleaved_medians(
          {name: (lambda fn=fn, x=x: fn(x)) for name, fn in fns.items()},
          args.deploy_warmup,
          args.deploy_runs,
          pause_s=0.0 if args.tiny else torch_reference.PAUSE_S,  # --tiny checks that it runs, not its timings
        )
        jax_s = medians["jax fp32"]
        rows.append(
          {
            "size": size,
            "image_size": list(s),
            "batch": b,
            "ms_per_call": {k: 1e3 * v for k, v in medians.items()},
            "ms_per_image": {k: 1e3 * v / b for k, v in medians.items()},
            "speedup_vs_jax": {k: jax_s / v for k, v in medians.items()},
          }
        )
  return rows


def print_deploy(rows: list[dict], env: dict) -> None:
  names = list(rows[0]["ms_per_call"]) if rows else []
  print(f"# {env['cpu']['model']} ({', '.join(env['cpu']['flags'])}), {env['cpu_count']} cores, {env['date']}")
  print("| model | batch | " + " | ".join(f"{n} ms/img (x jax)" for n in names) + " |")
  print("|---|---|" + "---|" * len(names))
  for r in rows:
    cells = [f"{r['ms_per_image'][n]:.1f} ({r['speedup_vs_jax'][n]:.2f}x)" for n in names]
    hw = "x".join(str(v) for v in r["image_size"])
    print(f"| PDN-{r['size'][0].upper()} {hw} | {r['batch']} | " + " | ".join(cells) + " |")
