"""The search: state, refill, aggregation, sampling, selection, CLI, kill-and-resume."""

import csv
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from nse_tf import arch as arch_lib
from nse_tf import candidate_eval, cli, cost, evolution, fileio, machine, search, spaces, stats

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# A reduced demo: the real search on the tiny macro, 2 rounds of 60 steps, a handful of
# candidates. 60 steps (not 6) so that a float difference in any step reaches the
# candidates' accuracies: with 6 steps, runs agreed on every output while their weights
# differed in the last bits. The same run is the reference of the kill-and-resume and
# of the run beside a CPU hog.
SMOKE = ["--flagfile=flags/demo.cfg", "--max_ops=2", "--rounds=2", "--epochs=1",
         "--steps_per_epoch=60", "--num_samples=10", "--num_edge=3", "--bn_recal_batches=2",
         "--eval_examples=96", "--eval_batch=48", "--interval=150,1000", "--edge_lo=0",
         "--checkpoint_every=20", "--progress=false", "--global_batch=32"]
COMPARED = ("final_arch.json", "round_01/front.json", "round_02/front.json",
            "round_01/candidates.csv", "round_02/candidates.csv")


def _cli(args, out_dir, **kw):
  env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2", CUDA_VISIBLE_DEVICES="")
  return subprocess.Popen([sys.executable, "-m", "nse_tf.search", *args,
                           f"--output_dir={out_dir}"], cwd=ROOT, env=env,
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kw)


def _run(args, out_dir, timeout=900):
  p = _cli(args, out_dir)
  out, err = p.communicate(timeout=timeout)
  return p.returncode, out, err


def _invoke(args, out_dir, capsys):
  """The search command in this process (its own flags): (status, stdout, stderr)."""
  code = cli.invoke(search.define_flags, search.main, [*args, f"--output_dir={out_dir}"])
  captured = capsys.readouterr()
  return code, captured.out, captured.err


def _tb_losses(out_dir, rounds=("round_01", "round_02")):
  """round/loss per (round, step) from the TensorBoard logs, as exact float32 bits."""
  from tensorboard.backend.event_processing import event_accumulator  # pylint: disable=g-import-not-at-top
  losses = {}
  for r in rounds:
    acc = event_accumulator.EventAccumulator(str(out_dir / "tb" / r),
                                             size_guidance={"tensors": 0})
    acc.Reload()
    for e in acc.Tensors("round/loss"):
      losses[(r, e.step)] = e.tensor_proto.SerializeToString()
  return losses


# ------------------------------------------------------------------ units


def _cfg(**kw):
  base = dict(space="flops27", macro="tiny", max_ops=3, seed=1)
  base.update(kw)
  return evolution.SearchConfig(**base)


def test_new_state_takes_first_k_of_each_seeded_queue():
  s = evolution.new_state(_cfg())
  assert len(s.queues) == spaces.num_layers("tiny")
  for q, ws, pos in zip(s.queues, s.working_sets, s.queue_pos):
    assert sorted(q) == list(range(27))
    assert ws == sorted(q[:3]) and pos == 3
  assert evolution.new_state(_cfg()).queues == s.queues             # seeded
  assert evolution.new_state(_cfg(seed=2)).queues != s.queues


def test_refill_keeps_inherited_and_takes_untried_ops_in_queue_order():
  s = evolution.SearchState(space="flops27", queues=[[5, 1, 7, 3, 9, 2]], queue_pos=[2],
                            working_sets=[[1, 5]], inherited=[[1, 7]])
  added = evolution.refill(s, 4)
  # 7 is already inherited: skipped (it was tried); 3 and 9 are next in the queue.
  assert s.working_sets == [[1, 3, 7, 9]]
  assert added == [[3, 9]] and s.queue_pos == [5]
  s.inherited = [[0, 1, 2, 3, 4]]
  assert evolution.refill(s, 4) == [[]]                              # |A_l| >= K adds nothing
  assert s.working_sets == [[0, 1, 2, 3, 4]]


def test_aggregate_is_the_per_layer_union():
  a = arch_lib.Architecture.from_indices("flops27", [[0], [3, 4], [], [1], [2], [5]], macro="tiny")
  b = arch_lib.Architecture.from_indices("flops27", [[0, 2], [4], [6], [1], [7], [5]], macro="tiny")
  assert evolution.aggregate([a, b], 6) == [[0, 2], [3, 4], [6], [1], [2, 7], [5]]


def test_rounds_formula():
  assert evolution.SearchConfig(space="flops27", max_ops=5).num_rounds() == 6
  assert evolution.SearchConfig(space="latency19", max_ops=6).num_rounds() == 3
  assert evolution.SearchConfig(space="flops72", init_from="x").num_rounds() == 3
  assert evolution.SearchConfig(space="flops27", max_ops=5, rounds=2).num_rounds() == 2


