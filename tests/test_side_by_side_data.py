"""The side-by-side tool's data set (tools/side_by_side.py): the MVTec AD layout it builds from one photograph, and
how the other commands find its category; the crops of tools/trajectory.py; the reference's decay ablation. The
photograph is a generated one here (scikit-image is not a test dependency); the tool reads scikit-image's bundled
files by name."""

import numpy as np
import pytest
from PIL import Image

from tools import side_by_side


def _photo(size: tuple[int, int]):
  rng = np.random.default_rng(0)
  return lambda name: Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))


def test_the_category_is_named_after_the_photograph_and_holds_every_folder(tmp_path, monkeypatch):
  monkeypatch.setattr(side_by_side, "skimage_photo", _photo((320, 430)))
  monkeypatch.setattr(side_by_side, "COUNTS", {"train": 3, "good": 2, "defect_per_type": 2})  # a small set, quick
  base = side_by_side.make_dataset(tmp_path, seed=1, photo_name="gravel.png")

  assert base == tmp_path / "mvtec" / "gravel"
  assert side_by_side.category(tmp_path) == "gravel"
  counts = side_by_side.COUNTS
  assert len(list((base / "train" / "good").glob("*.png"))) == counts["train"]
  assert len(list((base / "test" / "good").glob("*.png"))) == counts["good"]
  for kind in side_by_side.DEFECTS:
    images = sorted((base / "test" / kind).glob("*.png"))
    masks = sorted((base / "ground_truth" / kind).glob("*_mask.png"))
    assert len(images) == len(masks) == counts["defect_per_type"]
    mask = np.asarray(Image.open(masks[0]))
    assert mask.shape == (side_by_side.CROP, side_by_side.CROP) and mask.max() == 255
  assert Image.open(base / "train" / "good" / "000.png").size == (side_by_side.CROP, side_by_side.CROP)


def test_a_folder_with_two_categories_or_a_too_small_photograph_is_one_clear_error(tmp_path, monkeypatch):
  (tmp_path / "mvtec" / "a").mkdir(parents=True)
  (tmp_path / "mvtec" / "b").mkdir()
  with pytest.raises(SystemExit, match="holds 2 categories"):
    side_by_side.category(tmp_path)

  monkeypatch.setattr(side_by_side, "skimage_photo", _photo((200, 200)))
  with pytest.raises(SystemExit, match="crops need"):
    side_by_side.make_dataset(tmp_path / "small", photo_name="tiny.png")


def test_the_trajectory_crops_the_named_photograph(monkeypatch):
  """tools/trajectory.py --photo NAME: its crops are windows of that photograph, by name."""
  from tools import trajectory

  photos = {name: _photo((300 + 10 * i, 260))(name) for i, name in enumerate(("ihc.png", "grass.png"))}
  monkeypatch.setattr(trajectory, "skimage_photo", photos.__getitem__)
  for name, photo in photos.items():
    pixels = np.asarray(photo)
    crops = trajectory.photo_images(3, 64, seed=5, photo_name=name, crop=40)
    rng = np.random.default_rng(5)
    for crop in crops:
      y, x = (int(rng.integers(0, n - 40 + 1)) for n in pixels.shape[:2])
      np.testing.assert_array_equal(crop, pixels[y : y + 40, x : x + 40])
  assert trajectory.PHOTO == "ihc.png"  # the default, the photograph of items 1-9


def test_the_reference_decay_ablation_replaces_only_steplr_gamma(monkeypatch):
  """`reference --decay-factor F`: the code run before the reference's main() makes its StepLR(..., gamma=0.1)
  decay by F; without the flag (decay "") StepLR is PyTorch's own."""
  import torch

  monkeypatch.setattr(torch.optim.lr_scheduler, "StepLR", torch.optim.lr_scheduler.StepLR)  # restored after

  def lr_after(steps: int) -> float:
    param = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.Adam([param], lr=1e-4)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=3, gamma=0.1)  # as the reference calls it
    for _ in range(steps):
      opt.step()
      sched.step()
    return sched.get_last_lr()[0]

  own = torch.optim.lr_scheduler.StepLR
  exec(side_by_side._DECAY_ABLATION, {"torch": torch, "decay": ""})
  assert torch.optim.lr_scheduler.StepLR is own
  assert lr_after(4) == pytest.approx(1e-5)
  for factor in ("1.0", "0.5"):
    exec(side_by_side._DECAY_ABLATION, {"torch": torch, "decay": factor})
    assert lr_after(2) == pytest.approx(1e-4) and lr_after(4) == pytest.approx(1e-4 * float(factor))
    torch.optim.lr_scheduler.StepLR = own


def test_each_side_records_the_learning_rate_of_every_update(tmp_path, monkeypatch):
  """The table's learning-rate column: the reference's rates as its optimizer used them (the hook run before its
  main(), here around PyTorch's Adam + StepLR as the reference builds them, with and without the decay ablation),
  ours from the saved config by the schedule the trainer builds; both the same list for the same setting."""
  import torch

  from efficientad_jax import config_tree
  from efficientad_jax.config import Config

  monkeypatch.setattr(torch.optim.lr_scheduler, "StepLR", torch.optim.lr_scheduler.StepLR)  # restored after
  steps, own = 40, torch.optim.lr_scheduler.StepLR
  for decay in ("", "1.0"):
    ns = {"torch": torch, "decay": decay}
    exec(side_by_side._DECAY_ABLATION + side_by_side._LR_RECORDER, ns)
    param = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.Adam([param], lr=1e-4, weight_decay=1e-5)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=int(0.95 * steps), gamma=0.1)
    for _ in range(steps):
      opt.step()
      sched.step()
    ns["lr_hook"].remove()
    torch.optim.lr_scheduler.StepLR = own
    theirs = side_by_side.lr_changes(ns["learning_rates"])

    sets = [f"train.steps={steps}"] + ([f"optim.decay_factor={decay}"] if decay else [])
    run = tmp_path / f"run{decay}"
    run.mkdir()
    (run / "config.json").write_text(config_tree.to_json(config_tree.override(Config(), sets)))
    ours = side_by_side._our_learning_rates(run)

    assert [i for i, _ in theirs] == [i for i, _ in ours] == ([0, 38] if not decay else [0])
    np.testing.assert_allclose([lr for _, lr in ours], [lr for _, lr in theirs], rtol=1e-6)
  assert side_by_side.lr_text([[0, 1e-4], [38, 1e-5]]) == "1e-04; 1e-05 from 38"
  assert side_by_side.lr_text(None) == "not recorded"
