"""One writer per run directory: refusal naming the holder, takeover after a kill."""

import json
import os
import signal
import subprocess
import sys

import pytest
from absl import logging

from nse_tf import cli, run_lock, search

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

_HOLD = ("import sys, time\n"
         "from nse_tf import run_lock\n"
         "run_lock.acquire(sys.argv[1], 'search')\n"
         "print('locked', flush=True)\n"
         "time.sleep(600)\n")


def _holder(directory):
  p = subprocess.Popen([sys.executable, "-c", _HOLD, str(directory)], cwd=ROOT,
                       stdout=subprocess.PIPE, text=True)
  assert p.stdout.readline().strip() == "locked"
  return p


def test_second_writer_is_refused_and_a_killed_holder_is_taken_over(tmp_path, monkeypatch):
  run_dir = tmp_path / "run"
  p = _holder(run_dir)
  try:
    info = json.loads((run_dir / ".lock").read_text())
    assert info["pid"] == p.pid and info["host"] and info["started"]
    with pytest.raises(run_lock.RunLockError) as e:
      run_lock.acquire(str(run_dir), "search")
    msg = str(e.value)
    assert f"pid {p.pid}" in msg and "in use by another search" in msg and "\n" not in msg
    assert not run_lock.held(str(run_dir))
  finally:
    p.send_signal(signal.SIGKILL)     # no clean-up runs: the kernel drops the flock
    p.wait()
  notes = []
  monkeypatch.setattr(logging, "warning", lambda fmt, *a: notes.append(fmt % a))
  run_lock.acquire(str(run_dir), "search")
  try:
    assert any("taking over" in n and f"pid {p.pid}" in n for n in notes), notes
    assert json.loads((run_dir / ".lock").read_text())["pid"] == os.getpid()
    assert run_lock.acquire(str(run_dir)) == str(run_dir / ".lock")   # re-entrant
  finally:
    run_lock.release(str(run_dir))
  assert (run_dir / ".lock").read_text() == ""        # a clean end leaves nothing to take over
  notes.clear()
  run_lock.acquire(str(run_dir))
  run_lock.release(str(run_dir))
  assert not notes


def test_search_cli_refuses_a_locked_output_dir_before_writing(tmp_path, capsys):
  """The second search is refused in one line and writes nothing (no config.json)."""
  out = tmp_path / "busy"
  p = _holder(out)
  try:
    code = cli.invoke(search.define_flags, search.main,
                      ["--flagfile=flags/demo.cfg", f"--output_dir={out}"])
    err = capsys.readouterr().err
    assert code == 2, err[-2000:]
    lines = err.strip().splitlines()
    assert lines[-1].startswith("error: ") and f"pid {p.pid}" in lines[-1], err
    assert not run_lock.held(str(out))
    assert sorted(os.listdir(out)) == [".lock"]
  finally:
    p.kill()
    p.wait()
