"""The benchmark scripts run (at tiny sizes; their numbers are never asserted: timings do
not belong in tests)."""

import importlib.util
import json
import os

import numpy as np
import pytest
from absl import flags

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _benchmark(name):
  """A script of benchmarks/ as a module (they are not a package)."""
  spec = importlib.util.spec_from_file_location(
      f"bench_{name}", os.path.join(ROOT, "benchmarks", f"{name}.py"))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


@pytest.mark.slow
def test_round_cost_measures_every_phase_and_reports_ratios(monkeypatch, tmp_path, capsys):
  """The whole command: the resolution and the standalone memory probe each in a process
  of their own, as the benchmark runs them (peak memory is per process: in the test
  process earlier tests would already have set the high-water mark)."""
  import json
  rc = _benchmark("round_cost")
  fv = flags.FlagValues()
  rc.define_flags(fv)
  fv(["round_cost", "--resolutions=16", "--batches=16", "--eval_images=32", "--paths=2",
      "--steps=2", "--macro=tiny", "--max_ops=2", "--recal_batches=2", "--steady_steps=3",
      "--graph_optimization=off", f"--json_out={tmp_path}/out.json"])
  monkeypatch.setattr(rc, "FLAGS", fv)
  rc.main([])
  text = capsys.readouterr().out
  out, = json.loads((tmp_path / "out.json").read_text())
  assert set(out["first_call"]) == {"build", "weight_step", "theta_step", "catch_up",
                                    "evaluation", "round_start_up"}
  assert out["first_call"]["round_start_up"] == pytest.approx(
      sum(v for k, v in out["first_call"].items() if k != "round_start_up"))
  assert len(out["paths"]) == 2
  for row in out["paths"]:
    for key in ("super_weight", "alone_weight", "super_theta", "super_eval", "alone_eval",
                "alone_first_call"):
      assert row[key] > 0, (key, row)
  # The peak grows phase after phase (VmHWM is a high-water mark; the kernel's per-thread
  # RSS counters make it exact only to a few pages).
  peaks = [out["peak_mib"][k] for k in ("start", "build", "weight_step", "theta_step",
                                        "evaluation", "steady")]
  assert all(b >= a * 0.99 for a, b in zip(peaks, peaks[1:])), peaks
  assert out["peak_mib"]["round"] == peaks[-1] > peaks[0]
  # The standalone probe trains the largest path the weight steps ran, timed or steady.
  assert out["largest_mflops"] >= max(r["mflops"] for r in out["paths"])
  assert out["largest_path"].startswith("flops27@tiny:")
  assert out["standalone_peak_mib"] > 0 and out["wall_s"] > 0
  for needle in ("supernet/standalone", "θ step / supernet weight step", "first call",
                 "peak RSS", "round peak / standalone"):
    assert needle in text, text


def _device_check(argv=()):
  dc = _benchmark("device_check")
  fv = flags.FlagValues()
  dc.define_flags(fv)
  fv(["device_check", "--resolution=16", "--macro=tiny", "--max_ops=2", "--paths=2",
      "--steps=2", "--num_classes=10", "--retrain_arch=flops27@tiny:0|0|0|0|0|0",
      "--detector_size=128",
      "--detector_arch=flops27@flops*0.25:-|0|-|-|-|0|-|-|-|0|-|-|-|0|-|-|-|0|-|-|-|0",
      *argv])
  return dc, fv


def test_round_cost_sets_the_allocator_for_its_measuring_processes(monkeypatch):
  """--allocator reaches the processes that measure (TensorFlow and glibc read these
  variables once, at start), and the default changes nothing."""
  import subprocess
  rc = _benchmark("round_cost")
  fv = flags.FlagValues()
  rc.define_flags(fv)
  monkeypatch.setattr(rc, "FLAGS", fv)
  monkeypatch.delenv("TF_ONEDNN_USE_SYSTEM_ALLOCATOR", raising=False)
  monkeypatch.delenv("MALLOC_ARENA_MAX", raising=False)
  seen = []

  def fake_run(cmd, env=None, **_):
    seen.append(env)
    return subprocess.CompletedProcess(cmd, 0, stdout='{"peak_mib": 1}\n')

  monkeypatch.setattr(rc.subprocess, "run", fake_run)
  for allocator in ("default", "system"):
    fv(["round_cost", f"--allocator={allocator}"])
    assert rc._subprocess(["--_worker=standalone"]) == {"peak_mib": 1}
  default, system = seen
  assert "TF_ONEDNN_USE_SYSTEM_ALLOCATOR" not in default and "MALLOC_ARENA_MAX" not in default
  assert system["TF_ONEDNN_USE_SYSTEM_ALLOCATOR"] == "1" and system["MALLOC_ARENA_MAX"] == "2"
  assert system["PATH"] == os.environ["PATH"]


