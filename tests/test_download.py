"""Downloads (efficientad_jax/download.py, experiments/download.py, import_teacher --download) against a local
HTTP server: archives in the official layouts are built from the fixture trees at test time and served from
127.0.0.1 only; the server supports Range requests, can drop a connection, and stops itself.
"""

import collections
import dataclasses
import hashlib
import http.server
import io
import os
import pathlib
import socket
import subprocess
import sys
import tarfile
import threading
import zipfile

import numpy as np
import pytest

from efficientad_jax.config import DataConfig
from efficientad_jax.data import api, indexes
from efficientad_jax.files import download
from efficientad_jax.models import weights
from tests import fixture_sets

REPO = pathlib.Path(__file__).resolve().parents[1]
SERVER_LIFETIME_S = 300  # the server shuts itself down after this, whatever the tests do


class _Handler(http.server.BaseHTTPRequestHandler):
  """GET of server.files[name]; honours `Range: bytes=N-`; drops the first response after server.drop_after."""

  def do_GET(self):
    srv = self.server
    name = self.path.lstrip("/")
    srv.requests.append((name, self.headers.get("Range")))
    if name not in srv.files:
      self.send_error(404)
      return
    data, start = srv.files[name], 0
    if self.headers.get("Range"):
      start = int(self.headers["Range"].removeprefix("bytes=").split("-")[0])
      if start >= len(data):
        self.send_error(416)
        return
      self.send_response(206)
      self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
    else:
      self.send_response(200)
    self.send_header("Content-Length", str(len(data) - start))
    self.end_headers()
    body = data[start:]
    if srv.drop_after is not None:  # simulate a dropped connection: part of the body, then close
      body, srv.drop_after = body[: srv.drop_after], None
      self.close_connection = True
    self.wfile.write(body)

  def log_message(self, *args):  # keep the test output clean
    pass


class Server:
  """A ThreadingHTTPServer on 127.0.0.1 at a free port, in a daemon thread, stopped by `stop()` or a timer."""

  def __init__(self):
    self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    self.httpd.files, self.httpd.requests, self.httpd.drop_after = {}, [], None
    self.httpd.daemon_threads = True
    self.thread = threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    self.thread.start()
    self.timer = threading.Timer(SERVER_LIFETIME_S, self.stop)
    self.timer.daemon = True
    self.timer.start()

  def add(self, name: str, data: bytes) -> str:
    self.httpd.files[name] = data
    return self.url(name)

  def url(self, name: str) -> str:
    return f"http://127.0.0.1:{self.httpd.server_address[1]}/{name}"

  @property
  def requests(self) -> list:
    return self.httpd.requests

  def drop_next_after(self, n: int) -> None:
    self.httpd.drop_after = n

  def stop(self) -> None:
    self.timer.cancel()
    self.httpd.shutdown()
    self.httpd.server_close()
    self.thread.join(timeout=10)


@pytest.fixture(scope="module")
def server():
  srv = Server()
  yield srv
  srv.stop()


def tar_bytes(members: dict[str, pathlib.Path], mode: str) -> bytes:
  """A tar archive (mode 'w:xz', 'w:gz', 'w') of {arcname: file or folder}."""
  buffer = io.BytesIO()
  with tarfile.open(fileobj=buffer, mode=mode) as t:
    for arcname, path in members.items():
      t.add(path, arcname=arcname)
  return buffer.getvalue()


def sha256(data: bytes) -> str:
  return hashlib.sha256(data).hexdigest()


def tree(root: pathlib.Path) -> list[str]:
  return sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file())


def categories(dataset: pathlib.Path) -> list[str]:
  return sorted(p.name for p in dataset.iterdir() if p.is_dir())


def official_archive(fixtures: pathlib.Path, name: str) -> tuple[bytes, pathlib.Path]:
  """MVTec AD / LOCO archives hold their category folders at the top, like the published tar.xz files."""
  dataset = fixture_sets.dataset_root(fixtures, name)
  return tar_bytes({c: dataset / c for c in categories(dataset)}, "w:xz"), dataset


def local(name: str, server: Server, data: bytes, checksum: str | None = "auto") -> download.Source:
  """The registry entry of `name`, pointed at the local server (published layout check kept)."""
  published = download.DATASETS[name]
  return dataclasses.replace(
    published, url=server.add(published.filename, data), sha256=sha256(data) if checksum == "auto" else checksum
  )


