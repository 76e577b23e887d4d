"""Imports a pretrained PyTorch teacher (`.pth` state_dict) as an orbax checkpoint, without torch.

  python -m experiments.import_teacher teacher_small.pth --size small --out checkpoints/teacher_small
  python -m experiments.import_teacher --download small --out checkpoints/teacher_small   # fetches it first

Reads nelson1425/EfficientAD (`teacher_small.pth`, keys `0.weight`, ...) or anomalib
(`pretrained_teacher_small.pth`, keys `conv1.weight`, ...) files, checks every key and shape against PDN-S/M,
and writes {'params', 'meta'} that `efficientad_jax.models.weights.load_teacher` reads back. `--download` fetches the
published file first (nelson1425's, git blob id checked; or `--origin anomalib`, SHA-256 checked) into --cache.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import pathlib
import sys

from efficientad_jax.files import download, pth
from efficientad_jax.models import weights
from experiments import cli

DEFAULT_CACHE = pathlib.Path(os.environ.get("XDG_CACHE_HOME") or pathlib.Path.home() / ".cache") / "efficientad_jax"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
  parser = argparse.ArgumentParser(prog="python -m experiments.import_teacher", description=__doc__.split("\n")[0])
  parser.add_argument("path", nargs="?", help="PyTorch .pth holding the teacher's state_dict")
  parser.add_argument("--size", choices=("small", "medium"), help="PDN size of the teacher (with a path)")
  parser.add_argument("--download", choices=("small", "medium"), help="fetch the published PDN teacher instead")
  parser.add_argument(
    "--origin",
    choices=("nelson", "anomalib"),
    default="nelson",
    help="with --download: nelson1425/EfficientAD's file or anomalib's archive",
  )
  parser.add_argument("--cache", default=str(DEFAULT_CACHE), help="with --download: where the .pth is kept")
  parser.add_argument("--url", help="with --download: a mirror of the published file")
  parser.add_argument("--sha256", help="with --download: expected SHA-256 (replaces the published check)")
  parser.add_argument("--out", required=True, help="output folder for the orbax checkpoint")
  parser.add_argument("--force", action="store_true", help="replace a previous teacher checkpoint in --out")
  cli.add_debug_flag(parser)
  args = parser.parse_args(argv)
  if (args.path is None) == (args.download is None):
    parser.error("give either a .pth path (with --size) or --download small|medium")
  if args.path is not None and args.size is None:
    parser.error("--size is required with a .pth path")
  if args.download and args.size and args.size != args.download:
    parser.error(f"--size {args.size} contradicts --download {args.download}")
  return args


def fetch_teacher(args: argparse.Namespace) -> pathlib.Path:
  """The published teacher `.pth` (efficientad_jax.files.download), --url / --sha256 applied."""
  source = download.TEACHERS[(args.origin, args.download)].mirrored()
  if args.url:
    source = dataclasses.replace(source, url=args.url)
  if args.sha256:
    source = dataclasses.replace(source, sha256=args.sha256, git_blob_sha1=None)
  return download.download_teacher(args.download, args.cache, source=source)


def main(argv: list[str] | None = None) -> int:
  args = parse_args(argv)
  try:
    path = fetch_teacher(args) if args.download else args.path
    meta = weights.import_teacher(path, args.size or args.download, args.out, force=args.force)
  except (pth.PthError, weights.WeightsError, FileExistsError, FileNotFoundError, download.DownloadError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 1
  print(
    f"wrote PDN-{meta['size']} teacher ({meta['channels']} channels, {meta['layout']} layout) "
    f"from {meta['source']} to {args.out}"
  )
  return 0


def command() -> None:
  """The `efficientad-import-teacher` console script (pyproject.toml [project.scripts])."""
  sys.exit(cli.run(main))


if __name__ == "__main__":
  command()