@pytest.mark.parametrize("flag", ["--paths=0", "--steps=0", "--max_ops=0", "--recal_batches=0",
                                  "--steady_steps=0"])
def test_round_cost_refuses_counts_below_one(flag):
  rc = _benchmark("round_cost")
  fv = flags.FlagValues()
  rc.define_flags(fv)
  with pytest.raises(flags.IllegalFlagValueError, match="not a positive integer"):
    fv(["round_cost", flag])


def test_device_check_halves_the_batch_on_out_of_memory_only(monkeypatch):
  import tensorflow as tf
  dc, _ = _device_check()
  tried = []
  # Memory is freed before each retry. Not for real here: clear_session() would reset this
  # test process's Keras state, and its gc.collect() takes up to a minute in a process that
  # earlier tests filled with models.
  freed = []
  monkeypatch.setattr(dc, "_free_memory", lambda: freed.append(len(tried)))

  def run(b):
    tried.append(b)
    if b > 3:
      raise tf.errors.ResourceExhaustedError(None, None, "OOM when allocating tensor")
    return {"ok": True}

  assert dc.with_batch_fallback(run, 16) == {"ok": True, "per_replica_batch": 2}
  assert tried == [16, 8, 4, 2]
  assert freed == [1, 2, 3]

  def broken(b):
    raise ValueError("not a memory problem")

  with pytest.raises(ValueError, match="not a memory problem"):
    dc.with_batch_fallback(broken, 16)


def test_device_check_refuses_unknown_precisions_and_sections(monkeypatch):
  from nse_tf import cli
  dc, fv = _device_check(["--precisions=float32,float8", "--sections=supernet,tpu"])
  monkeypatch.setattr(dc, "FLAGS", fv)
  with pytest.raises(cli.UsageError, match=r"float8.*tpu|tpu.*float8"):
    dc.main([])
  dc, fv = _device_check(["--precisions=float32", "--retrain_arch=NoSuchNet"])
  monkeypatch.setattr(dc, "FLAGS", fv)
  with pytest.raises(cli.UsageError, match=r"--retrain_arch: unknown released network "
                     r"'NoSuchNet'"):
    dc.main([])


@pytest.mark.slow
def test_device_check_measures_every_section_on_the_cpu(tmp_path):
  """The whole command from the shell at tiny sizes, float32 (MirroredStrategy, one CPU
  replica): every section measured, one table row each, the JSON written. A process of
  its own: compiled steps trace faster there than in a test process full of models."""
  import json
  import math
  import subprocess
  import sys
  _, fv = _device_check()
  argv = [f"--{name}={fv[name].value}" for name in
          ("resolution", "macro", "max_ops", "steps", "num_classes", "retrain_arch",
           "detector_size", "detector_arch")]
  env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2", CUDA_VISIBLE_DEVICES="")
  proc = subprocess.run(
      [sys.executable, os.path.join(ROOT, "benchmarks", "device_check.py"), *argv,
       "--paths=1", "--per_replica_batch=2", "--detector_batch=1", "--precisions=float32",
       "--graph_optimization=off", f"--json_out={tmp_path}/out.json"], cwd=ROOT, env=env,
      capture_output=True, text=True, timeout=900)
  assert proc.returncode == 0, proc.stderr[-3000:]
  text = proc.stdout
  out = json.loads((tmp_path / "out.json").read_text())
  assert [(r["section"], r["precision"]) for r in out] == [
      ("supernet", "float32"), ("retrain", "float32"), ("detector", "float32")]
  assert all("error" not in r and r["per_replica_batch"] in (1, 2) for r in out), out
  sup, retrain, det = out
  for key in ("weight_step_s", "theta_step_s", "standalone_step_s", "supernet_over_standalone"):
    assert sup[key] > 0, key
  assert set(sup["first_call"]) == {"build", "weight_step", "theta_step", "standalone_step"}
  assert len(sup["paths"]) == 1 and retrain["step_s"] > 0
  assert det["size"] == 128 and det["step_s"] > 0 and math.isfinite(det["loss"])
  for needle in ("MirroredStrategy with 1 replica(s)", "supernet weight step",
                 "supernet / standalone", "θ step", "retrain step", "EfficientDet-D0 128²",
                 "img/s", "wall time"):
    assert needle in text, text


