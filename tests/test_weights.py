"""Weight import: the fixtures' recipe, the torch-free `.pth` reader, layouts, validation, teacher checkpoints.

torch is used here only to write real `.pth` files; everything under test reads them without it.
"""

import collections
import hashlib
import io
import json
import os
import pathlib
import pickle
import subprocess
import sys
import zipfile

import ml_dtypes
import numpy as np
import pytest
import torch

from efficientad_jax.files import pth
from efficientad_jax.models import weights

REPO = pathlib.Path(__file__).resolve().parents[1]
MANIFESTS = ("pdn_small_teacher", "pdn_small_student", "pdn_medium_teacher", "pdn_medium_student", "autoencoder")


def _manifest(fixtures, name):
  return json.loads((fixtures / "networks" / f"manifest_{name}.json").read_text())


@pytest.fixture(scope="module")
def recipe(fixtures):
  """name -> recipe state_dict (nelson keys, OIHW float32), built once per module."""
  return {name: weights.recipe_weights(_manifest(fixtures, name)) for name in MANIFESTS}


def _save(path, state, dtype=None):
  """torch.save of an OrderedDict of torch tensors (a real state_dict file)."""
  tensors = collections.OrderedDict((k, torch.from_numpy(np.array(v))) for k, v in state.items())
  if dtype is not None:
    tensors = collections.OrderedDict((k, v.to(dtype)) for k, v in tensors.items())
  torch.save(tensors, path)
  return path


def _assert_same_state(got, want):
  assert list(got) == list(want)
  for key in want:
    assert got[key].dtype == want[key].dtype and got[key].shape == want[key].shape, key
    assert got[key].tobytes() == want[key].tobytes(), key  # bit-exact


# ---------------------------------------------------------------------------------------------- recipe


@pytest.mark.parametrize("name", MANIFESTS)
def test_recipe_matches_manifest_checks(fixtures, recipe, name):
  manifest = _manifest(fixtures, name)
  state = recipe[name]
  assert list(state) == [t["key"] for t in manifest["tensors"]]
  assert sum(v.size for v in state.values()) == manifest["num_params"]
  for t in manifest["tensors"]:
    array = state[t["key"]]
    assert array.dtype == np.float32 and array.shape == tuple(t["shape"])
    assert hashlib.sha256(array.astype("<f4").tobytes()).hexdigest() == t["check_sha256_float32_le"], t["key"]
    np.testing.assert_allclose(array.sum(dtype=np.float64), t["check_sum_float64"], rtol=1e-12)
    np.testing.assert_array_equal(array.reshape(-1)[:4], np.float32(t["check_first4"]))


# ------------------------------------------------------------------------------------------ pth reader


@pytest.mark.parametrize("name", ["pdn_small_teacher", "autoencoder"])
def test_pth_roundtrip_nelson_is_bit_exact(tmp_path, recipe, name):
  state = recipe[name]
  _assert_same_state(weights.load_state_dict(_save(tmp_path / "w.pth", state)), state)


def test_pth_roundtrip_anomalib_layout(tmp_path, recipe):
  pdn = weights.state_from_pdn_params(
    weights.pdn_params_from_state(recipe["pdn_small_teacher"], "small"), "small", "anomalib"
  )
  ae = weights.state_from_autoencoder_params(weights.autoencoder_params_from_state(recipe["autoencoder"]), "anomalib")
  assert list(pdn)[:2] == ["conv1.weight", "conv1.bias"]
  assert "encoder.enconv6.weight" in ae and "decoder.deconv8.bias" in ae
  for state in (pdn, ae):
    _assert_same_state(weights.load_state_dict(_save(tmp_path / "a.pth", state)), state)
    assert weights.detect_layout(state) == "anomalib"
  # Both layouts give the same Flax params.
  a = weights.autoencoder_params_from_state(weights.load_state_dict(_save(tmp_path / "ae.pth", ae)))
  n = weights.autoencoder_params_from_state(recipe["autoencoder"])
  for layer in n:
    for leaf in ("kernel", "bias"):
      np.testing.assert_array_equal(a[layer][leaf], n[layer][leaf])


