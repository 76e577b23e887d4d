"""One process per run directory: an advisory lock on RUN/.lock that the operating system drops with its holder.

A training, a distillation or an evaluation writes into RUN (checkpoints, the saved model, RUN/eval); two of them
at once would overwrite each other's work. `hold(RUN, what)` takes an exclusive `flock` on RUN/.lock and writes
who holds it (pid, host, since when, what) into the file; a second command on the same RUN is refused at once with
`RunInUse`, one line naming the holder. The kernel releases a `flock` when its process ends however it ends
(SIGKILL included), and the file's content is only a note, so a lock left by a killed process never blocks a
resume; after a power loss no process holds it either. A run that stops before writing anything into a directory
it created leaves no directory behind. Within one process the lock is re-entrant (a training
that evaluates its own run at the end holds it once). In a multi-host run only the primary process writes, so
only it takes the lock (`hold(..., primary=jax.process_index() == 0)`).

`flock` on a network file system may be local to each host; two hosts training into one shared RUN by mistake
are not detected there.
"""

from __future__ import annotations

import contextlib
import datetime
import fcntl
import json
import os
import pathlib
import socket
import sys
from collections.abc import Iterator

LOCK_NAME = ".lock"
_held: dict[pathlib.Path, int] = {}  # lock file -> how many `hold`s of this process are open on it


class RunInUse(RuntimeError):
  """Another process holds the run directory."""


def _holder(path: pathlib.Path) -> str:
  try:
    info = json.loads(path.read_text())
    return (
      f"{info['what']} by pid {info['pid']} on {info['host']} since {info['since']} ({' '.join(info.get('argv', []))})"
    )
  except (OSError, ValueError, KeyError, TypeError):
    return "another process (no details recorded)"


@contextlib.contextmanager
def hold(workdir: str | pathlib.Path, what: str, *, primary: bool = True) -> Iterator[None]:
  """Holds RUN/.lock for the duration; raises RunInUse at once when another process holds it.

  Args:
    workdir: the run directory (created if missing).
    what: what this process does there ("training", "evaluation", ...), recorded for the refusal message.
    primary: False on the processes of a multi-host run that do not write: they take no lock.
  """
  if not primary:
    yield
    return
  workdir = pathlib.Path(workdir).absolute()
  path = workdir / LOCK_NAME
  created = not workdir.exists()
  if _held.get(path):
    _held[path] += 1
    try:
      yield
    finally:
      _held[path] -= 1
    return
  workdir.mkdir(parents=True, exist_ok=True)
  fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
  try:
    try:
      fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
      raise RunInUse(
        f"{workdir} is in use: {_holder(path)}; wait for it to finish or stop it, or choose another --workdir "
        "(a process that was killed holds nothing: then just run the command again)"
      ) from None
    note = {
      "what": what,
      "pid": os.getpid(),
      "host": socket.gethostname(),
      "argv": sys.argv,
      "since": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
    }
    os.ftruncate(fd, 0)
    os.pwrite(fd, json.dumps(note).encode(), 0)
    _held[path] = 1
    try:
      yield
    finally:
      del _held[path]
      os.ftruncate(fd, 0)  # the note goes with the lock; the empty file stays (removing it could race) ...
      if created and [p.name for p in workdir.iterdir()] == [LOCK_NAME]:
        path.unlink()  # ... unless the run failed before writing anything: then it leaves no directory
        workdir.rmdir()
  finally:
    os.close(fd)  # releases the flock
