"""MultiWorkerMirroredStrategy on one machine: two worker processes, TF_CONFIG with two
loopback ports (the way the README runs it without a cluster)."""

import json
import os
import socket
import subprocess
import sys

import pytest

from nse_tf import errors, run_dir

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _free_ports(n):
  socks = [socket.socket() for _ in range(n)]
  for s in socks:
    s.bind(("localhost", 0))
  ports = [s.getsockname()[1] for s in socks]
  for s in socks:
    s.close()
  return ports


def _tf_config(ports, index):
  return json.dumps({"cluster": {"worker": [f"localhost:{p}" for p in ports]},
                     "task": {"type": "worker", "index": index}})


def test_worker_task_from_tf_config(monkeypatch):
  monkeypatch.delenv("TF_CONFIG", raising=False)
  assert run_dir.worker_task("multi_worker") == (True, "chief", 0)
  monkeypatch.setenv("TF_CONFIG", _tf_config([1, 2], 1))
  assert run_dir.worker_task("default") == (True, "chief", 0)   # not a cluster run
  assert run_dir.worker_task("multi_worker") == (False, "worker", 1)
  assert run_dir.worker_output_dir("multi_worker", "/r") == "/r/.worker-1"
  monkeypatch.setenv("TF_CONFIG", _tf_config([1, 2], 0))
  assert run_dir.worker_output_dir("multi_worker", "/r") == "/r"
  monkeypatch.setenv("TF_CONFIG", json.dumps(
      {"cluster": {"chief": ["a:1"], "worker": ["b:2"]}, "task": {"type": "worker", "index": 0}}))
  assert run_dir.worker_task("multi_worker") == (False, "worker", 0)
  monkeypatch.setenv("TF_CONFIG", "{not json")
  with pytest.raises(errors.UsageError, match="TF_CONFIG is not a cluster"):
    run_dir.worker_task("multi_worker")


@pytest.mark.slow
def test_one_round_on_two_workers_chief_writes(tmp_path):
  out = tmp_path / "round"
  ports = _free_ports(2)
  args = [sys.executable, "-m", "nse_tf.train_round", "--dataset=demo_digits_hard",
          "--image_size=16", "--space=flops27", "--macro=tiny", "--max_ops=1",
          "--global_batch=16", "--epochs=1", "--steps_per_epoch=4", "--checkpoint_every=2",
          "--strategy=multi_worker", f"--output_dir={out}"]
  procs = []
  for i in range(2):
    env = dict(os.environ, TF_CONFIG=_tf_config(ports, i), TF_CPP_MIN_LOG_LEVEL="2",
               CUDA_VISIBLE_DEVICES="")
    env.pop("PYTHONPATH", None)
    procs.append(subprocess.Popen(args, cwd=ROOT, env=env, stdout=subprocess.PIPE,
                                  stderr=subprocess.PIPE, text=True))
  results = []
  for p in procs:
    try:
      results.append(p.communicate(timeout=600))
    except subprocess.TimeoutExpired:
      for q in procs:
        q.kill()
      raise
  for p, (stdout, err) in zip(procs, results):
    assert p.returncode == 0, err[-3000:]
    assert "Traceback" not in err, err[-3000:]
    assert "wrote" in stdout
  summary = json.loads((out / "round.json").read_text())
  assert summary["steps"] == 4
  # The chief wrote the run directory; worker 1 removed its own at the end.
  assert sorted(os.listdir(out)) == [".lock", "ckpt", "round.json", "tb"]
  # Both workers trained the same round: the same survivors and keep-probabilities.
  assert results[0][0].split("survivors per layer:")[1].split("wrote")[0] == \
      results[1][0].split("survivors per layer:")[1].split("wrote")[0]
