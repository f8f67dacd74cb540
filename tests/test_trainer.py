"""Round training: resume equivalence, strategies, schedules, config errors."""

import contextlib
import gc
import os
import shutil
import threading
import weakref

import numpy as np
import pytest
import tensorflow as tf

from nse_tf import (candidate_eval, cost, data, distribute, evolution, loop, optim, spaces,
                    supernet, trainer)

WS = [[0, 21], [3, 9], [0, 12], [6, 25], [1, 10], [3, 13]]   # tiny macro, 2 ops per layer


def _trainer(model_dir, **overrides):
  cfg = dict(global_batch=16, epochs=1, steps_per_epoch=6, warmup_epochs=0.5, lr=0.1,
             tau=2.0, alpha=0.05, theta_lr=0.05, prune_threshold=-0.01, checkpoint_every=100,
             progress=False, seed=3)
  cfg.update(overrides)
  d = data.get_data("demo_digits", image_size=32)
  table = cost.CostTable("flops27", "tiny", resolution=32)
  return trainer.RoundTrainer(trainer.TrainConfig(**cfg), distribute.get_strategy(), d, table,
                              space="flops27", macro="tiny", working_sets=WS,
                              protected=[[False, True]] + [[False, False]] * 5,
                              num_classes=10, resolution=32, model_dir=model_dir)


@pytest.mark.slow
def test_killed_round_resumes_on_the_same_trajectory(tmp_path, grappler_off, monkeypatch):
  """Also: tracing the θ step ahead, in a thread during the weight
  step's first call (the uninterrupted run), computes what tracing them on their first
  call does (the resumed run, trace-ahead off), and traces each function once."""
  tf.config.experimental.enable_op_determinism()
  uninterrupted = _trainer(str(tmp_path / "a"))
  threads = []
  uninterrupted.train(stop_at=3,
                      trace_also=lambda: threads.append(threading.current_thread().name))
  assert threads == ["nse-trace-ahead-2"]   # run beside the training, once
  uninterrupted.save()
  # What a kill at step 3 leaves on disk: the checkpoint of step 3, nothing later.
  shutil.copytree(tmp_path / "a", tmp_path / "b")
  straight = uninterrupted.train()
  for fn in (uninterrupted._weight_step, uninterrupted._theta_step):
    assert fn.experimental_get_tracing_count() == 1
  monkeypatch.setattr(trainer.RoundTrainer, "_trace_ahead", lambda self, also=None: (None, []))
  resumed = _trainer(str(tmp_path / "b"))
  assert resumed.restored and int(resumed.step.numpy()) == 3
  result = resumed.train()
  assert result.steps == straight.steps == 6
  for a, b in zip(straight.thetas, result.thetas):
    np.testing.assert_allclose(a, b, atol=1e-6)
  for key in ("loss", "theta_ce", "cost"):
    assert abs(straight.history[-1][key] - result.history[-1][key]) < 1e-6
  assert straight.pruned == result.pruned
  assert len(straight.pruned) > 0          # the test exercises pruning and its log
  for a, b in zip(straight.alive, result.alive):
    np.testing.assert_array_equal(a, b)
  # the protected op of layer 0 (A_l) is never pruned
  assert result.alive[0][1]
  w_a = straight.model.weight_variables
  w_b = result.model.weight_variables
  for va, vb in zip(w_a, w_b):
    np.testing.assert_allclose(va.numpy(), vb.numpy(), atol=1e-6)


def test_a_rounds_traced_steps_are_freed_with_its_trainer():
  """A search builds a new supernet every round; the graphs traced for the last one must
  go with it. The θ step's tf_keras Adam aggregated its gradients through
  ReplicaContext.all_reduce, a tf.custom_gradient that in a graph registers a gradient
  function in TensorFlow's global registry, never removed: that held every round's θ
  step graph (~0.5 GB on the flops supernet) until the process ended.

  The search runs each round inside `loop.fewer_gc_passes()` (Python's collector rarely
  while the round traces); its collection on the way out is what frees them, as here."""
  with loop.fewer_gc_passes():
    t = _trainer(None, steps_per_epoch=2)
    t.train()
    n, layers = t.model.total_ops, len(t.model.mbls)
    gates = tf.TensorSpec([n], tf.float32)
    steps = [t._weight_step.get_concrete_function(t.train_iter, gates),
             t._theta_step.get_concrete_function(t.holdout_iter, gates, gates,
                                                 tf.TensorSpec([layers], tf.bool), gates)]
    assert [t._weight_step.experimental_get_tracing_count(),
            t._theta_step.experimental_get_tracing_count()] == [1, 1]   # the graphs it ran
    graphs = [weakref.ref(s.graph) for s in steps]
    del t, steps
  assert [g() is None for g in graphs] == [True, True]


