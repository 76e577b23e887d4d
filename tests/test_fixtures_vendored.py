"""The vendored fixtures (tests/fixtures) equal the shared reference set, file by file, when that set is here.

A clone on its own has only the vendored copy and the check has nothing to compare with; on the machine
where ../shared/fixtures sits beside the repository, any drift between the two (a file added, removed or
changed on either side) fails here.
"""

import pathlib

import pytest

from tests.conftest import REPO, VENDORED_FIXTURES

SHARED_FIXTURES = REPO.parent / "shared" / "fixtures"


def _files(root: pathlib.Path) -> dict[str, pathlib.Path]:
  """Relative POSIX path -> file, for every regular file under root (caches excluded)."""
  return {
    p.relative_to(root).as_posix(): p for p in sorted(root.rglob("*")) if p.is_file() and "__pycache__" not in p.parts
  }


def test_vendored_fixtures_are_complete():
  # Independent of ../shared: the vendored copy alone must hold every part the tests read.
  files = _files(VENDORED_FIXTURES)
  for part in (
    "README.md",
    "networks/network_outputs.json",
    "full_path/full_path.json",
    "mvtec_ad/expected.json",
    "mvtec_loco/expected.json",
    "preprocess/preprocess.json",
  ):
    assert part in files, part


def test_vendored_fixtures_equal_shared_copy():
  if not (SHARED_FIXTURES / "README.md").exists():
    pytest.skip(f"no shared fixture set at {SHARED_FIXTURES} to compare the vendored copy with")
  vendored, shared = _files(VENDORED_FIXTURES), _files(SHARED_FIXTURES)
  assert sorted(vendored) == sorted(shared)
  differing = [rel for rel in shared if vendored[rel].read_bytes() != shared[rel].read_bytes()]
  assert not differing, f"vendored fixtures differ from {SHARED_FIXTURES}: {differing}"
