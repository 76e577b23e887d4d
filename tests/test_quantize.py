"""export --int8 (serving/quantize.py) on a tiny synthetic run (tests/test_evaluate.py's, MVTec AD layout with
masks): the IR is written with its accuracy figures, which match an independent computation from the jax
predict; the refusal when the image AU-ROC drops too much writes nothing; argument errors are one line.
export --format onnx --int8 (serving/onnx_int8.py) on the same run: the QDQ graph is written with its figures in
its metadata_props, agrees with the float graph within a loose bound, keeps the float nodes float, runs in
predict --backend onnxruntime, and is refused as the IR is; `float_nodes` on both runtimes' node names."""

import contextlib
import io
import json
import pathlib

import numpy as np
import pytest
from PIL import Image

from efficientad_jax import metrics
from efficientad_jax.serving import backends, onnx_graph, onnx_int8, openvino_ir, predict, quantize
from experiments import cli
from experiments import export as export_cli
from experiments import predict as predict_cli
from tests.test_evaluate import make_run

pytest.importorskip("openvino")
pytest.importorskip("nncf")
pytest.importorskip("onnxruntime")


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
    (["--int8", "--format", "jax"], "--int8 applies to --format openvino or onnx, not jax"),
    (["--int8", "--fp16"], "--fp16 and --int8 are two weight formats"),
    (["--int8", "--format", "onnx", "--fp16"], "--fp16 applies to --format openvino only"),
    (["--int8", "--format", "onnx", "--opset", "17"], "Resize needs opset >= 18"),
  ],
)
def test_bad_int8_arguments_are_one_line(argv, message, run, tmp_path, capsys):
  with pytest.raises(SystemExit) as e:
    cli.run(export_cli.main, ["--model", str(run), "--out", str(tmp_path / "m.xml"), *argv])
  assert message in str(e.value) + capsys.readouterr().err


# --- float_nodes: one rule for both int8 paths.


def test_float_nodes_on_onnx_and_openvino_names():
  """The same nodes from an ONNX graph's names and from OpenVINO's (which splits a Conv into Convolution
  NAME/WithoutBiases and its bias Add NAME); written out by hand."""
  onnx_names = [
    "transpose_1",
    *[f"{net}/conv_{i}" for net, i in (("teacher", 4), ("student", 9), ("autoencoder", 14))],
    "teacher/relu_5",
    "teacher/conv_6",
    "maps/sub_20",
    "maps/score",
  ]
  expected = ["maps/sub_20", "maps/score", "teacher/conv_4", "student/conv_9", "autoencoder/conv_14"]
  assert quantize.float_nodes(onnx_names) == expected
  ov_names = [x for n in onnx_names for x in ([f"{n}/WithoutBiases", n] if "/conv_" in n else [n])]
  assert quantize.float_nodes(ov_names) == [
    "maps/sub_20",
    "maps/score",
    *[x for n in expected[2:] for x in (f"{n}/WithoutBiases", n)],
  ]
  assert quantize.first_convs(quantize.float_nodes(ov_names)) == expected[2:]


# --- export --format onnx --int8 (serving/onnx_int8.py).


@pytest.fixture(scope="module")
def int8_onnx(run, tmp_path_factory) -> tuple[pathlib.Path, str]:
  """(the int8 graph of the tiny run, written by the CLI; the line it printed)."""
  path = tmp_path_factory.mktemp("int8_onnx") / "int8.onnx"
  # The tiny random model has nothing to lose (its float AU-ROC is near chance): any drop is allowed here.
  argv = ["--model", str(run), "--format", "onnx", "--int8", "--max-auroc-drop", "1", "--out", str(path)]
  with contextlib.redirect_stdout(io.StringIO()) as out:
    assert cli.run(export_cli.main, argv) == 0
  return path, out.getvalue().strip().splitlines()[-1]


def test_int8_onnx_carries_its_figures_and_agrees_with_float(run, int8_onnx):
  import onnxruntime as ort

  path, line = int8_onnx
  assert line.startswith(f"wrote {path} (onnx, QDQ") and "image AU-ROC" in line and "AU-PRO@0.3" in line
  # The metadata as the float file's are read (README snippet): all of the float graph's, and the figures.
  session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
  meta = session.get_modelmeta().custom_metadata_map
  model = predict.load(run)
  float_meta = onnx_graph.metadata(model, str(predict.model_dir(run)), onnx_graph.DEFAULT_OPSET)
  assert meta.items() >= {**float_meta, "weights": onnx_int8.WEIGHTS}.items() and "int8_accuracy" in meta
  figures = json.loads(meta["int8_accuracy"])
  images = quantize.run_images(model, predict.model_dir(run))
  assert figures["calibration_images"] == len(images.train) and figures["test_images"] == len(images.test)
  assert figures["float_nodes"] == ["maps/*", *quantize.first_convs(quantize.float_nodes(node_names(path)))]
  # Float figures from the jax predict, independently of quantize.accuracy; int8 from the written file.
  labels = [int(r["label"]) for r in images.test]
  float_scores, float_maps = quantize.scores_and_maps(backends.make(model, "jax"), images.test)
  int8_scores, int8_maps = quantize.scores_and_maps(backends.make(model, "onnxruntime", graph=path), images.test)
  assert figures["image_auroc_float"] == pytest.approx(metrics.auroc(float_scores, labels), abs=1e-6)
  assert np.abs(int8_scores - float_scores).max() == pytest.approx(figures["max_score_difference"], abs=1e-4)
  # Loose: measured 0.035 on maps and 0.020 on scores whose float maps span 0.38 (OpenVINO int8: 0.039, 0.022)
  bound = 0.15 * max(np.ptp(m) for m in float_maps)
  assert max(np.abs(a - b).max() for a, b in zip(int8_maps, float_maps)) <= bound
  assert 0 < figures["max_score_difference"] <= bound  # int8, not the float graph under another name


