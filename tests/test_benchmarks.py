"""The benchmark scripts run (at tiny sizes; their numbers are never asserted: timings do
not belong in tests)."""

import importlib.util
import os

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
def test_round_cost_measures_every_phase_and_reports_ratios(monkeypatch):
  rc = _benchmark("round_cost")
  fv = flags.FlagValues()
  rc.define_flags(fv)
  fv(["round_cost", "--resolutions=16", "--batches=16", "--eval_images=32", "--paths=2",
      "--steps=2", "--macro=tiny", "--max_ops=2", "--recal_batches=2"])
  monkeypatch.setattr(rc, "FLAGS", fv)
  out = rc.run_supernet(16, 16, 32)
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
                                        "evaluation")]
  assert all(b >= a * 0.99 for a, b in zip(peaks, peaks[1:])), peaks
  assert out["peak_mib"]["round"] == peaks[-1] > peaks[0]
  assert out["largest_path"] in {r["arch"] for r in out["paths"]}
  out["standalone_peak_mib"] = rc.run_standalone_memory(out["largest_path"], 16, 16)["peak_mib"]
  text = rc.report(out)
  for needle in ("supernet/standalone", "θ step / supernet weight step", "first call",
                 "peak RSS", "round peak / standalone"):
    assert needle in text, text
