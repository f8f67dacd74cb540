"""MultiBranchLayer, Supernet, gate sampling and pruning (SPEC §3–§4)."""

import numpy as np
import pytest
import tensorflow as tf

from nse_tf import cost, spaces, supernet


def _layer(kind="N", c_in=8, c_out=8, stride=1, hw=8):
  return spaces.LayerSpec(0, kind, c_in, c_out, stride, hw, hw, 0)


def _mbl(kind="N", ops=("dw_k3_e1", "dw_k5_e3", "ssc_k5_e1"), costs=None, **kw):
  c_out = 8 if kind == "N" else 16
  stride = 2 if kind == "R" else 1
  layer = _layer(kind, 8, c_out, stride)
  m = supernet.MultiBranchLayer(layer, list(ops), costs or [1.0 + i for i in range(len(ops))],
                                **kw)
  m(tf.zeros([2, 8, 8, 8]), gates=tf.ones([len(ops)]), training=False)
  return m


def test_averaging_rule_normal_layer_counts_identity():
  m = _mbl("N")
  x = tf.random.normal([2, 8, 8, 8], seed=1)
  y = m(x, gates=tf.constant([1.0, 1.0, 0.0]), training=False)
  expect = (x + m.branches[0](x, training=False) + m.branches[1](x, training=False)) / 3.0
  np.testing.assert_allclose(y.numpy(), expect.numpy(), atol=1e-5)
  # Empty pattern of a normal layer: the identity.
  y0 = m(x, gates=tf.zeros([3]), training=False)
  np.testing.assert_allclose(y0.numpy(), x.numpy(), atol=1e-6)


def test_averaging_rule_reduction_layer_has_no_identity():
  m = _mbl("R")
  x = tf.random.normal([2, 8, 8, 8], seed=2)
  y = m(x, gates=tf.constant([0.0, 1.0, 1.0]), training=False)
  expect = (m.branches[1](x, training=False) + m.branches[2](x, training=False)) / 2.0
  assert y.shape == (2, 4, 4, 16)
  np.testing.assert_allclose(y.numpy(), expect.numpy(), atol=1e-5)


def test_off_branch_neither_runs_nor_gets_gradient():
  m = _mbl("N")
  off = m.branches[1]
  bn = off.project_bn
  mean_before = bn.moving_mean.numpy().copy()
  x = tf.random.normal([2, 8, 8, 8], seed=3)

  @tf.function
  def step(x, g):
    with tf.GradientTape() as tape:
      loss = tf.reduce_sum(m(x, gates=g, training=True) ** 2)
    return tape.gradient(loss, off.trainable_variables + m.branches[0].trainable_variables)

  grads = step(x, tf.constant([1.0, 0.0, 0.0]))
  n_off = len(off.trainable_variables)
  for g in grads[:n_off]:
    assert g is None or not np.any(g.numpy()), "an off branch got a gradient"
  assert any(np.any(g.numpy()) for g in grads[n_off:] if g is not None)
  # Training-mode BN of an op that ran would have moved its statistics.
  np.testing.assert_array_equal(bn.moving_mean.numpy(), mean_before)
  step(x, tf.constant([0.0, 1.0, 0.0]))
  assert np.any(bn.moving_mean.numpy() != mean_before)


def test_estimator_forward_value_is_first_path():
  m = _mbl("N")
  x = tf.random.normal([2, 8, 8, 8], seed=4)
  g1 = tf.constant([1.0, 0.0, 1.0])
  g2 = tf.constant([0.0, 1.0, 0.0])
  alive = tf.ones([3])
  m.theta.assign([0.5, -0.3, 1.0])
  y, c = m.call_theta(x, g1, g2, tf.constant(False), alive, training=False)
  np.testing.assert_allclose(y.numpy(), m(x, gates=g1, training=False).numpy(), atol=1e-5)
  p = supernet.keep_prob(np.array([0.5, -0.3, 1.0]))
  lp = lambda g: np.sum(np.where(g > 0, np.log(p), np.log(1 - p)))
  pi1 = 1 / (1 + np.exp(lp(np.array([0, 1, 0])) - lp(np.array([1, 0, 1]))))
  # expected cost π₁ c(g¹) + π₂ c(g²) with costs 1, 2, 3
  np.testing.assert_allclose(c.numpy(), pi1 * 4.0 + (1 - pi1) * 2.0, rtol=1e-5)


