"""Pareto fronts of (cost ↓, accuracy ↑) and the choice of one front architecture.

SPEC §5.4 and §6. Pure Python/numpy (no TensorFlow import) so that the end of a round
and the command-line tools stay fast and testable.

Conventions used everywhere in this module:
  * `costs` and `accs` are parallel sequences (lists or numpy arrays) of finite numbers;
    lower cost and higher accuracy are better.
  * A *front* is a list of indices into `costs`/`accs`, sorted by cost ascending, as
    returned by `pareto_front`.
  * `knee` and `select` return one index into `costs`/`accs` (an element of `front`).
"""

from __future__ import annotations

import math
from typing import List, Optional, Sequence, Tuple

import numpy as np

RULES = ("knee", "max_acc", "min_cost", "closest")
RULE_HELP = "'knee', 'max_acc', 'min_cost' or 'closest:COST' (e.g. 'closest:320')"


def _as_vectors(costs, accs) -> Tuple[np.ndarray, np.ndarray]:
  c = np.asarray(costs, dtype=np.float64).reshape(-1)
  a = np.asarray(accs, dtype=np.float64).reshape(-1)
  if c.shape != a.shape:
    raise ValueError(f"costs and accs differ in length: {c.size} vs {a.size}")
  if not (np.all(np.isfinite(c)) and np.all(np.isfinite(a))):
    raise ValueError("costs and accs must be finite numbers (found NaN or inf)")
  return c, a


def pareto_front(costs: Sequence[float], accs: Sequence[float],
                 prefer: Optional[Sequence[int]] = None) -> List[int]:
  """Indices of the non-dominated points of (cost ↓, accuracy ↑), sorted by cost ascending.

  A point is dominated when another point has cost ≤ and accuracy ≥ with at least one of
  the two strict. Exact duplicates (same cost and same accuracy) do not dominate each
  other; only ONE of them is kept: the one with the lowest `prefer` value (e.g. 0 for the
  round's new samples, 1 for re-evaluated previous-front architectures, so that "ties go
  to new samples", SPEC §5.4), then the lowest index. Without `prefer` the lowest index
  is kept.

  O(n log n): sort by (cost ↑, accuracy ↓, prefer ↑, index ↑) and sweep, keeping a point
  when its accuracy beats every accuracy seen so far.
  """
  c, a = _as_vectors(costs, accs)
  n = c.size
  if prefer is None:
    p = np.zeros(n, dtype=np.int64)
  else:
    p = np.asarray(prefer).reshape(-1)
    if p.size != n:
      raise ValueError(f"prefer has {p.size} entries for {n} points")
    if p.size and not np.issubdtype(p.dtype, np.integer):
      raise ValueError(f"prefer must hold integers (priorities), got dtype {p.dtype}")
    p = p.astype(np.int64)
  if n == 0:
    return []
  # np.lexsort sorts by the LAST key first; it is stable, so the index breaks the last ties.
  order = np.lexsort((np.arange(n), p, -a, c))
  front: List[int] = []
  best = -math.inf
  for i in order:
    if a[i] > best:
      front.append(int(i))
      best = a[i]
  return front


def _check_front(front: Sequence[int], n: int) -> List[int]:
  front = [int(i) for i in front]
  if not front:
    raise ValueError("the Pareto front is empty: nothing to select from")
  bad = [i for i in front if not 0 <= i < n]
  if bad:
    raise ValueError(f"front indices out of range for {n} points: {bad[:5]}")
  return front


def _max_acc(c: np.ndarray, a: np.ndarray, front: Sequence[int]) -> int:
  # Highest accuracy; ties -> lower cost, then the earlier front entry.
  return min(front, key=lambda i: (-a[i], c[i]))


def _min_cost(c: np.ndarray, a: np.ndarray, front: Sequence[int]) -> int:
  # Lowest cost; ties -> higher accuracy, then the earlier front entry.
  return min(front, key=lambda i: (c[i], -a[i]))