def node_names(path: pathlib.Path) -> list[str]:
  import onnx

  return [n.name for n in onnx.load(str(path)).graph.node]


def test_int8_onnx_keeps_the_float_nodes_float(run, int8_onnx):
  """QDQ: an int8 op reads DequantizeLinear outputs (activations and weights) and feeds a QuantizeLinear. The
  float nodes (`float_nodes`) feed no QuantizeLinear and have no quantized weights; only the maps read a
  DequantizeLinear, of the networks' last outputs (onnx_int8's module doc)."""
  import onnx

  graph = onnx.load(str(int8_onnx[0])).graph
  made_by = {out: n for n in graph.node for out in n.output}
  keep = quantize.float_nodes([n.name for n in onnx_graph.to_onnx(predict.load(run)).graph.node])
  assert {n.name for n in graph.node} >= set(keep)  # none renamed or lost by the quantizer
  assert sum(n.op_type == "QuantizeLinear" for n in graph.node) > 20  # the networks are int8
  for node in (n for n in graph.node if n.name in keep):
    readers = [n.op_type for n in graph.node if set(n.input) & set(node.output)]
    assert "QuantizeLinear" not in readers, node.name
    for dq in (made_by[i] for i in node.input if i in made_by and made_by[i].op_type == "DequantizeLinear"):
      assert node.name.startswith(onnx_graph.MAPS_SCOPE), node.name  # never a first conv
      quantizer = made_by.get(dq.input[0])  # None: a quantized constant
      assert quantizer is not None and quantizer.op_type == "QuantizeLinear", node.name
      assert made_by[quantizer.input[0]].name.startswith(quantize.NETWORKS), node.name
  assert len(quantize.first_convs(keep)) == 3


def test_predict_runs_the_int8_onnx(run, int8_onnx, tmp_path, capsys):
  image = tmp_path / "part.png"
  Image.fromarray(np.random.default_rng(3).integers(0, 256, (70, 80, 3), dtype=np.uint8)).save(image)
  argv = ["--model", str(run), "--images", str(image), "--backend", "onnxruntime", "--graph", str(int8_onnx[0])]
  assert cli.run(predict_cli.main, argv) == 0
  score = float(capsys.readouterr().out.splitlines()[1].split("\t")[1])
  model = predict.load(run)
  runner = backends.make(model, "onnxruntime", graph=int8_onnx[0])
  assert score == pytest.approx(predict.predict_file(model, image, backend=runner).score, abs=1e-6)


def test_an_int8_onnx_over_the_bound_is_refused_and_nothing_written(run, tmp_path, monkeypatch):
  figures = {"image_auroc_float": 0.9, "image_auroc_int8": 0.8, "image_auroc_drop": 0.1}
  monkeypatch.setattr(onnx_int8, "quantize_onnx", lambda proto, images, *a: proto)  # no calibration: fast
  monkeypatch.setattr(quantize, "accuracy", lambda *a: dict(figures))
  out = tmp_path / "int8.onnx"
  argv = ["--model", str(run), "--format", "onnx", "--int8", "--max-auroc-drop", "0.05", "--out", str(out)]
  with pytest.raises(SystemExit) as e:
    cli.run(export_cli.main, argv)
  assert str(e.value).startswith("error: int8 image AU-ROC 0.8000 vs float 0.9000 on 8 test images: a drop of 0.1000")
  assert "nothing written" in str(e.value) and "\n" not in str(e.value) and not list(tmp_path.iterdir())


def test_4d_resize_sizes_change_nothing(run):
  """The rewrite onnxruntime's int8 session needs, against the float graph as built (onnxruntime float32)."""
  import onnxruntime as ort

  model = predict.load(run)
  proto = onnx_graph.to_onnx(model)
  rewritten = onnx_int8.resize_with_4d_sizes(onnx_graph.to_onnx(model))
  assert sum(n.op_type == "Shape" for n in rewritten.graph.node) == 7  # the decoder's resizes; not the maps'
  x = np.random.default_rng(0).normal(size=(2, *model.image_size, 3)).astype(np.float32)
  run_graph = lambda p: ort.InferenceSession(p.SerializeToString(), providers=["CPUExecutionProvider"]).run(
    None, {"image": x}
  )
  for ref, got in zip(run_graph(proto), run_graph(rewritten)):
    np.testing.assert_array_equal(got, ref)
