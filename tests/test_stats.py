"""nse_tf.stats on hand-made inputs (the numbers a search-quality claim rests on)."""

import math

import numpy as np
import pytest

from nse_tf import stats


def test_kendall_tau_orders():
  assert stats.kendall_tau([1, 2, 3, 4], [10, 20, 30, 40]) == 1.0
  assert stats.kendall_tau([1, 2, 3, 4], [4, 3, 2, 1]) == -1.0
  # 6 pairs: (1,2)+ (1,3)+ (1,4)+ (2,3)- (2,4)+ (3,4)+ -> (5 - 1) / 6
  assert stats.kendall_tau([1, 2, 3, 4], [1, 3, 2, 4]) == pytest.approx(4 / 6)


def test_kendall_tau_b_with_ties_matches_formula():
  x = [1, 2, 2, 3]
  y = [1, 2, 3, 3]
  # pairs: (0,1)+ (0,2)+ (0,3)+ (1,2) tie x (1,3)+ (2,3) tie y; C=4, D=0, Tx=1, Ty=1, n0=6
  assert stats.kendall_tau(x, y) == pytest.approx(4 / math.sqrt(5 * 5))
  scipy_stats = pytest.importorskip("scipy.stats")
  a = [0.81, 0.84, 0.79, 0.88, 0.84, 0.90, 0.77]
  b = [0.70, 0.75, 0.72, 0.80, 0.74, 0.79, 0.71]
  assert stats.kendall_tau(a, b) == pytest.approx(scipy_stats.kendalltau(a, b)[0])
  np = pytest.importorskip("numpy")     # numpy arrays (whose bools do not subtract) too
  assert stats.kendall_tau(np.asarray(a), np.asarray(b)) == pytest.approx(
      scipy_stats.kendalltau(a, b)[0])


def test_kendall_tau_rejects_bad_input():
  with pytest.raises(ValueError):
    stats.kendall_tau([1, 2], [1])
  with pytest.raises(ValueError):
    stats.kendall_tau([1], [1])
  assert math.isnan(stats.kendall_tau([1, 1, 1], [1, 2, 3]))


def test_pooled_kendall_tau_weights_each_set_by_its_pairs():
  # n = 16: sqrt(2·37 / (9·16·15)) = sqrt(74 / 2160).
  assert stats.kendall_tau_null_se(16) == pytest.approx(math.sqrt(74 / 2160))
  assert stats.kendall_tau_null_se(16) == pytest.approx(0.185, abs=5e-4)
  # Equal sets: the plain mean, and the null SE shrinks by sqrt(number of sets).
  tau, se = stats.pooled_kendall_tau([0.611, 0.532, 0.329], [16, 16, 16])
  assert tau == pytest.approx((0.611 + 0.532 + 0.329) / 3)
  assert se == pytest.approx(stats.kendall_tau_null_se(16) / math.sqrt(3))
  # Unequal sets: 4 architectures (6 pairs) at τ 1 and 3 (3 pairs) at τ −1 → (6 − 3) / 9.
  tau, se = stats.pooled_kendall_tau([1.0, -1.0], [4, 3])
  assert tau == pytest.approx(3 / 9)
  assert se == pytest.approx(math.sqrt((6 * stats.kendall_tau_null_se(4)) ** 2 +
                                       (3 * stats.kendall_tau_null_se(3)) ** 2) / 9)
  # Without ties, pooling the per-set τ equals counting the concordant minus discordant
  # pairs within each set over all those pairs.
  rng = np.random.default_rng(0)
  sets = [(rng.normal(size=n), rng.normal(size=n)) for n in (5, 8, 12)]
  c_minus_d = sum(np.sign(x[i] - x[j]) * np.sign(y[i] - y[j])
                  for x, y in sets for i in range(len(x)) for j in range(i + 1, len(x)))
  pairs = sum(len(x) * (len(x) - 1) / 2 for x, _ in sets)
  tau, _ = stats.pooled_kendall_tau([stats.kendall_tau(x, y) for x, y in sets],
                                    [len(x) for x, _ in sets])
  assert tau == pytest.approx(c_minus_d / pairs)
  with pytest.raises(ValueError, match="2 τ values for 1 set sizes"):
    stats.pooled_kendall_tau([0.1, 0.2], [16])
  with pytest.raises(ValueError, match="at least 2"):
    stats.kendall_tau_null_se(1)