def _quality_summary(directory, pick, random_means, budget=None):
  import json
  os.makedirs(directory, exist_ok=True)
  summary = {"budget": budget or {"steps": 600, "batch": 64, "lr": 0.1, "weight_decay": 4e-5,
                                  "seeds": 2},
             "nse_vs_random": {"nse": {"cost": 270.0, "accuracies": [pick, pick], "mean": pick},
                               "random": [{"mean": m, "accuracies": [m, m]}
                                          for m in random_means],
                               "cost_matched_residual": pick - 0.87}}
  with open(os.path.join(directory, "search_quality.json"), "w", encoding="utf-8") as f:
    json.dump(summary, f)


def test_search_quality_summary_is_strict_json():
  """What a run cannot measure (NaN) and any infinity become null, at any depth."""
  bench = _benchmark("search_quality")
  summary = {"a": float("nan"), "b": [1.0, float("inf"), (float("-inf"), 2)],
             "c": {"d": float("nan"), "e": "x", "f": None, "g": 3}}
  assert bench._nan_to_null(summary) == {  # pylint: disable=protected-access
      "a": None, "b": [1.0, None, [None, 2]], "c": {"d": None, "e": "x", "f": None, "g": 3}}
  json.dumps(bench._nan_to_null(summary), allow_nan=False)  # pylint: disable=protected-access


def test_search_quality_aggregates_search_seeds_against_one_random_set(tmp_path, capsys):
  from nse_tf import cli, stats
  bench = _benchmark("search_quality")
  rand = [0.86, 0.87, 0.88, 0.89, 0.85]
  picks = [0.90, 0.91, 0.86]
  dirs = [str(tmp_path / f"s{i}") for i in range(3)]
  for d, p in zip(dirs, picks):
    _quality_summary(d, p, rand)
  out = bench.aggregate(dirs)
  text = capsys.readouterr().out
  rm, rh = stats.mean_ci(rand)
  assert out["random_mean"] == pytest.approx(rm) and out["random_ci95"] == pytest.approx(rh)
  assert out["pick_mean"] == pytest.approx(sum(picks) / 3)
  assert out["above_ci"] == sum(p >= rm + rh for p in picks) == 2
  t, p = stats.welch_t_test(picks, rand)
  assert (out["welch_t"], out["welch_p"]) == pytest.approx((t, p))
  assert out["mann_whitney_p"] == pytest.approx(stats.mann_whitney_greater(picks, rand)[1])
  assert "2 of 3 picks above the random mean + CI half-width" in text
  assert "NOT significant at 5 % (Welch, two-sided)" in text
  assert out["welch_p_greater"] == pytest.approx(p / 2 if t > 0 else 1 - p / 2)
  _, lo, hi = stats.welch_difference_ci(picks, rand)
  assert out["difference_ci95"] == pytest.approx([lo, hi]) and lo < out["pick_mean"] - rm < hi
  assert f"difference 95 % CI (Welch) {100 * lo:+.2f} to {100 * hi:+.2f} points" in text
  # Mismatched inputs are refused with what differs, not averaged.
  _quality_summary(str(tmp_path / "other_random"), 0.9, rand[:-1] + [0.80])
  _quality_summary(str(tmp_path / "other_budget"), 0.9, rand,
                   budget={"steps": 300, "batch": 64, "lr": 0.1, "weight_decay": 4e-5,
                           "seeds": 2})
  for extra, message in (("other_random", "other random architectures"),
                         ("other_budget", "another budget"),
                         ("missing", "search_quality.json does not exist; --aggregate needs it")):
    with pytest.raises(cli.UsageError, match=message):
      bench.aggregate([dirs[0], str(tmp_path / extra)])
  with pytest.raises(cli.UsageError, match="at least 2"):
    bench.aggregate(dirs[:1])
  (tmp_path / "corrupt").mkdir()
  (tmp_path / "corrupt" / "search_quality.json").write_text("{not json")
  with pytest.raises(cli.UsageError, match=r"unreadable .*--aggregate needs it"):
    bench.aggregate([dirs[0], str(tmp_path / "corrupt")])