def test_pth_real_module_state_dict(tmp_path):
  """A state_dict straight from an nn.Sequential shaped like nelson's PDN-small (keys 0, 3, 6, 8)."""
  torch.manual_seed(0)
  net = torch.nn.Sequential(
    torch.nn.Conv2d(3, 128, 4),
    torch.nn.ReLU(),
    torch.nn.AvgPool2d(2, 2),
    torch.nn.Conv2d(128, 256, 4),
    torch.nn.ReLU(),
    torch.nn.AvgPool2d(2, 2),
    torch.nn.Conv2d(256, 256, 3),
    torch.nn.ReLU(),
    torch.nn.Conv2d(256, 16, 4),
  )
  torch.save(net.state_dict(), tmp_path / "net.pth")
  params = weights.pdn_params_from_state(weights.load_state_dict(tmp_path / "net.pth"), "small")
  assert params["conv4"]["kernel"].shape == (4, 4, 256, 16)
  np.testing.assert_array_equal(params["conv2"]["kernel"], net[3].weight.detach().numpy().transpose(2, 3, 1, 0))
  np.testing.assert_array_equal(params["conv4"]["bias"], net[8].bias.detach().numpy())


@pytest.mark.parametrize("dtype,np_dtype", [(torch.float16, np.float16), (torch.bfloat16, ml_dtypes.bfloat16)])
def test_pth_half_precision(tmp_path, recipe, dtype, np_dtype):
  state = {k: v.astype(np_dtype) for k, v in recipe["pdn_small_teacher"].items()}
  got = weights.load_state_dict(_save(tmp_path / "h.pth", recipe["pdn_small_teacher"], dtype))
  _assert_same_state(got, state)
  params = weights.pdn_params_from_state(got, "small")
  assert params["conv1"]["kernel"].dtype == np.float32
  np.testing.assert_array_equal(params["conv4"]["bias"], state["8.bias"].astype(np.float32))


def test_pth_views_offsets_strides_and_shared_storage(tmp_path):
  base = torch.arange(240, dtype=torch.float32).reshape(12, 20)
  tensors = collections.OrderedDict(
    slice=base[3:9, 2:17:3],  # offset and strides into a larger storage
    transposed=base.t(),  # non-contiguous
    row=base[5],  # offset only
    expanded=torch.tensor([1.0, 2.0, 3.0])[None].expand(4, 3),  # zero stride
    int64=torch.arange(5),
    empty=torch.zeros(0, 3),
    param=torch.nn.Parameter(torch.ones(2, 2)),
  )
  torch.save(tensors, tmp_path / "v.pth")
  got = weights.load_state_dict(tmp_path / "v.pth")
  for key, tensor in tensors.items():
    want = tensor.detach().numpy()
    assert got[key].dtype == want.dtype and got[key].flags.c_contiguous, key
    np.testing.assert_array_equal(got[key], want)
  got["slice"][0, 0] = -1  # copies, not views of one shared buffer
  assert got["transposed"][2, 3] == 62


def test_pth_any_top_level_folder_and_wrapped_state(tmp_path, recipe):
  state = recipe["pdn_small_teacher"]
  torch.save({"state_dict": {k: torch.from_numpy(v) for k, v in state.items()}, "epoch": 3}, tmp_path / "wrapped.pth")
  # Re-zip under another folder name: the reader must not assume it.
  with zipfile.ZipFile(tmp_path / "wrapped.pth") as src, zipfile.ZipFile(tmp_path / "renamed.pth", "w") as dst:
    for info in src.infolist():
      dst.writestr("some_other_name/" + info.filename.split("/", 1)[1], src.read(info))
  _assert_same_state(weights.load_state_dict(tmp_path / "renamed.pth"), state)


# A hand-built pickle (no torch) to test what torch.save never writes: stand-ins are pickled under this
# module's name, then renamed to the torch globals in the protocol-2 GLOBAL opcodes.
class _StubFloatStorage:
  pass


def _stub_rebuild_tensor_v2(*args):
  raise AssertionError("never called")


class _Tensor:
  def __init__(self, offset, size, stride):
    self.args = (_STORAGE, offset, size, stride, False, collections.OrderedDict())

  def __reduce__(self):
    return _stub_rebuild_tensor_v2, self.args


_STORAGE = object()