def assert_nothing_like_a_dataset(parent: pathlib.Path, to: pathlib.Path, layout) -> None:
  assert not to.exists()
  for d in parent.rglob("*"):
    if d.is_dir():
      assert not layout(d), f"{d} looks like a dataset"


@pytest.mark.parametrize("name", ["mvtec_ad", "mvtec_loco"])
def test_download_extracts_the_official_layout(fixtures, server, tmp_path, name):
  data, dataset = official_archive(fixtures, name)
  to = tmp_path / "data" / name
  got = download.download_dataset(name, to, source=local(name, server, data), progress=False)
  assert got == to and tree(to) == tree(dataset)
  assert os.listdir(tmp_path / "data") == [name]  # no archive, .part or temporary folder left behind
  for category in categories(dataset):
    index = (
      indexes.index_mvtec_ad(to, category, seed=0) if name == "mvtec_ad" else indexes.index_mvtec_loco(to, category)
    )
    assert index.train and index.test
  # A second run finds the dataset and downloads nothing.
  before = len(server.requests)
  assert download.download_dataset(name, to, source=local(name, server, data), progress=False) == to
  assert len(server.requests) == before


def test_download_visa_and_imagenette_layouts(fixtures, server, tmp_path):
  # VisA: <obj>/Data/{Images,Masks}/... plus split_csv/1cls.csv at the top, an uncompressed tar.
  bottle = fixture_sets.dataset_root(fixtures, "mvtec_ad")
  category = categories(bottle)[0]
  src = tmp_path / "visa_src"
  rows = ["object,split,label,image,mask"]
  for i, image in enumerate(sorted((bottle / category / "train" / "good").glob("*.png"))):
    dest = src / category / "Data" / "Images" / "Normal" / f"{i:03d}.png"
    dest.parent.mkdir(parents=True, exist_ok=True)
    dest.write_bytes(image.read_bytes())
    rows.append(f"{category},{'train' if i else 'test'},normal,{dest.relative_to(src)},")
  (src / "split_csv").mkdir()
  (src / "split_csv" / "1cls.csv").write_text("\n".join(rows) + "\n")
  data = tar_bytes({p.name: p for p in src.iterdir()}, "w")
  to = download.download_dataset("visa", tmp_path / "visa", source=local("visa", server, data), progress=False)
  assert tree(to) == tree(src)
  assert len(indexes.index_visa(to, category, seed=0, validation_fraction=0.0).train) == len(rows) - 2
  # Imagenette: one top folder imagenette2/{train,val}/<class>/; the dataset root becomes that folder.
  data = tar_bytes(
    {
      "imagenette2/train/n01440764": bottle / category / "train" / "good",
      "imagenette2/val/n01440764": bottle / category / "test" / "good",
    },
    "w:gz",
  )
  to = download.download_dataset(
    "imagenette", tmp_path / "imagenette", progress=False, source=local("imagenette", server, data)
  )
  assert sorted(p.name for p in to.iterdir()) == ["train", "val"]


def test_interrupted_transfer_resumes_with_range(fixtures, server, tmp_path):
  data, dataset = official_archive(fixtures, "mvtec_ad")
  source = local("mvtec_ad", server, data)
  to, cut = tmp_path / "mvtec_ad", len(data) // 3
  part = tmp_path / ".mvtec_ad.download" / (source.filename + ".part")
  # Run 1: the connection drops after `cut` bytes and no reconnect is allowed: a .part, no dataset.
  server.drop_next_after(cut)
  with pytest.raises(download.DownloadError, match="network error.*resumes"):
    download.download_dataset("mvtec_ad", to, source=source, retries=0, progress=False)
  assert part.stat().st_size == cut and not to.exists()
  # Run 2 continues from byte `cut` with a Range request and completes the same file.
  server.requests.clear()
  download.download_dataset("mvtec_ad", to, source=source, progress=False)
  assert server.requests == [(source.filename, f"bytes={cut}-")]
  assert tree(to) == tree(dataset)
  # Within one run, a dropped connection is resumed by a reconnect.
  server.drop_next_after(cut)
  server.requests.clear()
  to2 = tmp_path / "again"
  download.download_dataset("mvtec_ad", to2, source=source, retries=2, progress=False)
  assert server.requests == [(source.filename, None), (source.filename, f"bytes={cut}-")]
  assert tree(to2) == tree(dataset)


