"""PyTorch weights <-> Flax params for the PDNs and the autoencoder, the fixtures' weight recipe, and the
on-disk format of an imported teacher (docs/method.md §2.3).

Two PyTorch layouts exist for the same tensors: nelson1425/EfficientAD saves bare `nn.Sequential`s (keys are
layer indices, `0.weight`, `3.weight`, ...), anomalib saves named modules (`conv1.weight`; autoencoder
`encoder.enconv1.weight` .. `decoder.deconv8.weight`). Conv weights are OIHW in PyTorch, HWIO in Flax.
Every conversion checks the full key set and every shape against the architecture, so a wrong file fails
here with a message naming the key instead of deep inside a jitted forward pass.
"""

from __future__ import annotations

import json
import math
import pathlib
from collections.abc import Mapping
from typing import Any

import numpy as np

from efficientad_jax.files import pth
from efficientad_jax.models.autoencoder import ARCHITECTURE as AUTOENCODER
from efficientad_jax.models.autoencoder import bottleneck_kernel
from efficientad_jax.models.pdn import ARCHITECTURES

AUTOENCODER_WEIGHTS_SIZE = 256  # the image size nelson1425's and anomalib's autoencoder weights are for

# (flax layer, nelson nn.Sequential index, HWIO kernel shape) from the autoencoder's layer table; 'C' is the
# output width, read from the file. The bottleneck's kernel is the one of the reference size, 256.
_AE_SPEC = tuple(
  (layer.name, layer.torch_index, (k, k, layer.cin, layer.cout or "C"))
  for layer in AUTOENCODER
  for k in (layer.kernel or bottleneck_kernel(AUTOENCODER_WEIGHTS_SIZE),)
)
LAYOUTS = ("nelson", "anomalib")
TEACHER_FORMAT = 1  # bump when the saved teacher layout changes


class WeightsError(ValueError):
  """PDN or backbone (WideResNet) weights that do not fit the architecture; names the source and the keys."""


def load_state_dict(path: str | pathlib.Path) -> dict[str, np.ndarray]:
  """The tensors of a PyTorch state_dict `.pth` as NumPy arrays, read without torch (see `pth.py`)."""
  return pth.load_state_dict(str(path))


def detect_layout(state: Mapping[str, Any]) -> str:
  """'nelson' (keys `0.weight`, ...) or 'anomalib' (keys `conv1.weight`, `encoder.enconv1.weight`, ...)."""
  heads = {key.split(".")[0] for key in state}
  if heads and all(h.isdigit() for h in heads):
    return "nelson"
  if heads and heads <= {f"conv{i}" for i in range(1, 7)} | {"encoder", "decoder"}:
    return "anomalib"
  raise WeightsError(
    f"unknown state_dict layout (keys {sorted(state)[:6]}...); expected nelson1425 "
    "(`0.weight`, `3.weight`, ...) or anomalib (`conv1.weight`, ...) names"
  )


def _torch_name(layer: str, index: int, layout: str) -> str:
  """The PyTorch module name of a Flax layer in `layout`."""
  if layout == "nelson":
    return str(index)
  if layout != "anomalib":
    raise WeightsError(f"layout must be one of {LAYOUTS}, got {layout!r}")
  if layer.startswith("enc"):
    return f"encoder.enconv{layer[3:]}"
  if layer.startswith("dec"):
    return f"decoder.deconv{layer[3:]}"
  return layer


def _hwio(shape: tuple, channels: int) -> tuple[int, ...]:
  return tuple(channels if d == "C" else d for d in shape)


def _check_keys(state: Mapping[str, Any], expected: list[str], what: str, source: str) -> None:
  missing = [k for k in expected if k not in state]
  unexpected = sorted(set(state) - set(expected))
  if missing or unexpected:
    hint = ""
    layers = sum(k.endswith(".weight") for k in state)
    if what.startswith("PDN") and layers in (4, 6):
      hint = f" (the file holds {layers} conv layers: PDN-{'small' if layers == 4 else 'medium'})"
    raise WeightsError(f"{source}: not a {what} state_dict{hint}: missing keys {missing}, unexpected keys {unexpected}")