def _crafted_pth(path, obj, storage=np.arange(6, dtype="<f4"), byteorder="little"):
  class Pickler(pickle.Pickler):
    def persistent_id(self, o):
      return ("storage", _StubFloatStorage, "0", "cpu", storage.size) if o is _STORAGE else None

  buf = io.BytesIO()
  Pickler(buf, protocol=2).dump(obj)
  data = buf.getvalue().replace(f"{__name__}\n_StubFloatStorage\n".encode(), b"torch\nFloatStorage\n")
  data = data.replace(f"{__name__}\n_stub_rebuild_tensor_v2\n".encode(), b"torch._utils\n_rebuild_tensor_v2\n")
  with zipfile.ZipFile(path, "w") as z:
    z.writestr("archive/data.pkl", data)
    z.writestr("archive/byteorder", byteorder)
    z.writestr("archive/data/0", storage.tobytes())
  return path


def test_crafted_file_reads_and_out_of_bounds_views_are_refused(tmp_path):
  ok = weights.load_state_dict(_crafted_pth(tmp_path / "ok.pth", {"x": _Tensor(1, (2, 2), (2, 1))}))
  np.testing.assert_array_equal(ok["x"], [[1, 2], [3, 4]])
  big = weights.load_state_dict(
    _crafted_pth(tmp_path / "big.pth", {"x": _Tensor(1, (2, 2), (2, 1))}, np.arange(6, dtype=">f4"), "big")
  )
  np.testing.assert_array_equal(big["x"], [[1, 2], [3, 4]])
  assert big["x"].dtype == np.float32  # native byte order
  for offset, size, stride in ((3, (2, 2), (2, 1)), (0, (7,), (1,)), (0, (1 << 20, 1 << 20), (0, 0))):
    with pytest.raises(pth.PthError, match="bad.pth"):
      weights.load_state_dict(_crafted_pth(tmp_path / "bad.pth", {"x": _Tensor(offset, size, stride)}))


class _Evil:
  def __init__(self, marker):
    self.marker = marker

  def __reduce__(self):
    return os.system, (f"touch {self.marker}",)


def test_malicious_pickle_is_refused_before_running(tmp_path):
  marker = tmp_path / "pwned"
  path = tmp_path / "evil.pth"
  with zipfile.ZipFile(path, "w") as z:
    z.writestr("archive/data.pkl", pickle.dumps({"0.weight": _Evil(marker)}, protocol=2))
  with pytest.raises(pth.PthError, match=r"evil\.pth.*refused.*system.*model\.state_dict\(\)"):
    weights.load_state_dict(path)
  assert not marker.exists()


def test_whole_module_legacy_and_non_torch_files_are_refused(tmp_path):
  torch.save(torch.nn.Sequential(torch.nn.Conv2d(3, 4, 1)), tmp_path / "module.pth")
  with pytest.raises(pth.PthError, match=r"module\.pth.*torch\.nn.*model\.state_dict\(\)"):
    weights.load_state_dict(tmp_path / "module.pth")
  torch.save({"w": torch.ones(2)}, tmp_path / "legacy.pth", _use_new_zipfile_serialization=False)
  with pytest.raises(pth.PthError, match=r"legacy\.pth: not a zip.*legacy \(pre-1\.6\)"):
    weights.load_state_dict(tmp_path / "legacy.pth")
  torch.save({"lr": 0.1, "step": 3}, tmp_path / "nodict.pth")
  with pytest.raises(pth.PthError, match=r"nodict\.pth: holds a dict.*not a state_dict"):
    weights.load_state_dict(tmp_path / "nodict.pth")


# ------------------------------------------------------------------------------------------ validation


def test_pdn_params_shapes_and_roundtrip(recipe):
  for name, size, c in (
    ("pdn_small_teacher", "small", 384),
    ("pdn_small_student", "small", 768),
    ("pdn_medium_teacher", "medium", 384),
    ("pdn_medium_student", "medium", 768),
  ):
    state = recipe[name]
    params = weights.pdn_params_from_state(state, size)
    assert sorted(params) == [f"conv{i}" for i in range(1, 5 if size == "small" else 7)]
    last = params["conv4" if size == "small" else "conv6"]
    assert last["kernel"].shape == ((4, 4, 256, c) if size == "small" else (1, 1, c, c))
    np.testing.assert_array_equal(params["conv1"]["kernel"], state["0.weight"].transpose(2, 3, 1, 0))
    _assert_same_state(weights.state_from_pdn_params(params, size), state)
  ae = weights.autoencoder_params_from_state(recipe["autoencoder"])
  assert ae["enc6"]["kernel"].shape == (8, 8, 64, 64) and ae["dec8"]["kernel"].shape == (3, 3, 64, 384)
  _assert_same_state(weights.state_from_autoencoder_params(ae), recipe["autoencoder"])


