"""Synchronized batch norm inside tf.cond under MirroredStrategy (2 logical CPUs)."""

import numpy as np
import pytest
import tensorflow as tf
import tf_keras as keras

from nse_tf import sync_bn


def _run(strategy, use_sync, x_all):
  """Four steps (gate on, off, on, on) of conv + BN inside a tf.cond under `strategy`."""
  weights = tf.constant([0.25, -0.5, 0.75, 0.125])
  with strategy.scope():
    keras.utils.set_random_seed(1)
    conv = keras.layers.Conv2D(4, 3, use_bias=False)
    bn = (sync_bn.SyncBatchNorm(momentum=0.9) if use_sync
          else keras.layers.BatchNormalization(momentum=0.9))
    conv.build((None, 8, 8, 3))
    bn.build((None, 6, 6, 4))
    opt = keras.optimizers.SGD(0.05)
    variables = conv.trainable_variables + bn.trainable_variables
    opt.build(variables)

  @tf.function
  def step(x, gate):
    def fn(x):
      with tf.GradientTape() as tape:
        loss = tf.cond(gate > 0, lambda: tf.reduce_sum(
            tf.square(tf.nn.relu(bn(conv(x), training=True)) - 0.3) * weights) / 144.0,
            lambda: tf.constant(0.0))
      grads = tape.gradient(loss, variables,
                            unconnected_gradients=tf.UnconnectedGradients.ZERO)
      grads = tf.distribute.get_replica_context().all_reduce("sum", grads)
      opt.apply_gradients(zip(grads, variables), skip_gradients_aggregation=True)
      return grads
    return strategy.run(fn, args=(x,))

  n = strategy.num_replicas_in_sync
  xs = strategy.experimental_distribute_values_from_function(
      lambda c: tf.constant(x_all[c.replica_id_in_sync_group * 16 // n:
                                  (c.replica_id_in_sync_group + 1) * 16 // n]))
  out = []
  for gate in (1.0, 0.0, 1.0, 1.0):
    grads = step(xs, tf.constant(gate))
    first = lambda t: strategy.experimental_local_results(t)[0].numpy()  # noqa: E731
    out.append({"gate": gate, "grads": [first(g).ravel() for g in grads],
                "vars": [v.numpy().ravel() for v in variables],
                "moving": [np.ravel(r.numpy())
                           for r in strategy.experimental_local_results(bn.moving_variance)]})
  return out, int(step.experimental_get_tracing_count())


def test_sync_bn_in_cond_matches_one_device_on_the_global_batch(monkeypatch, mirrored_two_cpus):
  monkeypatch.setattr(sync_bn, "COLLECTIVE_TIMEOUT_S", 60.0)  # a deadlock fails, not hangs
  mirrored = mirrored_two_cpus
  x_all = np.random.RandomState(0).randn(16, 8, 8, 3).astype(np.float32)
  res = {}
  res["default"], _ = _run(tf.distribute.get_strategy(), True, x_all)
  res["mirrored"], res["traces"] = _run(mirrored, True, x_all)
  res["mirrored_plain"], _ = _run(mirrored, False, x_all)
  assert res["traces"] == 1                      # one compiled step for gates on and off
  for one, two, plain in zip(res["default"], res["mirrored"], res["mirrored_plain"]):
    for a, b in zip(one["grads"], two["grads"]):
      np.testing.assert_allclose(b, a, atol=1e-5)
    for a, b in zip(one["vars"], two["vars"]):
      np.testing.assert_allclose(b, a, atol=1e-6)
    for replica in two["moving"]:                # both replicas keep the global statistics
      np.testing.assert_allclose(replica, one["moving"][0], rtol=1e-5)
    if one["gate"] == 0.0:                       # off: nothing ran, nothing to apply
      assert all(not g.any() for g in two["grads"])
    else:   # per-replica batch norm (8 images each) really differs from the global batch
      assert max(np.abs(np.subtract(a, b)).max()
                 for a, b in zip(one["grads"], plain["grads"])) > 1e-3


def test_sync_bn_is_plain_batch_norm_on_one_replica():
  x = tf.random.stateless_normal([6, 5, 5, 3], seed=[1, 2]) * 3.0 + 1.0
  a = sync_bn.SyncBatchNorm(momentum=0.9)
  b = keras.layers.BatchNormalization(momentum=0.9, fused=False)   # same (biased) moving variance
  np.testing.assert_allclose(a(x, training=True).numpy(), b(x, training=True).numpy(), atol=1e-5)
  np.testing.assert_allclose(a.moving_variance.numpy(), b.moving_variance.numpy(), rtol=1e-6)
  cfg = a.get_config()
  assert type(a).from_config(cfg).momentum == 0.9