def test_sampling_unique_in_interval_and_edges_below():
  cfg = _cfg(num_samples=50, num_edge=10, interval=(150.0, 350.0), edge_lo=100.0)
  table = cost.CostTable("flops27", "tiny", 224)
  state = evolution.new_state(cfg)
  alive = [np.ones(len(w), bool) for w in state.working_sets]
  thetas = [np.zeros(len(w)) for w in state.working_sets]
  kinds = spaces.layer_kinds("tiny")
  samples, edges = evolution.sample_candidates(cfg, table, state.working_sets, alive, thetas,
                                               kinds, seed=3)
  assert len(samples) == 50 and len(set(samples)) == 50
  assert all(150 < table.indices_cost(s) < 350 for s in samples)
  assert all(100 < table.indices_cost(e) <= 150 for e in edges) and len(edges) == 10
  for s in samples + edges:
    for l, ops in enumerate(s):
      assert set(ops) <= set(state.working_sets[l])
      assert ops or kinds[l] == "N"
  again, _ = evolution.sample_candidates(cfg, table, state.working_sets, alive, thetas, kinds, 3)
  assert again == samples                                            # per-round seed


def test_unreachable_interval_is_a_clear_error():
  cfg = _cfg(num_samples=5, interval=(1e6, 2e6), edge_lo=0.0, max_draws=2000)
  table = cost.CostTable("flops27", "tiny", 224)
  state = evolution.new_state(cfg)
  alive = [np.ones(len(w), bool) for w in state.working_sets]
  with pytest.raises(evolution.SearchError, match=r"only 0 of 5 .*\(1e\+06, 2e\+06\).*--interval"):
    evolution.sample_candidates(cfg, table, state.working_sets, alive,
                                [np.zeros(len(w)) for w in state.working_sets],
                                spaces.layer_kinds("tiny"), seed=0)


def test_from_counts_reads_accuracy_halves_and_mean_loss():
  # [correct, seen, summed cross-entropy] of the even batches, then of the odd ones.
  acc, halves, loss = candidate_eval.from_counts([[45, 50, 20.0], [40, 50, 30.0]], 100)
  assert acc == pytest.approx(0.85) and halves == pytest.approx((0.9, 0.8))
  assert loss == pytest.approx(0.5)
  # One batch only: no odd half, so no halves; the mean is still over every example.
  acc, halves, loss = candidate_eval.from_counts([[30, 40, 8.0], [0, 0, 0.0]], 40)
  assert (acc, halves, loss) == (pytest.approx(0.75), None, pytest.approx(0.2))


def test_split_half_reliability():
  rng = np.random.default_rng(0)
  true = rng.uniform(0.6, 0.8, 200)
  # Halves = true accuracy + small noise: reliable ranking.
  good = [(t + rng.normal(0, 0.01), t + rng.normal(0, 0.01)) for t in true]
  rel = candidate_eval.split_half_reliability(good)
  assert rel["r"] > 0.9 and rel["r_low95"] > 0.85
  assert rel["reliability"] == pytest.approx(2 * rel["r"] / (1 + rel["r"]))
  assert "ranked above noise" in rel["text"]
  # Halves = independent noise around one accuracy: no ranking.
  noise = [(0.7 + rng.normal(0, 0.01), 0.7 + rng.normal(0, 0.01)) for _ in range(200)]
  rel = candidate_eval.split_half_reliability(noise)
  assert abs(rel["r"]) < 0.2 and rel["r_low95"] < 0
  assert "not distinguishable" in rel["text"]
  # Halves that disagree (r < 0): no Spearman-Brown value (it would fall below -1), and
  # nothing that strict JSON cannot hold.
  worse = [(t, 1.4 - t + rng.normal(0, 0.01)) for t in true[:10]]
  rel = candidate_eval.split_half_reliability(worse)
  assert rel["r"] < -0.5 and rel["reliability"] is None
  assert "no reliability (r <= 0)" in rel["text"] and "not distinguishable" in rel["text"]
  assert candidate_eval.split_half_reliability(good[:3])["r"] is None


def test_solve_scale_hits_the_target_from_below():
  a = arch_lib.load_released("NSENet-27").with_scale(1.0)
  s = evolution.solve_scale(a, 400.0, 224, 1000)
  assert cost.arch_cost(a.with_scale(s), 224).macs / 1e6 <= 400.0
  assert cost.arch_cost(a.with_scale(s + 0.02), 224).macs / 1e6 > 400.0
  with pytest.raises(evolution.SearchError):
    evolution.solve_scale(a, 1.0, 224, 1000)


def test_final_architecture_selection_and_metadata():
  cfg = _cfg(select="max_acc", final_target=None)
  s = evolution.new_state(cfg)
  a1 = arch_lib.Architecture.from_indices("flops27", [[0], [3], [], [1], [2], [5]], macro="tiny")
  a2 = arch_lib.Architecture.from_indices("flops27", [[0, 4], [3], [6], [1], [2], [5]], macro="tiny")
  s.front = [{"arch": a1.to_compact(), "cost": 100.0, "accuracy": 0.5, "kind": "sample"},
             {"arch": a2.to_compact(), "cost": 200.0, "accuracy": 0.7, "kind": "sample"}]
  s.round = 3
  f = evolution.final_architecture(cfg, s, 10)
  assert f.layers == a2.layers
  assert f.metadata["accuracy"] == 0.7 and f.metadata["selection"] == "max_acc"
  cfg.select = "min_cost"
  assert evolution.final_architecture(cfg, s, 10).layers == a1.layers
  assert evolution.final_architecture(cfg, s, 10).metadata["empty_layers_dropped"] == [2]