def test_key_and_shape_errors(recipe):
  state = dict(recipe["pdn_small_teacher"])
  with pytest.raises(weights.WeightsError, match=r"f\.pth: not a PDN-medium.*PDN-small.*missing keys \['10\.w"):
    weights.pdn_params_from_state(state, "medium", source="f.pth")
  missing = {k: v for k, v in state.items() if k != "6.bias"}
  with pytest.raises(weights.WeightsError, match=r"missing keys \['6\.bias'\], unexpected keys \[\]"):
    weights.pdn_params_from_state(missing, "small")
  extra = {**state, "9.weight": state["8.bias"]}
  with pytest.raises(weights.WeightsError, match=r"missing keys \[\], unexpected keys \['9\.weight'\]"):
    weights.pdn_params_from_state(extra, "small")
  bad = {**state, "6.weight": state["6.weight"][:, :128]}
  with pytest.raises(weights.WeightsError, match=r"6\.weight: expected \(256, 256, 3, 3\), got \(256, 128, 3, 3\)"):
    weights.pdn_params_from_state(bad, "small")
  # C is free, but it must be consistent between conv4's weight and bias.
  bad_c = {**state, "8.bias": np.zeros(100, np.float32)}
  with pytest.raises(weights.WeightsError, match=r"8\.bias: expected \(384,\), got \(100,\)"):
    weights.pdn_params_from_state(bad_c, "small")
  with pytest.raises(weights.WeightsError, match="unknown state_dict layout"):
    weights.detect_layout({"features.0.weight": 0})
  with pytest.raises(weights.WeightsError, match="size must be"):
    weights.pdn_params_from_state(state, "large")


# ------------------------------------------------------------------------------------- teacher checkpoint


def _run_cli(*args):
  env = {**os.environ, "JAX_PLATFORMS": "cpu"}
  return subprocess.run(
    [sys.executable, "-m", "experiments.import_teacher", *map(str, args)],
    cwd=REPO,
    env=env,
    capture_output=True,
    text=True,
    timeout=120,
  )


def test_cli_end_to_end(tmp_path, recipe):
  state = recipe["pdn_small_teacher"]
  anomalib = weights.state_from_pdn_params(weights.pdn_params_from_state(state, "small"), "small", "anomalib")
  src, out = _save(tmp_path / "pretrained_teacher_small.pth", anomalib), tmp_path / "teacher"
  done = _run_cli(src, "--size", "small", "--out", out)
  assert done.returncode == 0, done.stderr
  assert "384 channels" in done.stdout and "anomalib" in done.stdout
  params, size = weights.load_teacher(out)
  assert size == "small"
  want = weights.pdn_params_from_state(state, "small")
  for layer in want:
    for leaf in ("kernel", "bias"):
      assert np.asarray(params[layer][leaf]).tobytes() == want[layer][leaf].tobytes()
  again = _run_cli(src, "--size", "small", "--out", out)
  assert again.returncode == 1 and "not empty" in again.stderr and "--force" in again.stderr
  assert _run_cli(src, "--size", "small", "--out", out, "--force").returncode == 0
  wrong = _run_cli(src, "--size", "medium", "--out", tmp_path / "m")
  assert wrong.returncode == 1 and "PDN-small" in wrong.stderr and not (tmp_path / "m").exists()


def test_save_teacher_never_replaces_unrelated_folders(tmp_path, recipe):
  params = weights.pdn_params_from_state(recipe["pdn_small_teacher"], "small")
  (tmp_path / "other").mkdir()
  (tmp_path / "other" / "keep.txt").write_text("x")
  with pytest.raises(FileExistsError, match="not a teacher checkpoint"):
    weights.save_teacher(tmp_path / "other", params, "small", "x.pth", force=True)
  assert (tmp_path / "other" / "keep.txt").exists()
  (tmp_path / "empty").mkdir()
  meta = weights.save_teacher(tmp_path / "empty", params, "small", "x.pth")
  assert meta["channels"] == 384 and weights.load_teacher(tmp_path / "empty")[1] == "small"
