"""Teacher distillation: the target against torch's unfold / interpolate / adaptive_avg_pool1d, the data
stream, and the real loop on a tiny config (loss falls, exact resume, the teacher loads in the unpadded PDN)."""

import dataclasses
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from efficientad_jax.distillation import stream, train_step, trainer
from efficientad_jax.models import PDN, weights
from experiments import distill_teacher
from experiments.configs import distill as distill_configs
from tests.test_wide_resnet import save_tiny


def torch_target(layer2, layer3, layer_dim, channels):
  """PatchCore-style aggregation with torch primitives; NCHW in, [B, h, w, channels] out."""
  b, _, h, w = layer2.shape

  def patches(f, size):
    u = F.unfold(f, 3, padding=1, stride=1)  # [B, 9C, hh * ww], channel-major
    u = u.reshape(b, -1, *f.shape[2:])
    if f.shape[2:] != size:
      u = F.interpolate(u, size=size, mode="bilinear", align_corners=False)
    return u.reshape(b, u.shape[1], -1).permute(0, 2, 1).reshape(b * h * w, 1, -1)

  per_layer = [F.adaptive_avg_pool1d(patches(f, (h, w)), layer_dim) for f in (layer2, layer3)]
  stacked = torch.cat(per_layer, dim=1).reshape(b * h * w, 1, 2 * layer_dim)
  return F.adaptive_avg_pool1d(stacked, channels).reshape(b, h, w, channels).numpy()


@pytest.mark.parametrize("length,out", [(4608, 1024), (2048, 384), (288, 256), (10, 3), (5, 8), (7, 7)])
def test_adaptive_pool_matrix_matches_torch(length, out):
  v = np.random.default_rng(length).standard_normal((3, length)).astype(np.float32)
  want = F.adaptive_avg_pool1d(torch.from_numpy(v)[:, None], out)[:, 0].numpy()
  got = jax.jit(lambda v: v @ train_step.adaptive_pool_matrix(length, out))(v)
  np.testing.assert_allclose(np.asarray(got), want, atol=1e-6)


# (C2, C3, layer_dim, channels): generic conv path for both layers; layer3 on the 3x3-mean shortcut
# (9 * 64 / 64 = 9 values per bin, like WRN's 1024 -> 1024); the shortcut with 2 channels per bin.
@pytest.mark.parametrize("c2,c3,layer_dim,channels", [(8, 16, 12, 7), (32, 64, 64, 48), (16, 32, 16, 24)])
def test_target_matches_torch_unfold_interpolate_pool(c2, c3, layer_dim, channels):
  rng = np.random.default_rng(c2 + c3)
  l2 = np.maximum(rng.standard_normal((2, c2, 8, 10)), 0).astype(np.float32)  # post-ReLU like WRN
  l3 = np.maximum(rng.standard_normal((2, c3, 4, 5)), 0).astype(np.float32)
  want = torch_target(torch.from_numpy(l2), torch.from_numpy(l3), layer_dim, channels)
  fn = jax.jit(train_step.aggregate, static_argnums=(2, 3))
  got = np.asarray(fn(l2.transpose(0, 2, 3, 1), l3.transpose(0, 2, 3, 1), layer_dim, channels))
  assert got.shape == (2, 8, 10, channels)
  np.testing.assert_allclose(got, want, atol=1e-5 * want.std())


def test_sizes_must_match():
  cfg = distill_configs.get_config("small")
  train_step.check_sizes(cfg)  # 256 -> 64 = 512 / 8
  train_step.check_sizes(distill_configs.get_config("medium"))
  with pytest.raises(ValueError, match="backbone.image_size = 2 \\* model.image_size"):
    train_step.check_sizes(dataclasses.replace(cfg, backbone=dataclasses.replace(cfg.backbone, image_size=256)))