def _rank_summary(directory, tau, n, seeds=4, round_=1, with_b=None, tau_loss=0.3,
                  tau_max_sim=None):
  """A search_quality.json with (a) only (as `--num_random=0`), or also (b)."""
  import json
  if with_b is not None:
    _quality_summary(directory, *with_b)
  else:
    os.makedirs(directory, exist_ok=True)
    with open(os.path.join(directory, "search_quality.json"), "w", encoding="utf-8") as f:
      json.dump({"budget": {"steps": 600, "batch": 64, "lr": 0.1, "weight_decay": 4e-5,
                            "seeds": 2}}, f)
  path = os.path.join(directory, "search_quality.json")
  with open(path, encoding="utf-8") as f:
    summary = json.load(f)
  summary["rank_fidelity"] = {
      "rank_set": "uniform", "round": round_, "drop_pruned": False, "rank_seeds": seeds,
      "kendall_tau": tau, "kendall_tau_cost": 0.1, "kendall_tau_loss": tau_loss,
      "tau_ceiling": {"tau_max": 0.8, "seeds": seeds,
                      **({} if tau_max_sim is None else {"tau_max_sim": tau_max_sim})},
      "points": [{"arch": f"{directory}-{i}", "standalone": 0.9} for i in range(n)]}
  with open(path, "w", encoding="utf-8") as f:
    json.dump(summary, f)


def test_search_quality_aggregate_pools_rank_fidelity_over_pairs_within_a_search(
    tmp_path, capsys):
  from nse_tf import cli, stats
  bench = _benchmark("search_quality")
  taus, sizes = [0.6, 0.5, 0.3], [16, 16, 12]
  dirs = [str(tmp_path / f"p{i}") for i in range(3)]
  for d, t, n, sim in zip(dirs, taus, sizes, (0.7, None, None)):
    _rank_summary(d, t, n, tau_max_sim=sim)   # the simulated ceiling: newer runs only
  out = bench.aggregate(dirs)
  text = capsys.readouterr().out
  assert text.count("a perfect ranker ≈ 0.80") == 3
  assert text.count("a perfect ranker ≈ 0.80 (simulated 0.70)") == 1
  a = out["rank_fidelity"]
  # Pairs within a search: 120, 120 and 66; never across searches (other supernets).
  assert a["pairs"] == 306
  assert a["tau"] == pytest.approx((120 * 0.6 + 120 * 0.5 + 66 * 0.3) / 306)
  assert a["null_se"] == pytest.approx(stats.pooled_kendall_tau(taus, sizes)[1])
  assert a["between_searches_ci95"] == pytest.approx(stats.mean_ci(taus)[1])
  assert a["tau_cost"] == pytest.approx(0.1) and a["tau_loss"] == pytest.approx(0.3)
  assert "picks" not in out      # no (b) in these directories: nothing about picks
  assert "(a) rank fidelity across 3 searches: uniform draws of the round-1 space, 4 " \
      "standalone seed(s) each" in text
  assert f"pooled over the 306 pairs within a search: τ = {a['tau']:.3f}" in text
  assert "(b) across searches: not every directory has" in text
  # Where every directory also has (b), both are reported; (b)'s entries stay at the top.
  rand = [0.86, 0.87, 0.88, 0.89, 0.85]
  both = [str(tmp_path / f"b{i}") for i in range(2)]
  for d, t in zip(both, taus):
    _rank_summary(d, t, 16, with_b=(0.9, rand))
  out = bench.aggregate(both)
  assert out["pick_mean"] == pytest.approx(0.9)
  assert out["rank_fidelity"]["tau"] == pytest.approx(0.55)
  # Only (b) in one of them: (b) alone, as before.
  _quality_summary(both[1], 0.9, rand)
  assert bench.aggregate(both)["rank_fidelity"] is None
  # Different protocols are not pooled; the message names what differs.
  _rank_summary(str(tmp_path / "two_seeds"), 0.5, 16, seeds=2)
  _rank_summary(str(tmp_path / "round_3"), 0.5, 16, round_=3)
  for extra, message in (("two_seeds", "another standalone seeds .*(2 vs 4)"),
                         ("round_3", "another round .*(3 vs 1)")):
    with pytest.raises(cli.UsageError, match=message):
      bench.aggregate([dirs[0], str(tmp_path / extra)])
  # One search named twice (or copied) would count its pairs twice.
  with pytest.raises(cli.UsageError, match="the same directory"):
    bench.aggregate([dirs[0], dirs[1], dirs[0] + "/"])
  import shutil
  shutil.copytree(dirs[0], str(tmp_path / "copy"))
  with pytest.raises(cli.UsageError, match="copy and .*p0 hold the same .a. measurements"):
    bench.aggregate([dirs[1], dirs[0], str(tmp_path / "copy")])
  # Neither part in every directory: refused, naming where each is missing.
  with pytest.raises(cli.UsageError, match=r"b1/search_quality.json no rank fidelity \(a\)"):
    bench.aggregate([dirs[0], both[1]])


