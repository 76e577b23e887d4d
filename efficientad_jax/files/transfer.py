"""Moving one published file to disk: resumable HTTP transfer, checksums, safe extraction (download.py
names the files; README "Getting the data and weights").

Each step fails with a `DownloadError` naming the file and what to do: `fetch` continues an interrupted
transfer on `<name>.part` with HTTP Range requests; `verify` checks the SHA-256 or the git blob id; `extract`
refuses archive members that would land outside the target folder.
"""

from __future__ import annotations

import dataclasses
import hashlib
import http.client
import os
import pathlib
import sys
import tarfile
import time
import urllib.error
import urllib.request
import zipfile
from collections.abc import Callable

import tqdm

MIRROR_ENV = "EFFICIENTAD_DOWNLOAD_MIRROR"
_CHUNK = 1 << 16


class DownloadError(RuntimeError):
  """One failure: str() is `<what> (<which file or flag>): <what to do>`, the CLI's one error line."""

  def __init__(self, what: str, which: str, todo: str):
    super().__init__(f"{what} ({which}): {todo}")


@dataclasses.dataclass(frozen=True)
class Source:
  """A published file. `layout` checks an extracted folder (None: a single file, not extracted)."""

  url: str
  filename: str
  sha256: str | None = None
  git_blob_sha1: str | None = None  # a file published in a git repository: its object id at `url`'s commit
  layout: Callable[[pathlib.Path], bool] | None = None
  layout_doc: str = ""  # what `layout` looks for, for the error message
  member: str = ""  # archives holding one wanted file (teacher weights): its base name

  def mirrored(self) -> Source:
    mirror = os.environ.get(MIRROR_ENV, "")
    return dataclasses.replace(self, url=f"{mirror.rstrip('/')}/{self.filename}") if mirror else self


# --- 1. Transfer.


def _open(url: str, start: int, timeout: float):
  request = urllib.request.Request(
    url, headers={"User-Agent": "efficientad-jax", **({"Range": f"bytes={start}-"} if start else {})}
  )
  return urllib.request.urlopen(request, timeout=timeout)


def _transfer(url: str, part: pathlib.Path, timeout: float, progress: bool) -> bool:
  """Appends to `part` from its current size; True when the server says the file is complete."""
  start = part.stat().st_size if part.exists() else 0
  try:
    response = _open(url, start, timeout)
  except urllib.error.HTTPError as e:
    if e.code == 416 and start:  # nothing left past `start`: the .part already holds the whole file
      return True
    raise
  with response:
    if start and response.status != 206:  # the server ignored Range: start over
      start = 0
    length = response.headers.get("Content-Length")
    total = start + int(length) if length is not None else None
    # disable=None: a bar only on a terminal, so that logs and the CLI's error line stay clean.
    with (
      open(part, "ab" if start else "wb") as f,
      tqdm.tqdm(
        total=total,
        initial=start,
        unit="B",
        unit_scale=True,
        desc=part.name[:-5],
        disable=None if progress else True,
        file=sys.stderr,
      ) as bar,
    ):
      while chunk := response.read(_CHUNK):
        f.write(chunk)
        bar.update(len(chunk))
  return total is None or part.stat().st_size >= total


def fetch(
  source: Source, folder: str | pathlib.Path, *, retries: int = 5, timeout: float = 60.0, progress: bool = True
) -> pathlib.Path:
  """Downloads `source` to `folder/<filename>` (resuming `folder/<filename>.part`) and checks it."""
  folder = pathlib.Path(folder)
  target, part = folder / source.filename, folder / (source.filename + ".part")
  if target.is_file():
    verify(source, target)
    return target
  try:
    folder.mkdir(parents=True, exist_ok=True)
    part.touch()
  except OSError as e:
    raise DownloadError(
      f"cannot write the download ({e.strerror or e})", str(folder), "choose a writable folder or fix its permissions"
    ) from None
  last = None
  for attempt in range(retries + 1):
    try:
      if _transfer(source.url, part, timeout, progress):
        break
      last = "connection closed before the end of the file"
    except urllib.error.HTTPError as e:
      if 400 <= e.code < 500 and e.code not in (408, 429):  # the URL is wrong: retrying will not help
        raise DownloadError(
          f"HTTP {e.code} {e.reason}", source.url, "the file moved; pass the new location with --url"
        ) from None
      last = f"HTTP {e.code} {e.reason}"
    except (TimeoutError, urllib.error.URLError, http.client.HTTPException, ConnectionError) as e:
      last = f"{type(e).__name__}: {getattr(e, 'reason', e)}"
    except OSError as e:
      raise DownloadError(
        f"cannot write the download ({e.strerror or e})", str(part), "free some space or choose another folder"
      ) from None
    if attempt < retries:
      time.sleep(min(2.0**attempt, 30.0))  # 1, 2, 4, ... s: a flaky link gets time to recover
  else:
    raise DownloadError(
      f"network error after {retries + 1} attempts ({last})",
      source.url,
      f"check the connection and run the command again: {part.name} resumes",
    )
  verify(source, part, rename_to=target)
  return target


# --- 2. Checks.


def file_digests(path: pathlib.Path) -> tuple[str, str]:
  """(SHA-256, git blob SHA-1) of a file, in one pass."""
  sha256, blob = hashlib.sha256(), hashlib.sha1()
  blob.update(b"blob %d\0" % path.stat().st_size)
  with open(path, "rb") as f:
    while chunk := f.read(1 << 20):
      sha256.update(chunk)
      blob.update(chunk)
  return sha256.hexdigest(), blob.hexdigest()


def verify(source: Source, path: pathlib.Path, rename_to: pathlib.Path | None = None) -> None:
  """Checks `path` against the source's checksums; deletes it on a mismatch (resuming cannot repair it)."""
  sha256, blob = file_digests(path)
  for name, expected, got in (("SHA-256", source.sha256, sha256), ("git blob id", source.git_blob_sha1, blob)):
    if expected and expected.lower() != got:
      path.unlink()
      raise DownloadError(
        f"{name} mismatch: expected {expected}, got {got}; the file was deleted",
        str(rename_to or path),
        "run the command again; if it persists the published file changed: "
        "check it and pass its checksum with --sha256",
      )
  if not source.sha256 and not source.git_blob_sha1:
    print(
      f"{(rename_to or path).name}: SHA-256 {sha256} (no published checksum; pin it with --sha256)", file=sys.stderr
    )
  if rename_to is not None:
    path.replace(rename_to)


# --- 3. Extraction.


def extract(archive: pathlib.Path, into: pathlib.Path) -> None:
  try:
    if zipfile.is_zipfile(archive):
      with zipfile.ZipFile(archive) as z:
        for name in z.namelist():
          if name.startswith(("/", "\\")) or ".." in pathlib.PurePosixPath(name).parts:
            raise zipfile.BadZipFile(f"unsafe member name {name!r}")
        z.extractall(into)
    else:
      with tarfile.open(archive) as t:  # tar, tar.gz, tar.xz, tar.bz2 (detected)
        t.extractall(into, filter="data")  # refuses absolute paths, '..', devices and links out of `into`
  except (tarfile.TarError, zipfile.BadZipFile, EOFError, OSError, ValueError) as e:
    raise DownloadError(
      f"corrupt or unreadable archive ({type(e).__name__}: {e})", str(archive), "delete it and run the command again"
    ) from None
