"""One writer per run directory: refusal naming the holder, takeover after a kill."""

import json
import os
import signal
import subprocess
import sys

import pytest
from absl import logging

from nse_tf import run_lock

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


def test_search_cli_refuses_a_locked_output_dir_before_writing(tmp_path):
  """The second search is refused in one line and writes nothing (no config.json)."""
  out = tmp_path / "busy"
  p = _holder(out)
  try:
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2", CUDA_VISIBLE_DEVICES="")
    proc = subprocess.run([sys.executable, "-m", "nse_tf.search", "--flagfile=flags/demo.cfg",
                           f"--output_dir={out}"], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr[-2000:]
    lines = proc.stderr.strip().splitlines()
    assert lines[-1].startswith("error: ") and f"pid {p.pid}" in lines[-1], proc.stderr
    assert "Traceback" not in proc.stderr
    assert sorted(os.listdir(out)) == [".lock"]
  finally:
    p.kill()
    p.wait()
