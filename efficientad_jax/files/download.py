"""Downloading the published datasets and teacher weights: resumable, checksummed, extracted atomically
(the transfer itself: transfer.py).

  download_dataset("mvtec_ad", "data/mvtec_ad")      # -> data/mvtec_ad/<category>/{train,test,ground_truth}
  download_teacher("small", cache)                   # -> cache/teacher_small.pth (nelson1425's file)

Steps, each of which fails with a `DownloadError` naming the file and what to do:
  1. fetch the archive onto `<name>.part` with HTTP Range requests, so an interrupted transfer continues where
     it stopped (within one call: up to `retries` reconnects; across calls: the `.part` file stays);
  2. check it: SHA-256 where the publisher gives one, else the git blob id of a file published in a git
     repository; with neither, the SHA-256 is printed so that a user can pin it (`--sha256`);
  3. extract into a temporary sibling of the target folder, check that the result is the layout the dataset
     indexes read (`data/indexes.py`), and only then rename it into place: a half-finished download never looks
     like a dataset.

Published locations and checksums are the ones anomalib uses (MVTec AD, MVTec LOCO, VisA, Imagenette, its
EfficientAD teacher archive) and nelson1425/EfficientAD's repository (teacher_small/medium.pth at a pinned
commit). $EFFICIENTAD_DOWNLOAD_MIRROR (a URL prefix) replaces the published locations by
`<mirror>/<file name>` (the published checksums still apply); an explicit `source` is used as given.
"""

from __future__ import annotations

import pathlib
import shutil
import tempfile
import zipfile

from efficientad_jax.files.transfer import (  # noqa: F401
  MIRROR_ENV,
  DownloadError,
  Source,
  extract,
  fetch,
  file_digests,
  verify,
)


def _is_mvtec_like(root: pathlib.Path) -> bool:
  return any((d / "train" / "good").is_dir() for d in root.iterdir() if d.is_dir())


def _is_loco(root: pathlib.Path) -> bool:
  return any(
    (d / "train" / "good").is_dir() and (d / "defects_config.json").is_file() for d in root.iterdir() if d.is_dir()
  )


_MYDRIVE = "https://www.mydrive.ch/shares"
DATASETS = {
  "mvtec_ad": Source(
    f"{_MYDRIVE}/38536/3830184030e49fe74747669442f0f282/download/420938113-1629952094/mvtec_anomaly_detection.tar.xz",
    "mvtec_anomaly_detection.tar.xz",
    sha256="cf4313b13603bec67abb49ca959488f7eedce2a9f7795ec54446c649ac98cd3d",
    layout=_is_mvtec_like,
    layout_doc="<category>/train/good",
  ),
  "mvtec_loco": Source(
    f"{_MYDRIVE}/48237/1b9106ccdfbb09a0c414bd49fe44a14a/download/430647091-1646842701/"
    "mvtec_loco_anomaly_detection.tar.xz",
    "mvtec_loco_anomaly_detection.tar.xz",
    sha256="9e7c84dba550fd2e59d8e9e231c929c45ba737b6b6a6d3814100f54d63aae687",
    layout=_is_loco,
    layout_doc="<object>/train/good and <object>/defects_config.json",
  ),
  "visa": Source(
    "https://amazon-visual-anomaly.s3.us-west-2.amazonaws.com/VisA_20220922.tar",
    "VisA_20220922.tar",
    sha256="2eb8690c803ab37de0324772964100169ec8ba1fa3f7e94291c9ca673f40f362",
    layout=lambda p: (p / "split_csv" / "1cls.csv").is_file(),
    layout_doc="split_csv/1cls.csv",
  ),
  "imagenette": Source(
    "https://s3.amazonaws.com/fast-ai-imageclas/imagenette2.tgz",
    "imagenette2.tgz",
    sha256="6cbfac238434d89fe99e651496f0812ebc7a10fa62bd42d6874042bf01de4efd",
    layout=lambda p: (p / "train").is_dir(),
    layout_doc="train/<class>/*.JPEG",
  ),
}
_NELSON = "https://raw.githubusercontent.com/nelson1425/EfficientAD/fcab5146f84ae17597044ad5ddf1656ccf805401/models"
_ANOMALIB = (
  "https://github.com/openvinotoolkit/anomalib/releases/download/efficientad_pretrained_weights/"
  "efficientad_pretrained_weights.zip"
)
_ANOMALIB_SHA256 = "c09aeaa2b33f244b3261a5efdaeae8f8284a949470a4c5a526c61275fe62684a"
TEACHERS = {
  ("nelson", "small"): Source(
    f"{_NELSON}/teacher_small.pth", "teacher_small.pth", git_blob_sha1="631c66c9efa7f1c0629bba344e8583fed9380bf0"
  ),
  ("nelson", "medium"): Source(
    f"{_NELSON}/teacher_medium.pth", "teacher_medium.pth", git_blob_sha1="29db5c54b462ef32eec8ac1046b4a9770ac1dcb5"
  ),
  ("anomalib", "small"): Source(
    _ANOMALIB, "efficientad_pretrained_weights.zip", sha256=_ANOMALIB_SHA256, member="pretrained_teacher_small.pth"
  ),
  ("anomalib", "medium"): Source(
    _ANOMALIB, "efficientad_pretrained_weights.zip", sha256=_ANOMALIB_SHA256, member="pretrained_teacher_medium.pth"
  ),
}


