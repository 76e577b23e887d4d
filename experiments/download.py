"""Download and extract a published dataset into the layout the dataset indexes read.

  python -m experiments.download mvtec_ad --to data/mvtec_ad       # then data.root=data/mvtec_ad
  python -m experiments.download mvtec_loco --to data/mvtec_loco
  python -m experiments.download visa --to data/visa                # holds split_csv/1cls.csv
  python -m experiments.download imagenette --to data/imagenette    # penalty images: data/imagenette/train

Resumable (run the same command again after an interruption), SHA-256 checked, extracted atomically
(efficientad_jax/download.py). Any failure prints one line `error: <what> (<where>): <what to do>`.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys

from efficientad_jax.files import download
from experiments import cli


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
  p = argparse.ArgumentParser(
    prog="python -m experiments.download", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
  )
  p.add_argument("dataset", choices=sorted(download.DATASETS))
  p.add_argument("--to", required=True, help="dataset folder to create (the training config's data.root)")
  p.add_argument("--url", help="download from here instead of the published location (a mirror)")
  p.add_argument("--sha256", help="expected SHA-256 of the archive (replaces the published one)")
  p.add_argument("--keep-archive", action="store_true", help="keep the archive next to --to after extracting")
  p.add_argument("--retries", type=int, default=5, help="reconnects per run after a dropped connection")
  p.add_argument("--no-progress", action="store_true", help="no progress bar")
  cli.add_debug_flag(p)
  return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
  args = parse_args(argv)
  source = download.DATASETS[args.dataset].mirrored()
  if args.url:  # a mirror of the same file: the published checksum still applies
    source = dataclasses.replace(source, url=args.url)
  if args.sha256:
    source = dataclasses.replace(source, sha256=args.sha256)
  try:
    path = download.download_dataset(
      args.dataset,
      args.to,
      source=source,
      keep_archive=args.keep_archive,
      retries=args.retries,
      progress=not args.no_progress,
    )
  except download.DownloadError as e:
    print(f"error: {e}", file=sys.stderr)
    return 1
  except KeyboardInterrupt:
    print(f"error: interrupted ({args.to}): run the same command again to resume the download", file=sys.stderr)
    return 130
  print(f"{args.dataset} ready in {path}")
  return 0


def command() -> None:
  """The `efficientad-download` console script (pyproject.toml [project.scripts])."""
  sys.exit(cli.run(main))


if __name__ == "__main__":
  command()
