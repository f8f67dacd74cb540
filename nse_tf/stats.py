"""Statistics a NAS result needs: rank agreement and confidence intervals (pure Python).

Used by `benchmarks/search_quality.py`; kept here so that they are unit-tested on
hand-made inputs rather than trusted.
"""

from __future__ import annotations

import math
import random
from typing import Optional, Sequence, Tuple


def kendall_tau(x: Sequence[float], y: Sequence[float]) -> float:
  """Kendall's τ-b of two paired samples (ties in either count as neither order).

  τ-b = (C − D) / sqrt((n0 − T_x)(n0 − T_y)), n0 = n(n − 1)/2, with C/D the concordant and
  discordant pairs and T_x/T_y the pairs tied in x/y. 1: same order, −1: reversed, 0: none.
  O(n²), fine for the dozens of architectures a benchmark trains.
  """
  if len(x) != len(y):
    raise ValueError(f"kendall_tau: {len(x)} x values but {len(y)} y values")
  n = len(x)
  if n < 2:
    raise ValueError("kendall_tau needs at least 2 pairs")
  concordant = discordant = ties_x = ties_y = 0
  for i in range(n):
    for j in range(i + 1, n):
      dx = int(x[i] > x[j]) - int(x[i] < x[j])     # int(): numpy bools do not subtract
      dy = int(y[i] > y[j]) - int(y[i] < y[j])
      if dx == 0:
        ties_x += 1
      if dy == 0:
        ties_y += 1
      if dx and dy:
        if dx == dy:
          concordant += 1
        else:
          discordant += 1
  n0 = n * (n - 1) // 2
  denom = math.sqrt((n0 - ties_x) * (n0 - ties_y))
  if denom == 0:
    return float("nan")     # one of the samples is constant: no order to agree with
  return (concordant - discordant) / denom


def kendall_tau_null_se(n: int) -> float:
  """Standard error of Kendall's τ over n pairs when the two orders are independent:
  sqrt(2(2n + 5) / (9n(n − 1))) (0.19 for 16 architectures)."""
  if n < 2:
    raise ValueError("kendall_tau_null_se needs at least 2 pairs")
  return math.sqrt(2.0 * (2 * n + 5) / (9.0 * n * (n - 1)))


def pooled_kendall_tau(taus: Sequence[float], sizes: Sequence[int]) -> Tuple[float, float]:
  """Kendall's τ over several independent sets (e.g. the draws of several searches), with
  only the pairs within a set compared: each set's τ weighted by its n(n − 1)/2 pairs.

  Returns (pooled τ, its standard error under independence of the two orders): the
  pair-weighted combination of `kendall_tau_null_se` per set.
  """
  if len(taus) != len(sizes) or not taus:
    raise ValueError(f"pooled_kendall_tau: {len(taus)} τ values for {len(sizes)} set sizes")
  weights = [n * (n - 1) / 2 for n in sizes]
  total = sum(weights)
  tau = sum(w * t for w, t in zip(weights, taus)) / total
  se = math.sqrt(sum((w * kendall_tau_null_se(n)) ** 2 for w, n in zip(weights, sizes))) / total
  return tau, se


def quantile(sorted_values: Sequence[float], q: float) -> float:
  """Linear-interpolated q-quantile of already sorted values."""
  pos = q * (len(sorted_values) - 1)
  i = int(math.floor(pos))
  j = min(i + 1, len(sorted_values) - 1)
  return sorted_values[i] + (pos - i) * (sorted_values[j] - sorted_values[i])


def t_quantile(p: float, df: int) -> float:
  """Quantile of Student's t distribution (scipy)."""
  from scipy import stats  # pylint: disable=g-import-not-at-top
  return float(stats.t.ppf(p, df))


def mean_ci(values: Sequence[float], level: float = 0.95) -> Tuple[float, float]:
  """(mean, half-width of the two-sided `level` t confidence interval of the mean).

  The half-width is t_{(1+level)/2, n−1} · s / sqrt(n) with s the sample standard
  deviation; nan for a single value.
  """
  n = len(values)
  if n == 0:
    raise ValueError("mean_ci of no values")
  m = sum(values) / n
  if n < 2:
    return m, float("nan")
  return m, t_quantile((1 + level) / 2, n - 1) * stdev(values) / math.sqrt(n)


