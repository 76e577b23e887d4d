"""ONNX export (efficientad_jax/onnx_graph.py): onnxruntime against the project's own predict, PDN-S and
PDN-M at a tiny size with random weights, and PDN-S at a rectangular size, several batch sizes; the AST refusal;
the CLI; scoring an image with PIL + NumPy + onnxruntime only (no JAX in that process)."""

import dataclasses
import json
import os
import pathlib
import re
import subprocess
import sys

import jax
import numpy as np
import pytest
from PIL import Image

from efficientad_jax import config as config_lib
from efficientad_jax import models
from efficientad_jax.config import Config, MapConfig, ModelConfig
from efficientad_jax.efficientad import inference, normalization
from efficientad_jax.efficientad.inference import Detector
from efficientad_jax.serving import onnx_graph, predict, saved_model

ort = pytest.importorskip("onnxruntime")
pytest.importorskip("onnx")

REPO = pathlib.Path(__file__).resolve().parents[1]
SIZE = 64  # the smallest side the autoencoder accepts
# The models exported: PDN size, image size (H, W). A rectangular one: every H/W mix-up would show.
MODELS = {"small": ("small", (SIZE, SIZE)), "medium": ("medium", (SIZE, SIZE)), "small-64x96": ("small", (64, 96))}
# Not the defaults, so that a constant written into the graph instead of read from the model would show.
MAPS = MapConfig(scale=0.2, st_weight=0.3, ae_weight=0.7, pad=3)


def random_params(nets: models.Models, rng: np.random.Generator, hw=(SIZE, SIZE)) -> dict:
  """PyTorch-default-like random params in the structure of `models.init_params` (shapes by eval_shape)."""
  shapes = jax.eval_shape(lambda k: models.init_params(nets, k, hw), jax.random.key(0))

  def draw(s):
    fan_in = int(np.prod(s.shape[:-1])) if len(s.shape) > 1 else 64
    return rng.uniform(-1, 1, s.shape).astype(np.float32) / np.sqrt(fan_in)

  return jax.tree_util.tree_map(draw, shapes)


def images(rng: np.random.Generator, n: int, hw=(SIZE, SIZE)) -> np.ndarray:
  rgb = rng.uniform(0, 1, (n, *hw, 3)).astype(np.float32)
  return ((rgb - np.float32(config_lib.IMAGENET_MEAN)) / np.float32(config_lib.IMAGENET_STD)).astype(np.float32)


def save_model(root: pathlib.Path, name: str) -> pathlib.Path:
  """A saved model (`MODELS[name]`) with random networks, random teacher statistics and quantiles fitted on
  random images."""
  size, hw = MODELS[name]
  rng = np.random.default_rng(list(MODELS).index(name))
  cfg = Config(model=ModelConfig(size=size, image_size=hw), maps=MAPS)
  nets, predict_fn = inference.compiled_predict(cfg.model, cfg.maps)
  c = cfg.model.teacher_channels
  stats = normalization.TeacherStats(
    rng.normal(0, 0.1, c).astype(np.float32), rng.uniform(0.5, 2.0, c).astype(np.float32)
  )
  unit = normalization.MapQuantiles(*(np.float32(v) for v in (0, 1, 0, 1)))
  detector = Detector(params=random_params(nets, rng, hw), teacher_stats=stats, quantiles=unit)
  out = predict_fn(detector, images(rng, 3, hw), out_size=hw)  # raw maps don't depend on quantiles
  q = normalization.fit_map_quantiles(np.asarray(out["map_st"]), np.asarray(out["map_ae"]), 0.1, 0.9)
  meta = {
    "config": config_lib.to_dict(cfg),
    "threshold": 0.125,
    "threshold_rule": "0.99 quantile of validation image scores",
    "validation_scores": [0.05, 0.07, 0.1, 0.125],
    "image_size": list(hw),
    "model_size": size,
    "teacher": "random",
    "steps": 0,
  }
  saved_model.save(root / "run" / "model", "efficientad", detector.replace(quantiles=q), meta)
  return root / "run"


@pytest.fixture(scope="module", params=list(MODELS))
def exported(request, tmp_path_factory):
  """(run folder, .onnx path) per PDN size."""
  root = tmp_path_factory.mktemp(f"onnx_{request.param}")
  run = save_model(root, request.param)
  return run, onnx_graph.export_onnx(run, root / "model.onnx")


def test_onnxruntime_matches_predict(exported):
  run, path = exported
  model = predict.load(run)
  session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
  assert [i.name for i in session.get_inputs()] == ["image"]
  assert [o.name for o in session.get_outputs()] == ["anomaly_map", "score", "map_combined"]
  rng = np.random.default_rng(7)
  for batch in (1, 3, 2):
    x = images(rng, batch, model.image_size)
    anomaly_map, score, combined = session.run(None, {"image": x})
    ref = model.predict_fn(model.detector, x, out_size=model.image_size)
    assert anomaly_map.shape == (batch, *model.image_size) and score.shape == (batch,)
    assert float(np.abs(ref["anomaly_map"]).max()) > 0.01  # not a trivially zero map
    np.testing.assert_allclose(anomaly_map, np.asarray(ref["anomaly_map"]), rtol=0, atol=1e-4)
    np.testing.assert_allclose(score, np.asarray(ref["score"]), rtol=0, atol=1e-4)
    np.testing.assert_allclose(combined, np.asarray(ref["map_combined"]), rtol=0, atol=1e-4)


