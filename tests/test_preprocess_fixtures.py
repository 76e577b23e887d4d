"""Preprocessing against the reference's own torchvision/PIL output (fixtures README, section 7).

Every case listed in preprocess/preprocess.json is run through the project's function for its op and compared
with the stored CHW float32 array. Names, files, kinds, factors and sizes come from the document, so any
fixture set of this format is checked in full.
"""

import json

import numpy as np
import pytest

from efficientad_jax.data import preprocess

ATOL = 1e-6  # PIL works in uint8 inside every step: only float32 normalisation rounding remains


def _document(fixtures):
  folder = fixtures / "preprocess"
  return folder, json.loads((folder / "preprocess.json").read_text())


def _project_output(folder, doc, case):
  """The project's [S, S, 3] output for one case (mean/std from the document)."""
  rgb = preprocess.decode_image(folder / case["image"])
  size, mean, std = case["image_size"], doc["mean"], doc["std"]
  if case["op"] == "default":
    return preprocess.model_input(rgb, size, mean, std)
  if case["op"] == "autoencoder":
    return preprocess.autoencoder_input(rgb, case["kind"], case["factor"], size, mean, std)
  if case["op"] == "penalty":
    if case["kind"] not in ("color", "grayscale"):
      raise ValueError(f"{case['name']}: unknown penalty kind {case['kind']!r}")
    # The reference: Resize((2S, 2S)) -> optional grayscale -> CenterCrop(S).
    return preprocess.penalty_transform(rgb, case["kind"] == "grayscale", 2 * size, size, mean, std)
  raise ValueError(f"{case['name']}: unknown op {case['op']!r}")


def test_every_case_matches_the_reference(fixtures):
  folder, doc = _document(fixtures)
  expected = np.load(folder / "preprocess.npz")
  assert doc["cases"], "the fixture document lists no cases"
  ops = set()
  for case in doc["cases"]:
    got = _project_output(folder, doc, case).transpose(2, 0, 1)  # HWC -> the fixtures' CHW
    want = expected[case["name"]]
    assert got.shape == want.shape == tuple(case["shape_chw"]), case["name"]
    assert got.dtype == np.float32
    np.testing.assert_allclose(got, want, rtol=0, atol=ATOL, err_msg=case["name"])
    ops.add(case["op"])
  assert ops <= {"default", "autoencoder", "penalty"}


def test_jitter_after_the_resize_would_not_match(fixtures):
  """The order matters: jittering the resized image (the old pipeline's order) misses the reference."""
  folder, doc = _document(fixtures)
  expected = np.load(folder / "preprocess.npz")
  cases = [c for c in doc["cases"] if c["op"] == "autoencoder" and c["kind"] != "brightness"]
  if not cases:
    pytest.skip("no contrast or saturation case in this fixture set")
  misses = []
  for case in cases:
    rgb = preprocess.decode_image(folder / case["image"])
    size = case["image_size"]
    late = preprocess.adjust_color(preprocess.resize(rgb, size), case["kind"], case["factor"])
    late = preprocess.model_input(late, size, doc["mean"], doc["std"]).transpose(2, 0, 1)
    misses.append(np.abs(late - expected[case["name"]]).max() > ATOL)
  assert any(misses)


def test_adjust_color_rejects_an_unknown_kind():
  with pytest.raises(ValueError, match="colour jitter kind"):
    preprocess.adjust_color(np.zeros((4, 4, 3), np.uint8), "hue", 1.1)
