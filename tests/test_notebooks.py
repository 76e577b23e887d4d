"""Both Colab notebooks run headless (nbclient, kernel python3, cwd = the repository root) with the tiny settings;
a failing cell fails the test. The quickstart trains the model that the inference notebook then loads."""

import csv
import os
import pathlib
import shutil
from unittest import mock

import nbformat
import pytest
from nbclient import NotebookClient
from PIL import Image

from tests.conftest import REPO, jax_cache_env

NOTEBOOKS = REPO / "notebooks"


def execute(name: str, env: dict, cache: pathlib.Path) -> nbformat.NotebookNode:
  """Runs notebooks/<name> in a fresh kernel that inherits `env`; raises CellExecutionError on a failing cell."""
  nb = nbformat.read(NOTEBOOKS / name, as_version=4)
  kernel_env = {
    "JAX_PLATFORMS": "cpu",
    **env,
    # Both notebooks compile the same predict program: a shared XLA cache compiles it once.
    **jax_cache_env(cache),
  }
  with mock.patch.dict(os.environ, kernel_env):  # the kernel process inherits this environment
    os.environ.pop("MPLBACKEND", None)  # the kernel's inline backend, as in Jupyter and Colab
    NotebookClient(nb, kernel_name="python3", timeout=300, resources={"metadata": {"path": str(REPO)}}).execute()
  return nb


def outputs(nb: nbformat.NotebookNode) -> tuple[str, int]:
  """(all stream and text output, number of PNG figures)."""
  text, figures = [], 0
  for cell in nb.cells:
    for out in cell.get("outputs", []):
      text.append(
        out.get("text", "") + out.get("data", {}).get("text/plain", "") + out.get("data", {}).get("text/markdown", "")
      )
      figures += "image/png" in out.get("data", {})
  return "".join(text), figures


@pytest.fixture(scope="module")
def quickstart(tmp_path_factory, jax_cache):
  tmp = tmp_path_factory.mktemp("notebooks")
  workdir = tmp / "quickstart"
  # The session's cache (conftest.jax_cache): the sweep's tiny runs compile the same programs later.
  nb = execute(
    "quickstart.ipynb", {"EFFICIENTAD_NOTEBOOK_TINY": "1", "EFFICIENTAD_NOTEBOOK_WORKDIR": str(workdir)}, jax_cache
  )
  return tmp, workdir, nb


@pytest.mark.parametrize("name", ["quickstart.ipynb", "inference.ipynb"])
def test_notebooks_are_saved_clean_and_colab_ready(name):
  nb = nbformat.read(NOTEBOOKS / name, as_version=4)
  nbformat.validate(nb)
  assert nb.metadata.kernelspec.name == "python3"
  code = [c for c in nb.cells if c.cell_type == "code"]
  assert all(not c.outputs and c.execution_count is None for c in code)  # no saved outputs
  assert sum(c.cell_type == "markdown" for c in nb.cells) >= len(code)  # every step explained
  assert "google.colab" in code[0].source and "pip" in code[0].source  # installs on Colab, only there
  assert "EFFICIENTAD_NOTEBOOK_" in "".join(c.source for c in code)


@pytest.mark.slow
def test_quickstart_trains_evaluates_plots_and_exports(quickstart):
  _, workdir, nb = quickstart
  text, figures = outputs(nb)
  assert (workdir / "model" / "meta").exists() and (workdir / "eval" / "metrics.json").exists()
  assert (workdir / "model.eadx").stat().st_size > 0
  assert "image AU-ROC" in text and "exported score" in text and "in-process score" in text
  assert figures >= 3  # examples, heatmaps, scores + ROC


@pytest.mark.slow
def test_inference_scores_a_folder_of_images(quickstart, jax_cache):
  tmp, workdir, _ = quickstart
  images = tmp / "images"
  images.mkdir()
  tests = sorted((workdir / "data" / "widget" / "test").glob("*/000.png"))
  for path in tests:
    shutil.copy(path, images / f"{path.parent.name}.png")
  Image.open(tests[0]).convert("L").resize((90, 70)).save(images / "gray_other_size.png")  # any size, gray
  (images / "notes.txt").write_text("not an image")  # reported, not fatal
  out = tmp / "predictions"
  env = {
    "EFFICIENTAD_NOTEBOOK_MODEL": str(workdir),
    "EFFICIENTAD_NOTEBOOK_IMAGES": str(images),
    "EFFICIENTAD_NOTEBOOK_OUT": str(out),
  }
  nb = execute("inference.ipynb", env, jax_cache)
  text, figures = outputs(nb)
  with open(out / "predictions.csv", newline="") as f:
    rows = list(csv.DictReader(f))
  assert sorted(pathlib.Path(r["file"]).name for r in rows) == sorted(p.name for p in images.glob("*.png"))
  assert "not scored: " in text and "notes.txt" in text
  assert "exported " in text and figures == 1
  assert (out / "gray_other_size.tiff").exists() and (out / "gray_other_size_overlay.png").exists()