def test_fewer_gc_passes_restores_the_thresholds_and_collects_on_the_way_out():
  class Node:
    pass

  before = gc.get_threshold()
  for fail in (False, True):
    with pytest.raises(ValueError) if fail else contextlib.nullcontext():
      with loop.fewer_gc_passes():
        assert gc.get_threshold() == loop.FEWER_GC_THRESHOLDS
        a, b = Node(), Node()
        a.other, b.other = b, a          # a cycle: only the cyclic collector frees it
        dead = weakref.ref(a)
        del a, b
        if fail:
          raise ValueError("the round failed")
    assert gc.get_threshold() == before
    assert dead() is None


def test_background_work_reraises_its_error_on_join():
  def fail():
    raise ValueError("tracing failed")
  work = trainer._Background(fail, name="test")
  with pytest.raises(ValueError, match="tracing failed"):
    work.join()
  done = []
  trainer._Background(lambda: done.append(1), name="test").join()
  assert done == [1]


def test_warmup_cosine_schedule():
  s = optim.WarmupCosine(0.4, total_steps=100, warmup_steps=10, start_lr=0.1)
  assert float(s(0)) == pytest.approx(0.1)
  assert float(s(5)) == pytest.approx(0.25)
  assert float(s(10)) == pytest.approx(0.4)
  assert float(s(55)) == pytest.approx(0.2, abs=1e-6)
  assert float(s(100)) == pytest.approx(0.0, abs=1e-7)


def test_search_sgd_matches_pytorch_nesterov_and_skips_bn_decay():
  kernel = tf.Variable([1.0, -2.0], name="conv/kernel")
  gamma = tf.Variable([1.0, 1.0], name="bn/gamma")
  opt = optim.SearchSGD(0.1, momentum=0.9, nesterov=True, l2=0.01)
  g = tf.constant([0.5, 0.5])
  w, v = np.array([1.0, -2.0]), np.zeros(2)
  for _ in range(3):
    opt.apply_gradients([(g, kernel), (g, gamma)])
    d = g.numpy() + 0.01 * w
    v = 0.9 * v + d
    w = w - 0.1 * (d + 0.9 * v)
  np.testing.assert_allclose(kernel.numpy(), w, rtol=1e-6)
  # gamma: no weight decay
  v2, w2 = np.zeros(2), np.ones(2)
  for _ in range(3):
    v2 = 0.9 * v2 + 0.5
    w2 = w2 - 0.1 * (0.5 + 0.9 * v2)
  np.testing.assert_allclose(gamma.numpy(), w2, rtol=1e-6)


def _op_vars():
  rng = np.random.default_rng(3)
  mk = lambda shape, name: tf.Variable(rng.normal(size=shape).astype(np.float32), name=name)
  groups = [[mk((2, 3), "op0/kernel"), mk((3,), "op0/bias")], [mk((4,), "op1/kernel")],
            [mk((3,), "op2/bn/gamma")]]
  shared = mk((2,), "stem/kernel")
  return groups, shared


def _run_sgd(skip_off_ops, deferred, gate_seq, grad_seq, final_catch_up=True):
  groups, shared = _op_vars()
  flat = [v for g in groups for v in g] + [shared]
  sched = optim.WarmupCosine(0.3, total_steps=len(gate_seq), warmup_steps=3, start_lr=0.05)
  opt = optim.SearchSGD(sched, momentum=0.9, nesterov=True, l2=0.05, skip_off_ops=skip_off_ops)
  opt.build(flat)
  if deferred:
    opt.set_op_groups(groups)

  @tf.function
  def step(gates, grads):
    opt.catch_up(gates)
    with opt.gated(gates):
      opt.apply_gradients(zip(grads, flat))

  for gates, grads in zip(gate_seq, grad_seq):
    grads = [g * gates[i] for g, i in zip(grads[:-1], (0, 0, 1, 2))] + [grads[-1]]
    if deferred:
      step(tf.constant(gates), [tf.constant(g) for g in grads])
    else:   # reference: every variable updated every step, off ops with a zero gradient
      if skip_off_ops:
        on = [gates[i] > 0 for i in (0, 0, 1, 2)] + [True]
        opt.apply_gradients([(tf.constant(g), v) for g, v, o in zip(grads, flat, on) if o])
      else:
        opt.apply_gradients([(tf.constant(g), v) for g, v in zip(grads, flat)])
  if deferred and final_catch_up == "compiled":
    tf.function(opt.catch_up, autograph=False)()
  elif deferred and final_catch_up:
    opt.catch_up()
  return [v.numpy() for v in flat] + [opt._momentum(v).numpy() for v in flat]


