"""A real browser for the report tests: headless Chromium (Debian's `chromium` package, which .ci/run installs).

Without a browser the tests that need one are skipped, unless EFFICIENTAD_REQUIRE_BROWSER=1 (set by .ci/run),
where they fail: CI must not pass without having looked at the page.
"""

import os
import pathlib
import shutil
import subprocess
import tempfile

import numpy as np
import pytest
from PIL import Image

NAMES = ("chromium", "chromium-browser", "google-chrome")


def executable() -> str:
  for name in NAMES:
    if path := shutil.which(name):
      return path
  message = "no headless browser (apt install chromium)"
  if os.environ.get("EFFICIENTAD_REQUIRE_BROWSER") == "1":
    pytest.fail(message)
  pytest.skip(message)


def _run(page: pathlib.Path, fragment: str, *flags: str) -> subprocess.CompletedProcess:
  with tempfile.TemporaryDirectory() as profile:  # one profile per call: parallel test workers do not share one
    command = [
      executable(),
      "--headless",
      "--no-sandbox",  # root in CI containers
      "--disable-gpu",
      "--hide-scrollbars",
      f"--user-data-dir={profile}",
      "--virtual-time-budget=5000",  # lets the page's script and the lazy thumbnails finish before the capture
      *flags,
      page.absolute().as_uri() + fragment,
    ]
    return subprocess.run(command, capture_output=True, text=True, timeout=120, check=True)


def dom(page: pathlib.Path, fragment: str = "") -> str:
  """The page's DOM after its script ran (`fragment`, e.g. '#outcome=errors', as in the address bar)."""
  return _run(page, fragment, "--dump-dom").stdout


def screenshot(page: pathlib.Path, size: tuple[int, int], images: bool = True, fragment: str = "") -> np.ndarray:
  """[H, W, 3] uint8 screenshot of the page in a window of `size` (width, height); images=False blocks images."""
  with tempfile.TemporaryDirectory() as tmp:
    path = pathlib.Path(tmp) / "shot.png"
    flags = [f"--window-size={size[0]},{size[1]}", f"--screenshot={path}"]
    if not images:
      flags.append("--blink-settings=imagesEnabled=false")
    _run(page, fragment, *flags)
    return np.asarray(Image.open(path).convert("RGB"))