def stdev(values: Sequence[float]) -> float:
  """Sample standard deviation (n − 1 in the denominator)."""
  n = len(values)
  if n < 2:
    return float("nan")
  m = sum(values) / n
  return math.sqrt(sum((v - m) ** 2 for v in values) / (n - 1))


def pooled_seed_stdev(groups: Sequence[Sequence[float]]) -> float:
  """Within-group (between training seeds) standard deviation, pooled over groups.

  sqrt(Σ_g Σ_i (v_gi − mean_g)² / Σ_g (n_g − 1)); groups with one value are ignored.
  """
  num = 0.0
  dof = 0
  for g in groups:
    if len(g) < 2:
      continue
    m = sum(g) / len(g)
    num += sum((v - m) ** 2 for v in g)
    dof += len(g) - 1
  return math.sqrt(num / dof) if dof else float("nan")


def binomial_se(p: float, n: int) -> float:
  """Standard error of an accuracy p measured on n examples."""
  return math.sqrt(max(p * (1 - p), 0.0) / n)


def tau_ceiling(groups: Sequence[Sequence[float]], seed_sd: Optional[float] = None,
                draws: int = 400, seed: int = 0) -> dict:
  """How high a perfect ranker's Kendall τ against these noisy measurements can be.

  groups: per architecture, its accuracy under each training seed (≥ 2 seeds for at least
  one architecture). A benchmark ranks architectures by their seed mean, which carries
  training noise: with between-architecture variance V_a of the true accuracies and seed
  variance s² (pooled over groups), the k-seed mean has reliability
  ρ = V_a / (V_a + s²/k), where V_a is estimated as var(means) − s²/k (clamped at 0).
  The best possible correlation of any ranking with the means is then √ρ, and under
  bivariate normality Kendall's τ is (2/π)·arcsin(Pearson r) (Greiner's relation), so

      τ_max = (2/π)·arcsin(√ρ).

  seed_sd: the seed standard deviation measured elsewhere (e.g. on other networks with
  the same budget), for groups of one seed each; default: pooled from `groups`.

  The arcsine relation assumes normally distributed true accuracies. One architecture far
  from the rest (a network that fails to train) inflates V_a and so τ_max, although it
  decides only n − 1 of the n(n − 1)/2 pairs. So the perfect ranker is also simulated on
  these architectures themselves (`tau_max_sim`): their means shrunk toward the grand
  mean to the spread V_a (the estimated true accuracies, outliers kept), each measured
  again with seed noise N(0, s²/k), Kendall τ between the two averaged over `draws`
  seeded draws. On normal true accuracies the two agree; with an outlier the simulated
  one is the lower, and the one to read (not simulated above `SIMULATE_MAX` architectures:
  nan).

  Returns {"reliability": ρ, "tau_max": τ_max, "tau_max_sim": simulated τ_max, "seeds": k,
  "seed_sd": s, "between_sd": sqrt(V_a)} (nan values where there are too few groups or
  seeds). Expected values, not bounds on one sample: a small set can land above them by
  chance.
  """
  groups = [list(g) for g in groups if len(g) > 0]
  out = {"reliability": float("nan"), "tau_max": float("nan"), "tau_max_sim": float("nan"),
         "seeds": 0, "seed_sd": float("nan"), "between_sd": float("nan")}
  if len(groups) < 2:
    return out
  k = min(len(g) for g in groups)
  s = pooled_seed_stdev(groups) if seed_sd is None else float(seed_sd)
  means = [sum(g) / len(g) for g in groups]
  out.update(seeds=k, seed_sd=s)
  if math.isnan(s):
    return out
  var_means = stdev(means) ** 2
  var_a = max(var_means - s * s / k, 0.0)
  rel = var_a / var_means if var_means > 0 else 0.0
  out.update(reliability=rel, between_sd=math.sqrt(var_a),
             tau_max=2.0 / math.pi * math.asin(math.sqrt(rel)),
             tau_max_sim=_simulated_perfect_ranker(means, math.sqrt(rel), s / math.sqrt(k),
                                                   draws, seed))
  return out