def test_single_pattern_layer_gets_no_theta_gradient():
  m = _mbl("R", ops=("dw_k3_e1",), costs=[1.0])
  x = tf.random.normal([2, 8, 8, 8])
  g = tf.ones([1])
  with tf.GradientTape() as tape:
    y, c = m.call_theta(x, g, g, tf.constant(True), tf.ones([1]), training=False)
    loss = tf.reduce_sum(y) + c
  grad = tape.gradient(loss, m.theta)
  assert grad is None or not np.any(tf.convert_to_tensor(grad).numpy())


def test_theta_gradient_prefers_the_useful_op_and_prunes_the_useless_one():
  """Toy problem: the target is exactly the output of pattern {good}."""
  tf.random.set_seed(0)
  m = _mbl("N", ops=("dw_k3_e1", "dw_k5_e3"), costs=[0.0, 0.0])
  x = tf.random.normal([4, 8, 8, 8], seed=5)
  target = m(x, gates=tf.constant([1.0, 0.0]), training=False)
  opt = tf.keras.optimizers.Adam(0.1, beta_1=0.0)
  opt.build([m.theta])        # no variable created inside the step: traced once, not twice
  sampler = supernet.GateSampler(["N"], [2], seed=0)
  alive = [np.ones(2, bool)]

  @tf.function
  def theta_step(g1, g2, same):
    with tf.GradientTape() as tape:
      y, _ = m.call_theta(x, g1, g2, same, tf.ones([2]), training=False)
      loss = tf.reduce_mean((y - target) ** 2)
    opt.apply_gradients([(tape.gradient(loss, m.theta), m.theta)])

  pruned, trace = [], []
  for _ in range(400):
    g1, g2, same = sampler.theta_gates(alive, [m.theta.numpy()])
    theta_step(tf.constant(g1), tf.constant(g2), tf.constant(same[0]))
    trace.append(m.theta.numpy().copy())
    pruned += supernet.prune([m.theta.numpy()], alive, ["N"], [[False, False]])
    if pruned:
      break
  theta = m.theta.numpy()
  assert pruned == [(0, 1)], theta
  assert theta[0] > 0.5 and theta[1] < -2.0, theta
  # the useful op's θ rose and the useless one's fell on average along the way
  assert trace[len(trace) // 2][0] > 0 > trace[len(trace) // 2][1]
  assert alive[0].tolist() == [True, False]


@pytest.mark.slow
def test_regulariser_moves_expected_cost_toward_tau():
  table = cost.CostTable("flops27", "tiny", resolution=32)
  ws = [[0, 3, 21]] * spaces.num_layers("tiny")
  net = supernet.Supernet("flops27", "tiny", ws, table, num_classes=4, resolution=32)
  net.build_all()
  sampler = supernet.GateSampler(spaces.layer_kinds("tiny"), [3] * len(ws), seed=1)
  alive = [np.ones(3, bool) for _ in ws]
  alive_flat = tf.ones([net.total_ops])
  images = tf.random.normal([2, 32, 32, 3])
  full = table.fixed + sum(sum(table.layer_costs(l)[i] for i in w) for l, w in enumerate(ws))
  tau = table.fixed + 0.1 * (full - table.fixed)
  opt = tf.keras.optimizers.Adam(0.05, beta_1=0.0)
  opt.build(net.theta_variables)   # no variable created inside the step: traced once

  @tf.function
  def step(g1, g2, same):
    with tf.GradientTape() as tape:
      _, c = net.call_theta(images, g1, g2, same, alive_flat, training=True)
      loss = 1.0 * (c - tau) ** 2 / (full - table.fixed) ** 2
    grads = tape.gradient(loss, net.theta_variables)
    opt.apply_gradients([(tf.zeros_like(v) if g is None else g, v)
                         for g, v in zip(grads, net.theta_variables)])
    return c

  def expected():
    p = [supernet.keep_prob(t) for t in net.thetas_numpy()]
    return table.fixed + sum(sum(pi * table.layer_costs(l)[i] for pi, i in zip(pl, w))
                             for l, (pl, w) in enumerate(zip(p, ws)))

  before = expected()
  for _ in range(40):
    g1, g2, same = sampler.theta_gates(alive, net.thetas_numpy())
    step(tf.constant(g1), tf.constant(g2), tf.constant(same))
  after = expected()
  assert abs(after - tau) < abs(before - tau)
  assert after < before
  assert step.experimental_get_tracing_count() == 1


# ----------------------------------------------------------------- sampling


def test_weight_gates_uniform_and_never_empty_reduction():
  kinds = ["N", "R", "E"]
  s = supernet.GateSampler(kinds, [3, 3, 1], seed=0)
  alive = [np.ones(3, bool), np.array([True, False, True]), np.ones(1, bool)]
  draws = np.array([s.weight_gates(alive) for _ in range(2000)])
  assert draws.shape == (2000, 7)
  assert np.all(draws[:, 4] == 0)                    # pruned op never on
  assert np.all(draws[:, 3:6].sum(1) >= 1)           # R never empty
  assert np.all(draws[:, 6] == 1)                    # single-op E always on
  assert abs(draws[:, 0].mean() - 0.5) < 0.05        # N: uniform 0.5
  assert np.any(draws[:, :3].sum(1) == 0)            # N may be empty


def test_weight_gates_count_mode_uniform_over_op_counts():
  kinds = ["N", "R"]
  s = supernet.GateSampler(kinds, [4, 4], seed=0)
  alive = [np.ones(4, bool), np.array([True, False, True, True])]
  draws = np.array([s.weight_gates(alive, count=True) for _ in range(5000)])
  n_counts = np.bincount(draws[:, :4].sum(1).astype(int), minlength=5) / len(draws)
  r_counts = np.bincount(draws[:, 4:].sum(1).astype(int), minlength=4) / len(draws)
  np.testing.assert_allclose(n_counts, [0.2] * 5, atol=0.03)        # N: 0..4 ops equally
  np.testing.assert_allclose(r_counts[1:], [1 / 3] * 3, atol=0.03)  # R: 1..3 alive ops
  assert r_counts[0] == 0 and np.all(draws[:, 5] == 0)              # never empty, never dead
  np.testing.assert_allclose(draws[:, :4].mean(0), [0.5] * 4, atol=0.03)  # no op favoured


def test_theta_gates_distinct_patterns_enumerated_and_rejection():
  kinds = ["N", "R", "N", "R"]
  sizes = [3, 2, 7, 1]
  s = supernet.GateSampler(kinds, sizes, seed=0)
  alive = [np.ones(n, bool) for n in sizes]
  thetas = [np.zeros(n) for n in sizes]
  for _ in range(300):
    g1, g2, same = s.theta_gates(alive, thetas)
    parts1 = np.split(g1, np.cumsum(sizes)[:-1])
    parts2 = np.split(g2, np.cumsum(sizes)[:-1])
    assert same.tolist() == [False, False, False, True]
    for l in range(3):
      assert np.any(parts1[l] != parts2[l])
    assert parts1[1].sum() >= 1 and parts2[1].sum() >= 1
    np.testing.assert_array_equal(parts1[3], [1.0])


def test_theta_gates_follow_theta():
  s = supernet.GateSampler(["N"], [2], seed=3)
  alive = [np.ones(2, bool)]
  thetas = [np.array([4.0, -4.0])]
  firsts = np.array([s.theta_gates(alive, thetas)[0] for _ in range(500)])
  assert firsts[:, 0].mean() > 0.9 and firsts[:, 1].mean() < 0.1


def test_sampler_state_resumes_the_same_stream():
  a = supernet.GateSampler(["N", "R"], [4, 4], seed=7)
  alive = [np.ones(4, bool)] * 2
  for _ in range(5):
    a.weight_gates(alive)
  b = supernet.GateSampler(["N", "R"], [4, 4], seed=0)
  b.state = a.state
  for _ in range(5):
    np.testing.assert_array_equal(a.weight_gates(alive), b.weight_gates(alive))


def test_prune_threshold_protection_and_last_op():
  thetas = [np.array([-3.0, 0.0, -2.5]), np.array([-5.0, -4.0]), np.array([-3.0, -1.0])]
  alive = [np.ones(3, bool), np.ones(2, bool), np.ones(2, bool)]
  protected = [[False, False, True], [False, False], [False, False]]
  pruned = supernet.prune(thetas, alive, ["N", "R", "N"], protected)
  assert (0, 0) in pruned and (0, 2) not in pruned      # A_l protected
  assert alive[1].sum() == 1 and alive[1][1]             # R keeps its best op
  assert alive[2].tolist() == [False, True]
  assert supernet.prune(thetas, alive, ["N", "R", "N"], protected) == []


def test_supernet_builds_and_splits_gates():
  table = cost.CostTable("flops27", "tiny", resolution=32)
  ws = [[0, 5], [3], [9, 21, 25], [1], [2, 4], [6]]
  net = supernet.Supernet("flops27", "tiny", ws, table, num_classes=5, resolution=32)
  net.build_all()
  assert net.total_ops == 10
  assert [m.op_names for m in net.mbls][2] == ["dw_k5_e1", "ssc_k5_e1", "ssc_k7_e2"]
  out = net(tf.zeros([3, 32, 32, 3]), gates=tf.constant([1, 0, 1, 0, 1, 0, 1, 1, 0, 1.0]))
  assert out.shape == (3, 5)
  assert len(net.theta_variables) == 6
  names = {v.name for v in net.weight_variables}
  assert not any("theta" in n for n in names)


def _graph_op_types(concrete):
  gd = concrete.graph.as_graph_def()
  types = [n.op for n in gd.node]
  for f in gd.library.function:
    types += [n.op for n in f.node_def]
  return types


def test_theta_mode_builds_no_weight_gradients_and_the_same_theta_gradient():
  # The θ step needs θ's gradient only; its branches build input gradients, not the
  # weights' (no filter-gradient op inside any branch), and θ's gradient is bit for bit
  # the one that a graph building every gradient computes.
  table = cost.CostTable("flops27", "tiny", resolution=16, num_classes=4)
  ws = [[0, 5, 9], [3, 7], [9, 21, 25], [1, 2], [2, 4], [6, 8]]
  net = supernet.Supernet("flops27", "tiny", ws, table, num_classes=4, resolution=16)
  net.build_all()
  n, nl = net.total_ops, len(net.mbls)
  rng = np.random.default_rng(0)
  for th in net.theta_variables:
    th.assign(rng.normal(size=th.shape).astype(np.float32))
  images = tf.constant(rng.normal(size=(4, 16, 16, 3)).astype(np.float32))
  labels = tf.constant([0, 1, 2, 3])
  g1 = tf.constant([1., 0, 1, 1, 0, 0, 1, 1, 0, 1, 1, 0, 1, 1])
  g2 = tf.constant([0., 1, 1, 0, 1, 1, 0, 0, 1, 1, 0, 1, 0, 1])
  same, alive = tf.constant([False] * nl), tf.ones([n])
  assert n == 14

  def grads_fn(weight_grads):
    @tf.function(autograph=False)
    def f():
      with tf.GradientTape() as tape:
        logits, cost_ = net.call_theta(images, g1, g2, same, alive, training=True,
                                       weight_grads=weight_grads)
        loss = tf.reduce_mean(tf.nn.sparse_softmax_cross_entropy_with_logits(
            labels, logits)) + 1e-3 * cost_
      branch_w = [w for m in net.mbls for op in m.branches for w in op.trainable_weights]
      return tape.gradient(loss, net.theta_variables + branch_w)
    return f

  lean, full = grads_fn(False), grads_fn(True)
  g_lean, g_full = lean(), full()
  nt = len(net.theta_variables)
  for a, b in zip(g_lean[:nt], g_full[:nt]):
    np.testing.assert_array_equal(a.numpy(), b.numpy())
  assert any(np.any(g.numpy() != 0) for g in g_lean[:nt])
  assert all(g is None for g in g_lean[nt:])                 # no weight gradient built
  assert sum(g is not None for g in g_full[nt:]) > 0
  lean_types = _graph_op_types(lean.get_concrete_function())
  full_types = _graph_op_types(full.get_concrete_function())
  filt = lambda ts: sum("BackpropFilter" in t for t in ts)
  assert filt(full_types) > 20
  assert filt(lean_types) <= 2          # the stem's and the head's, outside the branches
  assert len(lean_types) < len(full_types)


def test_weight_gates_within_an_interval_are_uniform_paths_conditioned_on_cost():
  """gate_sampling='interval': p = 0.5 paths (R non-empty) redrawn until lo < cost < hi,
  i.e. uniform over the allowed patterns inside the interval (checked against exact
  enumeration), never a dead op; an interval out of reach gives the nearest path."""
  import itertools  # pylint: disable=g-import-not-at-top
  kinds = ["N", "R"]
  costs = [np.array([10.0, 20.0, 40.0]), np.array([5.0, 99.0, 15.0])]
  alive = [np.ones(3, bool), np.array([True, False, True])]
  within = supernet.CostInterval(costs, 100.0, 125.0, 160.0)
  inside = []
  for a in itertools.product((0, 1), repeat=3):
    for b in ((1, 0, 0), (0, 0, 1), (1, 0, 1)):         # R: non-empty, op 1 dead
      c = 100.0 + np.dot(a, costs[0]) + np.dot(b, costs[1])
      if 125.0 < c < 160.0:
        inside.append(a + b)
  exact = np.mean(inside, axis=0)
  assert 4 <= len(inside) < 24                          # the interval excludes most paths
  s = supernet.GateSampler(kinds, [3, 3], seed=0)
  draws = np.array([s.weight_gates(alive, within=within) for _ in range(4000)])
  total = 100.0 + draws[:, :3] @ costs[0] + draws[:, 3:] @ costs[1]
  assert np.all((total > 125.0) & (total < 160.0))
  assert np.all(draws[:, 4] == 0) and np.all(draws[:, 3:].sum(1) >= 1)
  np.testing.assert_allclose(draws.mean(0), exact, atol=0.03)
  seen = {tuple(d.astype(int)) for d in draws}
  assert seen == set(inside)                           # every path of the interval, only those
  # Out of reach (the most a path costs is 100 + 70 + 20): the nearest, all alive ops on.
  far = supernet.CostInterval(costs, 100.0, 500.0, 600.0, max_draws=512)
  np.testing.assert_array_equal(s.weight_gates(alive, within=far), [1, 1, 1, 1, 0, 1])
  share, cheapest, dearest = s.interval_share(alive, within)
  assert 0 < share < 1 and cheapest == 105.0 and dearest == 190.0
  assert s.interval_share(alive, far)[0] == 0.0
  forty = supernet.GateSampler(["R"] * 40, [1] * 40, seed=0)    # all 64 draws leave one empty
  assert forty.interval_share([np.ones(1, bool)] * 40, supernet.CostInterval(
      [np.ones(1)] * 40, 0.0, 1.0, 50.0), draws=64)[0] == 0.0


def test_supernet_path_cost_is_the_cost_tables():
  """The per-op costs and fixed cost a supernet carries (its θ step's expected cost, and
  what gate_sampling='interval' tests paths against) add up to the table's architecture
  cost, the unit of --interval."""
  table = cost.CostTable("flops27", "tiny", resolution=224, num_classes=8)
  ws = [[0, 21, 4], [3, 9], [0, 12, 7], [6, 25], [1, 10], [3, 13]]
  net = supernet.Supernet("flops27", "tiny", ws, table, num_classes=8, resolution=16)
  rng = np.random.default_rng(0)
  for _ in range(5):
    on = [rng.random(len(w)) < 0.5 for w in ws]
    mine = net.fixed_cost + sum(float(np.dot(o, m.op_costs.numpy()))
                                for o, m in zip(on, net.mbls))
    theirs = table.indices_cost([np.asarray(w)[o].tolist() for w, o in zip(ws, on)])
    assert mine == pytest.approx(theirs, rel=1e-6)
