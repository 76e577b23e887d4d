"""EfficientAD-AST training on a tiny synthetic dataset: one step of each stage (compiled once), the whole
`train_ast` run with resume and the saved model, and predict on test records with the standard keys."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from efficientad_jax.config import DataConfig
from efficientad_jax.data import eval_batches, generate_synthetic, make_datasets
from efficientad_jax.efficientad_ast import inference as method
from efficientad_jax.efficientad_ast import train_step, trainer
from efficientad_jax.serving import saved_model
from efficientad_jax.training import optim, parallel
from experiments.configs import ast_synthetic

KEYS = {"map_st", "map_ae", "map_combined", "anomaly_map", "score"}


@pytest.fixture(scope="module")
def cfg(tmp_path_factory):
  base = generate_synthetic(tmp_path_factory.mktemp("data"), layout="mvtec_ad", size=64, num_train=4, num_test=2)
  data = DataConfig(dataset="mvtec_ad", root=str(base.parent), category=base.name, validation_fraction=0.25)
  # The shrunk networks and epochs of `--method efficientad_ast --size small,tiny`, on MVTec-layout data.
  return dataclasses.replace(ast_synthetic.get_config("tiny"), data=data)


@pytest.fixture(scope="module")
def setup(cfg):
  ds = make_datasets(cfg.data, image_size=cfg.model.image_size, seed=cfg.train.seed)
  nets = method.build(cfg)
  params = method.init_params(nets, jax.random.key(0), cfg.model.image_size)
  feats = trainer.extract(nets, params["backbone"], ds.train_eval, cfg.train.batch_size)
  return ds, nets, params, feats


def test_one_step_of_each_stage(cfg, setup):
  ds, nets, params, feats = setup
  assert feats.shape == (3, 4, 4, nets.channels)  # 4 train images, 1 held out for validation
  mesh = parallel.data_mesh()
  tx = optim.make_optimizer(cfg.optim, 2)  # the one optimizer builder; AST: a constant learning rate

  flow_step = parallel.compile_step(lambda s, b: train_step.flow_train_step(nets, tx, s, b), mesh, "rd", "rr")
  state = parallel.replicate(optim.TrainState.create(params["flow"], tx), mesh)
  for i in range(2):
    state, out = flow_step(state, parallel.shard_batch({"features": feats[i : i + 2]}, mesh))
    assert np.isfinite(float(out["loss"]))
  assert int(state.step) == 2 and flow_step._cache_size() == 1
  moved = jax.tree_util.tree_map(lambda a, b: float(jnp.max(jnp.abs(a - b))), state.params, params["flow"])
  assert min(jax.tree_util.tree_leaves(moved)) > 0

  z = jax.jit(lambda p, f: method.teacher(nets, p, f))(state.params, feats[:2])
  batch = parallel.shard_batch({"features": feats[:2], "target": np.asarray(z)}, mesh)
  st_step = parallel.compile_step(lambda s, b, k: train_step.student_train_step(nets, tx, s, b, k), mesh, "rdr", "rr")
  sstate = parallel.replicate(train_step.init_student_state(params, tx), mesh)
  for _ in range(2):
    sstate, losses = st_step(sstate, batch, jax.random.key(1))
  assert set(losses) == {"loss", "loss_st", "loss_ae", "loss_stae", "loss_penalty"} and st_step._cache_size() == 1
  assert float(losses["loss_penalty"]) == 0.0  # no penalty features in the batch
  np.testing.assert_allclose(losses["loss"], losses["loss_st"] + losses["loss_ae"] + losses["loss_stae"], rtol=1e-6)
  changed = jax.tree_util.tree_map(lambda a, b: bool(jnp.any(a != b)), sstate.batch_stats, params["student_stats"])
  assert all(jax.tree_util.tree_leaves(changed))  # BN running statistics updated in training mode
  per_sample = train_step.student_eval_losses(nets, sstate, batch)
  assert per_sample["loss"].shape == (2,)


def test_student_losses_by_hand(setup):
  """The loss is the plain MSE over all elements of the three pairs (no hard quantile)."""
  _, nets, params, feats = setup
  z = np.random.default_rng(0).normal(size=feats[:2].shape).astype(np.float32)
  trainable = {"student": params["student"], "autoencoder": params["autoencoder"]}
  losses, _ = train_step.student_losses(
    nets, trainable, params["student_stats"], {"features": feats[:2], "target": z}, None
  )
  c = nets.channels
  x = np.concatenate([feats[:2], np.asarray(method.cond(nets, 2))], -1)
  s = np.asarray(nets.student.apply({"params": params["student"], "batch_stats": params["student_stats"]}, x))
  a = np.asarray(nets.autoencoder.apply({"params": params["autoencoder"]}, feats[:2]))
  want = (
    ((z - s[..., :c]) ** 2).mean((1, 2, 3)) + ((z - a) ** 2).mean((1, 2, 3)) + ((a - s[..., c:]) ** 2).mean((1, 2, 3))
  )
  np.testing.assert_allclose(losses["loss"], want, rtol=1e-5)


def test_penalty_loss_by_hand(setup):
  """With penalty features: + mean S_P[:C]^2 per sample, the student's own training-mode call on them; the
  running BN statistics come from the training images alone."""
  _, nets, params, feats = setup
  rng = np.random.default_rng(1)
  z = rng.normal(size=feats[:2].shape).astype(np.float32)
  pen = rng.normal(size=feats[:2].shape).astype(np.float32)
  trainable = {"student": params["student"], "autoencoder": params["autoencoder"]}
  key = jax.random.key(3)
  plain, stats = train_step.student_losses(
    nets, trainable, params["student_stats"], {"features": feats[:2], "target": z}, key
  )
  with_pen, stats_pen = train_step.student_losses(
    nets, trainable, params["student_stats"], {"features": feats[:2], "target": z, "penalty": pen}, key
  )
  c = nets.channels
  x_p = np.concatenate([pen, np.asarray(method.cond(nets, 2))], -1)
  s_p, _ = nets.student.apply(
    {"params": params["student"], "batch_stats": params["student_stats"]}, x_p, train=True, mutable=["batch_stats"]
  )
  want = (np.asarray(s_p)[..., :c] ** 2).mean((1, 2, 3))
  np.testing.assert_allclose(with_pen["loss_penalty"], want, rtol=1e-5)
  np.testing.assert_allclose(with_pen["loss"], plain["loss"] + want, rtol=1e-5)
  for k in ("loss_st", "loss_ae", "loss_stae"):
    np.testing.assert_array_equal(with_pen[k], plain[k])
  jax.tree_util.tree_map(np.testing.assert_array_equal, stats_pen, stats)
  with pytest.raises(ValueError, match="training input"):
    train_step.student_losses(
      nets, trainable, params["student_stats"], {"features": feats[:2], "target": z, "penalty": pen}, None
    )


def test_train_ast_with_penalty(cfg, tmp_path):
  """`data.penalty` switches the AST penalty on, as for EfficientAD; a too small penalty_resize is an error."""
  folder = tmp_path / "penalty"
  folder.mkdir()
  for i in range(3):
    Image.fromarray(np.random.default_rng(i).integers(0, 255, (40, 50, 3), dtype=np.uint8)).save(folder / f"{i}.png")
  on = dataclasses.replace(
    cfg,
    data=dataclasses.replace(cfg.data, penalty=str(folder), penalty_resize=32),
    train=dataclasses.replace(cfg.train, flow_epochs=1, student_epochs=1),
  )
  model = saved_model.load(trainer.train_ast(on, tmp_path / "run", progress=False))
  assert model.meta["penalty"] == "on" and np.isfinite(model.threshold)
  small = dataclasses.replace(on, data=dataclasses.replace(on.data, penalty_resize=8))
  with pytest.raises(ValueError, match="data.penalty_resize = 8 is out of range"):  # checked before any work
    trainer.train_ast(small, tmp_path / "small", progress=False)
  assert not (tmp_path / "small").exists()


@pytest.fixture(scope="module")
def cli_run(cfg, tmp_path_factory):
  """`experiments.train --method efficientad_ast` on the module's config (one training shared by the CLI test
  and the resume test: the CLI trains through `trainer.train_ast`)."""
  from efficientad_jax import config as config_lib
  from experiments import train as train_cli

  tmp = tmp_path_factory.mktemp("ast_cli")
  config_file = tmp / "ast_tiny.py"
  config_file.write_text(
    "from efficientad_jax.efficientad_ast.config import AstConfig\nfrom efficientad_jax.config import from_dict\n"
    f"def get_config(arg=''):\n  return from_dict(AstConfig, {config_lib.to_dict(cfg)!r})\n"
  )
  workdir = tmp / "run"
  status = train_cli.main(["--method", "efficientad_ast", "--config", str(config_file), "--workdir", str(workdir)])
  return status, workdir


def test_train_ast_resume_and_predict(cfg, cli_run):
  """The run `cli_run` trained: re-running it through the library resumes, the saved model predicts."""
  _, run = cli_run
  path = run / "model"
  model = saved_model.load(run)
  assert model.meta["method"] == "efficientad_ast" and np.isfinite(model.threshold)
  assert model.meta["student"]["epochs_run"] <= cfg.train.student_epochs
  assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["flow", "student"]

  # Re-running the finished run resumes both stages from their last checkpoints: the same model.
  again = trainer.train_ast(cfg, run, progress=False)
  assert again == path
  same = jax.tree_util.tree_map(
    lambda a, b: bool(np.array_equal(a, b)), model.detector, saved_model.load(path).detector
  )
  assert all(jax.tree_util.tree_leaves(same))
  with pytest.raises(ValueError, match="different config"):
    trainer.train_ast(
      dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, flow_epochs=3)), run, progress=False
    )

  # The folder holds the params alone (AST has no statistics or quantiles); predict on test records gives the
  # standard keys at the original size.
  arrays, meta = saved_model.read(path)
  assert (
    meta["method"] == "efficientad_ast"
    and set(arrays) == {"params"}
    and set(arrays["params"]) == {"backbone", "flow", "student", "student_stats", "autoencoder"}
  )
  ds = make_datasets(cfg.data, image_size=cfg.model.image_size, seed=cfg.train.seed)
  batch = next(iter(eval_batches(ds.test, 2)))
  out = model.predict_fn(model.detector, batch["image"], out_size=(64, 64))
  assert set(out) == KEYS
  assert out["map_st"].shape == out["map_combined"].shape == (2, 4, 4)
  assert out["anomaly_map"].shape == (2, 64, 64) and out["score"].shape == (2,)
  np.testing.assert_allclose(out["map_combined"], 0.5 * out["map_st"] + 0.5 * out["map_ae"], rtol=1e-6)
  np.testing.assert_allclose(out["score"], np.asarray(out["anomaly_map"]).max((1, 2)), rtol=1e-6)


def test_bad_config_errors(cfg):
  with pytest.raises(ValueError, match="multiple of the backbone stride"):
    method.build(dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, image_size=18)))
  with pytest.raises(FileNotFoundError, match="not a saved"):
    saved_model.load("/nonexistent")


def test_cli_trains_and_evaluates_the_ast_method(cli_run):
  """`experiments.train --method efficientad_ast` end to end: the shared train CLI, predict.load and evaluate
  dispatch to the AST variant by the saved model's method."""
  status, workdir = cli_run
  assert status == 0
  _, meta = saved_model.read(workdir / "model")
  assert meta["method"] == "efficientad_ast"
  assert (workdir / "eval" / "metrics.json").exists()
