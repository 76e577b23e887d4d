"""One process per run directory, with real processes: a second training or an evaluation of a held RUN is
refused at once in one line naming the holder; a holder killed with SIGKILL blocks nothing."""

import os
import signal
import subprocess
import sys
import textwrap

import pytest

from efficientad_jax.training import lock
from tests.conftest import REPO
from tests.test_cli_errors import one_line, run_cli

HOLDER = textwrap.dedent("""
    import sys, time
    from efficientad_jax.training import lock
    with lock.hold(sys.argv[1], "training"):
        print("held", flush=True)
        time.sleep(600)
""")


def _start_holder(run) -> subprocess.Popen:
  proc = subprocess.Popen([sys.executable, "-c", HOLDER, str(run)], cwd=REPO, stdout=subprocess.PIPE, text=True)
  assert proc.stdout.readline().strip() == "held"
  return proc


def test_a_held_run_directory_refuses_training_and_evaluation_and_a_killed_holder_blocks_nothing(tmp_path):
  run = tmp_path / "run"
  holder = _start_holder(run)
  try:
    train = run_cli("train", "--workdir", str(run), "--set", "train.steps=1")
    line = one_line(train, 1, f"{run} is in use", f"training by pid {holder.pid}", "choose another --workdir")
    assert "since" in line
    evaluate = run_cli("evaluate", "--workdir", str(run))
    one_line(evaluate, 1, f"{run} is in use", f"pid {holder.pid}")
    assert sorted(p.name for p in run.iterdir()) == [".lock"]  # the refused commands wrote nothing
  finally:
    os.kill(holder.pid, signal.SIGKILL)
    holder.wait()
  # The kernel dropped the killed holder's lock: the next command holds the directory (the stale note is
  # overwritten with its own).
  again = _start_holder(run)
  try:
    assert f'"pid": {again.pid}' in (run / ".lock").read_text()
  finally:
    again.kill()
    again.wait()


def test_the_lock_is_reentrant_in_one_process_and_released_on_exit(tmp_path):
  run = tmp_path / "run"
  with lock.hold(run, "training"):
    (run / "config.json").write_text("{}")
    with lock.hold(run, "evaluation"):  # a training that evaluates its own run at the end
      pass
    assert '"what": "training"' in (run / ".lock").read_text()
  assert (run / ".lock").read_text() == ""  # released: the note went with it, the run's files stay
  with lock.hold(run, "evaluation"):
    pass


def test_only_the_primary_process_of_a_multi_host_run_takes_the_lock(tmp_path):
  holder = _start_holder(tmp_path / "run")
  try:
    with lock.hold(tmp_path / "run", "training", primary=False):  # a non-writing host: no lock, no refusal
      pass
    with pytest.raises(lock.RunInUse, match=f"pid {holder.pid}"), lock.hold(tmp_path / "run", "training"):
      pass
  finally:
    holder.kill()
    holder.wait()
