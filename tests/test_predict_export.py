"""predict CLI (subprocess, mixed and broken files) and the jax.export artifact (parity, in a process
without flax)."""

import json
import os
import pathlib
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import tifffile
from PIL import Image

from efficientad_jax.data import make_datasets, preprocess
from efficientad_jax.serving import export, predict
from tests.conftest import REPO
from tests.test_evaluate import SIZE, make_run, padded


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> pathlib.Path:
  return make_run(tmp_path_factory.mktemp("predict"), "mvtec_ad")


def run_python(args, **kwargs) -> subprocess.CompletedProcess:
  env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=str(REPO))
  return subprocess.run(
    [sys.executable, *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=120, **kwargs
  )


def test_predict_cli_mixed_sizes_and_a_corrupt_file(run, tmp_path):
  images, out = tmp_path / "images", tmp_path / "out"
  images.mkdir()
  source = run.parent / "data" / "widget" / "test" / "stain" / "000.png"
  Image.open(source).save(images / "part.png")
  Image.open(source).convert("L").resize((80, 48)).save(images / "gray.jpg")  # another size, 1 channel
  (images / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n definitely not a png")
  proc = run_python(["-m", "experiments.predict", "--model", str(run), "--images", str(images), "--out", str(out)])
  assert proc.returncode != 0
  assert "broken.png" in proc.stderr and "corrupt" in proc.stderr
  lines = [line.split("\t") for line in proc.stdout.splitlines() if not line.startswith("#")]
  assert sorted(pathlib.Path(name).name for name, *_ in lines) == ["gray.jpg", "part.png"]
  model = predict.load(run)
  threshold, median = model.threshold, float(np.median(model.validation_scores))
  for name, score, decision, normalized in lines:
    stem = pathlib.Path(name).stem
    amap = tifffile.imread(out / f"{stem}.tiff")
    assert amap.shape == ((48, 80) if stem == "gray" else (SIZE, SIZE)) and amap.dtype == np.float32
    assert float(score) == pytest.approx(float(amap.max()), rel=1e-5)
    assert decision == ("anomalous" if float(score) > threshold else "normal")
    if threshold > median:
      assert float(normalized) == pytest.approx(0.5 * (float(score) - median) / (threshold - median), abs=1e-4)
    else:  # the tiny run's validation normals all score alike: no scale to normalise on
      assert normalized == "nan"
    assert Image.open(out / f"{stem}_overlay.png").size == amap.shape[::-1]
  assert len((out / "predictions.csv").read_text().splitlines()) == 3  # header + 2 images
  # report.html: one card per predicted image, with its score, decision, overlay and thumbnail.
  from tests.test_report import page_data

  cards = {pathlib.Path(c["name"]).name: c for c in page_data((out / "report.html").read_text())}
  assert sorted(cards) == ["gray.jpg", "part.png"]
  for name, score, decision, _ in lines:
    card = cards[pathlib.Path(name).name]
    assert card["score"] == pytest.approx(float(score), rel=1e-5) and card["group"] == "images"
    assert card["outcome"] == ("flagged" if decision == "anomalous" else "passed")
    assert card["full"] == f"{pathlib.Path(name).stem}_overlay.png" and (out / card["thumb"]).is_file()


def test_predict_cli_takes_a_threshold_or_a_false_positive_rate(run, tmp_path):
  """The model records its validation normals' scores: --fpr picks the threshold from them (at most that share
  of them above it), --threshold takes a number; the header line says which rule decided."""
  model = predict.load(run)
  scores = np.sort(np.asarray(model.validation_scores))
  assert len(scores) >= 1 and model.threshold == pytest.approx(np.quantile(scores, 0.99))
  image = run.parent / "data" / "widget" / "test" / "stain" / "000.png"
  fpr = 0.5
  expected = scores[int(np.ceil(len(scores) * (1 - fpr))) - 1]  # the hand rule of serving.thresholds
  proc = run_python(["-m", "experiments.predict", "--model", str(run), "--images", str(image), "--fpr", str(fpr)])
  assert proc.returncode == 0, proc.stderr[-2000:]
  header = proc.stdout.splitlines()[0]
  assert header.startswith(f"# threshold {expected:.6g} (false-positive rate 0.5 on {len(scores)} validation")
  _, score, decision, _ = proc.stdout.splitlines()[1].split("\t")
  assert decision == ("anomalous" if float(score) > expected else "normal")
  assert predict.predict_file(model, image, threshold=-1.0).anomalous  # a number: the same path in-process
  both = run_python(
    ["-m", "experiments.predict", "--model", str(run), "--images", str(image), "--threshold", "1", "--fpr", "0.1"]
  )
  assert both.returncode == 2 and "not allowed with argument" in both.stderr


def test_predict_library_matches_the_eval_path(run):
  """One image through `predict_file` (batch 1) equals the same image in an eval batch."""
  model = predict.load(run)
  record = next(iter(make_datasets(model.cfg.data, SIZE, seed=0).test))
  path = run.parent / "data" / "widget" / f"{record['id']}.png"
  result = predict.predict_file(model, path)
  ref = model.predict_fn(model.detector, padded(record["image"][None]), out_size=(SIZE, SIZE))
  np.testing.assert_allclose(result.anomaly_map, np.asarray(ref["anomaly_map"][0]), rtol=1e-5, atol=1e-6)
  assert result.anomalous == (result.score > model.threshold)


def test_list_images_errors(tmp_path):
  with pytest.raises(FileNotFoundError, match="no files match"):
    predict.list_images(tmp_path / "nothing*.png")
  with pytest.raises(FileNotFoundError, match="not a saved model"):
    predict.load(tmp_path)


NO_FLAX = textwrap.dedent("""
    import sys
    sys.modules["flax"] = None  # any `import flax` now raises ImportError
    import numpy as np
    from efficientad_jax.serving.export import load_exported
    model = load_exported(sys.argv[1])
    images = np.load(sys.argv[2])
    outs = {f"{k}_{n}": np.asarray(v) for n in (1, 3) for k, v in model(images[:n]).items()}
    np.savez(sys.argv[3], **outs)
    loaded = sorted(m for m, v in sys.modules.items() if v is not None and m.split(".")[0] in ("flax", "orbax"))
    print("LOADED", loaded, model.image_size, model.threshold)
""")


def test_export_parity_without_flax(run, tmp_path):
  model = predict.load(run)
  path = export.export_model(run, tmp_path / "model.eadx")
  records = list(make_datasets(model.cfg.data, SIZE, seed=0).test)[:3]
  images = np.stack([r["image"] for r in records])
  np.save(tmp_path / "images.npy", images)
  script = tmp_path / "no_flax.py"
  script.write_text(NO_FLAX)
  proc = run_python([str(script), str(path), str(tmp_path / "images.npy"), str(tmp_path / "outs.npz")])
  assert proc.returncode == 0, proc.stderr
  assert f"LOADED [] {SIZE} {model.threshold}" in proc.stdout  # neither flax nor orbax was imported
  ref = model.predict_fn(model.detector, padded(images), out_size=(SIZE, SIZE))
  outs = np.load(tmp_path / "outs.npz")
  for n in (1, 3):
    for key in export.OUTPUTS:
      np.testing.assert_allclose(
        outs[f"{key}_{n}"], np.asarray(ref[key])[:n], rtol=1e-5, atol=1e-6, err_msg=f"{key}, batch {n}"
      )


def test_exported_file_meta_and_errors(run, tmp_path):
  path = export.export_model(run, tmp_path / "m.eadx")
  model = export.load_exported(path)
  assert model.meta["format"] == export.FORMAT and model.meta["output_size"] == [SIZE, SIZE]
  assert model.meta["platforms"] == ["cpu", "cuda"]  # portable by default
  assert model.threshold == predict.load(run).threshold
  assert model.meta["validation_median"] == pytest.approx(float(np.median(predict.load(run).validation_scores)))
  assert model.meta["normalized_score"].startswith("0.5 * (score - validation_median)")
  assert model.meta["preprocessing"] == preprocess.describe(SIZE) and "bilinear" in model.meta["preprocessing"]
  assert str(model.exported.in_avals[-1].shape[0]) == "b"  # symbolic batch
  with pytest.raises(ValueError, match="expected images of shape"):
    model(np.zeros((1, SIZE + 1, SIZE, 3), np.float32))
  (tmp_path / "junk.eadx").write_bytes(b"junk")
  with pytest.raises(ValueError, match="not an exported EfficientAD model"):
    export.load_exported(tmp_path / "junk.eadx")
  (tmp_path / "cut.eadx").write_bytes(path.read_bytes()[: path.stat().st_size // 2])  # a truncated copy
  with pytest.raises(ValueError, match="not an exported EfficientAD model"):
    export.load_exported(tmp_path / "cut.eadx")
  json.dumps(model.meta)  # plain JSON
