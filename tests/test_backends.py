"""serving/backends.py: onnxruntime and OpenVINO against the jax predict on one saved model (random PDN-S
networks, calibrated quantiles, non-default map settings: tests/test_onnx_export.py's), through the same
predict functions; the host resize against jax.image.resize; the predict CLI's --backend; the one-line error
for a missing package."""

import json
import pathlib
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import tifffile
from PIL import Image

from efficientad_jax.serving import backends, predict
from experiments import cli
from experiments import predict as predict_cli
from tests.test_onnx_export import SIZE, images, save_model

pytest.importorskip("onnxruntime")
pytest.importorskip("openvino")
GRAPH_BACKENDS = ("onnxruntime", "openvino")
OTHER_SIZE = (90, 100)  # another image size and aspect: the map is padded and resized to it on the host


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> pathlib.Path:
  return save_model(tmp_path_factory.mktemp("backends"), "small")


@pytest.fixture(scope="module")
def model(run):
  return predict.load(run)


@pytest.fixture(scope="module")
def runners(model) -> dict:
  return {name: backends.make(model, name) for name in backends.BACKENDS}


@pytest.fixture(scope="module")
def image_files(tmp_path_factory) -> list[pathlib.Path]:
  """One image at the model's size, one at another size and aspect."""
  folder = tmp_path_factory.mktemp("images")
  rng = np.random.default_rng(5)
  paths = [folder / "square.png", folder / "other.png"]
  for path, (h, w) in zip(paths, [(SIZE, SIZE), OTHER_SIZE]):
    Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(path)
  return paths


@pytest.mark.parametrize("shape", [(3, 13, 17)])
@pytest.mark.parametrize("out_size", [(64, 64), (90, 100), (7, 5), (13, 17)])
def test_resize_map_is_jax_bilinear_resize(shape, out_size):
  maps = np.random.default_rng(0).normal(size=shape).astype(np.float32)
  ref = jax.image.resize(jnp.asarray(maps), (shape[0], *out_size), method="bilinear", antialias=False)
  got = backends.resize_map(maps, out_size)
  assert got.shape == (shape[0], *out_size) and got.dtype == np.float32
  np.testing.assert_allclose(got, np.asarray(ref), rtol=0, atol=1e-5)


@pytest.mark.parametrize("name", GRAPH_BACKENDS)
def test_graph_backends_match_jax_at_the_model_size(name, runners):
  x = images(np.random.default_rng(7), 3)  # the batch shape save_model compiled
  ref, got = runners["jax"](x), runners[name](x)
  assert got["anomaly_map"].shape == (3, SIZE, SIZE) and got["score"].shape == (3,)
  assert float(np.abs(ref["anomaly_map"]).max()) > 0.01  # not a trivially zero map
  np.testing.assert_allclose(got["anomaly_map"], ref["anomaly_map"], rtol=0, atol=1e-4)
  np.testing.assert_allclose(got["score"], ref["score"], rtol=0, atol=1e-4)


def test_predict_paths_writes_the_same_outputs_for_every_backend(model, runners, image_files, tmp_path):
  """The same predict_paths for all: maps at each image's size, scores = their max, the same files."""
  results, files = {}, {}
  for name, runner in runners.items():
    preds, failures = predict.predict_paths(model, image_files, tmp_path / name, threshold=0.1, backend=runner)
    assert not failures
    results[name] = {p.name: p for p in preds}
    files[name] = sorted(f.name for f in (tmp_path / name).iterdir())
    assert {"predictions.csv", "square.tiff", "other.tiff"} <= set(files[name])
    assert files[name] == files["jax"]
  for name in GRAPH_BACKENDS:
    for path in image_files:
      ref, got = results["jax"][str(path)], results[name][str(path)]
      assert got.anomaly_map.shape == ref.anomaly_map.shape == Image.open(path).size[::-1]
      assert got.score == pytest.approx(float(got.anomaly_map.max()), abs=1e-7)
      np.testing.assert_array_equal(tifffile.imread(tmp_path / name / f"{path.stem}.tiff"), got.anomaly_map)
      np.testing.assert_allclose(got.anomaly_map, ref.anomaly_map, rtol=0, atol=1e-4)
      assert got.score == pytest.approx(ref.score, abs=1e-4)
      assert got.threshold == ref.threshold == 0.1 and got.anomalous == (got.score > 0.1)


def test_a_string_backend_and_an_exported_graph(model, run, image_files, tmp_path):
  from efficientad_jax.serving import onnx_graph

  ref = predict.predict_file(model, image_files[0])
  path = onnx_graph.export_onnx(run, tmp_path / "model.onnx")
  for name in GRAPH_BACKENDS:
    got = predict.predict_file(model, image_files[0], backend=backends.make(model, name, graph=path))
    assert got.score == pytest.approx(ref.score, abs=1e-4)
  assert predict.predict_file(model, image_files[0], backend="onnxruntime").score == pytest.approx(ref.score, abs=1e-4)
  with pytest.raises(backends.BackendError, match="onnxruntime runs .onnx files"):
    backends.make(model, "onnxruntime", graph=run / "model" / "meta" / "metadata")
  with pytest.raises(backends.BackendError, match="no such graph file"):
    backends.make(model, "openvino", graph=tmp_path / "missing.xml")
  with pytest.raises(backends.BackendError, match="unknown backend 'tensorrt'.*jax, onnxruntime, openvino"):
    backends.make(model, "tensorrt")