def test_a_search_records_its_machine_and_says_when_another_goes_on(tmp_path):
  """state.json lists the machines that ran the search; a resume on another CPU (other
  kernels, other rounding) is said in one line, and a state from before the record loads."""
  here = {"cpu": "AMD EPYC", "cpu_id": "cpu family 25, model 1, stepping 1",
          "isa": "avx avx2 fma", "cores": 2, "gpus": [], "tensorflow": "2.20.0",
          "python": "3.11.7"}
  lines = []
  search = evolution.Search.__new__(evolution.Search)   # only the state and its file
  search.state = evolution.SearchState(space="flops27")
  search.state_path = str(tmp_path / "state.json")
  search.report = lines.append
  search.note_machine(here)
  search.note_machine(dict(here, python="3.12.1"))     # not a result-changing difference
  assert lines == []
  saved = evolution.SearchState.load(search.state_path)
  assert saved.machines == [dict(here, **{"from": "round 1 (train)"})]
  search.state.round, search.state.phase = 2, "evaluate"
  zen4 = dict(here, cpu_id="cpu family 25, model 17, stepping 1",
              isa="avx avx2 fma avx512f avx512_vnni avx512_bf16")
  search.note_machine(zen4)
  note, = lines
  assert note.startswith("note: this search ran from round 1 (train) on AMD EPYC (cpu family "
                         "25, model 1, stepping 1; avx avx2 fma), 2 cores")
  assert "from round 2 (evaluate) it runs on AMD EPYC (cpu family 25, model 17" in note
  assert "(other cpu_id, isa)" in note and "not be bit-identical" in note
  assert [m["from"] for m in evolution.SearchState.load(search.state_path).machines] == [
      "round 1 (train)", "round 2 (evaluate)"]
  # The same CPU with other kernels (oneDNN capped at AVX2) rounds otherwise too; a record
  # from before `kernels` was recorded (zen4 above has none) is not compared on it.
  search.note_machine(dict(zen4, kernels=""))
  assert len(lines) == 1                               # recorded anew, with the field
  assert evolution.SearchState.load(search.state_path).machines[-1]["kernels"] == ""
  search.note_machine(dict(zen4, kernels="ONEDNN_MAX_CPU_ISA=AVX2"))
  assert len(lines) == 2 and "(other kernels)" in lines[-1], lines[-1]
  assert "Python 3.11.7; kernels: ONEDNN_MAX_CPU_ISA=AVX2 (other kernels)" in lines[-1]
  del lines[-1]
  search.state.phase = "done"                          # nothing more runs: nothing to note
  search.note_machine(here)
  assert len(lines) == 1
  # A state.json written before machines were recorded loads, and the first run notes
  # its machine without a warning (nothing to compare with).
  old = json.loads(open(search.state_path).read())
  del old["machines"]
  (tmp_path / "old").mkdir()
  (tmp_path / "old" / "state.json").write_text(json.dumps(old))
  search.state = evolution.SearchState.load(str(tmp_path / "old" / "state.json"))
  search.state.phase = "train"
  search.state_path = str(tmp_path / "old" / "state.json")
  search.note_machine(zen4)
  assert len(lines) == 1 and len(search.state.machines) == 1
  # A hand-edited record that is not a list of records: one clear error, not a traceback.
  old["machines"] = "AMD EPYC"
  (tmp_path / "old" / "state.json").write_text(json.dumps(old))
  with pytest.raises(evolution.SearchError, match="'machines' must be a list"):
    evolution.SearchState.load(str(tmp_path / "old" / "state.json"))


def test_corrupt_state_is_refused_clearly(tmp_path):
  p = tmp_path / "state.json"
  p.write_text("{not json")
  with pytest.raises(evolution.SearchError, match="corrupt.*--overwrite"):
    evolution.SearchState.load(str(p))
  p.write_text(json.dumps({"version": 99}))
  with pytest.raises(evolution.SearchError, match="version"):
    evolution.SearchState.load(str(p))


# ------------------------------------------------------------- end to end


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory):
  out = tmp_path_factory.mktemp("smoke")
  t0 = time.time()
  code, stdout, stderr = _run(SMOKE, str(out))
  assert code == 0, stderr[-4000:]
  return out, stdout, time.time() - t0