def test_search_quality_ablation_picks_round_one_knee_and_a_theta_sample(tmp_path, capsys):
  import json
  import types
  from nse_tf import arch as arch_lib, pareto
  bench = _benchmark("search_quality")
  out = tmp_path / "search"
  for r in (1, 3):
    (out / f"round_{r:02d}").mkdir(parents=True)
  (out / "config.json").write_text(json.dumps({"space": "flops27"}))
  front = [("flops27@tiny:0|0|0|0|0|0", 250.0, 0.70), ("flops27@tiny:1|1|1|1|1|1", 270.0, 0.78),
           ("flops27@tiny:2|2|2|2|2|2", 299.0, 0.79)]
  (out / "round_01" / "front.json").write_text(json.dumps([
      arch_lib.Architecture.from_compact(a).with_metadata(cost=c, accuracy=acc).to_dict()
      for a, c, acc in front]))
  rows = ["arch_id,kind,cost,accuracy,is_pareto,arch",
          "0,edge,245.0,0.9,0,flops27@tiny:3|3|3|3|3|3",
          "1,sample,260.0,0.75,0,flops27@tiny:4|4|4|4|4|4",
          "2,prev_front,280.0,0.8,1,flops27@tiny:5|5|5|5|5|5",
          "3,sample,290.0,0.76,1,flops27@tiny:6|6|6|6|6|6"]
  (out / "round_03" / "candidates.csv").write_text("\n".join(rows) + "\n")
  # The last space: two ops per layer, layer 0's second pruned (the uniform draw skips it).
  layers = [{"kind": "N", "working_set": ["dw_k3_e1", "dw_k5_e3"],
             "pruned": [{"op": "dw_k5_e3"}] if l == 0 else []} for l in range(6)]
  (out / "round_03" / "space.json").write_text(json.dumps({"round": 3, "layers": layers}))
  # Round 1's initial space: other ops, one of them pruned in round 1 (the control keeps it).
  first = [{"kind": "N", "working_set": ["dw_k7_e6", "dw_k9_e6"],
            "pruned": [{"op": "dw_k9_e6"}]} for _ in range(6)]
  (out / "round_01" / "space.json").write_text(json.dumps({"round": 1, "layers": first}))
  trained = []

  class FakeRunner:
    def mean(self, a, seeds):
      trained.append((a.to_compact(), seeds))
      return 0.8, [0.79, 0.81]

  table = types.SimpleNamespace(arch_cost=lambda a: 123.0, indices_cost=lambda layers: 275.0)
  fv = types.SimpleNamespace(seeds=2, seed=0)
  cfg = {"select": "knee", "scale": 1.0, "space": "flops27", "macro": "tiny",
         "interval": ["250", "300"]}
  entry = bench.ablation(fv, str(out), cfg, FakeRunner(), table, 3)
  knee = pareto.select([c for _, c, _ in front], [a for _, _, a in front], [0, 1, 2], "knee")
  assert entry["round1_pick"]["arch"] == front[knee][0]
  assert entry["round1_pick"]["supernet"] == front[knee][2]
  # The θ sample is one of the last round's sampled candidates, never an edge or a front.
  assert entry["theta_sample"]["arch"] in ("flops27@tiny:4|4|4|4|4|4", "flops27@tiny:6|6|6|6|6|6")
  uniform = arch_lib.Architecture.from_compact(entry["space_sample"]["arch"])
  assert uniform.layers[0] in ((), ("dw_k3_e1",))       # never the pruned op
  assert all(set(l) <= {"dw_k3_e1", "dw_k5_e3"} for l in uniform.layers)
  assert entry["space_sample"]["supernet"] is None
  control = arch_lib.Architecture.from_compact(entry["initial_space_sample"]["arch"])
  assert all(set(l) <= {"dw_k7_e6", "dw_k9_e6"} for l in control.layers)
  assert "dw_k9_e6" in {op for l in control.layers for op in l}   # pruned later: still drawn
  assert trained == [(front[knee][0], 2), (entry["theta_sample"]["arch"], 2),
                     (entry["space_sample"]["arch"], 2), (entry["initial_space_sample"]["arch"], 2)]
  assert entry["theta_sample"]["accuracies"] == [0.79, 0.81]
  assert "(e) ablation, 2 seeds per network" in capsys.readouterr().out