def write_images(folder, n=8):
  folder.mkdir(parents=True)
  rng = np.random.default_rng(0)
  for i in range(n):
    h, w = 60 + 7 * i, 90 - 3 * i  # not square, not the network sizes
    yy, xx = np.mgrid[:h, :w] / max(h, w)
    base = np.stack([np.sin((i + 1) * 3 * xx + c) * np.cos(5 * yy * (c + 1)) for c in range(3)], -1)
    image = ((base + 0.3 * rng.standard_normal(base.shape)) * 60 + 128).clip(0, 255).astype(np.uint8)
    mode_image = Image.fromarray(image).convert("L") if i == 3 else Image.fromarray(image)
    mode_image.save(folder / f"img_{i}.png")


def tiny_cfg(tmp_path):
  write_images(tmp_path / "imagenet" / "n01")
  save_tiny(tmp_path / "wrn.pth", seed=1)
  cfg = distill_configs.get_config("small,tiny")
  return dataclasses.replace(
    cfg,
    data=dataclasses.replace(cfg.data, imagenet=str(tmp_path / "imagenet")),
    backbone=dataclasses.replace(cfg.backbone, weights=str(tmp_path / "wrn.pth")),
  )


def test_stream_is_seeded_and_grayscale_is_shared(tmp_path):
  cfg = tiny_cfg(tmp_path)
  cfg = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, grayscale_prob=0.5))
  source = stream.image_source(cfg.data.imagenet)
  batches = [next(iter(stream.train_dataset(source, cfg, 8))) for _ in range(2)]
  np.testing.assert_array_equal(batches[0]["backbone"], batches[1]["backbone"])
  b = batches[0]
  assert b["image"].shape == (8, 32, 32, 3) and b["backbone"].shape == (8, 64, 64, 3)
  # Undo the normalisation: a gray element has equal channels at BOTH sizes (one decision per image).
  raw = lambda x: x * np.asarray(cfg.data.std) + np.asarray(cfg.data.mean)
  gray = lambda x: np.abs(np.diff(raw(x), axis=-1)).max(axis=(1, 2, 3)) < 1e-5
  assert (gray(b["image"]) == gray(b["backbone"])).all() and 0 < gray(b["image"]).sum() < 8


def test_distill_end_to_end_resume_and_teacher(tmp_path):
  cfg = tiny_cfg(tmp_path)
  run = tmp_path / "run"
  teacher_dir, history = trainer.distill(cfg, run, progress=False)
  losses = np.array([loss for _, loss in history])
  assert [s for s, _ in history] == list(range(1, 21)) and np.isfinite(losses).all()
  assert losses[-5:].mean() < 0.9 * losses[:3].mean()  # learning, on a normalised target (start ~ 1)
  params, size = weights.load_teacher(teacher_dir)
  assert size == "small"
  # Same names and shapes in the unpadded PDN used for anomaly detection: 64 -> 8 (unpadded) vs 16 (padded).
  out = PDN("small", 384).apply({"params": params}, jnp.ones((1, 64, 64, 3)))
  assert out.shape == (1, 8, 8, 384) and np.isfinite(np.asarray(out)).all()

  # Resume: drop the final checkpoint and teacher; the rerun from step 10 must give the same teacher.
  shutil.rmtree(run / "checkpoints" / "20")
  shutil.rmtree(teacher_dir)
  distill_teacher.main(
    ["--size", "small,tiny", "--imagenet", cfg.data.imagenet, "--backbone", cfg.backbone.weights, "--workdir", str(run)]
  )
  resumed, _ = weights.load_teacher(teacher_dir)
  for a, b in zip(jax.tree_util.tree_leaves(params), jax.tree_util.tree_leaves(resumed)):
    np.testing.assert_array_equal(a, b)
  # A rerun with other settings is not silently continued (the learning rate alone may change: RESUMABLE).
  with pytest.raises(ValueError, match="different config"):
    trainer.distill(
      dataclasses.replace(cfg, optim=dataclasses.replace(cfg.optim, weight_decay=1e-2)), run, progress=False
    )