def test_search_sgd_defers_off_op_updates_exactly():
  rng = np.random.default_rng(0)
  gate_seq = [(rng.random(3) < 0.5).astype(np.float32) for _ in range(14)]
  gate_seq[3][:] = 0.0   # all off once
  shapes = [(2, 3), (3,), (4,), (3,), (2,)]
  grad_seq = [[rng.normal(size=s).astype(np.float32) for s in shapes] for _ in gate_seq]
  for skip in (False, True):
    ref = _run_sgd(skip, False, gate_seq, grad_seq)
    lazy = _run_sgd(skip, True, gate_seq, grad_seq)
    for a, b in zip(ref, lazy):
      np.testing.assert_allclose(b, a, rtol=2e-5, atol=2e-6)
  # Reference mode really moves off ops (momentum + decay), skip mode leaves them alone.
  gate_seq = [np.ones(3, np.float32), np.zeros(3, np.float32)]
  grad_seq = [[np.ones(s, np.float32) for s in shapes]] * 2
  moved = _run_sgd(False, True, gate_seq, grad_seq)
  frozen = _run_sgd(True, True, gate_seq, grad_seq)
  once = _run_sgd(False, True, gate_seq[:1], grad_seq[:1])
  assert not np.allclose(moved[0], once[0])
  np.testing.assert_allclose(frozen[2], once[2], rtol=1e-6)
  # The round end's catch-up runs eagerly (RoundTrainer): the same bits as compiled.
  eager = _run_sgd(False, True, gate_seq, grad_seq, final_catch_up=True)
  compiled = _run_sgd(False, True, gate_seq, grad_seq, final_catch_up="compiled")
  for a, b in zip(eager, compiled):
    np.testing.assert_array_equal(a, b)
  # Deferred, not done: before catch_up the off step has not touched the weights.
  pending = _run_sgd(False, True, gate_seq, grad_seq, final_catch_up=False)
  np.testing.assert_array_equal(pending[2], once[2])


def _reference_weight_step(tr):
  """The reference's weight step on RoundTrainer `tr`: every weight updated every step,
  an op that was off with a zero gradient (SGD's momentum and decay still move it)."""
  tr.sgd._groups = None               # nothing deferred: no op groups
  model, sgd, gb = tr.model, tr.sgd, float(tr.cfg.global_batch)
  import tf_keras as keras  # pylint: disable=g-import-not-at-top

  @tf.function(autograph=False)
  def step(iterator, gates):
    images, labels = next(iterator)
    wvars = model.weight_variables
    with tf.GradientTape() as tape:
      logits = model(images, gates=gates, training=True)
      loss = tf.reduce_sum(keras.losses.sparse_categorical_crossentropy(
          labels, logits, from_logits=True)) / gb
    grads = tape.gradient(loss, wvars)
    sgd.apply_gradients([(tf.zeros_like(v) if g is None else g, v)
                         for g, v in zip(grads, wvars)])
    return loss

  return step


def _caught_up(tr):
  """(weights, momenta) of RoundTrainer `tr` with its deferred updates applied, in NumPy,
  without changing `tr` (`pending[i, c]`: op i's 2x2 matrix for class c, decayed or not)."""
  sgd, pending = tr.sgd, tr.sgd.pending.numpy()
  matrix = {id(v): pending[i, 0 if sgd._decayed(v) else 1]
            for i, group in enumerate(sgd._groups) for v in group}
  out = []
  for v in tr.model.weight_variables:
    w, m = v.numpy(), sgd._momentum(v).numpy()
    a = matrix.get(id(v), np.eye(2, dtype=np.float32))
    out.append((a[0, 0] * w + a[0, 1] * m, a[1, 0] * w + a[1, 1] * m))
  return out


def _sync(ref, tr, caught_up):
  """`ref` (every weight updated every step) takes the state of `tr` with `caught_up`,
  `_caught_up(tr)`, as its weights and momenta."""
  for v, (w, m) in zip(ref.model.weight_variables, caught_up):
    v.assign(w)
    ref.sgd._momentum(v).assign(m)
  for a, b in zip(ref.model.non_trainable_variables, tr.model.non_trainable_variables):
    if a is not ref.sgd.pending:
      a.assign(b)
  for a, b in zip(ref.model.theta_variables, tr.model.theta_variables):
    a.assign(b)
  ref.sgd.iterations.assign(tr.sgd.iterations)


