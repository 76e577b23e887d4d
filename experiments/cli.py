"""Start-up shared by the command-line entry points."""

import argparse
import errno
import logging
import os
import pathlib
import sys
import threading
import zipfile

from efficientad_jax.config import ConfigError


def setup_logging(library_level: int = logging.INFO) -> None:
  """Warnings from dependencies (orbax logs every save at INFO), `library_level` from efficientad_jax."""
  logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(message)s")
  logging.getLogger("efficientad_jax").setLevel(library_level)


def init_distributed(enabled: bool) -> None:
  """Multi-host runs: `jax.distributed.initialize()` (reads the cluster's environment) before any jax work."""
  if enabled:
    import jax  # imported here so that --help stays fast

    jax.distributed.initialize()


# --- One line for every error a user can cause (README "When something goes wrong").

DEBUG_HELP = "on an error, print the full Python traceback instead of one line"


class UsageError(Exception):
  """A flag the command cannot use: its message is the whole line after 'error: ', exit status 2."""


def writable_folder(path: str, flag: str) -> None:
  """Creates `path` if needed and proves it writable before any work (not after the first image)."""
  folder = pathlib.Path(path)
  if folder.exists() and not folder.is_dir():
    raise UsageError(f"{path} is a file, not a folder ({flag}): name a folder to create or fill")
  try:
    folder.mkdir(parents=True, exist_ok=True)
    probe = folder / f".write_test_{os.getpid()}"
    probe.write_bytes(b"")
    probe.unlink()
  except OSError as e:
    raise UsageError(f"cannot write to {path} ({flag}: {e.strerror or e}): choose a folder you can write to") from None


def new_file(path: str, flag: str) -> None:
  """`path` must name a file to write (replacing an older file is fine), not a folder or a path under a file."""
  out = pathlib.Path(path)
  if out.is_dir():
    raise UsageError(f"{path} is a folder ({flag}): name a file, e.g. {out / 'model.eadx'}")
  if out.parent.exists() and not out.parent.is_dir():
    raise UsageError(f"{out.parent} is a file, not a folder ({flag}): choose another path")


def add_debug_flag(parser) -> None:
  parser.add_argument("--debug", action="store_true", help=DEBUG_HELP)


def error_line(e: BaseException) -> tuple[str, int]:
  """(`error: <what> (<file or flag>): <what to do>`, exit status) for an error a user can cause, or
  ("", 0) for anything else (a bug: its traceback is shown)."""
  first = lambda text: " ".join(str(text).split())
  where = getattr(e, "filename", None)
  if isinstance(e, (ConfigError, UsageError)):
    return f"error: {first(e)}", 2
  if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT):
    return (
      f"error: no space left on the device ({where or 'while writing'}): free some space and run the "
      "same command again (training resumes from its last complete checkpoint)"
    ), 1
  if isinstance(e, PermissionError):
    return f"error: permission denied ({where or first(e)}): choose a folder you can write to", 1
  if isinstance(e, IsADirectoryError):
    return f"error: a folder is in the way ({where or first(e)}): choose another file name", 1
  if isinstance(e, zipfile.BadZipFile):
    return f"error: not a complete exported model ({first(e)}): export it again", 1
  if isinstance(e, (ValueError, OSError, RuntimeError, KeyError)) and _is_ours(e):
    return f"error: {first(e)}", 1
  return "", 0


def _is_ours(e: BaseException) -> bool:
  """Errors raised on purpose by efficientad_jax / experiments (or plain OSErrors about a file) are for the
  user; anything else raised inside a dependency is a bug whose traceback must stay visible."""
  if isinstance(e, OSError):
    return True
  tb = e.__traceback__
  while tb is not None and tb.tb_next is not None:
    tb = tb.tb_next
  module = tb.tb_frame.f_globals.get("__name__", "") if tb is not None else ""
  return module.startswith(("efficientad_jax", "experiments", "__main__")) or type(e).__module__.startswith(
    ("efficientad_jax", "experiments")
  )


def run(main, argv=None) -> int:
  """Calls `main(argv)`; an error a user can cause ends as one stderr line and exit status 1 (2 for a bad
  config value, as argparse does for a bad flag). `--debug` re-raises it with the full traceback."""
  args = sys.argv[1:] if argv is None else list(argv)
  debug = "--debug" in args
  hooks = sys.excepthook, sys.unraisablehook
  if not debug:  # orbax logs each failed background write with its traceback; the error line says it once
    logging.getLogger("absl").addFilter(lambda record: record.levelno < logging.ERROR)
    _drop_closed_loop_callbacks()
  try:
    return main(argv)
  except KeyboardInterrupt:
    if debug:
      raise
    print("error: interrupted (Ctrl-C): run the same command again to resume", file=sys.stderr)
    return 130
  except Exception as e:
    line, status = error_line(e)
    if debug or not status:
      raise
    print(line, file=sys.stderr, flush=True)
    if argv is None:  # the process ends here (python -m experiments.<cli>): let nothing bury the line
      _quiet_shutdown()
    return status
  finally:
    if argv is not None:  # called in-process: leave the caller's hooks as they were
      sys.excepthook, sys.unraisablehook = hooks


def _closed_loop(error: BaseException | None) -> bool:
  return isinstance(error, RuntimeError) and str(error) == "Event loop is closed"


def _drop_closed_loop_callbacks() -> None:
  """When an asynchronous checkpoint write fails (a full disk), orbax closes its asyncio event loop while
  tensorstore's threads still complete futures; each such callback calls `loop.call_soon_threadsafe` on the closed
  loop and tensorstore reports the RuntimeError through `sys.unraisablehook` (C code printing it with `PyErr_Print`
  would go through `sys.excepthook`, filtered the same way). Those tracebacks say nothing a user can act on and
  would come before the one error line, so they are dropped; every other exception reaches the previous hooks
  unchanged."""
  excepthook, unraisablehook = sys.excepthook, sys.unraisablehook
  sys.excepthook = lambda kind, error, tb: None if _closed_loop(error) else excepthook(kind, error, tb)
  sys.unraisablehook = lambda u: None if _closed_loop(u.exc_value) else unraisablehook(u)


def _quiet_shutdown() -> None:
  """After the error line: background threads of dependencies (orbax's and tensorstore's writers after a full
  disk) that fail while the interpreter shuts down must not bury it under their tracebacks, some printed by
  C++ threads straight to file descriptor 2, so fd 2 goes to /dev/null (BUILD_NOTES.md, "Errors and resuming
  with other settings")."""
  sys.unraisablehook = lambda unraisable: None
  threading.excepthook = lambda args: None
  logging.disable(logging.CRITICAL)
  devnull = os.open(os.devnull, os.O_WRONLY)
  os.dup2(devnull, 2)
  sys.stderr = open(os.devnull, "w")  # noqa: SIM115  (until exit)


def positive_int(text: str) -> int:
  """argparse type: an integer >= 1 (a bad value is a usage error, exit status 2)."""
  try:
    value = int(text)
  except ValueError:
    raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {text!r}") from None
  if value < 1:
    raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
  return value
