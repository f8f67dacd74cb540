"""Tests of nse_tf.plots: valid PNGs, atomic writes, clean failures."""

import os
import random

import pytest

from nse_tf import plots
from nse_tf import spaces

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _check_png(path, min_bytes=10_000):
  with open(path, "rb") as f:
    data = f.read()
  assert data[:8] == PNG_SIGNATURE
  assert data[12:16] == b"IHDR"
  width, height = int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")
  assert len(data) > min_bytes
  return width, height


def _no_temp_files(directory):
  return [n for n in os.listdir(directory) if n.endswith(".tmp")] == []


def _pareto_data(seed=0):
  rng = random.Random(seed)
  samples = [(c, 0.70 + 0.0005 * (c - 300) + rng.gauss(0, 0.01))
             for c in (rng.uniform(300, 350) for _ in range(300))]
  edges = [(rng.uniform(290, 300), 0.70 + rng.gauss(0, 0.01)) for _ in range(30)]
  prev = [(rng.uniform(300, 350), 0.72 + rng.gauss(0, 0.005)) for _ in range(5)]
  best, front = -1.0, []
  for c, a in sorted(samples + prev, key=lambda p: (p[0], -p[1])):
    if a > best:
      front.append((c, a))
      best = a
  return samples, edges, prev, front


def _rounds(pool, num_layers, k, n_rounds, seed=0):
  rng = random.Random(seed)
  queues = [rng.sample(pool, len(pool)) for _ in range(num_layers)]
  used = [0] * num_layers
  inherited = [[] for _ in range(num_layers)]
  rounds = []
  for _ in range(n_rounds):
    ws, pruned, inh = [], [], []
    for layer in range(num_layers):
      add = max(0, k - len(inherited[layer]))
      s = inherited[layer] + queues[layer][used[layer]:used[layer] + add]
      used[layer] += add
      p = rng.sample(s, rng.randint(0, len(s) - 1))
      rest = [o for o in s if o not in p]
      inherited[layer] = rng.sample(rest, rng.randint(1, len(rest)))
      ws.append(s)
      pruned.append(p)
      inh.append(inherited[layer])
    rounds.append({"working_sets": ws, "pruned": pruned, "inherited": inh})
  return rounds


def test_plot_pareto_writes_png(tmp_path):
  samples, edges, prev, front = _pareto_data()
  path = tmp_path / "pareto.png"
  out = plots.plot_pareto(path, samples, edges, prev, front, 300, 350, title="round 2")
  assert out == str(path)
  w, h = _check_png(path)
  assert w >= 800 and h >= 500
  assert _no_temp_files(tmp_path)
  # Overwrites atomically; percent data and empty groups work too.
  plots.plot_pareto(str(path), [(c, 100 * a) for c, a in samples], [], [], [], 300, 350,
                    cost_unit="ms")
  _check_png(path)
  assert sorted(os.listdir(tmp_path)) == ["pareto.png"]


def test_plot_space_evolution_writes_png_flops27_and_72(tmp_path):
  for space in ("flops27", "flops72"):
    pool = list(spaces.get_pool(space))
    path = tmp_path / f"{space}.png"
    plots.plot_space_evolution(path, _rounds(pool, 22, 5, 6), pool, 22, title=space)
    w, h = _check_png(path)
    # The figure grows with the pool, and six stacked rounds make it tall.
    assert h > 2000 and (w > 1500) == (space == "flops72")
  one = tmp_path / "one.png"
  pool = list(spaces.get_pool("latency19"))
  plots.plot_space_evolution(one, _rounds(pool, 22, 6, 1), pool, 22)
  _check_png(one)
  assert _no_temp_files(tmp_path)


def test_plot_space_evolution_rejects_bad_input(tmp_path):
  pool = ["a", "b", "c"]
  path = tmp_path / "x.png"
  with pytest.raises(ValueError, match="at least one round"):
    plots.plot_space_evolution(path, [], pool, 2)
  good = {"working_sets": [["a"], ["b"]], "pruned": [[], []], "inherited": [["a"], ["b"]]}
  with pytest.raises(ValueError, match="not in the pool"):
    plots.plot_space_evolution(path, [dict(good, pruned=[["z"], []])], pool, 2)
  with pytest.raises(ValueError, match="layers"):
    plots.plot_space_evolution(path, [good], pool, 3)
  with pytest.raises(ValueError, match="lacks"):
    plots.plot_space_evolution(path, [{"working_sets": good["working_sets"]}], pool, 2)
  assert os.listdir(tmp_path) == []


def test_failures_leave_no_partial_file(tmp_path):
  samples, edges, prev, front = _pareto_data()
  missing = tmp_path / "no_such_dir" / "p.png"
  with pytest.raises(FileNotFoundError):
    plots.plot_pareto(missing, samples, edges, prev, front, 300, 350)
  pool = ["a", "b"]
  rnd = {"working_sets": [["a"]], "pruned": [[]], "inherited": [["a"]]}
  with pytest.raises(FileNotFoundError):
    plots.plot_space_evolution(missing, [rnd], pool, 1)
  assert os.listdir(tmp_path) == []


def test_failure_during_render_keeps_old_file(tmp_path, monkeypatch):
  path = tmp_path / "p.png"
  path.write_bytes(b"old")

  def boom(*args, **kwargs):
    raise RuntimeError("disk full")

  from matplotlib.figure import Figure
  monkeypatch.setattr(Figure, "savefig", boom)
  samples, edges, prev, front = _pareto_data()
  with pytest.raises(RuntimeError, match="disk full"):
    plots.plot_pareto(path, samples, edges, prev, front, 300, 350)
  assert path.read_bytes() == b"old"
  assert os.listdir(tmp_path) == ["p.png"]


def test_bad_points_raise(tmp_path):
  with pytest.raises(ValueError, match="samples"):
    plots.plot_pareto(tmp_path / "p.png", [(1, 2, 3)], [], [], [], 0, 1)
  assert os.listdir(tmp_path) == []