def _lazy_against_reference(lazy, ref, steps):
  """`steps` weight steps (a θ step after every second) of `lazy` (the search's steps,
  off-op updates deferred) and of `ref` (every weight updated every step), `ref` put in
  the state `lazy` holds before each step: one step at a time, so that float rounding
  does not compound (ReLU kinks amplify it chaotically over steps, float64 too). Returns
  the largest loss / θ-output difference, the largest weight and momentum difference
  after the weight steps, the largest change that catching up made to the weights of an
  op about to run, and after how many weight steps some update was still deferred."""
  ref_weight_step = _reference_weight_step(ref)
  alive = lazy.alive_masks()
  sampler = supernet.GateSampler(lazy.kinds, [len(w) for w in WS], seed=5)
  index = {id(v): j for j, v in enumerate(lazy.model.weight_variables)}
  worst_out = worst_state = stale_gap = 0.0
  off_then_on, prev, deferred = 0, None, 0
  for k in range(steps):
    g = sampler.weight_gates(alive, None)
    if prev is not None:
      off_then_on += int(((prev == 0) & (g > 0)).sum())
    prev = g
    caught_up = _caught_up(lazy)
    _sync(ref, lazy, caught_up)
    # How far the deferred updates move the weights of the ops about to run: what a step
    # that read them stale would get wrong.
    for i in np.flatnonzero(g):
      for v in lazy.sgd._groups[i]:
        stale_gap = max(stale_gap, np.abs(caught_up[index[id(v)]][0] - v.numpy()).max())
    a = float(lazy._weight_step(lazy.train_iter, tf.constant(g))[0])
    b = float(ref_weight_step(ref.train_iter, tf.constant(g)))
    worst_out = max(worst_out, abs(a - b) / (1 + abs(b)))
    deferred += int(not np.allclose(lazy.sgd.pending.numpy(), lazy.sgd._eye.numpy()))
    caught_up = _caught_up(lazy)
    for v, (w, m) in zip(ref.model.weight_variables, caught_up):
      worst_state = max(worst_state, np.abs(w - v.numpy()).max(),
                        np.abs(m - ref.sgd._momentum(v).numpy()).max())
    if k % 2:
      g1, g2, same = sampler.theta_gates(alive, lazy.model.thetas_numpy())
      args = [tf.constant(x) for x in (g1, g2, same, np.concatenate(alive).astype(np.float32))]
      _sync(ref, lazy, caught_up)         # the weight step left both as they are
      out_a = [float(x) for x in lazy._theta_step(lazy.holdout_iter, *args)]
      out_b = [float(x) for x in ref._theta_step(ref.holdout_iter, *args)]
      worst_out = max([worst_out] + [abs(x - y) / (1 + abs(y)) for x, y in zip(out_a, out_b)])
  assert off_then_on > 0                  # ops ran again after off steps
  return worst_out, worst_state, stale_gap, deferred


@pytest.mark.slow
def test_steps_catch_up_deferred_off_op_updates_before_the_op_runs(grappler_off):
  """The search's steps catch up the deferred off-step updates of the ops they run (the
  θ step: of both paths) before the ops read their weights: each step computes what a
  step that updates every weight every step computes, and leaves the same weights and
  momenta once caught up. The catch-ups it checks move the weights of ops about to run
  by far more than its tolerances (the check can fail)."""
  tf.config.experimental.enable_op_determinism()
  cfg = dict(weight_decay=0.01, steps_per_epoch=8)
  lazy = _trainer(None, **cfg)
  worst_out, worst_state, stale_gap, deferred = _lazy_against_reference(
      lazy, _trainer(None, **cfg), 8)
  # Updates were still deferred after some weight steps, so the weight and momentum
  # comparisons after them compare caught-up state. (Not asserted at the last step alone:
  # whether the last θ step's paths happen to catch up every op depends on θ to float
  # rounding, which the number of intra-op threads, i.e. of cores, changes.)
  assert deferred > 0, deferred
  assert max(np.abs(t).max() for t in lazy.model.thetas_numpy()) > 1e-3   # θ moved
  assert worst_out < 1e-6, worst_out     # measured: 0.0 (bit-identical outputs)
  assert worst_state < 1e-5, worst_state  # measured: 2.4e-7
  # The check can fail: ops ran with deferred updates that move their weights by far more
  # than the tolerance (measured 2.7e-2). Steps with the catch-up disabled (the updates
  # dropped) failed it: outputs 1.1e-2 apart, weights and momenta 0.33.
  assert stale_gap > 1e-3, stale_gap