def _dataset_root(extracted: pathlib.Path, source: Source) -> pathlib.Path | None:
  """The folder of the extracted tree that has the expected layout: the top, or its only sub-folder."""
  if source.layout(extracted):
    return extracted
  entries = [p for p in extracted.iterdir() if not p.name.startswith(".")]
  if len(entries) == 1 and entries[0].is_dir() and source.layout(entries[0]):
    return entries[0]  # e.g. imagenette2.tgz holds imagenette2/{train,val}
  return None


def download_dataset(
  name: str,
  to: str | pathlib.Path,
  *,
  source: Source | None = None,
  keep_archive: bool = False,
  retries: int = 5,
  timeout: float = 60.0,
  progress: bool = True,
) -> pathlib.Path:
  """Downloads and extracts dataset `name` (a key of DATASETS) so that `to` is its root (`data.root`).

  An existing `to` that already has the layout is returned untouched; any other non-empty `to` is refused.
  The archive is kept in the hidden sibling `.<to>.download/` while incomplete (so it resumes) and deleted
  after a successful extraction unless `keep_archive`.
  """
  if source is None:
    if name not in DATASETS:
      raise DownloadError(f"unknown dataset {name!r}", "dataset", f"choose one of {sorted(DATASETS)}")
    source = DATASETS[name].mirrored()
  to = pathlib.Path(to).absolute()
  if to.exists() and not to.is_dir():
    raise DownloadError("not a folder", str(to), "choose another --to")
  if to.is_dir() and any(to.iterdir()):
    if _dataset_root(to, source) == to:
      return to
    raise DownloadError(f"folder exists and is not a {name} dataset", str(to), "remove it or choose another --to")
  cache = to.parent / f".{to.name}.download"  # a sibling: same file system, so the final rename is atomic
  try:
    archive = fetch(source, cache, retries=retries, timeout=timeout, progress=progress)
    tmp = pathlib.Path(tempfile.mkdtemp(prefix=f".{to.name}.extracting-", dir=to.parent))
  except OSError as e:
    raise DownloadError(
      f"cannot write ({e.strerror or e})", str(to.parent), "choose a writable --to or fix its permissions"
    ) from None
  except DownloadError:
    _remove_if_empty(cache)  # a .part stays, to be resumed
    raise
  try:
    extract(archive, tmp)
    root = _dataset_root(tmp, source)
    if root is None:
      raise DownloadError(
        f"the archive does not hold a {name} dataset (no {source.layout_doc})",
        str(archive),
        "delete it and run the command again, or check --url",
      )
    try:
      if to.is_dir():
        to.rmdir()  # empty (checked above)
      root.rename(to)  # atomic on one file system: `to` appears complete or not at all
    except OSError as e:
      if not (to.is_dir() and _dataset_root(to, source) == to):  # else another process finished first
        raise DownloadError(
          f"cannot move the extracted dataset into place ({e.strerror or e})",
          str(to),
          "remove it or choose another --to",
        ) from None
  except DownloadError:
    archive.unlink(missing_ok=True)  # unusable: the next run downloads afresh
    _remove_if_empty(cache)
    raise
  finally:
    shutil.rmtree(tmp, ignore_errors=True)
  if not keep_archive:
    archive.unlink(missing_ok=True)
    _remove_if_empty(cache)
  return to


def _remove_if_empty(folder: pathlib.Path) -> None:
  if folder.is_dir() and not any(folder.iterdir()):
    folder.rmdir()


def download_teacher(
  size: str,
  folder: str | pathlib.Path,
  *,
  origin: str = "nelson",
  source: Source | None = None,
  retries: int = 5,
  timeout: float = 60.0,
  progress: bool = True,
) -> pathlib.Path:
  """The published PDN-`size` teacher `.pth` in `folder` (downloaded and checked unless already there).

  origin "nelson": nelson1425/EfficientAD's teacher_<size>.pth (git blob id checked); "anomalib": the
  teacher from anomalib's efficientad_pretrained_weights.zip (SHA-256 checked), extracted next to it.
  """
  if source is None:
    if (origin, size) not in TEACHERS:
      raise DownloadError(
        f"no published teacher for origin {origin!r}, size {size!r}",
        "--download",
        "choose size small or medium, origin nelson or anomalib",
      )
    source = TEACHERS[(origin, size)].mirrored()
  folder = pathlib.Path(folder).absolute()
  if source.member and (folder / source.member).is_file():
    return folder / source.member
  path = fetch(source, folder, retries=retries, timeout=timeout, progress=progress)
  if not source.member:
    return path
  try:
    with zipfile.ZipFile(path) as z:
      names = [n for n in z.namelist() if pathlib.PurePosixPath(n).name == source.member]
      if not names:
        raise DownloadError(f"the archive holds no {source.member}", str(path), "check --url")
      tmp = folder / (source.member + ".part")
      tmp.write_bytes(z.read(names[0]))
      tmp.replace(folder / source.member)
  except (zipfile.BadZipFile, OSError) as e:
    raise DownloadError(
      f"corrupt or unreadable archive ({type(e).__name__}: {e})", str(path), "delete it and run the command again"
    ) from None
  return folder / source.member