def test_search_quality_aggregates_the_ablation_paired_by_search(tmp_path, capsys):
  import json
  from nse_tf import stats
  bench = _benchmark("search_quality")
  rand = [0.86, 0.87, 0.88, 0.89, 0.85]
  picks, round1, theta = [0.90, 0.91, 0.86], [0.88, 0.90, 0.87], [0.85, 0.86, 0.84]
  dirs = [str(tmp_path / f"s{i}") for i in range(3)]
  for d, p, r1, th in zip(dirs, picks, round1, theta):
    _quality_summary(d, p, rand)
    path = os.path.join(d, "search_quality.json")
    summary = json.load(open(path, encoding="utf-8"))
    summary["ablation"] = {"round1_pick": {"mean": r1}, "theta_sample": {"mean": th}}
    if d != dirs[0]:     # a variant missing from one summary is left out, not guessed
      summary["ablation"]["space_sample"] = {"mean": 0.5}
    summary["ablation"]["initial_space_sample"] = {"mean": r1 - 0.01}
    with open(path, "w", encoding="utf-8") as f:
      json.dump(summary, f)
  out = bench.aggregate(dirs)["ablation"]
  text = capsys.readouterr().out
  for key, vals in (("round1_pick", round1), ("theta_sample", theta)):
    diffs = [p - v for p, v in zip(picks, vals)]
    assert out[key]["pick_minus_variant"] == pytest.approx(np.mean(diffs))
    assert out[key]["pick_minus_variant_ci95"] == pytest.approx(stats.mean_ci(diffs)[1])
    assert out[key]["paired_p"] == pytest.approx(stats.paired_t_test(picks, vals)[1])
    assert out[key]["minus_random"] == pytest.approx(np.mean(vals) - np.mean(rand))
  assert "the final pick is higher in 2 of 3 searches" in text     # round 1: +2, +1, −1
  assert "the final pick is higher in 3 of 3 searches" in text     # θ sample
  assert "space_sample" not in out and "uniform in the last space" not in text
  assert out["initial_space_sample"]["values"] == pytest.approx([r - 0.01 for r in round1])
  assert "last_minus_initial_space" not in out     # needs both draws in every search
  path = os.path.join(dirs[0], "search_quality.json")
  summary = json.load(open(path, encoding="utf-8"))
  summary["ablation"]["space_sample"] = {"mean": 0.5}
  with open(path, "w", encoding="utf-8") as f:
    json.dump(summary, f)
  both = bench.aggregate(dirs)["ablation"]["last_minus_initial_space"]
  assert both["mean"] == pytest.approx(np.mean([0.5 - (r - 0.01) for r in round1]))
  assert "uniform in the last space − uniform in round 1's" in capsys.readouterr().out
  # Without the ablation in every summary there is no (e).
  os.remove(os.path.join(dirs[2], "search_quality.json"))
  _quality_summary(dirs[2], picks[2], rand)
  assert bench.aggregate(dirs)["ablation"] is None