def test_truncated_newest_checkpoint_falls_back_to_the_previous_one(tmp_path, monkeypatch):
  """A checkpoint cut short (full disk, interrupted copy) costs its steps, not the run."""
  model_dir = str(tmp_path / "ckpt")
  t = _trainer(model_dir)
  for step in (2, 4):                       # two checkpoints, as a round would leave them
    t.step.assign(step)
    t.save()
  del t
  data_files = sorted(f for f in os.listdir(model_dir) if f.startswith("ckpt-4.data"))
  path = os.path.join(model_dir, data_files[0])
  with open(path, "r+b") as f:
    f.truncate(os.path.getsize(path) // 2)
  notes = []
  monkeypatch.setattr(trainer.logging, "warning", lambda fmt, *a: notes.append(fmt % a))
  resumed = _trainer(model_dir)
  assert resumed.restored and int(resumed.step.numpy()) == 2
  assert any("resumed from" in n and "ckpt-2" in n and "ckpt-4" in n for n in notes), notes
  del resumed
  for name in os.listdir(model_dir):
    if name.startswith("ckpt-2.data"):
      with open(os.path.join(model_dir, name), "r+b") as f:
        f.truncate(10)
  with pytest.raises(loop.CheckpointError, match=r"no checkpoint in .* can be read back.*"
                     r"ckpt-4.*ckpt-2.*delete .*ckpt"):
    _trainer(model_dir)


def test_workers_resume_at_the_lowest_step_any_of_them_holds(tmp_path, mirrored_two_cpus):
  """A worker killed during a save holds one checkpoint fewer: every worker resumes at
  the lowest newest step (the exchange itself runs in tests/test_multi_worker.py)."""
  v = tf.Variable(0.0)
  ckpt = tf.train.Checkpoint(v=v)
  manager = tf.train.CheckpointManager(ckpt, str(tmp_path), max_to_keep=2)
  for step in (2, 4):
    v.assign(float(step))
    manager.save(checkpoint_number=step)
  assert loop.steps_of_workers(tf.distribute.get_strategy(), 4) is None   # one worker
  assert loop.steps_of_workers(mirrored_two_cpus, 4) is None              # one worker
  newest = loop.restore_newest_intact(ckpt, manager, "fix it")
  assert loop.checkpoint_step(newest) == 4 and float(v.numpy()) == 4.0
  # All at the same step: nothing more to do.
  assert loop.agree_across_workers(ckpt, manager, newest, {0: 4, 1: 4}, "fix") == newest
  # Worker 1 holds step 2 at most: this worker goes back to step 2.
  back = loop.agree_across_workers(ckpt, manager, newest, {0: 4, 1: 2}, "fix")
  assert loop.checkpoint_step(back) == 2 and float(v.numpy()) == 2.0
  with pytest.raises(loop.CheckpointError, match=r"worker\(s\) 1 have no checkpoint while "
                     r"others would resume at step 4.*delete it"):
    loop.agree_across_workers(ckpt, manager, newest, {0: 4, 1: -1}, "delete it")
  with pytest.raises(loop.CheckpointError, match=r"worker\(s\) 0 can resume only at step 1,.*"
                     r"no checkpoint of that step.*\[2, 4\]"):
    loop.agree_across_workers(ckpt, manager, newest, {0: 1, 1: 4}, "fix")


def test_failed_checkpoint_write_leaves_no_temporary_files(tmp_path):
  """A save that fails half-way (here: the merge step) leaves no ckpt-N_temp behind."""
  model_dir = str(tmp_path / "ckpt")
  t = _trainer(model_dir)
  t.step.assign(2)
  t.save()
  real = t.manager._checkpoint._write    # pylint: disable=protected-access

  def write_then_fail(prefix, *args, **kwargs):
    os.makedirs(prefix + "_temp", exist_ok=True)      # what TensorFlow leaves on ENOSPC
    open(os.path.join(prefix + "_temp", "part-00000-of-00001.data-00000-of-00001"),
         "wb").close()
    raise tf.errors.ResourceExhaustedError(None, None, f"{prefix}; No space left on device")

  t.manager._checkpoint._write = write_then_fail      # pylint: disable=protected-access
  t.step.assign(4)
  with pytest.raises(tf.errors.ResourceExhaustedError):
    t.save()
  t.manager._checkpoint._write = real                 # pylint: disable=protected-access
  assert sorted(n for n in os.listdir(model_dir) if "ckpt-4" in n) == []
  assert tf.train.latest_checkpoint(model_dir).endswith("ckpt-2")


def test_interval_gate_sampling_trains_only_paths_inside_the_interval(monkeypatch):
  """--gate_sampling=interval: every weight step of the loop gets a path whose cost (the
  cost table's, the unit of the search's --interval) lies inside the interval. The
  steps are stand-ins here: what is checked is the loop's sampling."""
  table = cost.CostTable("flops27", "tiny", resolution=32)
  lo_c = table.indices_cost([[min(w, key=lambda i, l=l: table.macs[l][i])] for l, w in
                             enumerate(WS)])
  hi_c = table.indices_cost(WS)
  lo, hi = lo_c + 0.4 * (hi_c - lo_c), lo_c + 0.6 * (hi_c - lo_c)
  t = _trainer(None, gate_sampling="interval", gate_interval=(lo, hi))
  seen = []

  def weight_step(iterator, gates):
    del iterator
    seen.append(gates.numpy())
    return tf.constant(2.0), tf.constant(0.1)

  def theta_step(iterator, g1, g2, same, alive):
    del iterator, g1, g2, same, alive
    return tf.constant(2.0), tf.constant(0.0), tf.constant(1.0)

  monkeypatch.setattr(t, "_weight_step", weight_step)
  monkeypatch.setattr(t, "_theta_step", theta_step)
  monkeypatch.setattr(t, "_trace_ahead", lambda also=None: (None, []))
  t.train()
  assert len(seen) == 6
  for g in seen:
    on = [np.asarray(w)[g[a:b] > 0].tolist() for w, a, b in
          zip(WS, t.model.offsets[:-1], t.model.offsets[1:])]
    assert lo < table.indices_cost(on) < hi
  assert len({tuple(g) for g in seen}) > 1
  with pytest.raises(ValueError, match=r"none of 25,600 p = 0.5 paths .* costs within "
                                       r"\(1e\+06, 2e\+06\)"):
    _trainer(None, gate_sampling="interval", gate_interval=(1e6, 2e6))


def test_config_errors_are_clear():
  with pytest.raises(ValueError, match="gate_sampling"):
    trainer.TrainConfig(gate_sampling="bogus").validate()
  with pytest.raises(ValueError, match="nse_tf.search"):    # no interval to draw in
    trainer.RoundTrainer(trainer.TrainConfig(gate_sampling="interval"), None, None, None,
                         space="flops27", macro="tiny", working_sets=[], num_classes=2,
                         resolution=16)
  with pytest.raises(ValueError, match="mixed_precision"):
    trainer.TrainConfig(mixed_precision="int8").validate()
  with pytest.raises(distribute.StrategyError, match="unknown --strategy"):
    distribute.get_strategy("horovod")
  with pytest.raises(distribute.StrategyError, match="--tpu"):
    distribute.get_strategy("tpu")
  with pytest.raises(distribute.StrategyError, match="divisible"):
    distribute.per_replica_batch(10, _FakeStrategy(4))


@pytest.mark.parametrize("bad, needle", [
    (dict(global_batch=0), "--global_batch and --epochs must be positive"),
    (dict(epochs=0), "--global_batch and --epochs must be positive"),
    (dict(steps_per_epoch=0), "--steps_per_epoch must be >= 1"),
    (dict(lr=0.0), "--lr must be > 0"),
    (dict(weight_decay=-1e-5), "--weight_decay >= 0"),
    (dict(mixed_precision="int8"), "--mixed_precision must be bfloat16 or float16"),
    (dict(checkpoint_every=0), "--checkpoint_every and --log_every must be >= 1"),
    (dict(log_every=0), "--checkpoint_every and --log_every must be >= 1")])
def test_round_and_retrain_check_the_shared_loop_settings_alike(bad, needle):
  """One LoopConfig holds what nse_tf/loop.py reads; each config keeps its error type."""
  from nse_tf import errors, retrainer  # pylint: disable=g-import-not-at-top
  with pytest.raises(trainer.ConfigError, match=needle):
    trainer.TrainConfig(**bad).validate()
  with pytest.raises(errors.UsageError, match=needle):
    retrainer.RetrainConfig(**bad).validate()
  # Each keeps its own SPEC defaults (§4 for a round, §6 for the retrain).
  assert (trainer.TrainConfig().lr, retrainer.RetrainConfig().lr) == (0.4, 0.8)
  assert (trainer.TrainConfig().global_batch, retrainer.RetrainConfig().global_batch) == (
      1024, 2048)


class _FakeStrategy:
  def __init__(self, n):
    self.num_replicas_in_sync = n


class _FakeMultiWorker:
  num_replicas_in_sync = 4          # 2 machines x 2 local devices
  class extended:
    worker_devices = ("/job:worker/replica:0/task:0/device:CPU:0",
                      "/job:worker/replica:0/task:0/device:CPU:1")


def test_sync_bn_across_machines_is_refused_with_the_fix():
  cfg = trainer.TrainConfig(global_batch=16, sync_bn=True, progress=False)
  with pytest.raises(trainer.ConfigError, match=r"sync_bn needs all 4 replicas on this "
                     r"machine.*--strategy=mirrored.*Drop --sync_bn"):
    trainer.RoundTrainer(cfg, _FakeMultiWorker(), data.get_data("demo_digits", image_size=32),
                         cost.CostTable("flops27", "tiny", resolution=32), space="flops27",
                         macro="tiny", working_sets=WS, num_classes=10, resolution=32)


def _mirrored_vs_default(working_sets, mirrored):
  """The same 4 steps on one device (16 images) and on 2 mirrored replicas (8 each).

  float64: in float32 one device's gradients on these 16 images are up to 14 % off its
  float64 ones on a few variables (2 x 8 under mirrored: within 3e-5; one device on 8
  images: 2e-5). The cause is ReLU's switch point under rounding: the 16 images are 8
  duplicated, some pre-activations lie within float32 rounding of 0, and another
  summation order flips their side of the kink (gone with swish or 1e-3 noise on the
  copies). So float32 cannot tell a sync-BN bug from that. In float64 both strategies
  must agree to rounding; θ stays float32. (The test harness restores the policy.)
  """
  import tf_keras as keras  # pylint: disable=g-import-not-at-top
  keras.mixed_precision.set_global_policy("float64")
  assert mirrored.num_replicas_in_sync == 2, mirrored.num_replicas_in_sync
  real = data.get_data("demo_digits", image_size=32)
  images, labels = next(iter(real.validation(16)))

  class FixedBatch:
    # The same global batch of 16 images every step: one device gets all 16, each of
    # the two mirrored replicas 8 of them. With synchronized batch norm (moments of
    # the global batch) and the loss divided by the global batch, the updates match.
    info = real.info

    def dataset_fn(self, split, global_batch, seed=0):
      del split, seed

      def fn(ctx):
        per = ctx.get_per_replica_batch_size(global_batch)
        parts = [(images[i:i + per], labels[i:i + per]) for i in range(0, 16, per)]
        ds = tf.data.Dataset.from_tensors(parts[0])
        for part in parts[1:]:
          ds = ds.concatenate(tf.data.Dataset.from_tensors(part))
        return ds.repeat()
      return fn

  table = cost.CostTable("flops27", "tiny", resolution=32)
  # 88 held-out images in batches of 48: the last one smaller (40; 24 + 16 per replica).
  scfg = evolution.SearchConfig(space="flops27", macro="tiny", max_ops=2, bn_recal_batches=2,
                                eval_examples=88, eval_batch=48, image_size=32)
  out = {}
  for name, strategy in (("default", tf.distribute.get_strategy()), ("mirrored", mirrored)):
    cfg = trainer.TrainConfig(global_batch=16, epochs=1, steps_per_epoch=4, warmup_epochs=0,
                              lr=0.1, tau=2.0, alpha=0.05, theta_lr=0.05, prune_threshold=-50,
                              progress=False, seed=5, sync_bn=True)
    t = trainer.RoundTrainer(cfg, strategy, FixedBatch(), table, space="flops27",
                             macro="tiny", working_sets=working_sets, num_classes=10,
                             resolution=32)
    box = {}

    def trace_evaluator(t=t, box=box):   # as the search does while a round trains
      box["evaluator"] = candidate_eval.CandidateEvaluator(t, real, scfg)
      box["evaluator"].trace()

    r = t.train(trace_also=trace_evaluator)
    bn = t.model.stem_bn.moving_variance
    ev, gates = box["evaluator"], np.ones(t.model.total_ops, np.float32)
    evaluated = (ev.accuracy(gates), ev.recal_step.experimental_get_tracing_count(),
                 ev.eval_step.experimental_get_tracing_count())
    assert evaluated[0] == candidate_eval.CandidateEvaluator(t, real, scfg).accuracy(gates)
    out[name] = {"evaluated": evaluated, "thetas": r.thetas,
                 "weights": [v.numpy().ravel()[:50] for v in t.model.weight_variables],
                 "moving_variance": tf.convert_to_tensor(bn).numpy(),
                 "loss": r.history[-1]["loss"], "cost": r.history[-1]["cost"]}
  return out


def test_evaluator_step_has_the_batches_shape_unless_the_last_batch_is_smaller():
  """Traced ahead, once: a held-out set that batches evenly keeps the graph optimised for
  its batch size; one with a smaller last batch gets one graph for any size (not a second
  trace and compile for the last batch at the first candidate)."""
  t = _trainer(None)
  d = data.get_data("demo_digits", image_size=32)
  gates = np.ones(t.model.total_ops, np.float32)
  batch_dims = {}
  for n in (96, 88):
    ev = candidate_eval.CandidateEvaluator(t, d, evolution.SearchConfig(
        space="flops27", macro="tiny", max_ops=2, bn_recal_batches=1, eval_examples=n,
        eval_batch=48, image_size=32))
    ev.trace()
    ev.accuracy(gates)
    assert ev.eval_step.experimental_get_tracing_count() == 1
    assert int(ev.last_counts[:, 1].sum()) == n           # every example counted once
    batch_dims[n] = [spec.shape[0] for spec in ev.eval_step.input_signature[:2]]
  assert batch_dims == {96: [48, 48], 88: [None, None]}


# Two ops in an N and an R layer (ssc ops among them: two batch norms in a row), one
# elsewhere (the single-pattern path of the θ step): 8 ops keep the compile short.
MIRRORED_WS = [[0, 21], [3], [12], [6, 25], [1], [13]]


@pytest.mark.slow
def test_mirrored_two_cpus_matches_default_strategy_with_sync_bn(mirrored_two_cpus, grappler_off):
  res = _mirrored_vs_default(MIRRORED_WS, mirrored_two_cpus)
  a, b = res["default"], res["mirrored"]
  # The evaluator built and traced in the trace-ahead thread, under either strategy: traced
  # once, and it evaluates as one built afterwards does (checked in the helper).
  assert a["evaluated"][1:] == b["evaluated"][1:] == (1, 1)
  assert abs(a["loss"] - b["loss"]) < 1e-6                # logits are cast to float32
  assert abs(a["cost"] - b["cost"]) < 1e-5
  assert max(np.abs(x).max() for x in a["thetas"]) > 1e-3  # θ steps ran
  for x, y in zip(a["thetas"], b["thetas"]):               # θ is float32
    np.testing.assert_allclose(x, y, atol=1e-6)
  for x, y in zip(a["weights"], b["weights"]):
    np.testing.assert_allclose(x, y, atol=1e-11)
  np.testing.assert_allclose(a["moving_variance"], b["moving_variance"], rtol=1e-11)


@pytest.mark.slow
def test_mixed_precision_bfloat16_keeps_theta_and_cost_in_float32(tmp_path, grappler_off):
  t = _trainer(None, mixed_precision="bfloat16", steps_per_epoch=2)
  assert t.model.mbls[0].branches[0].compute_dtype == "bfloat16"
  assert t.model.theta_variables[0].dtype == tf.float32
  result = t.train()
  last = result.history[-1]
  assert np.isfinite(last["loss"]) and np.isfinite(last["cost"])
  assert all(np.all(np.isfinite(th)) for th in result.thetas)
  assert any(np.any(th != 0) for th in result.thetas)      # θ moved
  import tf_keras as keras
  assert keras.mixed_precision.global_policy().name == "float32"  # restored


def test_private_apis_we_build_on_are_still_there(monkeypatch):
  """SearchSGD and the checkpointed iterators use non-public tf_keras/TF members (each
  wrapped in one place); a tf_keras or TensorFlow upgrade that changes them fails here."""
  optim.check_keras_internals()
  v = tf.Variable([1.0, 2.0])
  opt = optim.SearchSGD(0.1, l2=0.1)
  opt.build([v])
  assert opt._var_key(v) in opt._index_dict and len(opt.momentums) == 1
  opt.set_op_groups([[v]])
  assert loop.iterators_checkpointable(iter(tf.data.Dataset.range(3)))
  assert not loop.iterators_checkpointable(iter([1, 2]))
  import tf_keras as keras
  monkeypatch.setattr(keras.optimizers.SGD, "_distributed_apply_gradients_fn", None)
  with pytest.raises(optim.KerasInternalsError, match="install the tf_keras version"):
    optim.SearchSGD(0.1)
