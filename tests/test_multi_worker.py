"""MultiWorkerMirroredStrategy on one machine: two worker processes, TF_CONFIG with two
loopback ports (the way the README runs it without a cluster)."""

import json
import os
import shutil
import socket
import subprocess
import sys
import time

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


def _start_workers(args, ports):
  procs = []
  for i in range(2):
    env = dict(os.environ, TF_CONFIG=_tf_config(ports, i), TF_CPP_MIN_LOG_LEVEL="2",
               CUDA_VISIBLE_DEVICES="")
    env.pop("PYTHONPATH", None)
    procs.append(subprocess.Popen(args, cwd=ROOT, env=env, stdout=subprocess.PIPE,
                                  stderr=subprocess.PIPE, text=True))
  return procs


def _run_workers(args, ports):
  procs = _start_workers(args, ports)
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
  return results


def _survivors(results):
  """Each worker's printed survivors per layer (and keep-probabilities)."""
  return [stdout.split("survivors per layer:")[1].split("wrote")[0] for stdout, _ in results]


@pytest.mark.slow
def test_two_workers_lost_worker_resume_and_a_worker_behind_the_chief(tmp_path):
  """One round on two workers, three times (one test: each pair of processes costs a
  start-up and a compile):
  1. worker 0 killed mid-round: worker 1 stops within 60 s with one `error:` line that
     names the lost worker and says how to resume;
  2. the same command on both resumes from the last checkpoint and finishes the round:
     the chief wrote the run directory, worker 1 removed its own, both trained the same
     round;
  3. a worker that holds an older checkpoint than the chief (as if killed while both
     saved the last step) makes both resume at that step, ending with the same
     round.json."""
  import tensorflow as tf  # pylint: disable=import-outside-toplevel
  out = tmp_path / "round"
  args = [sys.executable, "-m", "nse_tf.train_round", "--dataset=demo_digits_hard",
          "--image_size=16", "--space=flops27", "--macro=tiny", "--max_ops=1",
          "--global_batch=16", "--epochs=1", "--steps_per_epoch=40", "--checkpoint_every=10",
          "--strategy=multi_worker", "--graph_optimization=off",
          f"--output_dir={out}"]
  chief, worker = _start_workers(args, _free_ports(2))
  try:
    deadline = time.time() + 300
    while (time.time() < deadline and chief.poll() is None and worker.poll() is None
           and not (out / "ckpt" / "checkpoint").exists()):
      time.sleep(0.2)
    assert chief.poll() is None and worker.poll() is None, "a worker ended before the kill"
    chief.kill()
    chief.wait()
    killed = time.time()
    _, err = worker.communicate(timeout=60)
    assert time.time() - killed < 60
  finally:
    for p in (chief, worker):
      if p.poll() is None:
        p.kill()
        p.wait()
  assert worker.returncode == 2 and "Traceback" not in err, err[-3000:]
  last = err.strip().splitlines()[-1]
  assert last.startswith("error: lost contact with") and "worker 0" in last, last
  assert "Re-run the same command on every worker" in last, last
  resumed = _run_workers(args, _free_ports(2))
  for stdout, _ in resumed:
    assert "resuming at step" in stdout, stdout
  summary = json.loads((out / "round.json").read_text())
  assert summary["steps"] == 40
  assert summary["machine"]["cores"] == os.cpu_count() and summary["machine"]["cpu"]
  # The chief wrote the run directory; worker 1 removed its own at the end.
  assert sorted(os.listdir(out)) == [".lock", "ckpt", "round.json", "tb"]
  # Both workers trained the same round: the same survivors and keep-probabilities.
  survivors = _survivors(resumed)
  assert survivors[0] == survivors[1]
  # Worker 1 as if killed while both saved step 40: it holds step 30 only (workers hold
  # the same mirrored values, so the chief's step-30 files are what it wrote).
  mine = out / ".worker-1" / "ckpt"
  mine.mkdir(parents=True)
  for f in (out / "ckpt").glob("ckpt-30.*"):
    shutil.copy(f, mine / f.name)
  tf.compat.v1.train.update_checkpoint_state(
      str(mine), "ckpt-30", all_model_checkpoint_paths=["ckpt-30"],
      all_model_checkpoint_timestamps=[time.time()])
  again = _run_workers(args, _free_ports(2))
  for stdout, _ in again:
    assert "resuming at step 30 of 40" in stdout, stdout
  assert "the newest step every worker has" in again[0][1]   # the chief went back
  resumed_again = json.loads((out / "round.json").read_text())
  assert {k: v for k, v in resumed_again.items() if k != "seconds"} == {
      k: v for k, v in summary.items() if k != "seconds"}
  assert _survivors(again) == survivors


@pytest.mark.slow
def test_search_splits_candidate_evaluation_across_two_workers(tmp_path, monkeypatch):
  """--split_evaluation: each worker evaluates its share, the chief logs every result, and
  each result is the one a single process computes from the same checkpoint."""
  import csv  # pylint: disable=import-outside-toplevel
  import importlib.util  # pylint: disable=import-outside-toplevel
  from nse_tf import arch as arch_lib, data as data_lib  # pylint: disable=import-outside-toplevel
  out = tmp_path / "search"
  args = [sys.executable, "-m", "nse_tf.search", "--dataset=demo_digits_hard",
          "--image_size=16", "--space=flops27", "--macro=tiny", "--max_ops=2", "--rounds=1",
          "--global_batch=16", "--epochs=1", "--steps_per_epoch=4", "--num_samples=9",
          "--num_edge=1", "--bn_recal_batches=2", "--eval_examples=32", "--eval_batch=16",
          "--interval=150,1000", "--edge_lo=0", "--tau=250", "--progress=false",
          "--strategy=multi_worker", "--split_evaluation", "--graph_optimization=off",
          f"--output_dir={out}"]
  _run_workers(args, _free_ports(2))
  assert not (out / ".worker-1").exists()
  log = [json.loads(line) for line in (out / "round_01" / "evaluated.jsonl").read_text()
         .splitlines()]
  rows = list(csv.DictReader(open(out / "round_01" / "candidates.csv", encoding="utf-8")))
  assert [r["i"] for r in log] == list(range(len(rows))) and len(rows) >= 9
  # One process, the chief's finished checkpoint, the same candidates: the same results.
  # (Under MirroredStrategy on one device: like MultiWorkerMirroredStrategy, it keeps no
  # data iterators in the checkpoint.)
  import tensorflow as tf  # pylint: disable=import-outside-toplevel
  from nse_tf import distribute  # pylint: disable=import-outside-toplevel
  one_device = tf.distribute.MirroredStrategy(["/cpu:0"])
  monkeypatch.setattr(distribute, "get_strategy", lambda *a: one_device)
  spec = importlib.util.spec_from_file_location(
      "bench_search_quality", os.path.join(ROOT, "benchmarks", "search_quality.py"))
  bench = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(bench)
  cfg = json.loads((out / "config.json").read_text())
  srch = bench.finished_search(str(out), cfg, data_lib.get_data(
      cfg["dataset"], image_size=cfg["image_size"]))
  archs = [arch_lib.Architecture.from_compact(r["arch"]) for r in rows]
  again = srch.evaluate_in_round(archs, str(tmp_path / "again.jsonl"))
  assert again == [r["accuracy"] for r in log]