def test_search_quality_refuses_a_cache_from_another_task(tmp_path):
  """search_quality_runs.jsonl copied between searches on different datasets would be read
  as this task's accuracies: refused, naming both datasets; older records (no dataset)
  are read as they are."""
  bench = _benchmark("search_quality")
  path = tmp_path / "search_quality_runs.jsonl"
  path.write_text(json.dumps({"key": "a|seed=0", "accuracy": 0.5}) + "\n"
                  + json.dumps({"key": "b|seed=0", "accuracy": 0.7, "dataset": "demo_glyphs"})
                  + "\n")
  cache = bench.read_cache(str(path), "demo_glyphs")
  assert sorted(cache) == ["a|seed=0", "b|seed=0"] and cache["b|seed=0"]["accuracy"] == 0.7
  from nse_tf import cli
  with pytest.raises(cli.UsageError, match="trained on demo_glyphs, but this search ran on "
                     "demo_digits_hard"):
    bench.read_cache(str(path), "demo_digits_hard")
  path.write_text(json.dumps({"key": "a|seed=0", "accuracy": 0.5}) + "\n[1, 2]\n")
  with pytest.raises(cli.UsageError, match="record 2: not a trained network's record"):
    bench.read_cache(str(path), "demo_glyphs")


def test_search_quality_takes_known_runs_instead_of_training(tmp_path, monkeypatch):
  """--known_runs: a network already trained elsewhere (same key) is copied into this
  search's cache, marked with its file, not trained again; others are trained; this
  search's own cache wins; a missing file or another task's file is refused."""
  bench = _benchmark("search_quality")
  from nse_tf import arch as arch_lib, cli, fileio  # pylint: disable=g-import-not-at-top

  class Budget:
    steps, batch, lr, weight_decay = 600, 64, 0.1, 4e-5

  class Info:
    num_classes = 8

  class Data:
    info = Info()

  monkeypatch.setattr(bench.Runner, "_data", lambda self, size: Data())
  trained = []
  monkeypatch.setattr(bench.Runner, "_train", lambda self, a, seed: trained.append(
      (a.to_compact(), seed)) or 0.25)
  cfg = {"dataset": "demo_compass", "image_size": 16}
  a = arch_lib.Architecture.from_compact("flops27@tiny:4|7|6+18|1+5|6+7+10+23|7+10")
  b = arch_lib.Architecture.from_compact("flops27@tiny:10+19|19|6+14|5|7+10|7")
  own = tmp_path / "search_quality_runs.jsonl"
  probe = bench.Runner(cfg, str(own), Budget())
  recorded = tmp_path / "recorded.jsonl"
  for k, acc in ((probe.key(a, 0), 0.5), (probe.key(a, 1), 0.6), (probe.key(b, 0), 0.7)):
    fileio.append_jsonl(str(recorded), {"key": k, "accuracy": acc, "dataset": "demo_compass"})
  fileio.append_jsonl(str(own), {"key": probe.key(b, 0), "accuracy": 0.9,
                                 "dataset": "demo_compass"})
  runner = bench.Runner(cfg, str(own), Budget(), known_runs=[str(recorded)])
  assert runner.accuracy(a, 0) == 0.5 and runner.accuracy(a, 1) == 0.6
  assert runner.accuracy(b, 0) == 0.9          # this search's own record wins
  assert runner.accuracy(b, 1) == 0.25 and trained == [(b.to_compact(), 1)]
  assert runner.from_known == 2 and runner.trained == 1
  recs = {r["key"]: r for r in fileio.read_jsonl(str(own))}
  assert recs[probe.key(a, 0)]["known_from"] == "recorded.jsonl"
  assert "known_from" not in recs[probe.key(b, 1)]
  # A second run finds them in its own cache: the known file is not needed any more.
  again = bench.Runner(cfg, str(own), Budget())
  assert again.accuracy(a, 1) == 0.6 and again.from_known == 0 and len(trained) == 1
  with pytest.raises(cli.UsageError, match="--known_runs: .*nope.jsonl is not a file"):
    bench.Runner(cfg, str(own), Budget(), known_runs=[str(tmp_path / "nope.jsonl")])
  with pytest.raises(cli.UsageError, match="--known_runs: .*recorded.jsonl holds networks "
                     "trained on demo_compass, but this search ran on demo_glyphs"):
    bench.Runner(dict(cfg, dataset="demo_glyphs"), str(tmp_path / "other.jsonl"), Budget(),
                 known_runs=[str(recorded)])
  recorded.write_text("[1, 2]\n")
  with pytest.raises(cli.UsageError, match="--known_runs: .*recorded.jsonl, record 1: not a "
                     "trained network's record .*name another file, or leave the flag out"):
    bench.Runner(cfg, str(tmp_path / "other.jsonl"), Budget(), known_runs=[str(recorded)])