def test_metadata_holds_threshold_size_and_preprocessing(exported):
  import onnx

  run, path = exported
  model = predict.load(run)
  props = {p.key: p.value for p in onnx.load(str(path)).metadata_props}
  assert float(props["threshold"]) == model.threshold
  h, w = model.image_size
  assert (int(props["image_height"]), int(props["image_width"])) == (h, w)
  assert props["image_size"] == (f"{h}" if h == w else f"{h}x{w}") and props["model_size"] == model.cfg.model.size
  assert json.loads(props["mean"]) == list(config_lib.IMAGENET_MEAN)
  assert json.loads(props["std"]) == list(config_lib.IMAGENET_STD)
  assert "PIL" in props["preprocessing"] and "bilinear" in props["preprocessing"]
  assert json.loads(props["map_config"])["pad"] == MAPS.pad
  # What a caller needs for the normalised score: the validation normals' median and the formula.
  assert json.loads(props["validation_median"]) == pytest.approx(0.085)  # the median of the saved scores
  assert props["normalized_score"] == "0.5 * (score - validation_median) / (threshold - validation_median)"
  assert "quantile of validation image scores" in props["threshold_rule"]


def test_ast_models_are_refused(exported):
  model = predict.load(exported[0])
  ast = dataclasses.replace(model, method=saved_model.method("efficientad_ast"))
  with pytest.raises(onnx_graph.OnnxExportError, match="supports EfficientAD PDN models only.*AST"):
    onnx_graph.to_onnx(ast, "runs/ast")
  with pytest.raises(onnx_graph.OnnxExportError, match="opset"):
    onnx_graph.to_onnx(model, opset=13)


def test_a_saved_ast_model_is_refused_in_one_line(tmp_path):
  from tests.test_saved_model import tiny_ast_model

  tiny_ast_model(tmp_path / "ast")
  with pytest.raises(onnx_graph.OnnxExportError) as e:
    onnx_graph.export_onnx(tmp_path / "ast", tmp_path / "ast.onnx")
  assert "\n" not in str(e.value) and "'efficientad_ast'" in str(e.value) and "AST" in str(e.value)
  assert not (tmp_path / "ast.onnx").exists()


def readme_snippet(model: pathlib.Path, image: pathlib.Path) -> str:
  """The README's onnxruntime block as it stands, its two paths replaced, in a process where JAX cannot load."""
  text = (REPO / "README.md").read_text()
  code = re.search(r"<!-- onnxruntime snippet -->\n```python\n(.*?)```", text, re.S).group(1)
  assert 'MODEL, IMAGE = "model.onnx", "part.png"' in code
  code = code.replace('MODEL, IMAGE = "model.onnx", "part.png"', f"MODEL, IMAGE = {str(model)!r}, {str(image)!r}")
  return 'import sys\nsys.modules["jax"] = None  # any `import jax` now fails\nsys.modules["flax"] = None\n' + code


def run_python(args: list[str]) -> subprocess.CompletedProcess:
  env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=str(REPO))
  return subprocess.run([sys.executable, *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=300)


@pytest.mark.parametrize("exported", ["small", "small-64x96"], indirect=True)  # square and rectangular inputs
def test_cli_and_scoring_without_jax(exported, tmp_path):
  run, _ = exported
  model = predict.load(run)
  out = tmp_path / "cli.onnx"
  proc = run_python(["-m", "experiments.export", "--model", str(run), "--format", "onnx", "--out", str(out)])
  assert proc.returncode == 0, proc.stderr
  assert "onnx" in proc.stdout and out.is_file()
  rng = np.random.default_rng(3)
  # An image of another size (the snippet's resize = predict.prepare's), and one at the model's size, where the
  # map needs no resize and the snippet's score, decision and normalised score are predict_file's own.
  odd, native = tmp_path / "odd.png", tmp_path / "native.png"
  Image.fromarray(rng.integers(0, 256, (90, 100, 3), dtype=np.uint8)).save(odd)
  h, w = model.image_size
  Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(native)
  for image in (odd, native):
    proc = run_python(["-c", readme_snippet(out, image)])
    assert proc.returncode == 0, proc.stderr
    score, decision, normalized = proc.stdout.split()
    x, _ = predict.prepare(image, model.image_size, model.cfg.data.mean, model.cfg.data.std)
    ref = float(model.predict_fn(model.detector, x[None], out_size=model.image_size)["score"][0])
    assert float(score) == pytest.approx(ref, abs=1e-4)
  result = predict.predict_file(model, native)
  assert float(score) == pytest.approx(result.score, abs=1e-4)
  assert decision == ("anomalous" if result.anomalous else "normal")
  if np.isnan(result.normalized_score):
    assert normalized == "None"
  else:
    assert float(normalized) == pytest.approx(result.normalized_score, abs=1e-3)