def test_mean_ci_by_hand():
  m, h = stats.mean_ci([1.0, 2.0, 3.0, 4.0, 5.0])
  # s = sqrt(2.5), t_{0.975, 4} = 2.776445
  assert m == 3.0
  assert h == pytest.approx(2.776445 * math.sqrt(2.5) / math.sqrt(5), rel=1e-5)
  m, h = stats.mean_ci([0.5, 0.7])
  assert h == pytest.approx(12.706205 * stats.stdev([0.5, 0.7]) / math.sqrt(2), rel=1e-5)
  assert math.isnan(stats.mean_ci([0.3])[1])
  with pytest.raises(ValueError):
    stats.mean_ci([])


def test_pooled_seed_stdev_and_binomial_se():
  # groups (1, 3) and (2, 2, 5): squares 2 + 6 = 8 over 1 + 2 dof
  assert stats.pooled_seed_stdev([[1, 3], [2, 2, 5], [7]]) == pytest.approx(math.sqrt(8 / 3))
  assert math.isnan(stats.pooled_seed_stdev([[1], [2]]))
  assert stats.stdev([2, 4, 4, 4, 5, 5, 7, 9]) == pytest.approx(math.sqrt(32 / 7))
  assert stats.binomial_se(0.5, 2400) == pytest.approx(0.0102, abs=1e-4)


def test_tau_ceiling_by_hand():
  # Seed variance 2 in every group (pooled s² = 2), means 2, 6, 10 (variance 16), k = 2:
  # V_a = 16 − 2/2 = 15, ρ = 15/16, τ_max = (2/π)·asin(√(15/16)).
  c = stats.tau_ceiling([[1, 3], [5, 7], [9, 11]])
  assert c["seeds"] == 2 and c["seed_sd"] == pytest.approx(math.sqrt(2))
  assert c["reliability"] == pytest.approx(15 / 16)
  assert c["between_sd"] == pytest.approx(math.sqrt(15))
  assert c["tau_max"] == pytest.approx(2 / math.pi * math.asin(math.sqrt(15 / 16)))
  # No seed noise: a perfect ranker reaches τ = 1. Noise as large as the differences
  # between architectures: nothing is left to rank.
  assert stats.tau_ceiling([[1, 1], [2, 2], [3, 3]])["tau_max"] == pytest.approx(1.0)
  assert stats.tau_ceiling([[0, 2], [2, 0], [1, 1]])["tau_max"] == 0.0
  # One seed per network, or one network: no estimate, unless the seed noise is known.
  assert math.isnan(stats.tau_ceiling([[1], [2], [3]])["tau_max"])
  c = stats.tau_ceiling([[2], [6], [10]], seed_sd=math.sqrt(2))   # V_a = 16 − 2, k = 1
  assert c["seeds"] == 1 and c["reliability"] == pytest.approx(14 / 16)
  assert math.isnan(stats.tau_ceiling([[1, 2]])["tau_max"])


def test_tau_ceiling_matches_a_simulated_perfect_ranker():
  """True accuracies N(0, 1), two seeds each with noise N(0, 1): ρ = 1/(1 + 1/2), and a
  ranker that knows the true accuracies scores τ ≈ (2/π)·asin(√ρ) = 0.608 against the
  measured seed means."""
  np = pytest.importorskip("numpy")
  scipy_stats = pytest.importorskip("scipy.stats")
  rng = np.random.default_rng(0)
  true = rng.normal(size=20000)
  seeds = true[:, None] + rng.normal(size=(20000, 2))
  c = stats.tau_ceiling(seeds.tolist())
  assert c["reliability"] == pytest.approx(2 / 3, abs=0.02)
  expected = 2 / math.pi * math.asin(math.sqrt(2 / 3))
  assert c["tau_max"] == pytest.approx(expected, abs=0.02)
  achieved = scipy_stats.kendalltau(true, seeds.mean(axis=1))[0]
  assert achieved == pytest.approx(expected, abs=0.02)


def test_simulated_perfect_ranker_by_hand():
  # No seed noise: measured again, the architectures keep their order (τ 1); noise as large
  # as the differences between architectures: no true spread left to rank (τ 0).
  assert stats.tau_ceiling([[1, 1], [2, 2], [3, 3]])["tau_max_sim"] == 1.0
  assert stats.tau_ceiling([[0, 2], [2, 0], [1, 1]])["tau_max_sim"] == 0.0
  assert math.isnan(stats.tau_ceiling([[1], [2], [3]])["tau_max_sim"])
  # Seeded: the same groups give the same value; another seed another (Monte Carlo) value.
  groups = [[1, 3], [5, 7], [9, 11], [4, 8]]
  a, b = stats.tau_ceiling(groups), stats.tau_ceiling(groups)
  assert a["tau_max_sim"] == b["tau_max_sim"] and 0 < a["tau_max_sim"] < 1
  assert stats.tau_ceiling(groups, seed=1)["tau_max_sim"] != a["tau_max_sim"]