def _params_from_state(state: Mapping[str, Any], spec: tuple, layout: str | None, what: str, source: str) -> dict:
  """Validated HWIO float32 Flax params from an OIHW state_dict, for the layers of `spec`."""
  layout = layout or detect_layout(state)
  names = [_torch_name(layer, index, layout) for layer, index, _ in spec]
  _check_keys(state, [f"{n}.{p}" for n in names for p in ("weight", "bias")], what, source)
  # The output width C is the only free dimension; read it from the first layer that produces it.
  first_c = next(n for n, (_, _, shape) in zip(names, spec) if shape[3] == "C")
  channels = int(np.shape(state[f"{first_c}.weight"])[0])
  params, errors = {}, []
  for name, (layer, _, shape) in zip(names, spec):
    h, w, i, o = _hwio(shape, channels)
    weight, bias = np.asarray(state[f"{name}.weight"]), np.asarray(state[f"{name}.bias"])
    for key, array, expect in ((f"{name}.weight", weight, (o, i, h, w)), (f"{name}.bias", bias, (o,))):
      if array.shape != expect:
        errors.append(f"{key}: expected {expect}, got {array.shape}")
      elif not np.issubdtype(array.dtype, np.floating) and array.dtype.name != "bfloat16":
        errors.append(f"{key}: expected floating point, got {array.dtype}")
    if not errors:
      params[layer] = {
        "kernel": np.ascontiguousarray(weight.transpose(2, 3, 1, 0), np.float32),
        "bias": bias.astype(np.float32),
      }
  if errors:
    raise WeightsError(f"{source}: shape mismatch for {what} with C={channels} ({layout} layout): " + "; ".join(errors))
  return params


def _state_from_params(params: Mapping[str, Any], spec: tuple, layout: str) -> dict[str, np.ndarray]:
  """The inverse of `_params_from_state`: OIHW float32 arrays in state_dict order."""
  state = {}
  for layer, index, _ in spec:
    name = _torch_name(layer, index, layout)
    state[f"{name}.weight"] = np.ascontiguousarray(np.asarray(params[layer]["kernel"]).transpose(3, 2, 0, 1))
    state[f"{name}.bias"] = np.asarray(params[layer]["bias"])
  return state


def _pdn_spec(size: str) -> tuple:
  """The PDN's layers as (flax name, nelson nn.Sequential index, HWIO kernel shape), from the one architecture
  table (`models.pdn.ARCHITECTURES`): each ReLU and pooling layer takes an index of the Sequential too."""
  if size not in ARCHITECTURES:
    raise WeightsError(f"PDN size must be one of {sorted(ARCHITECTURES)}, got {size!r}")
  spec, index = [], 0
  for i, (k, cin, cout, _, relu, pool) in enumerate(ARCHITECTURES[size], start=1):
    spec.append((f"conv{i}", index, (k, k, "C" if cin is None else cin, "C" if cout is None else cout)))
    index += 1 + relu + pool
  return tuple(spec)


def pdn_params_from_state(
  state: Mapping[str, Any], size: str, layout: str | None = None, *, source: str = "state_dict"
) -> dict:
  """Flax params {'conv1': {'kernel', 'bias'}, ...} of a PDN from a PyTorch state_dict.

  Args:
    state: name -> OIHW array, nelson or anomalib names.
    size: 'small' or 'medium'.
    layout: 'nelson' | 'anomalib'; None detects it from the keys.
    source: what to call the state in error messages (the file name).

  Returns:
    HWIO float32 params; the output width (384 teacher, 768 student) is taken from the state.

  Raises:
    WeightsError: missing or unexpected keys, or a shape that does not fit PDN-`size`.
  """
  return _params_from_state(state, _pdn_spec(size), layout, f"PDN-{size}", source)


def autoencoder_params_from_state(
  state: Mapping[str, Any], layout: str | None = None, *, source: str = "state_dict"
) -> dict:
  """Flax params {'enc1'..'enc6', 'dec1'..'dec8'} of the autoencoder from a PyTorch state_dict."""
  return _params_from_state(state, _AE_SPEC, layout, "autoencoder", source)


def state_from_pdn_params(params: Mapping[str, Any], size: str, layout: str = "nelson") -> dict[str, np.ndarray]:
  """PyTorch state_dict arrays (OIHW, `layout` names) of Flax PDN params; inverse of `pdn_params_from_state`."""
  return _state_from_params(params, _pdn_spec(size), layout)


def state_from_autoencoder_params(params: Mapping[str, Any], layout: str = "nelson") -> dict[str, np.ndarray]:
  """PyTorch state_dict arrays of Flax autoencoder params; inverse of `autoencoder_params_from_state`."""
  return _state_from_params(params, _AE_SPEC, layout)


