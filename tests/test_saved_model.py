"""saved_model: one folder format and one loaded record for both methods. A tiny AST model with random params
goes through predict.load and the jax.export file with equal maps; EfficientAD folders written before meta
had a 'method' still load; an unknown method or a folder that is no model is refused in one line."""

import pathlib

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from efficientad_jax import config as config_lib
from efficientad_jax.efficientad_ast import inference as ast_method
from efficientad_jax.efficientad_ast.config import (
  AstConfig,
  AstModelConfig,
  EfficientNetConfig,
  FlowConfig,
)
from efficientad_jax.serving import export, predict, saved_model

AST_SIZE = 16


def tiny_ast_model(run: pathlib.Path, seed: int = 0) -> pathlib.Path:
  """A saved AST model with random params (no training) in run/model; returns `run`."""
  cfg = AstConfig(
    model=AstModelConfig(image_size=AST_SIZE, pos_channels=8, student_hidden=16, student_blocks=1, ae_channels=8),
    backbone=EfficientNetConfig(width=0.25, depth=0.25, stages=2),
    flow=FlowConfig(blocks=2, hidden=16),
  )
  params = ast_method.init_params(ast_method.build(cfg), jax.random.key(seed), AST_SIZE)
  meta = {"config": config_lib.to_dict(cfg), "threshold": 1.0, "image_size": AST_SIZE, "model_size": "ast"}
  saved_model.save(run / "model", ast_method.METHOD, params, meta)
  return run


def test_an_ast_model_exports_with_the_maps_of_predict_load(tmp_path):
  run = tiny_ast_model(tmp_path / "run")
  model = predict.load(run)
  assert model.method.name == "efficientad_ast" and model.image_size == (AST_SIZE, AST_SIZE)  # (H, W), a square
  assert set(model.detector) == {"backbone", "flow", "student", "student_stats", "autoencoder"}
  path = export.export_model(run, tmp_path / "ast.eadx")
  exported = export.load_exported(path)
  assert exported.meta["method"] == "efficientad_ast" and exported.image_size == (AST_SIZE, AST_SIZE)
  assert exported.meta["mean"] == list(model.inputs.mean) and exported.threshold == model.threshold
  images = np.random.default_rng(0).normal(size=(3, AST_SIZE, AST_SIZE, 3)).astype(np.float32)
  ref = model.predict_fn(model.detector, images, out_size=(AST_SIZE, AST_SIZE))
  for n in (1, 3):  # the symbolic batch size
    out = exported(images[:n])
    assert set(out) == set(ref) == set(export.OUTPUTS)
    for key in export.OUTPUTS:
      np.testing.assert_allclose(
        np.asarray(out[key]), np.asarray(ref[key])[:n], rtol=1e-5, atol=1e-6, err_msg=f"{key}, batch {n}"
      )
  assert np.all(np.isfinite(np.asarray(ref["score"])))


def test_a_model_saved_before_the_method_field_is_efficientad(tmp_path):
  """The layout the EfficientAD trainer wrote before this module existed, written with orbax directly."""
  cfg = config_lib.Config(model=config_lib.ModelConfig(image_size=64))
  c = cfg.model.teacher_channels
  tree = {
    "params": {"teacher": {"w": np.zeros(2, np.float32)}},
    "teacher_stats": {"mean": np.zeros(c, np.float32), "std": np.ones(c, np.float32)},
    "quantiles": {k: np.float32(v) for k, v in (("st_start", 0), ("st_end", 1), ("ae_start", 0), ("ae_end", 1))},
  }
  meta = {"config": config_lib.to_dict(cfg), "threshold": 0.5, "image_size": 64, "format": saved_model.MODEL_FORMAT}
  with ocp.Checkpointer(ocp.CompositeCheckpointHandler()) as ckptr:
    ckptr.save(
      (tmp_path / "model").absolute(),
      ocp.args.Composite(arrays=ocp.args.StandardSave(tree), meta=ocp.args.JsonSave(meta)),
    )
  model = saved_model.load(tmp_path)
  assert model.method.name == model.meta["method"] == "efficientad"
  assert model.inputs == saved_model.Inputs((64, 64), cfg.data.mean, cfg.data.std, cfg.model.dtype, cfg.train.seed)
  np.testing.assert_array_equal(model.detector.teacher_stats.std, np.ones(c))
  assert float(model.detector.quantiles.st_end) == 1.0 and model.threshold == 0.5


def test_unknown_method_and_not_a_model_are_refused(tmp_path):
  with pytest.raises(ValueError, match=r"unknown method 'efficientad_v3'.*known: efficientad, efficientad_ast"):
    saved_model.method("efficientad_v3")
  (tmp_path / "notes.txt").write_text("not a model")
  with pytest.raises(FileNotFoundError, match="is not a saved model.*--model"):
    saved_model.load(tmp_path)
  assert saved_model.model_dir(tmp_path) == tmp_path
  (tmp_path / "model" / "meta").mkdir(parents=True)
  assert saved_model.model_dir(tmp_path) == tmp_path / "model"