def test_simulated_perfect_ranker_is_not_fooled_by_one_outlier():
  """16 architectures, 2 seeds each with noise N(0, 1): a perfect ranker (it knows the true
  accuracies) scored against the measured seed means, averaged over 40 replicates, against
  the two estimates made from each replicate's seed values alone. Normal true accuracies:
  both estimates are right to 0.05. Fifteen close architectures and one that failed to
  train (−20): the Gaussian estimate says ≈ 0.9, the simulated one is closer to the truth."""
  np = pytest.importorskip("numpy")
  rng = np.random.default_rng(1)
  scenarios = {"normal": rng.normal(size=16) * 1.5,
               "outlier": np.r_[rng.normal(size=15) * 0.8, -20.0]}
  result = {}
  for name, true in scenarios.items():
    achieved, gauss, sim = [], [], []
    for r in range(40):
      seeds = true[:, None] + rng.normal(size=(16, 2))
      achieved.append(stats.kendall_tau(true.tolist(), seeds.mean(axis=1).tolist()))
      c = stats.tau_ceiling(seeds.tolist(), draws=50, seed=r)
      gauss.append(c["tau_max"])
      sim.append(c["tau_max_sim"])
    result[name] = (np.mean(achieved), np.mean(gauss), np.mean(sim))
  real, gauss, sim = result["normal"]
  assert gauss == pytest.approx(real, abs=0.05) and sim == pytest.approx(real, abs=0.05)
  real, gauss, sim = result["outlier"]
  assert gauss > real + 0.25                       # the arcsine relation is fooled
  assert abs(sim - real) < 0.5 * abs(gauss - real)


def test_two_sample_tests_by_hand():
  # Welch: means 2 and 5, variances 1 and 1, n 3 and 3: t = −3/sqrt(1/3 + 1/3), df = 4.
  t, p = stats.welch_t_test([1, 2, 3], [4, 5, 6])
  assert t == pytest.approx(-3 / math.sqrt(2 / 3))
  scipy_stats = pytest.importorskip("scipy.stats")
  assert p == pytest.approx(2 * scipy_stats.t.sf(abs(t), 4))
  # One-sided: half the two-sided p in the direction of t, the rest against it.
  assert stats.welch_t_test([4, 5, 6], [1, 2, 3], "greater")[1] == pytest.approx(p / 2)
  assert stats.welch_t_test([1, 2, 3], [4, 5, 6], "greater")[1] == pytest.approx(1 - p / 2)
  with pytest.raises(ValueError, match="at least 2 values"):
    stats.welch_t_test([1], [1, 2])
  # Its interval: −3 ± t_{0.975, 4}·sqrt(2/3) (equal variances and sizes: df = 4).
  diff, lo, hi = stats.welch_difference_ci([1, 2, 3], [4, 5, 6])
  half = scipy_stats.t.ppf(0.975, 4) * math.sqrt(2 / 3)
  assert (diff, lo, hi) == pytest.approx((-3, -3 - half, -3 + half))
  # Unequal variances: Welch–Satterthwaite df, by hand.
  a, b = [1.0, 2.0, 4.0, 7.0], [2.0, 2.5, 3.0]
  va, vb = np.var(a, ddof=1) / 4, np.var(b, ddof=1) / 3
  df = (va + vb) ** 2 / (va ** 2 / 3 + vb ** 2 / 2)
  half = scipy_stats.t.ppf(0.975, df) * math.sqrt(va + vb)
  d = np.mean(a) - np.mean(b)
  assert stats.welch_difference_ci(a, b) == pytest.approx((d, d - half, d + half))
  with pytest.raises(ValueError, match="at least 2 values"):
    stats.welch_difference_ci([1], [1, 2])
  # Paired: differences 1, 2, 3 (mean 2, sd 1, n 3): t = 2 / (1/sqrt(3)), df = 2.
  t, p = stats.paired_t_test([2, 4, 6], [1, 2, 3])
  assert t == pytest.approx(2 * math.sqrt(3))
  assert p == pytest.approx(2 * scipy_stats.t.sf(t, 2))
  assert stats.paired_t_test([1, 2, 3], [2, 4, 6])[0] == pytest.approx(-t)
  with pytest.raises(ValueError, match="one length"):
    stats.paired_t_test([1, 2, 3], [1, 2])
  # Mann-Whitney: every a above every b: U = n_a·n_b = 9, exact one-sided p = 1/C(6,3).
  u, p = stats.mann_whitney_greater([4, 5, 6], [1, 2, 3])
  assert u == 9 and p == pytest.approx(1 / 20)
  u, p = stats.mann_whitney_greater([1, 2, 3], [4, 5, 6])
  assert u == 0 and p == pytest.approx(1.0)