SIMULATE_MAX = 100     # architectures; Kendall τ here is O(n²) pure Python per draw (~2 s at 100)


def _simulated_perfect_ranker(means: Sequence[float], shrink: float, noise_sd: float,
                              draws: int, seed: int) -> float:
  """Mean Kendall τ between `means` shrunk by `shrink` toward their mean (the estimated
  true accuracies) and the same plus N(0, noise_sd²), over `draws` seeded draws."""
  if len(means) > SIMULATE_MAX:
    return float("nan")
  if shrink == 0.0:
    return 0.0
  grand = sum(means) / len(means)
  true = [grand + shrink * (m - grand) for m in means]
  if noise_sd == 0.0:
    return 1.0
  rng = random.Random(seed)
  total = 0.0
  for _ in range(draws):
    total += kendall_tau(true, [t + rng.gauss(0.0, noise_sd) for t in true])
  return total / draws


def welch_t_test(a: Sequence[float], b: Sequence[float],
                 alternative: str = "two-sided") -> Tuple[float, float]:
  """(t, p) of Welch's t-test, unequal variances (scipy): p for mean(a) ≠ mean(b), or with
  alternative='greater' the one-sided p for mean(a) > mean(b)."""
  if len(a) < 2 or len(b) < 2:
    raise ValueError(f"welch_t_test needs at least 2 values per sample, got {len(a)} and "
                     f"{len(b)}")
  from scipy import stats  # pylint: disable=g-import-not-at-top
  r = stats.ttest_ind(list(a), list(b), equal_var=False, alternative=alternative)
  return float(r.statistic), float(r.pvalue)


def paired_t_test(a: Sequence[float], b: Sequence[float]) -> Tuple[float, float]:
  """(t, two-sided p) of the paired t-test of mean(a − b) = 0 (scipy), for values that
  belong together pair by pair (e.g. two picks of the same search seed)."""
  if len(a) != len(b) or len(a) < 2:
    raise ValueError(f"paired_t_test needs two samples of one length ≥ 2, got {len(a)} and "
                     f"{len(b)}")
  from scipy import stats  # pylint: disable=g-import-not-at-top
  r = stats.ttest_rel(list(a), list(b))
  return float(r.statistic), float(r.pvalue)


def welch_difference_ci(a: Sequence[float], b: Sequence[float],
                        level: float = 0.95) -> Tuple[float, float, float]:
  """(mean(a) − mean(b), low, high): the confidence interval of the difference of means
  with Welch's standard error and Welch–Satterthwaite degrees of freedom (unequal
  variances; the interval that goes with `welch_t_test`)."""
  if len(a) < 2 or len(b) < 2:
    raise ValueError(f"welch_difference_ci needs at least 2 values per sample, got {len(a)} "
                     f"and {len(b)}")
  from scipy import stats  # pylint: disable=g-import-not-at-top
  va, vb = stdev(a) ** 2 / len(a), stdev(b) ** 2 / len(b)
  diff = sum(a) / len(a) - sum(b) / len(b)
  se = math.sqrt(va + vb)
  if se == 0:
    return diff, diff, diff
  df = (va + vb) ** 2 / (va ** 2 / (len(a) - 1) + vb ** 2 / (len(b) - 1))
  half = float(stats.t.ppf(0.5 + level / 2, df)) * se
  return diff, diff - half, diff + half


def mann_whitney_greater(a: Sequence[float], b: Sequence[float]) -> Tuple[float, float]:
  """(U, one-sided p) of the Mann-Whitney test that values of `a` tend to exceed those of
  `b` (no normality assumed; ties get half credit). scipy's exact p for small samples."""
  if not a or not b:
    raise ValueError("mann_whitney_greater needs values in both samples")
  from scipy import stats  # pylint: disable=g-import-not-at-top
  r = stats.mannwhitneyu(list(a), list(b), alternative="greater")
  return float(r.statistic), float(r.pvalue)
