"""Latency look-up tables: keys, refusal, predictor arithmetic, regulariser, a tiny real build."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from nse_tf import arch as arch_lib
from nse_tf import cost, evolution, latency, latency_check, latency_measure, spaces, stats

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OVERHEAD = 0.05


def _stats(v):
  return {"count": 5, "mean": v, "std": 0.0, "min": v, "q25": v, "median": v}


def _synthetic(space="latency19", macro="tiny", resolution=32, num_classes=10, max_branches=3,
               backend="tf", batch=1):
  """A table whose net values are known: op i of the pool at layer position p costs
  (i + 1) · 0.01 · (1 + position index); avg of n costs 0.001 · (n − 1); fixed blocks 0.1."""
  lay = latency.layout(space, macro, resolution, num_classes=num_classes,
                       max_branches=max_branches)
  pool = spaces.get_pool(space)
  positions = {}
  entries = {}
  for e in lay.entries:
    if e.kind == "null":
      v = 0.0
    elif e.kind == "op":
      pos = e.key.split("/", 2)[2]
      p = positions.setdefault(pos, len(positions))
      v = (pool.index(e.arg("op")) + 1) * 0.01 * (1 + p)
    elif e.kind == "avg":
      v = 0.001 * (e.inputs - 1)
    else:
      v = 0.1
    entries[e.key] = _stats(v + OVERHEAD)
  return {"format": "nse_tf.latency_table", "version": latency.TABLE_VERSION,
          "device": {"backend": backend, "batch_size": batch, "threads": 1,
                     "statistic": "median", "cpu": "test"},
          "max_branches": max_branches, "built_for": [lay.describe()], "entries": entries}


def _table(**kw):
  cfg = {k: kw.pop(k) for k in ("space", "macro", "resolution", "num_classes") if k in kw}
  data = _synthetic(**cfg, **kw)
  return latency.LatencyTable(data, cfg.get("space", "latency19"), cfg.get("macro", "tiny"),
                              cfg.get("resolution", 32), 1.0, cfg.get("num_classes", 10))


# ------------------------------------------------------------------ keys, refusal


def test_layout_keys_name_every_geometry_once():
  lay = latency.layout("latency19", "latency", 224, num_classes=1000, max_branches=7)
  keys = [e.key for e in lay.entries]
  assert len(keys) == len(set(keys))
  # 21 layers but 9 distinct (H, W, C_in, C_out, stride) positions, 19 ops each.
  assert sum(e.kind == "op" for e in lay.entries) == 9 * 19
  assert lay.op_keys[0][0] == "op/dw_k3_e1/112x112x16/16/s1"
  assert lay.op_keys[1][18] == "op/ssc_k7_e4/112x112x16/32/s2"
  assert lay.fixed == ("null/1/224x224x3", "stem/224x224x3/16", "head/7x7x256/1024",
                       "pool/7x7x1024", "fc/1024/1000")
  assert lay.avg_keys[2] == tuple(f"avg/{n}/56x56x32" for n in range(2, 8))
  # Baselines are measured before the entries that subtract them.
  first = {k: i for i, k in enumerate(keys)}
  assert all(first[e.baseline] < first[e.key] for e in lay.entries if e.baseline)


def test_ops_that_cannot_be_built_get_no_key():
  lay = latency.layout("flops72", "tiny", 32, num_classes=10)
  # Same rule as cost.CostTable: a key exactly where the op's groups divide the channels.
  pool = spaces.get_pool("flops72")
  for layer, row in zip(lay.resolved.layers, lay.op_keys):
    for name, key in zip(pool, row):
      try:
        cost.check_groups(spaces.parse_op(name), layer.c_in, layer.c_out)
        assert key is not None
      except spaces.SpaceError:
        assert key is None


def test_table_for_another_resolution_or_macro_is_refused(tmp_path):
  path = str(tmp_path / "lut.json")
  with open(path, "w") as f:
    json.dump(_synthetic(resolution=32), f)
  assert latency.LatencyTable.load(path, "latency19", "tiny", 32, num_classes=10).unit == "ms"
  for kwargs in (dict(macro="tiny", resolution=64), dict(macro="latency", resolution=32),
                 dict(macro="tiny", resolution=32, scale=1.5),
                 dict(macro="tiny", resolution=32, num_classes=1000)):
    kwargs.setdefault("num_classes", 10)
    with pytest.raises(latency.LatencyError) as e:
      latency.LatencyTable.load(path, "latency19", **kwargs)
    msg = str(e.value)
    assert "it was built for latency19 on tiny at 32x32" in msg
    assert "python tools/build_latency_lut.py" in msg and f"--output={path}" in msg
  with pytest.raises(latency.LatencyError, match="backend 'tf', not 'tflite'"):
    latency.LatencyTable.load(path, "latency19", "tiny", 32, num_classes=10, backend="tflite")
  with pytest.raises(latency.LatencyError, match="batch 1, not 128"):
    latency.LatencyTable.load(path, "latency19", "tiny", 32, num_classes=10, batch_size=128)


def test_corrupt_or_foreign_files_are_refused(tmp_path):
  p = tmp_path / "x.json"
  with pytest.raises(latency.LatencyError, match="no latency table at"):
    latency.load_json(str(p))
  p.write_text("{not json")
  with pytest.raises(latency.LatencyError, match="is not a latency table"):
    latency.load_json(str(p))
  p.write_text(json.dumps({"format": "something else"}))
  with pytest.raises(latency.LatencyError, match="nse_tf.latency_table"):
    latency.load_json(str(p))


# ------------------------------------------------------------------ predictor


def test_predictor_sums_ops_averages_and_fixed_part():
  t = _table()
  kinds = spaces.layer_kinds("tiny")          # N R N R N E
  assert t.overhead == pytest.approx(OVERHEAD)
  assert t.fixed_exact == pytest.approx(OVERHEAD + 4 * 0.1)    # call + stem, head, pool, fc
  pool = spaces.get_pool("latency19")
  a = arch_lib.Architecture("latency19", "tiny", [
      [],                                  # empty normal layer: dropped, costs nothing
      ["dw_k3_e1"],                        # R, one branch: no averaging
      ["dw_k3_e1", "conv_k3_e1"],          # N: 2 ops + identity = 3 branches
      ["dw_k3_e1", "dw_k5_e1"],            # R: 2 branches
      ["dw_k3_e1"],                        # N: 1 op + identity = 2 branches
      ["dw_k3_e1", "dw_k5_e1", "ssc_k5_e1", "dw_k7_e6"]])   # E: 4 branches > measured 3
  op = lambda l, name: t.op_ms[l][pool.index(name)]
  expected = t.fixed_exact
  expected += op(1, "dw_k3_e1")
  expected += op(2, "dw_k3_e1") + op(2, "conv_k3_e1") + 0.002
  expected += op(3, "dw_k3_e1") + op(3, "dw_k5_e1") + 0.001
  expected += op(4, "dw_k3_e1") + 0.001
  expected += sum(op(5, n) for n in a.layers[5]) + 0.003     # linear beyond 3 branches
  assert t.arch_cost(a) == pytest.approx(expected)
  assert t.indices_cost(a.indices()) == pytest.approx(expected)
  assert t.breakdown(a)["total"] == pytest.approx(expected)
  # The op values are net of the call overhead; layers at one geometry share entries.
  assert op(1, "dw_k3_e1") == pytest.approx(0.01 * 2)
  assert kinds == ("N", "R", "N", "R", "N", "E")


def test_linear_form_for_the_regulariser_is_exact_at_its_ends():
  t = _table(max_branches=3)
  rng = np.random.default_rng(0)
  kinds = spaces.layer_kinds("tiny")
  for _ in range(20):
    idx = []
    for kind in kinds:
      # normal layers: 0 or M − 1 = 2 ops; reduction layers: 1 or M = 3 ops.
      n = int(rng.choice([0, 2] if kind == "N" else [1, 3]))
      idx.append(tuple(sorted(rng.choice(19, n, replace=False).tolist())))
    linear = t.fixed + sum(sum(t.layer_costs(l)[i] for i in ix) for l, ix in enumerate(idx))
    assert linear == pytest.approx(t.indices_cost(idx))


def test_arch_from_another_macro_or_scale_is_refused():
  t = _table()
  other = cost.random_architectures("latency19", 1, macro="latency")[0]
  with pytest.raises(spaces.SpaceError):
    t.arch_cost(other)
  scaled = cost.random_architectures("latency19", 1, macro="tiny", scale=2.0)[0]
  with pytest.raises(latency.LatencyError, match="channel scale"):
    t.arch_cost(scaled)


def test_mape_and_kendall_tau():
  assert latency_check.mape([110, 90], [100, 100]) == pytest.approx(10.0)
  assert stats.kendall_tau([1, 2, 3, 4], [10, 20, 30, 40]) == pytest.approx(1.0)
  assert stats.kendall_tau([1, 2, 3, 4], [40, 30, 20, 10]) == pytest.approx(-1.0)
  assert stats.kendall_tau([1, 2, 3], [1, 3, 2]) == pytest.approx(1 / 3)
  s = latency.summarize([1.0, 2.0, 3.0, 10.0])
  assert (s["count"], s["min"], s["median"], s["q25"]) == (4, 1.0, 2.5, 1.75)


# ------------------------------------------------------------------ search plumbing


def test_search_picks_the_latency_table_and_samples_in_ms(tmp_path):
  path = str(tmp_path / "lut.json")
  with open(path, "w") as f:
    json.dump(_synthetic(resolution=32), f)
  cfg = evolution.SearchConfig(space="latency19", macro="tiny", max_ops=3, cost_resolution=32,
                               constraint="latency", latency_lut=path, num_samples=5,
                               num_edge=0, interval=(0.0, 100.0), edge_lo=0.0)
  cfg.validate()
  table = evolution.make_cost_table(cfg, 10)
  assert isinstance(table, latency.LatencyTable) and table.unit == "ms"
  assert evolution.reference_cost(table) == pytest.approx(table.reference_cost())
  state = evolution.new_state(cfg)
  alive = [np.ones(len(w), bool) for w in state.working_sets]
  thetas = [np.zeros(len(w)) for w in state.working_sets]
  samples, _ = evolution.sample_candidates(cfg, table, state.working_sets, alive, thetas,
                                           spaces.layer_kinds("tiny"), seed=0)
  assert len(samples) == 5
  with pytest.raises(evolution.SearchError, match="latency table"):
    evolution.SearchConfig(constraint="latency").validate()
  bad = evolution.SearchConfig(space="latency19", macro="tiny", cost_resolution=64,
                               constraint="latency", latency_lut=path)
  with pytest.raises(evolution.SearchError, match="built for"):
    evolution.make_cost_table(bad, 10)


def test_supernet_regulariser_reads_a_latency_table_like_a_flops_table():
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  from nse_tf import supernet  # pylint: disable=g-import-not-at-top
  t = _table(max_branches=2)       # linear form exact for 0/1 ops (N) and 1/2 ops (R/E)
  ws = [[0, 9, 13]] * spaces.num_layers("tiny")
  net = supernet.Supernet("latency19", "tiny", ws, t, num_classes=10, resolution=32)
  net.build_all()
  assert net.fixed_cost == pytest.approx(t.fixed)
  for l, mbl in enumerate(net.mbls):
    np.testing.assert_allclose(mbl.op_costs.numpy(), [t.layer_costs(l)[i] for i in ws[l]],
                               rtol=1e-6)
  # One fixed pattern on both paths: the expected cost in the graph is that pattern's
  # predicted latency.
  kinds = spaces.layer_kinds("tiny")
  pattern = [[1, 0, 0] if k == "N" else [1, 0, 1] for k in kinds]
  g = tf.constant(np.concatenate(pattern).astype(np.float32))
  same = tf.constant([True] * len(ws))
  _, c = net.call_theta(tf.zeros([1, 32, 32, 3]), g, g, same, tf.ones([net.total_ops]))
  idx = [tuple(w[i] for i, on in enumerate(p) if on) for w, p in zip(ws, pattern)]
  assert float(c) == pytest.approx(t.indices_cost(idx), rel=1e-5)


# ------------------------------------------------------------------ a real (tiny) build


def test_tiny_table_built_here_resumes_and_predicts(tmp_path, monkeypatch):
  path = str(tmp_path / "lut.json")
  kw = dict(space="latency19", macro="tiny", resolution=32, num_classes=10,
            ops=["dw_k3_e1", "conv_k3_e1"], max_branches=2, warmup=1, repeats=3,
            progress=False, chunk=64)
  data = latency_measure.build_table(path, **kw)
  dev = data["device"]
  assert dev["backend"] == "tf" and dev["batch_size"] == 1 and dev["tensorflow"]
  assert set(dev) >= {"cpu", "threads", "statistic", "warmup", "repeats"}
  lay = latency.layout("latency19", "tiny", 32, num_classes=10, max_branches=2,
                       ops=kw["ops"])
  assert set(data["entries"]) == {e.key for e in lay.entries}
  for entry in data["entries"].values():
    assert entry["count"] == 3 and 0 < entry["min"] <= entry["median"]
  # A rerun measures nothing more (resume); another device's file is refused.
  calls = []
  monkeypatch.setattr(latency_measure.Measurer, "measure_interleaved",
                      lambda self, runs: calls.append(len(runs)) or [])
  latency_measure.build_table(path, **kw)
  assert calls == []
  monkeypatch.setattr(latency_measure, "device_description",
                      lambda *a: dict(dev, cpu="another cpu"))
  with pytest.raises(latency.LatencyError, match="cpu"):
    latency_measure.build_table(path, **kw)
  t = latency.LatencyTable.load(path, "latency19", "tiny", 32, num_classes=10, ops=kw["ops"])
  a = arch_lib.Architecture("latency19", "tiny", [["dw_k3_e1"]] * 6)
  assert t.arch_cost(a) > t.fixed_exact > 0


def test_tflite_backend_measures_a_block():
  spec = latency.layout("latency19", "tiny", 32, num_classes=10, ops=["dw_k3_e1"]).entries[-1]
  m = latency_measure.Measurer("tflite", threads=1, warmup=1, repeats=3)
  stats = m.measure(latency_measure.entry_model(spec, 1))
  assert stats["count"] == 3 and stats["min"] > 0


def test_build_tool_reports_bad_input_in_one_line(tmp_path):
  env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2", CUDA_VISIBLE_DEVICES="")
  bad = tmp_path / "bad.json"
  bad.write_text("{}")
  p = subprocess.run([sys.executable, "tools/build_latency_lut.py", f"--output={bad}",
                      "--macro=tiny", "--resolution=32", "--ops=dw_k3_e1"], cwd=ROOT,
                     env=env, capture_output=True, text=True, timeout=120)
  last = p.stderr.strip().splitlines()[-1]
  assert p.returncode == 2 and last.startswith("error: ") and "is not a latency table" in last
  assert bad.read_text() == "{}"          # nothing written over the user's file


def test_calibration_factor_scales_every_block_and_keeps_the_linear_form():
  data = _synthetic(max_branches=2)
  plain = latency.LatencyTable(data, "latency19", "tiny", 32, 1.0, 10)
  key = latency.config_key(plain.layout)
  data["calibration"] = {key: {"archs": 5, "seed": 1, "factor": {s: 0.9 for s in
                                                                 latency.STATISTICS}}}
  cal = latency.LatencyTable(data, "latency19", "tiny", 32, 1.0, 10)
  assert cal.calibration == 0.9 and plain.calibration == 1.0
  a = cost.random_architectures("latency19", 1, macro="tiny", max_ops=1)[0]
  assert cal.arch_cost(a) == pytest.approx(0.9 * plain.arch_cost(a))
  assert cal.fixed == pytest.approx(0.9 * plain.fixed)
  assert cal.layer_costs(3) == pytest.approx([0.9 * c for c in plain.layer_costs(3)])
  other = latency.LatencyTable(data, "latency19", "tiny", 32, 1.0, 10, calibrated=False)
  assert other.arch_cost(a) == pytest.approx(plain.arch_cost(a))