def recipe_weights(manifest: Mapping[str, Any]) -> dict[str, np.ndarray]:
  """The fixtures' deterministic weights (fixtures/README.md section 1), nelson names, OIHW float32.

  The product is taken in float32 on purpose: float64 then a cast differs in the last bit from the
  reference tensors (checked against the manifest's SHA-256 in the tests).
  """
  out = {}
  for t in manifest["tensors"]:
    shape = tuple(t["shape"])
    if t["key"].endswith(".bias"):
      scale = 0.05
    else:
      scale = math.sqrt(2.0 / (shape[1] * shape[2] * shape[3]))  # conv weight: fan_in = in * kh * kw
    rng = np.random.default_rng([t["seed"], t["index"]])
    out[t["key"]] = rng.standard_normal(shape).astype(np.float32) * np.float32(scale)
  return out


def _is_teacher_checkpoint(directory: pathlib.Path) -> bool:
  meta = directory / "meta" / "metadata"
  try:
    return json.loads(meta.read_text()).get("format") == TEACHER_FORMAT
  except (OSError, ValueError, AttributeError):
    return False


def save_teacher(
  directory: str | pathlib.Path,
  params: Mapping[str, Any],
  size: str,
  source: str,
  *,
  layout: str = "",
  force: bool = False,
) -> dict:
  """Writes teacher params as an orbax checkpoint with items 'params' and 'meta' (JSON).

  Args:
    directory: target folder; it must not exist or be empty. With `force`, a previous teacher checkpoint
      there is replaced; any other non-empty folder is still refused (never delete unrelated files).
    params: PDN params as from `pdn_params_from_state` (validated again here).
    size: 'small' or 'medium'.
    source: where the weights came from (kept for provenance).
    layout: the source layout, for provenance.
    force: replace an existing teacher checkpoint.

  Returns:
    The meta dict written: format, size, channels, source, layout.
  """
  import orbax.checkpoint as ocp

  directory = pathlib.Path(directory).absolute()
  # Round trip through the state_dict form: one validation path for imported and hand-built params.
  params = pdn_params_from_state(state_from_pdn_params(params, size), size, "nelson", source=str(source))
  if directory.exists() and any(directory.iterdir()):
    if not force:
      raise FileExistsError(f"{directory} exists and is not empty; pass force=True (--force) to replace it")
    if not _is_teacher_checkpoint(directory):
      raise FileExistsError(f"{directory} is not a teacher checkpoint; refusing to replace it even with force")
  elif directory.exists():
    directory.rmdir()  # orbax wants to create the folder itself
  meta = {
    "format": TEACHER_FORMAT,
    "size": size,
    "channels": _channels(params, size),
    "source": str(source),
    "layout": layout,
  }
  with ocp.Checkpointer(ocp.CompositeCheckpointHandler()) as ckpt:
    ckpt.save(
      directory, ocp.args.Composite(params=ocp.args.StandardSave(params), meta=ocp.args.JsonSave(meta)), force=force
    )
  return meta


def _channels(params: Mapping[str, Any], size: str) -> int:
  return int(np.shape(params[_pdn_spec(size)[-1][0]]["bias"])[0])


def load_teacher(directory: str | pathlib.Path) -> tuple[dict, str]:
  """(params, size) of a teacher written by `save_teacher`; params are validated NumPy float32 arrays."""
  import orbax.checkpoint as ocp

  directory = pathlib.Path(directory).absolute()
  if not _is_teacher_checkpoint(directory):
    raise FileNotFoundError(
      f"no teacher checkpoint (format {TEACHER_FORMAT}) at {directory} "
      "(train.teacher_checkpoint): import one with `python -m experiments.import_teacher "
      "--download small --out DIR` (or a .pth: see its --help), then pass that DIR"
    )
  with ocp.Checkpointer(ocp.CompositeCheckpointHandler()) as ckpt:
    restored = ckpt.restore(
      directory, ocp.args.Composite(params=ocp.args.StandardRestore(), meta=ocp.args.JsonRestore())
    )
  size = restored["meta"]["size"]
  params = pdn_params_from_state(state_from_pdn_params(restored["params"], size), size, "nelson", source=str(directory))
  return params, size


def import_teacher(path: str | pathlib.Path, size: str, out_dir: str | pathlib.Path, *, force: bool = False) -> dict:
  """Reads a teacher `.pth` (nelson or anomalib layout, detected), validates it and saves it to `out_dir`.

  Returns:
    The meta dict written by `save_teacher`.
  """
  path = pathlib.Path(path).absolute()
  state = load_state_dict(path)
  layout = detect_layout(state)
  params = pdn_params_from_state(state, size, layout, source=str(path))
  return save_teacher(out_dir, params, size, str(path), layout=layout, force=force)