def knee(costs: Sequence[float], accs: Sequence[float], front: Sequence[int]) -> int:
  """The knee of a front: the index of the front point farthest above the chord.

  Cost and accuracy are normalised to [0, 1] over the front; the chord joins the front's
  two extremes, the min-cost point and the max-accuracy point. The knee is the point with
  the largest perpendicular distance to the chord *on the good side* (towards low cost and
  high accuracy: it buys the most accuracy per unit of cost); ties go to the higher
  accuracy.

  Fallbacks, all returning the max-accuracy point:
    * fronts of 1 or 2 points (no interior point exists);
    * fronts with no point strictly above the chord (a straight or sagging front has no
      knee worth trading accuracy for; a point below the chord is the worst trade-off, not
      the best).
  Raises ValueError for an empty front.
  """
  c, a = _as_vectors(costs, accs)
  front = _check_front(front, c.size)
  best_acc = _max_acc(c, a, front)
  if len(front) <= 2:
    return best_acc
  lo = _min_cost(c, a, front)
  fc, fa = c[front], a[front]
  c_span = float(fc.max() - fc.min())
  a_span = float(fa.max() - fa.min())
  nc = (fc - fc.min()) / c_span if c_span > 0 else np.zeros_like(fc)
  na = (fa - fa.min()) / a_span if a_span > 0 else np.zeros_like(fa)
  pos = {i: k for k, i in enumerate(front)}
  x0, y0 = nc[pos[lo]], na[pos[lo]]
  x1, y1 = nc[pos[best_acc]], na[pos[best_acc]]
  dx, dy = x1 - x0, y1 - y0
  length = math.hypot(dx, dy)
  if length == 0.0:
    return best_acc
  # Signed distance; positive = above/left of the chord (from the min-cost point towards
  # the max-accuracy point), i.e. more accuracy for the cost than the chord promises.
  dist = (dx * (na - y0) - dy * (nc - x0)) / length
  eps = 1e-12
  k = max(range(len(front)), key=lambda j: (dist[j], fa[j], -fc[j]))
  if dist[k] <= eps:
    return best_acc
  return front[k]


def parse_rule(rule: str) -> Tuple[str, Optional[float]]:
  """Validate a selection rule: 'knee' | 'max_acc' | 'min_cost' | 'closest:COST'.

  Returns (name, COST) with COST a finite float for 'closest' and None otherwise.
  Raises ValueError with the accepted forms in the message.
  """
  if not isinstance(rule, str):
    raise ValueError(f"selection rule must be a string, got {type(rule).__name__}; "
                     f"use {RULE_HELP}")
  text = rule.strip()
  name, sep, arg = text.partition(":")
  name = name.strip().lower()
  if name in ("knee", "max_acc", "min_cost"):
    if sep:
      raise ValueError(f"selection rule {rule!r}: {name!r} takes no argument; use {RULE_HELP}")
    return name, None
  if name == "closest":
    arg = arg.strip()
    if not sep or not arg:
      raise ValueError(f"selection rule {rule!r}: 'closest' needs a target cost, "
                       f"e.g. 'closest:320'")
    try:
      value = float(arg)
    except ValueError:
      raise ValueError(f"selection rule {rule!r}: target cost {arg!r} is not a number; "
                       f"use e.g. 'closest:320'") from None
    if not math.isfinite(value):
      raise ValueError(f"selection rule {rule!r}: target cost must be finite")
    return "closest", value
  raise ValueError(f"unknown selection rule {rule!r}; use {RULE_HELP}")


def select(costs: Sequence[float], accs: Sequence[float], front: Sequence[int],
           rule: str) -> int:
  """Pick one front point by `rule` (see `parse_rule`); returns its index.

    knee         -- `knee` (the default in SPEC §6)
    max_acc      -- highest accuracy (ties -> lower cost)
    min_cost     -- lowest cost (ties -> higher accuracy)
    closest:COST -- cost closest to COST (ties -> higher accuracy, then lower cost)
  Raises ValueError for an unknown rule, a bad COST or an empty front.
  """
  name, target = parse_rule(rule)
  c, a = _as_vectors(costs, accs)
  front = _check_front(front, c.size)
  if name == "knee":
    return knee(c, a, front)
  if name == "max_acc":
    return _max_acc(c, a, front)
  if name == "min_cost":
    return _min_cost(c, a, front)
  return min(front, key=lambda i: (abs(c[i] - target), -a[i], c[i]))