def test_intra_op_threads_alternates_settings_and_compares_them(monkeypatch, tmp_path, capsys):
  """The settings alternate (A B, B A, …); medians and ratios to the first setting; the
  repeats of a setting are compared by what they wrote (a round's wall time and machine
  left out); the commands it builds parse as the real command's flags."""
  from nse_tf import cli, train_round  # pylint: disable=g-import-not-at-top
  bench = _benchmark("intra_op_threads")
  assert bench.order([0, 1], 3) == [(0, 0), (1, 0), (1, 1), (0, 1), (0, 2), (1, 2)]
  walls = {0: [10.0, 12.0, 11.0], 1: [7.0, 9.0, 8.0]}
  seen = []

  def fake_run(cmds, logs):
    assert len(cmds) == 2 and cmds[0] != cmds[1]    # --jobs=2: two copies, two directories
    assert len(set(logs)) == 2
    for cmd in cmds:
      fv = cli.parse(train_round.define_flags, cmd[3:])   # python -m nse_tf.train_round …
      assert fv.epochs == 0.5 and fv.dataset == "demo_digits"
      n = fv.intra_op_threads
      os.makedirs(fv.output_dir)
      # Setting 1's repeats differ in a trained value, setting 0's only in time and machine.
      rec = {"theta": [0.5, 0.25 + 0.01 * (n * len(seen))], "seconds": len(seen),
             "machine": {"cpu": str(len(seen))}}
      with open(os.path.join(fv.output_dir, "round.json"), "w") as f:
        json.dump(rec, f)
    seen.append(n)
    return walls[n].pop(0), [0, 0]

  monkeypatch.setattr(bench, "run_once", fake_run)
  fv = flags.FlagValues()
  bench.define_flags(fv)
  fv(["intra_op_threads", "--module=train_round", f"--run_flagfile={ROOT}/flags/demo_round.cfg",
      "--extra=--epochs=0.5 --dataset=demo_digits", "--repeats=3", "--jobs=2",
      f"--work_dir={tmp_path}/w", f"--json_out={tmp_path}/out.json"])
  bench.main([], fv)
  assert seen == [0, 1, 1, 0, 0, 1]
  text = capsys.readouterr().out
  assert "--intra_op_threads=1  run 3: wall" in text
  out = json.loads((tmp_path / "out.json").read_text())
  s0, s1 = out["summary"]["0"], out["summary"]["1"]
  assert (s0["wall_s"], s1["wall_s"]) == (11.0, 8.0)
  assert s1["wall_ratio"] == pytest.approx(8 / 11) and s0["wall_ratio"] == 1.0
  assert s0["repeats_identical"] is True and s1["repeats_identical"] is False
  assert "NO" in text and "yes" in text and out["machine"]["cores"] >= 1

  def failing_run(cmds, logs):
    with open(logs[1], "w") as f:
      f.write("Traceback …\nValueError: something broke\n\n")
    return 1.0, [0, 1]

  monkeypatch.setattr(bench, "run_once", failing_run)
  with pytest.raises(cli.UsageError) as e:
    bench.main([], fv)
  message = str(e.value)
  assert "\n" not in message and "--intra_op_threads=0 failed (exit 1): ValueError: something " \
      "broke; its standard error is " in message and "nse_tf.train_round" in message
  assert os.path.exists(message.split("its standard error is ")[1].split(",")[0])
