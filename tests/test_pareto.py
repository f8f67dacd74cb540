"""Tests of nse_tf.pareto: the front against a brute-force reference, tie preferences, the
knee and the selection rules."""

import random

import numpy as np
import pytest

from nse_tf import pareto


def _brute_front(costs, accs, prefer=None):
  """O(n²) reference: non-dominated points, one per group of exact duplicates."""
  n = len(costs)
  prefer = [0] * n if prefer is None else list(prefer)
  keep = []
  for i in range(n):
    dominated = any(
        costs[j] <= costs[i] and accs[j] >= accs[i]
        and (costs[j] < costs[i] or accs[j] > accs[i]) for j in range(n))
    if dominated:
      continue
    twins = [j for j in range(n) if costs[j] == costs[i] and accs[j] == accs[i]]
    if min(twins, key=lambda j: (prefer[j], j)) == i:
      keep.append(i)
  return sorted(keep, key=lambda i: costs[i])


@pytest.mark.parametrize("seed", range(50))
def test_front_matches_brute_force_with_many_ties(seed):
  rng = random.Random(seed)
  n = rng.randint(0, 200)
  span_c, span_a = rng.choice([(3, 3), (5, 10), (20, 20), (50, 8)])
  costs = [rng.randint(0, span_c) for _ in range(n)]
  accs = [rng.randint(0, span_a) for _ in range(n)]
  prefer = [rng.randint(0, 2) for _ in range(n)] if seed % 2 else None
  got = pareto.pareto_front(costs, accs, prefer)
  assert got == _brute_front(costs, accs, prefer)
  # Sorted by cost (strictly: a front has one point per cost) and accuracy strictly rising.
  assert all(costs[a] < costs[b] and accs[a] < accs[b] for a, b in zip(got, got[1:]))
  # numpy inputs give the same answer.
  assert pareto.pareto_front(np.array(costs, float), np.array(accs, float), prefer) == got


def test_front_float_data_and_types():
  rng = np.random.default_rng(0)
  c, a = rng.uniform(300, 350, 500), rng.uniform(0.6, 0.75, 500)
  got = pareto.pareto_front(c, a)
  assert got == _brute_front(list(c), list(a))
  assert all(type(i) is int for i in got)
  assert pareto.pareto_front([], []) == []
  assert pareto.pareto_front([5.0], [0.1]) == [0]


def test_new_sample_beats_identical_previous_front_point():
  # Index 0 is a previous-front architecture (priority 1), index 2 an identical new sample.
  costs = [300.0, 310.0, 300.0, 320.0]
  accs = [0.70, 0.72, 0.70, 0.71]
  prefer = [1, 0, 0, 0]
  assert pareto.pareto_front(costs, accs, prefer) == [2, 1]
  # Without preferences the lowest index wins; with equal priorities too.
  assert pareto.pareto_front(costs, accs) == [0, 1]
  assert pareto.pareto_front(costs, accs, [0, 0, 0, 0]) == [0, 1]
  # Three-way tie: lowest priority, then lowest index among those.
  assert pareto.pareto_front([1, 1, 1], [5, 5, 5], [1, 0, 0]) == [1]


def test_front_domination_cases():
  # Same cost, lower acc: dominated. Same acc, higher cost: dominated.
  assert pareto.pareto_front([1, 1, 2, 3], [5, 4, 5, 6]) == [0, 3]
  # Returned in cost order, not input order.
  assert pareto.pareto_front([30, 10, 20], [3, 1, 2]) == [1, 2, 0]


def test_front_rejects_bad_input():
  with pytest.raises(ValueError, match="length"):
    pareto.pareto_front([1, 2], [1])
  with pytest.raises(ValueError, match="finite"):
    pareto.pareto_front([1, float("nan")], [1, 2])
  with pytest.raises(ValueError, match="prefer"):
    pareto.pareto_front([1, 2], [1, 2], prefer=[0])
  with pytest.raises(ValueError, match="integers"):
    pareto.pareto_front([1, 2], [1, 2], prefer=[0.5, 1.0])


