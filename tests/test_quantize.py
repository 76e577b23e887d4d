"""export --int8 (serving/quantize.py) on a tiny synthetic run (tests/test_evaluate.py's, MVTec AD layout with
masks): the IR is written with its accuracy figures, which match an independent computation from the jax
predict; the refusal when the image AU-ROC drops too much writes nothing; argument errors are one line."""

import json
import pathlib

import numpy as np
import pytest

from efficientad_jax import metrics
from efficientad_jax.serving import backends, openvino_ir, predict, quantize
from experiments import cli
from experiments import export as export_cli
from tests.test_evaluate import make_run

pytest.importorskip("openvino")
pytest.importorskip("nncf")


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> pathlib.Path:
  return make_run(tmp_path_factory.mktemp("quantize"), "mvtec_ad")


def test_int8_export_writes_its_accuracy_figures(run, tmp_path, capsys):
  xml = tmp_path / "int8.xml"
  # The tiny random model has nothing to lose (its float AU-ROC is near chance): any drop is allowed here.
  assert cli.run(export_cli.main, ["--model", str(run), "--int8", "--max-auroc-drop", "1", "--out", str(xml)]) == 0
  line = capsys.readouterr().out.strip().splitlines()[-1]
  assert line.startswith(f"wrote {xml}") and "image AU-ROC" in line and "AU-PRO@0.3" in line
  meta = openvino_ir.read_metadata(xml)
  figures = json.loads(meta["int8_accuracy"])
  assert meta["threshold"] and meta["image_size"] == "64"  # the float IR's metadata are all there too
  # Float figures from the jax predict and the metrics, independently of quantize.accuracy.
  model = predict.load(run)
  images = quantize.run_images(model, predict.model_dir(run))
  assert figures["calibration_images"] == len(images.train) and figures["test_images"] == len(images.test)
  jax_runner = backends.make(model, "jax")
  labels = [int(r["label"]) for r in images.test]
  outs = [jax_runner(r["image"][None], out_size=tuple(int(v) for v in r["orig_size"])) for r in images.test]
  scores = np.array([float(o["score"][0]) for o in outs])
  maps, masks = [o["anomaly_map"][0] for o in outs], [r["mask"] for r in images.test]
  assert figures["image_auroc_float"] == pytest.approx(metrics.auroc(scores, labels), abs=1e-6)
  assert figures["au_pro_0.3_float"] == pytest.approx(metrics.au_pro(maps, masks, [0.3])[0.3], abs=1e-3)
  # The int8 IR runs, its scores as far from float as the figures say.
  int8 = backends.make(model, "openvino", graph=xml)
  int8_scores, _ = quantize.scores_and_maps(int8, images.test)
  assert np.abs(int8_scores - scores).max() == pytest.approx(figures["max_score_difference"], abs=1e-4)
  assert figures["max_score_difference"] > 0  # it is int8: not the float graph under another name


def test_an_auroc_drop_over_the_bound_is_refused_and_nothing_written(run, tmp_path, monkeypatch):
  figures = {"image_auroc_float": 0.9, "image_auroc_int8": 0.8, "image_auroc_drop": 0.1}
  monkeypatch.setattr(quantize, "quantize", lambda ov_model, images, *a: ov_model)  # no calibration: fast
  monkeypatch.setattr(quantize, "accuracy", lambda *a: dict(figures))
  xml = tmp_path / "int8.xml"
  with pytest.raises(SystemExit) as e:
    cli.run(export_cli.main, ["--model", str(run), "--int8", "--max-auroc-drop", "0.05", "--out", str(xml)])
  assert str(e.value).startswith("error: int8 image AU-ROC 0.8000 vs float 0.9000 on 8 test images: a drop of 0.1000")
  assert "(--max-auroc-drop); nothing written" in str(e.value) and not list(tmp_path.iterdir())


@pytest.mark.parametrize(
  "argv, message",
  [
    (["--int8", "--max-auroc-drop", "-0.1"], "a drop in image AU-ROC is a number >= 0"),
    (["--int8", "--format", "onnx"], "--int8 applies to --format openvino only"),
    (["--int8", "--fp16"], "--fp16 and --int8 are two weight formats"),
  ],
)
def test_bad_int8_arguments_are_one_line(argv, message, run, tmp_path, capsys):
  with pytest.raises(SystemExit) as e:
    cli.run(export_cli.main, ["--model", str(run), "--out", str(tmp_path / "m.xml"), *argv])
  assert message in str(e.value) + capsys.readouterr().err