@pytest.mark.slow
def test_smoke_search_writes_every_output(smoke_run):
  out, stdout, _ = smoke_run
  for name in ("config.json", "state.json", "final_arch.json", "space_evolution.png", "tb"):
    assert (out / name).exists(), name
  state = json.loads((out / "state.json").read_text())
  assert state["phase"] == "done" and state["round"] == 2
  # The machine that ran it, once (the same machine throughout).
  ran_on, = state["machines"]
  assert ran_on["from"] == "round 1 (train)" and ran_on["cores"] == os.cpu_count()
  assert not machine.differences(ran_on, machine.describe())
  for r in (1, 2):
    rd = out / f"round_{r:02d}"
    rows = list(csv.DictReader(open(rd / "candidates.csv")))
    assert list(rows[0]) == ["arch_id", "kind", "cost", "accuracy", "is_pareto", "arch"]
    kinds = {row["kind"] for row in rows}
    assert "sample" in kinds and ("prev_front" in kinds) == (r == 2)
    assert all(row["is_pareto"] == "0" for row in rows if row["kind"] == "edge")
    front = [row for row in rows if row["is_pareto"] == "1"]
    fj = json.loads((rd / "front.json").read_text())
    assert len(fj) == len(front) > 0
    for d in fj:
      a = arch_lib.Architecture.from_dict(d)
      assert "cost" in a.metadata and "accuracy" in a.metadata
    space = json.loads((rd / "space.json").read_text())
    assert {"working_set", "pruned", "inherited", "added_next"} <= set(space["layers"][0])
    # A_l is the union of the front's ops.
    union = evolution.aggregate([arch_lib.Architecture.from_dict(d) for d in fj], 6)
    pool = spaces.get_pool("flops27")
    assert [[pool[i] for i in u] for u in union] == [l["inherited"] for l in space["layers"]]
    assert (rd / "pareto.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
  final = arch_lib.Architecture.load(str(out / "final_arch.json"))
  assert final.macro == "tiny" and final.metadata["selection"] == "knee"
  assert "final architecture" in stdout
  # Each round reports whether its ranking is above noise and how the space changed.
  assert stdout.count("split-half") == 2
  assert stdout.count("new ops for the next round") == 2
  for h in state["history"]:
    assert {"accuracy_std", "accuracy_se", "split_half_r", "pruned", "inherited",
            "added"} <= set(h)
    assert 0 < h["accuracy_se"] < 0.06         # 96 evaluated examples


def _benchmark(name):
  """A script of benchmarks/ as a module (they are not a package)."""
  import importlib.util  # pylint: disable=g-import-not-at-top
  spec = importlib.util.spec_from_file_location(name, os.path.join(ROOT, "benchmarks",
                                                                   f"{name}.py"))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def _tau_or_null(x, y):
  """Kendall τ as search_quality.json stores it: None where it is undefined (ties: NaN)."""
  tau = stats.kendall_tau(x, y)
  return None if math.isnan(tau) else tau


@pytest.mark.slow
def test_search_quality_benchmark_runs_on_a_finished_search(smoke_run, tmp_path, capsys,
                                                           monkeypatch):
  out, _, _ = smoke_run
  run = tmp_path / "run"
  import shutil  # pylint: disable=g-import-not-at-top
  import tf_keras as keras  # pylint: disable=g-import-not-at-top
  shutil.copytree(out, run)
  bench = _benchmark("search_quality")
  traced = []
  fit = keras.Model.fit

  def fit_counting_traces(model, *a, **kw):
    history = fit(model, *a, **kw)
    traced.append(model.train_function.experimental_get_tracing_count())
    return history

  monkeypatch.setattr(keras.Model, "fit", fit_counting_traces)
  args = [f"--search_dir={run}", "--steps=3", "--batch=16", "--num_rank=3", "--num_random=2",
          "--seeds=1", "--norounds"]
  code = cli.invoke(bench.define_flags, bench.main, args)
  stdout, err = capsys.readouterr()
  assert code == 0, err[-3000:]
  # Each standalone network's training step is traced once (every variable exists before
  # the first step; a step that creates variables is traced twice).
  assert traced and set(traced) == {1}, traced
  assert "Kendall" in stdout and "random:" in stdout
  # One seed per network: no seed noise to say how far a perfect ranker's τ would get.
  assert "a perfect ranker's τ against these standalone numbers: not estimated" in stdout
  assert "across training seeds: not measured (--seeds=1)" in stdout
  # What one seed cannot measure is null in the summary (strict JSON: no NaN).
  text = (run / "search_quality.json").read_text()
  assert "NaN" not in text
  summary = json.loads(text)
  assert summary["nse_vs_random"]["std_between_seeds"] is None
  assert len(summary["rank_fidelity"]["points"]) == 3
  assert summary["rank_fidelity"]["tau_ceiling"]["seeds"] == 1
  assert len(summary["nse_vs_random"]["random"]) == 2
  # 1 pick + 2 random + 3 ranked; a ranked candidate may be the pick itself (cached).
  trained = summary["networks_trained"]
  assert 3 <= trained <= 6
  assert len((run / "search_quality_runs.jsonl").read_text().splitlines()) == trained
  # Every trained network is cached: a second run trains nothing.
  assert cli.invoke(bench.define_flags, bench.main, args) == 0
  again = json.loads((run / "search_quality.json").read_text())
  assert again["networks_trained"] == 0 and again["networks_from_cache"] == trained
  assert f"0 networks trained in 0.0 min ({trained} more read from the cache)" in \
      capsys.readouterr().out
  # --num_rank=0: (b) alone (another search seed, the random networks from the cache).
  assert cli.invoke(bench.define_flags, bench.main, args + ["--num_rank=0"]) == 0
  b_out = capsys.readouterr().out
  assert "(a) rank fidelity: skipped" in b_out
  assert "from an earlier run with the same budget: rank_fidelity" in b_out
  only_b = json.loads((run / "search_quality.json").read_text())
  assert only_b["rank_fidelity"] == again["rank_fidelity"]     # kept: same budget
  assert only_b["networks_trained"] == 0
  # --num_random=0: (a) alone (here from the cache: nothing more is trained).
  assert cli.invoke(bench.define_flags, bench.main, args + ["--num_random=0"]) == 0
  only_a_out = capsys.readouterr().out
  assert "(b) NSE vs random: skipped" in only_a_out and "Kendall" in only_a_out
  only_a = json.loads((run / "search_quality.json").read_text())
  assert only_a["nse_vs_random"] == only_b["nse_vs_random"] and only_a["networks_trained"] == 0
  assert len(only_a["rank_fidelity"]["points"]) == 3
  assert only_a["rank_fidelity"]["round"] == 2
  # --rank_round: (a) on round 1's candidates; a round the search did not run is an error.
  assert cli.invoke(bench.define_flags, bench.main, args + ["--num_random=0",
                                                            "--rank_round=1"]) == 0
  assert "3 round-1 candidates across the interval" in capsys.readouterr().out
  ra = json.loads((run / "search_quality.json").read_text())["rank_fidelity"]
  assert ra["round"] == 1
  # The candidates' losses come from the search's own evaluation log.
  logged = {r["key"]: r["loss"] for r in fileio.read_jsonl(str(run / "round_01" /
                                                               "evaluated.jsonl"))}
  assert [p["supernet_loss"] for p in ra["points"]] == \
      [logged[evolution.Search.candidate_key(arch_lib.Architecture.from_compact(
          p["arch"]).indices())] for p in ra["points"]]
  assert ra["kendall_tau_loss"] == _tau_or_null(
      [-p["supernet_loss"] for p in ra["points"]], [p["standalone"] for p in ra["points"]])
  # Uniform draws of round 1's surviving ops, evaluated in round 1's supernet.
  assert cli.invoke(bench.define_flags, bench.main, args + [
      "--num_random=0", "--rank_round=1", "--rank_set=uniform", "--rank_drop_pruned"]) == 0
  assert "uniform draws of the surviving ops of the round-1 space" in capsys.readouterr().out
  ra = json.loads((run / "search_quality.json").read_text())["rank_fidelity"]
  assert ra["round"] == 1 and ra["drop_pruned"] and ra["with_pruned_ops"] == 0
  assert (run / "search_quality_uniform_eval_round01_survivors.jsonl").exists()
  survivors = bench.read_space(str(run), 1, drop_pruned=True)
  pool = spaces.get_pool("flops27")
  for p in ra["points"]:
    for ops, ws in zip(arch_lib.Architecture.from_compact(p["arch"]).layers, survivors):
      assert {pool.index(op) for op in ops} <= set(ws)
  assert cli.invoke(bench.define_flags, bench.main, args + ["--rank_round=3"]) == 2
  assert "--rank_round=3: the search in" in capsys.readouterr().err
  # --image_size: the same networks trained at another resolution, cached apart (the pick
  # and one random network: two more trainings).
  assert cli.invoke(bench.define_flags, bench.main, args + ["--num_rank=0", "--num_random=1",
                                                            "--image_size=20"]) == 0
  assert "every network at 20px" in capsys.readouterr().out
  at20 = json.loads((run / "search_quality.json").read_text())
  assert at20["networks_trained"] == 2 and at20["budget"]["image_size"] == 20
  assert "rank_fidelity" not in at20       # another budget: nothing kept from the 16px runs
  assert sum("|size=20" in line for line in
             (run / "search_quality_runs.jsonl").read_text().splitlines()) == 2
  # (a) on uniform draws of the last round's space, evaluated in its supernet checkpoint:
  # the search directory's own files are not touched.
  before = {p: p.stat().st_mtime_ns for p in run.rglob("*") if p.is_file()}
  code = cli.invoke(bench.define_flags, bench.main,
                    args + ["--rank_set=uniform", "--num_rank=2", "--num_random=0"])
  stdout, err = capsys.readouterr()
  assert code == 0, err[-3000:]
  assert "uniform draws of the round-2 space" in stdout and "τ(number of ops, supernet)" in stdout
  assert "Kendall τ(−supernet held-out loss, standalone) = " in stdout
  rank = json.loads((run / "search_quality.json").read_text())["rank_fidelity"]
  assert rank["rank_set"] == "uniform" and len(rank["points"]) >= 2
  assert all(0.0 <= p["supernet"] <= 1.0 and p["supernet_loss"] > 0 for p in rank["points"])
  assert rank["kendall_tau_loss"] == _tau_or_null(
      [-p["supernet_loss"] for p in rank["points"]], [p["standalone"] for p in rank["points"]])
  changed = [p for p, t in before.items() if p.stat().st_mtime_ns != t]
  assert {p.name for p in changed} <= {"search_quality.json", "search_quality_runs.jsonl"}, changed
  assert (run / "search_quality_uniform_eval.jsonl").exists()
  # A directory that is not a finished search: one error line.
  assert cli.invoke(bench.define_flags, bench.main, [f"--search_dir={tmp_path}"]) == 2
  assert "no config.json" in capsys.readouterr().err


# Spins until its parent (the test's process) is gone, so that a test run killed before
# its `finally` does not leave a loop eating a core.
_BUSY_LOOP = """
import os
parent = os.getppid()
while os.getppid() == parent:
  for _ in range(200000):
    pass
"""


@pytest.mark.slow
def test_sigkill_and_resume_ends_like_an_uninterrupted_run(smoke_run, tmp_path, capsys):
  """A second process, killed twice and resumed, all of it beside a busy loop, ends with
  the same bits as the uninterrupted reference run (issue 14: the same command gives the
  same result however loaded the machine is).

  The busy loop runs at nice 10: it still preempts the run's threads at arbitrary points
  (what reordered concurrent work under load, before --deterministic), but takes ~10 % of
  a core where everything else is busy instead of a whole one, which had this test and
  whatever ran beside it in the suite's other worker at about half speed."""
  ref, _, _ = smoke_run
  out = tmp_path / "killed"
  hog = subprocess.Popen([sys.executable, "-c", _BUSY_LOOP],
                         preexec_fn=lambda: os.nice(10))
  try:
    _kill_twice_and_resume(out, capsys)
  finally:
    hog.kill()
    hog.wait()
  for name in COMPARED:
    assert (out / name).read_text() == (ref / name).read_text(), name
  # Every logged loss too (steps re-run after the kill are logged again: the same bits).
  assert _tb_losses(out) == _tb_losses(ref)


def _kill_twice_and_resume(out, capsys):
  """Kills the smoke search once mid-evaluation of round 1 and once mid-training of
  round 2, then lets it finish. While the first run works, a second search on its
  directory is refused (one writer per run; the second search runs in this process: the
  lock is taken before anything else)."""
  for marker in ("round_01/evaluated.jsonl", "round_02/ckpt/checkpoint"):
    p = _cli(SMOKE, str(out))
    deadline = time.time() + 600
    while time.time() < deadline and p.poll() is None:
      path = out / marker
      if path.exists() and (not marker.endswith(".jsonl") or
                            len(path.read_text().splitlines()) >= 3):
        break
      time.sleep(0.2)
    assert p.poll() is None, "the run ended before it could be killed"
    if marker.endswith(".jsonl"):
      code, _, err = _invoke(SMOKE, out, capsys)
      assert code == 2 and f"pid {p.pid}" in err and "Traceback" not in err, err[-2000:]
      assert err.strip().splitlines()[-1].startswith("error: ")
    p.send_signal(signal.SIGKILL)
    p.wait()
  code, _, stderr = _run(SMOKE, str(out))
  assert code == 0, stderr[-4000:]


@pytest.mark.slow
def test_resume_refuses_a_changed_configuration(smoke_run, capsys):
  ref, _, _ = smoke_run
  before = (ref / "final_arch.json").read_text()
  code, _, err = _invoke(SMOKE + ["--tau=123"], ref, capsys)
  assert code != 0
  assert "tau: 250.0 -> 123.0" in err and "--overwrite" in err and "Traceback" not in err
  assert (ref / "final_arch.json").read_text() == before

@pytest.mark.slow
def test_resume_may_change_a_flag_that_changes_only_the_rounding(smoke_run, tmp_path, capsys):
  """--intra_op_threads changes the float rounding only, as another machine would: a
  resume may change it (on a copy: the smoke run's config.json is read by other tests)."""
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  ref, _, _ = smoke_run
  out = tmp_path / "copy"
  shutil.copytree(ref, out)
  before = (out / "final_arch.json").read_text()
  tf.constant(1.0) + 1.0    # TensorFlow has started: the command cannot change this process
  threads = tf.config.threading.get_intra_op_parallelism_threads()
  code, _, err = _invoke(SMOKE + ["--intra_op_threads=1"], out, capsys)
  assert code == 0 and "another configuration" not in err, err[-2000:]
  assert (out / "final_arch.json").read_text() == before
  assert tf.config.threading.get_intra_op_parallelism_threads() == threads


def test_bad_inputs_give_one_clear_line(tmp_path, capsys):
  cases = [
      (["--flagfile=flags/demo.cfg", "--bogus_flag=1"], "bogus_flag"),
      (["--flagfile=flags/nope.cfg"], "nope.cfg"),
      (["--flagfile=flags/demo.cfg", "--interval=300"], "--interval must be two numbers"),
      (["--flagfile=flags/demo.cfg", "--interval=300,200"], "lower bound"),
      (["--flagfile=flags/demo.cfg", "--select=best"], "best"),
      (["--flagfile=flags/demo.cfg", "--dataset=cifar10", f"--data_dir={tmp_path}/tfds"],
       "tfds build cifar10"),
  ]
  # Every check that needs no training runs before the first write: a failed start
  # leaves no config.json that would refuse the corrected command.
  cases.append((["--flagfile=flags/demo.cfg", "--interval=5000,6000", "--edge_lo=0"],
                "cannot be reached in round 1"))
  # Refused as with TF_CONFIG (the tests run without one), not accepted as one worker.
  cases.append((["--flagfile=flags/demo.cfg", "--strategy=multi_worker", "--sync_bn"],
                "sync_bn is not supported under --strategy=multi_worker"))
  for args, needle in cases:
    code, _, err = _invoke(args, tmp_path / "o", capsys)
    assert code != 0, args
    assert needle in err, (args, err[-2000:])
    assert "Traceback" not in err, (args, err[-2000:])
    assert not (tmp_path / "o" / "config.json").exists(), args
  code, _, err = _invoke(["--flagfile=flags/demo.cfg"], "/proc/nse_no_such_dir", capsys)
  assert code != 0 and "cannot write to --output_dir" in err
  corrupt = tmp_path / "corrupt"
  args = ["--flagfile=flags/demo.cfg", "--space=flops72", f"--init_from={tmp_path}/none"]
  code, _, err = _invoke(args, corrupt, capsys)
  assert code != 0 and "no state.json there" in err
  assert not (corrupt / "config.json").exists()
  (corrupt / "state.json").write_text("{oops")
  code, _, err = _invoke(args, corrupt, capsys)
  assert code != 0 and "corrupt" in err and "Traceback" not in err
  assert (corrupt / "state.json").read_text() == "{oops"      # nothing overwritten
  # The second space continues the same task: a search of another dataset is refused.
  prev = tmp_path / "prev"
  prev.mkdir()
  (prev / "config.json").write_text(json.dumps(
      {"dataset": "demo_compass", "image_size": 16, "holdout_examples": None, "macro": "tiny"}))
  args = ["--flagfile=flags/demo.cfg", "--space=flops72", f"--init_from={prev}",
          "--holdout_examples=300"]
  code, _, err = _invoke(args, tmp_path / "o72", capsys)
  assert code != 0 and "Traceback" not in err
  assert ("searched another task (dataset: 'demo_compass' there, 'demo_digits_hard' here, "
          "holdout_examples: None there, 300 here)") in err, err
  assert "add --dataset=demo_compass, leave --holdout_examples out" in err
  assert not (tmp_path / "o72" / "config.json").exists()


def test_second_space_continues_a_finished_flops27_search(tmp_path):
  cfg27 = _cfg(max_ops=4)
  prev = evolution.new_state(cfg27)
  a = arch_lib.Architecture.from_indices("flops27", [[0], [3, 4], [], [1], [2], [5]], macro="tiny")
  prev.inherited = evolution.aggregate([a], 6)
  prev.front = [{"arch": a.to_compact(), "cost": 100.0, "accuracy": 0.5, "kind": "sample"}]
  prev.phase = "evaluate"
  prev.save(str(tmp_path / "state.json"))
  cfg72 = _cfg(space="flops72", max_ops=4, init_from=str(tmp_path))
  with pytest.raises(evolution.SearchError, match="has not finished"):
    evolution.state_from_previous(cfg72, str(tmp_path))
  prev.phase = "done"
  prev.save(str(tmp_path / "state.json"))
  with pytest.raises(evolution.SearchError, match="--space=flops72"):
    evolution.state_from_previous(_cfg(space="flops27", init_from=str(tmp_path)), str(tmp_path))
  s = evolution.state_from_previous(cfg72, str(tmp_path))
  assert cfg72.num_rounds() == 3
  assert s.inherited == prev.inherited
  for ws, inh, q in zip(s.working_sets, s.inherited, s.queues):
    assert set(inh) <= set(ws) and len(ws) == 4
    assert sorted(q) == list(range(27, 72))                 # only the 45 grouped ops queued
    assert set(ws) - set(inh) <= set(range(27, 72))
  f = arch_lib.Architecture.from_compact(s.front[0]["arch"])
  assert f.space == "flops72" and f.layers == a.layers


# ------------------------------------------------------------------ latency constraint


def test_latency_search_with_a_missing_table_is_one_error_line(tmp_path, capsys):
  out = tmp_path / "run"
  code, _, err = _invoke(["--flagfile=flags/latency_demo.cfg",
                          f"--latency_lut={tmp_path / 'nope.json'}"], out, capsys)
  assert code == 2
  last = err.strip().splitlines()[-1]
  assert last.startswith("error: --latency_lut=") and "tools/build_latency_lut.py" in last
  assert not (out / "config.json").exists()


@pytest.mark.slow
def test_an_earlier_round_of_a_finished_search_evaluates_as_the_search_did(smoke_run, tmp_path):
  """evaluate_in_round(r=1) on a two-round search restores round 1's supernet with round
  1's working sets: its candidates get the accuracies the search logged in round 1."""
  from nse_tf import data as data_lib  # pylint: disable=g-import-not-at-top
  out, _, _ = smoke_run
  cfg = json.loads((out / "config.json").read_text())
  srch = _benchmark("search_quality").finished_search(
      str(out), cfg, data_lib.get_data(cfg["dataset"], image_size=cfg["image_size"]))
  pool = spaces.get_pool(cfg["space"])
  for r in (1, 2):
    layers = json.loads((out / f"round_{r:02d}" / "space.json").read_text())["layers"]
    assert [[pool[i] for i in w] for w in srch.round_state(r).working_sets] == \
        [l["working_set"] for l in layers]
  # Round 1's state, not the final one. (Whether its working sets also differ from the
  # final ones depends on round 1's front covering every op or not, i.e. on float rounding,
  # which the number of intra-op threads changes: with 2 they differ, with 1 or 4 not.)
  assert srch.round_state(1).round == 1 and srch.state.round == 2
  rows = list(csv.DictReader(open(out / "round_01" / "candidates.csv")))[:3]
  logged = {rec["i"]: rec["accuracy"] for rec in fileio.read_jsonl(
      str(out / "round_01" / "evaluated.jsonl"))}
  archs = [arch_lib.Architecture.from_compact(r["arch"]) for r in rows]
  assert srch.evaluate_in_round(archs, str(tmp_path / "r1.jsonl"), 1) == \
      [logged[int(r["arch_id"])] for r in rows]
  assert srch.state.round == 2 and srch.state.working_sets == \
      evolution.SearchState.load(str(out / "state.json")).working_sets
  with pytest.raises(evolution.SearchError, match="rounds 1 to 2"):
    srch.round_state(3)


@pytest.mark.slow
def test_split_evaluation_computes_what_the_default_does_and_resumes(smoke_run, tmp_path,
                                                                     monkeypatch):
  """--split_evaluation's per-worker evaluator (whole batches, no strategy.run) gives every
  candidate the bits of the default evaluator in one process, block by block, also when
  a cut log is resumed."""
  import dataclasses  # pylint: disable=g-import-not-at-top
  import shutil  # pylint: disable=g-import-not-at-top
  from nse_tf import data as data_lib  # pylint: disable=g-import-not-at-top
  out, _, _ = smoke_run
  run = tmp_path / "run"
  shutil.copytree(out, run)
  cfg = json.loads((run / "config.json").read_text())
  bench = _benchmark("search_quality")
  d = data_lib.get_data(cfg["dataset"], image_size=cfg["image_size"])
  srch = bench.finished_search(str(run), cfg, d)
  rows = list(csv.DictReader(open(run / "round_02" / "candidates.csv")))
  archs = [arch_lib.Architecture.from_compact(r["arch"]) for r in rows[:6]]   # blocks 4 + 2
  plain = srch.evaluate_in_round(archs, str(tmp_path / "plain.jsonl"))
  plain_halves, plain_losses = dict(srch.halves), dict(srch.losses)
  assert len(plain) == 6 and len(plain_halves) == 6
  # Every candidate's held-out mean cross-entropy is logged beside its accuracy: a worse
  # candidate (fewer hits) tends to a higher loss, and both come back from the log.
  assert sorted(plain_losses) == list(range(6))
  assert all(0 < x < 10 and np.isfinite(x) for x in plain_losses.values())
  assert [rec["loss"] for rec in fileio.read_jsonl(str(tmp_path / "plain.jsonl"))] == \
      [plain_losses[i] for i in range(6)]
  assert srch.evaluate_in_round(archs, str(tmp_path / "plain.jsonl"), with_loss=True) == \
      (plain, [plain_losses[i] for i in range(6)])
  # A log written before losses were logged: accuracies still read, the losses an error.
  old_log = tmp_path / "old.jsonl"
  old_log.write_text("".join(
      json.dumps({k: v for k, v in rec.items() if k != "loss"}) + "\n"
      for rec in fileio.read_jsonl(str(tmp_path / "plain.jsonl"))))
  assert srch.evaluate_in_round(archs, str(old_log)) == plain
  with pytest.raises(evolution.SearchError, match="without held-out losses"):
    srch.evaluate_in_round(archs, str(old_log), with_loss=True)
  # The search built its evaluator and traced it while round 2 trained (trace-ahead);
  # a fresh one on the finished round gives its candidates the same bits.
  logged = {rec["i"]: rec["accuracy"] for rec in fileio.read_jsonl(
      str(run / "round_02" / "evaluated.jsonl"))}
  assert [int(r["arch_id"]) for r in rows[:6]] == list(range(6))
  assert plain == [logged[i] for i in range(6)]
  srch.cfg = dataclasses.replace(srch.cfg, split_evaluation=True)
  split_log = tmp_path / "split.jsonl"
  assert srch.evaluate_in_round(archs, str(split_log)) == plain
  assert srch.halves == plain_halves and srch.losses == plain_losses
  assert split_log.read_text() == (tmp_path / "plain.jsonl").read_text()
  # A log cut inside its fourth line: the three whole lines are kept, the rest evaluated
  # again (candidate 3 recalibrates on its own batches, not on candidate 0's).
  lines = split_log.read_text().splitlines(keepends=True)
  split_log.write_text("".join(lines[:3]) + lines[3][:10])
  assert srch.evaluate_in_round(archs, str(split_log)) == plain
  assert split_log.read_text() == (tmp_path / "plain.jsonl").read_text()
  # Several workers: another worker (simulated) logged only 2 results, so this one, which
  # logged all 6, goes back to the third candidate with it.
  from nse_tf import distribute  # pylint: disable=g-import-not-at-top
  monkeypatch.setattr(distribute, "worker_rank", lambda strategy: (0, 2))
  monkeypatch.setattr(   # its log holds 2 results (this one's 6); the same checkpoint step
      distribute, "gather_from_workers",
      lambda strategy, rows: {0: rows, 1: np.array([2]) if rows[0] == 6 else rows})
  calls = []
  accuracy = candidate_eval.CandidateEvaluator.accuracy
  monkeypatch.setattr(candidate_eval.CandidateEvaluator, "accuracy",
                      lambda self, g: calls.append(1) or accuracy(self, g))
  srch.cfg = dataclasses.replace(srch.cfg, split_evaluation=False)
  assert srch.evaluate_in_round(archs, str(tmp_path / "plain.jsonl")) == plain
  assert len(calls) == 4