def test_knee_l_shaped_front():
  # An L: a steep rise to the corner (index 2), then a flat tail.
  costs = [0.0, 1.0, 2.0, 6.0, 10.0, 5.0]
  accs = [0.0, 8.0, 9.5, 9.8, 10.0, 1.0]
  front = pareto.pareto_front(costs, accs)
  assert front == [0, 1, 2, 3, 4]
  assert pareto.knee(costs, accs, front) == 2
  assert pareto.select(costs, accs, front, "knee") == 2


def test_knee_is_scale_free_and_ignores_sagging_points():
  costs = [300.0, 301.0, 302.0, 350.0]
  accs = [0.70, 0.74, 0.7405, 0.75]   # normalised: 0.80 - 0.02 > 0.81 - 0.04
  front = pareto.pareto_front(costs, accs)
  k = pareto.knee(costs, accs, front)
  assert k == pareto.knee([c * 1e6 for c in costs], [a * 100 for a in accs], front) == 1
  # A sagging (convex) front has no point above the chord: the max-accuracy point.
  costs = [0.0, 9.0, 10.0]
  accs = [0.0, 1.0, 10.0]
  assert pareto.knee(costs, accs, [0, 1, 2]) == 2
  # A straight front: likewise.
  assert pareto.knee([0, 1, 2, 3], [0, 1, 2, 3], [0, 1, 2, 3]) == 3


def test_knee_small_fronts():
  assert pareto.knee([5.0], [0.5], [0]) == 0
  assert pareto.knee([5.0, 7.0], [0.5, 0.6], [0, 1]) == 1
  with pytest.raises(ValueError, match="empty"):
    pareto.knee([5.0], [0.5], [])


def test_select_rules():
  costs = [300.0, 310.0, 320.0, 330.0, 345.0]
  accs = [0.70, 0.72, 0.73, 0.735, 0.74]
  front = pareto.pareto_front(costs, accs)
  assert pareto.select(costs, accs, front, "max_acc") == 4
  assert pareto.select(costs, accs, front, "min_cost") == 0
  assert pareto.select(costs, accs, front, "closest:322") == 2
  assert pareto.select(costs, accs, front, " closest: 1000 ") == 4
  assert pareto.select(costs, accs, front, "closest:0") == 0
  # Equidistant from 310 and 320: the higher accuracy wins.
  assert pareto.select(costs, accs, front, "closest:315") == 2
  assert pareto.select(costs, accs, front, "closest:315.0") == 2
  assert pareto.select(costs, accs, front, "MAX_ACC") == 4
  # Only front points are candidates.
  assert pareto.select([1, 2, 3], [1, 9, 3], [0, 1], "closest:3") == 1


def test_select_errors():
  costs, accs = [1.0, 2.0], [0.1, 0.2]
  for bad in ("best", "closest:abc", "closest", "closest:", "closest:nan", "closest:inf",
              "knee:3", "", "max_acc:1"):
    with pytest.raises(ValueError, match="rule|closest|cost"):
      pareto.select(costs, accs, [0, 1], bad)
  with pytest.raises(ValueError, match="empty"):
    pareto.select(costs, accs, [], "knee")
  with pytest.raises(ValueError, match="out of range"):
    pareto.select(costs, accs, [0, 5], "max_acc")


def test_parse_rule():
  assert pareto.parse_rule("knee") == ("knee", None)
  assert pareto.parse_rule("max_acc") == ("max_acc", None)
  assert pareto.parse_rule("min_cost") == ("min_cost", None)
  assert pareto.parse_rule("closest:320") == ("closest", 320.0)
  assert pareto.parse_rule("closest:3.2e2") == ("closest", 320.0)
  with pytest.raises(ValueError, match="unknown selection rule"):
    pareto.parse_rule("pareto")
  with pytest.raises(ValueError, match="not a number"):
    pareto.parse_rule("closest:abc")
  with pytest.raises(ValueError):
    pareto.parse_rule(None)
