"""Start-up shared by the command-line entry points."""

import logging


def setup_logging(library_level: int = logging.INFO) -> None:
  """Warnings from dependencies (orbax logs every save at INFO), `library_level` from efficientad_jax."""
  logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(message)s")
  logging.getLogger("efficientad_jax").setLevel(library_level)


def init_distributed(enabled: bool) -> None:
  """Multi-host runs: `jax.distributed.initialize()` (reads the cluster's environment) before any jax work."""
  if enabled:
    import jax  # imported here so that --help stays fast
    jax.distributed.initialize()