def test_wrong_checksum_and_corrupt_archives_are_refused(fixtures, server, tmp_path):
  data, _ = official_archive(fixtures, "mvtec_ad")
  layout = download.DATASETS["mvtec_ad"].layout
  to = tmp_path / "d" / "mvtec_ad"
  with pytest.raises(download.DownloadError, match="SHA-256 mismatch.*deleted"):
    download.download_dataset("mvtec_ad", to, source=local("mvtec_ad", server, data, "0" * 64), progress=False)
  assert_nothing_like_a_dataset(tmp_path, to, layout)
  assert not list(tmp_path.rglob("*.tar.xz*"))  # the bad file is gone: the next run starts afresh
  # No checksum, truncated archive: refused at extraction, the partial extraction removed.
  with pytest.raises(download.DownloadError, match="corrupt or unreadable archive"):
    download.download_dataset(
      "mvtec_ad", to, source=local("mvtec_ad", server, data[: len(data) // 2], None), progress=False
    )
  assert_nothing_like_a_dataset(tmp_path, to, layout)
  # A valid archive without the layout (another dataset).
  other = tar_bytes({"readme.txt": REPO / "pyproject.toml"}, "w:xz")
  with pytest.raises(download.DownloadError, match="does not hold a mvtec_ad dataset"):
    download.download_dataset("mvtec_ad", to, source=local("mvtec_ad", server, other), progress=False)
  assert_nothing_like_a_dataset(tmp_path, to, layout)
  assert [p.name for p in (tmp_path / "d").iterdir()] == []  # no temporary folders left
  # An existing folder that is not the dataset is never overwritten.
  (to / "notes").mkdir(parents=True)
  with pytest.raises(download.DownloadError, match="exists and is not a mvtec_ad dataset"):
    download.download_dataset("mvtec_ad", to, source=local("mvtec_ad", server, data), progress=False)
  assert [p.name for p in to.iterdir()] == ["notes"]


def test_no_checksum_prints_the_sha256(server, tmp_path, capsys):
  data = b"x" * 1000
  source = download.Source(server.add("blob.bin", data), "blob.bin")
  path = download.fetch(source, tmp_path, progress=False)
  assert path.read_bytes() == data
  assert sha256(data) in capsys.readouterr().err


def test_git_blob_id_matches_git(tmp_path):
  path = tmp_path / "f.bin"
  path.write_bytes(b"hello\n")
  assert download.file_digests(path)[1] == "ce013625030ba8dba906f756967f9e9ca394464a"  # git hash-object


def test_data_download_config_fetches_a_missing_root(fixtures, server, tmp_path, monkeypatch):
  data, dataset = official_archive(fixtures, "mvtec_ad")
  monkeypatch.setitem(download.DATASETS, "mvtec_ad", local("mvtec_ad", server, data))
  category = categories(dataset)[0]
  cfg = DataConfig(dataset="mvtec_ad", root=str(tmp_path / "new"), category=category, download=True)
  index, base = api.build_index(cfg, seed=0)
  assert base == tmp_path / "new" / category and index.train
  with pytest.raises(api.DataError, match="data.download: .*folder.*no published archive"):
    api.build_index(dataclasses.replace(cfg, dataset="folder", root=str(tmp_path / "missing")), seed=0)


def run_cli(args: list[str], **env) -> subprocess.CompletedProcess:
  environ = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=str(REPO), **env)
  return subprocess.run(
    [sys.executable, "-m", *args], cwd=REPO, env=environ, capture_output=True, text=True, timeout=120
  )


def assert_one_error_line(proc: subprocess.CompletedProcess, *needles: str) -> None:
  assert proc.returncode != 0
  lines = proc.stderr.strip().splitlines()
  assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in proc.stderr, proc.stderr
  for needle in needles:
    assert needle in lines[0]


def test_cli_errors_are_one_line(fixtures, server, tmp_path):
  data, _ = official_archive(fixtures, "mvtec_ad")
  server.add(download.DATASETS["mvtec_ad"].filename, data)
  mirror = {download.MIRROR_ENV: server.url("")}
  # Checksum: the tiny archive is not the published one.
  proc = run_cli(["experiments.download", "mvtec_ad", "--to", str(tmp_path / "a"), "--no-progress"], **mirror)
  assert_one_error_line(proc, "SHA-256 mismatch", "mvtec_anomaly_detection.tar.xz", "run the command again")
  # Unwritable folder: --to under a regular file.
  (tmp_path / "file").write_text("x")
  proc = run_cli(["experiments.download", "mvtec_ad", "--to", str(tmp_path / "file" / "d")], **mirror)
  assert_one_error_line(proc, "cannot write", str(tmp_path / "file"))
  # Network: nothing listens at the URL (a 404 here), then a closed port.
  proc = run_cli(["experiments.download", "visa", "--to", str(tmp_path / "v"), "--url", server.url("nope.tar")])
  assert_one_error_line(proc, "HTTP 404", "nope.tar", "--url")
  with socket.socket() as s:  # a port that was free a moment ago: nothing listens there
    s.bind(("127.0.0.1", 0))
    closed = f"http://127.0.0.1:{s.getsockname()[1]}/VisA_20220922.tar"
  proc = run_cli(["experiments.download", "visa", "--to", str(tmp_path / "v"), "--retries", "0", "--url", closed])
  assert_one_error_line(proc, "network error", closed, "resumes")
  # Success through the CLI with a pinned checksum.
  proc = run_cli(
    ["experiments.download", "mvtec_ad", "--to", str(tmp_path / "ok"), "--sha256", sha256(data), "--no-progress"],
    **mirror,
  )
  assert proc.returncode == 0, proc.stderr
  assert "ready in" in proc.stdout


# --- Teacher weights.

PDN_SMALL_OIHW = collections.OrderedDict(
  [  # nelson1425's nn.Sequential indices (docs/method.md §2.3)
    ("0", (128, 3, 4, 4)),
    ("3", (256, 128, 4, 4)),
    ("6", (256, 256, 3, 3)),
    ("8", (384, 256, 4, 4)),
  ]
)


def teacher_pth(path: pathlib.Path, prefix: str = "") -> dict[str, np.ndarray]:
  """A random PDN-small teacher state_dict saved with torch.save; keys `<prefix><index>.weight|bias`."""
  torch = pytest.importorskip("torch")
  rng = np.random.default_rng(0)
  state = collections.OrderedDict()
  for index, shape in PDN_SMALL_OIHW.items():
    state[f"{prefix}{index}.weight"] = rng.standard_normal(shape).astype(np.float32)
    state[f"{prefix}{index}.bias"] = rng.standard_normal(shape[0]).astype(np.float32)
  torch.save(collections.OrderedDict((k, torch.from_numpy(v)) for k, v in state.items()), path)
  return state


def test_import_teacher_download_cli(server, tmp_path):
  state = teacher_pth(tmp_path / "teacher_small.pth")
  data = (tmp_path / "teacher_small.pth").read_bytes()
  server.add("teacher_small.pth", data)
  args = [
    "experiments.import_teacher",
    "--download",
    "small",
    "--cache",
    str(tmp_path / "cache"),
    "--out",
    str(tmp_path / "ckpt"),
  ]
  # The published git blob id does not match the test file: refused in one line, nothing imported.
  proc = run_cli(args, **{download.MIRROR_ENV: server.url("")})
  assert_one_error_line(proc, "git blob id mismatch", "teacher_small.pth")
  assert not (tmp_path / "ckpt").exists()
  proc = run_cli([*args, "--url", server.url("teacher_small.pth"), "--sha256", sha256(data)])
  assert proc.returncode == 0, proc.stderr
  params, size = weights.load_teacher(tmp_path / "ckpt")
  assert size == "small"
  np.testing.assert_array_equal(params["conv1"]["kernel"], state["0.weight"].transpose(2, 3, 1, 0))
  np.testing.assert_array_equal(params["conv4"]["bias"], state["8.bias"])


def test_download_teacher_from_an_anomalib_style_zip(server, tmp_path):
  pth = tmp_path / "pretrained_teacher_small.pth"
  teacher_pth(pth)
  buffer = io.BytesIO()
  with zipfile.ZipFile(buffer, "w") as z:
    z.write(pth, "efficientad_pretrained_weights/pretrained_teacher_small.pth")
  data = buffer.getvalue()
  source = dataclasses.replace(
    download.TEACHERS[("anomalib", "small")],
    sha256=sha256(data),
    url=server.add("efficientad_pretrained_weights.zip", data),
  )
  got = download.download_teacher("small", tmp_path / "cache", source=source, progress=False)
  assert got.name == "pretrained_teacher_small.pth" and got.read_bytes() == pth.read_bytes()
  assert weights.pdn_params_from_state(weights.load_state_dict(got), "small")["conv4"]["bias"].shape == (384,)
  with pytest.raises(download.DownloadError, match="no published teacher"):
    download.download_teacher("large", tmp_path)