def test_cli_backend_flag(run, image_files, capsys):
  assert predict_cli.BACKENDS == backends.BACKENDS
  argv = ["--model", str(run), "--images", str(image_files[1]), "--threshold", "0.1"]
  scores = {}
  for name in ("jax", "openvino"):
    assert cli.run(predict_cli.main, [*argv, "--backend", name]) == 0
    line = capsys.readouterr().out.splitlines()[1]
    assert line.startswith(str(image_files[1]))
    scores[name] = float(line.split("\t")[1])
  assert scores["openvino"] == pytest.approx(scores["jax"], abs=1e-4)
  with pytest.raises(SystemExit):
    predict_cli.parse_args([*argv, "--backend", "tensorrt"])


@pytest.mark.parametrize("package", ["onnxruntime", "openvino"])
def test_a_missing_package_is_one_line_naming_the_extra(package, run, image_files, monkeypatch):
  monkeypatch.setitem(sys.modules, package, None)  # `import <package>` now raises ImportError
  argv = ["--model", str(run), "--images", str(image_files[0]), "--backend", package]
  with pytest.raises(SystemExit) as e:  # the CLI's one line: SystemExit("error: ...") prints only its text
    cli.run(predict_cli.main, argv)
  assert str(e.value) == (
    f"error: the {package} package is not installed (--backend {package}): "
    f"pip install 'efficientad_jax[deploy]' (or pip install {package})"
  )


# --- export --format openvino (serving/openvino_ir.py).


@pytest.mark.parametrize("fp16", [False, True])
def test_openvino_ir_runs_like_jax_and_carries_the_onnx_metadata(fp16, run, model, runners, tmp_path, capsys):
  from efficientad_jax.serving import onnx_graph, openvino_ir
  from experiments import export as export_cli

  xml = tmp_path / "model.xml"
  argv = ["--model", str(run), "--format", "openvino", "--out", str(xml), *(["--fp16"] if fp16 else [])]
  assert cli.run(export_cli.main, argv) == 0
  assert "openvino" in capsys.readouterr().out and xml.with_suffix(".bin").is_file()
  assert sorted(p.name for p in tmp_path.iterdir()) == ["model.bin", "model.xml"]  # no temporary left behind
  meta = openvino_ir.read_metadata(xml)
  source = str(predict.model_dir(run))
  assert meta == {
    **onnx_graph.metadata(model, source, onnx_graph.DEFAULT_OPSET),
    "weights": "float16" if fp16 else "float32",
  }
  x = images(np.random.default_rng(7), 3)
  ref, got = runners["jax"](x), backends.make(model, "openvino", graph=xml)(x)
  # float16 weights: measured 8e-5 (map) and 4e-5 (score) on this model, whose maps span ~0.3
  atol = 5e-4 if fp16 else 1e-4
  np.testing.assert_allclose(got["anomaly_map"], ref["anomaly_map"], rtol=0, atol=atol)
  np.testing.assert_allclose(got["score"], ref["score"], rtol=0, atol=atol)


def test_openvino_export_refusals_are_one_line(run, tmp_path):
  from experiments import export as export_cli

  for argv, message in [
    (["--format", "openvino", "--out", str(tmp_path / "model.bin")], "written as NAME.xml"),
    (["--format", "onnx", "--fp16", "--out", str(tmp_path / "m.onnx")], "--fp16 applies to --format openvino only"),
  ]:
    with pytest.raises(SystemExit) as e:
      cli.run(export_cli.main, ["--model", str(run), *argv])
    assert message in str(e.value) and "\n" not in str(e.value)
  assert not list(tmp_path.iterdir())


# --- experiments.benchmark --mode deploy.


def test_deploy_benchmark_tiny_writes_every_backend(tmp_path, capsys):
  """The documented JSON (no timing assertions: the numbers depend on the machine)."""
  from experiments import benchmark

  out = tmp_path / "deploy.json"
  report = benchmark.main(["--mode", "deploy", "--tiny", "--out", str(out)])
  assert json.loads(out.read_text()) == json.loads(json.dumps(report))
  env = report["environment"]
  assert env["cpu"]["model"] and env["versions"]["openvino"] and env["versions"]["onnxruntime"]
  assert [(r["size"], r["batch"], r["image_size"]) for r in report["results"]] == [
    ("small", 1, [64, 64]),
    ("small", 2, [64, 64]),
  ]
  names = {"jax fp32", "onnxruntime fp32", "openvino fp32", "openvino int8", "onnxruntime int8", "pytorch fp32"}
  for r in report["results"]:
    assert set(r["ms_per_call"]) == names and min(r["ms_per_call"].values()) > 0
    assert r["speedup_vs_jax"]["jax fp32"] == 1.0
  table = capsys.readouterr().out
  assert "| PDN-S 64x64 | 1 |" in table and "| onnxruntime int8 ms/img (x jax) |" in table
