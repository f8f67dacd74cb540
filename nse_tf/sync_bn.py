"""Synchronized batch normalization that also works inside `tf.cond`.

The supernet skips an inactive branch with `tf.cond`, so every batch norm of a
candidate op lives inside a cond branch. TensorFlow's own synchronized batch norm
all-reduces through `ReplicaContext.all_reduce`, which under MirroredStrategy needs
`merge_call`, and merge_call is refused inside control flow. `SyncBatchNorm` sums the
batch moments over replicas with `cross_replica_sum`, which picks:

  * outside control flow, and always under TPUStrategy: `ReplicaContext.all_reduce`,
    what `BatchNormalization(synchronized=True)` uses (any strategy);
  * inside control flow with all replicas on this machine (MirroredStrategy): one
    `CollectiveReduceV2` per replica.
      - The gates are identical on every replica, so every replica traces the same
        collectives. A collective's instance key comes from its call site (the layer's
        moving-mean name, and the call's index for a layer called twice), the same on
        every replica whatever order the replicas are traced in.
      - Each replica's collectives carry an ordering token of their own (a resource
        handle created in the step's outermost graph). Without it, automatic control
        dependencies chain the stateful cond ops of replica 0 and replica 1 in trace
        order, and replica 0's collective waits forever for replica 1's.
      - The gradient of a cross-replica sum is the cross-replica sum of the incoming
        gradients, launched the same way.
      - A collective that waits longer than `COLLECTIVE_TIMEOUT_S` fails with
        DeadlineExceededError rather than hanging the job.
  * inside control flow with replicas on several machines (MultiWorkerMirrored):
    not supported, a clear error.

With one replica this is plain (unfused) batch norm; with several, mean and variance
are computed in one pass around a shift (see `_calculate_mean_and_var`).
"""

from __future__ import annotations

import threading
import weakref
from typing import Optional

import numpy as np
import tensorflow as tf
import tf_keras as keras

COLLECTIVE_TIMEOUT_S = 300.0
_GROUP_KEY_BASE = 900001          # far from the keys tf.distribute hands out itself
_KEYS_PER_GRAPH = 1 << 16

_lock = threading.RLock()
_graphs = weakref.WeakKeyDictionary()   # step graph -> {"base", "keys", "calls", "tokens"}
_group_keys = {}
_next_base = [1 << 20]


def _step_graph():
  """The outermost function graph of the current trace (not a cond branch)."""
  g = tf.compat.v1.get_default_graph()
  while getattr(g, "is_control_flow_graph", False):
    g = g.outer_graph
  return g


def in_control_flow() -> bool:
  """True while tracing inside a tf.cond / tf.while_loop body (or their gradients)."""
  return bool(getattr(tf.compat.v1.get_default_graph(), "is_control_flow_graph", False))


def _group_key(devices):
  with _lock:
    return _group_keys.setdefault(devices, _GROUP_KEY_BASE + len(_group_keys))


def _graph_state(graph):
  state = _graphs.get(graph)
  if state is None:
    state = {"base": _next_base[0], "keys": {}, "calls": {}, "tokens": {}}
    _next_base[0] += _KEYS_PER_GRAPH
    _graphs[graph] = state
  return state


def _collective_sum(x, replica: int, devices, tag: str):
  graph = _step_graph()
  if not getattr(graph, "building_function", False):
    raise RuntimeError("synchronized batch norm with several replicas must run inside a "
                       "tf.function (strategy.run in a compiled step)")
  group_key = _group_key(devices)
  with _lock:
    state = _graph_state(graph)
    # The same tag on every replica gets the same instance key, whatever order
    # the replicas' collectives were traced in.
    key = state["keys"].setdefault(tag, state["base"] + len(state["keys"]) + 1)
    if len(state["keys"]) >= _KEYS_PER_GRAPH:
      raise RuntimeError("too many synchronized batch-norm collectives in one step")
    if not state["tokens"]:
      # All replicas' tokens at once, in the step graph: a token created later,
      # while replica 1 is traced, would be ordered after replica 0's collectives.
      for r, device in enumerate(devices):
        with graph.as_default(), tf.control_dependencies(None), tf.device(device):
          state["tokens"][r] = tf.raw_ops.VarHandleOp(
              dtype=tf.float32, shape=[], shared_name=f"nse_sync_bn_token_{group_key}_{r}")
    token = state["tokens"][replica]
  with tf.device(devices[replica]):
    return tf.raw_ops.CollectiveReduceV2(
        input=x, group_size=len(devices), group_key=group_key, instance_key=key,
        ordering_token=[token], merge_op="Add", final_op="Id", communication_hint="auto",
        timeout_seconds=COLLECTIVE_TIMEOUT_S)


def unsupported_reason(strategy) -> Optional[str]:
  """Why sums inside tf.cond cannot work under `strategy`; None where they can."""
  n = strategy.num_replicas_in_sync
  if n == 1 or isinstance(strategy, tf.distribute.TPUStrategy):
    return None
  local = len(strategy.extended.worker_devices)
  if local != n:
    return (f"needs all {n} replicas on this machine (--strategy=mirrored) or TPUStrategy; "
            f"this strategy has {local} of them here")
  return None


def _call_tag(replica: int, name: str) -> str:
  """`name#i` for the i-th call with this name by this replica in this step."""
  with _lock:
    calls = _graph_state(_step_graph())["calls"]
    index = calls.get((replica, name), 0)
    calls[(replica, name)] = index + 1
  return f"{name}#{index}"


def cross_replica_sum(x, name: str):
  """Σ over replicas of `x` (replica context; fine inside tf.cond); grad likewise.

  `name` identifies the call site (the same on every replica, unique in the step);
  calls with the same name in one step are told apart by their order.
  """
  ctx = tf.distribute.get_replica_context()
  if ctx is None:
    raise RuntimeError("cross_replica_sum needs a replica context (inside strategy.run)")
  n = ctx.num_replicas_in_sync
  if n == 1:
    return tf.identity(x)
  if isinstance(ctx.strategy, tf.distribute.TPUStrategy) or not in_control_flow():
    return ctx.all_reduce(tf.distribute.ReduceOp.SUM, x)
  reason = unsupported_reason(ctx.strategy)
  if reason:
    raise NotImplementedError(f"synchronized batch norm inside tf.cond {reason}. Drop "
                              "--sync_bn or use --strategy=mirrored|tpu")
  devices = tuple(ctx.strategy.extended.worker_devices)
  replica = tf.get_static_value(ctx.replica_id_in_sync_group)
  if replica is None:
    raise RuntimeError("cross_replica_sum needs a static replica id")
  replica = int(replica)

  @tf.custom_gradient
  def summed(v):
    tag = _call_tag(replica, name)
    def grad(dy):   # a second tape.gradient over the same sum gets keys of its own
      return _collective_sum(dy, replica, devices, _call_tag(replica, tag + "/grad"))
    return _collective_sum(v, replica, devices, tag), grad

  return summed(tf.convert_to_tensor(x))


@keras.utils.register_keras_serializable(package="nse_tf")
class SyncBatchNorm(keras.layers.BatchNormalization):
  """BatchNormalization with the moments of the global batch, usable inside tf.cond."""

  def __init__(self, **kwargs):
    kwargs.pop("fused", None)
    kwargs.pop("synchronized", None)
    super().__init__(fused=False, synchronized=False, **kwargs)

  def _calculate_mean_and_var(self, x, reduction_axes, keep_dims, mask=None):
    ctx = tf.distribute.get_replica_context()
    if ctx is None or ctx.num_replicas_in_sync == 1 or mask is not None:
      return super()._calculate_mean_and_var(x, reduction_axes, keep_dims, mask=mask)
    with tf.name_scope("sync_moments"):
      y = tf.cast(x, tf.float32) if x.dtype in (tf.float16, tf.bfloat16) else x
      # One collective per call (and one for its gradient): Σ(y − s), Σ(y − s)² and the
      # count together. The shift s (the moving mean, the same on every replica) keeps
      # the one-pass variance E[(y − s)²] − E[y − s]² from cancelling once it tracks the
      # batch mean; mean and variance are exact functions of y whatever s is.
      shape = [1 if i in reduction_axes else d for i, d in enumerate(y.shape)]
      shift = tf.stop_gradient(tf.reshape(tf.cast(self.moving_mean, y.dtype), shape))
      d = y - shift
      channels = int(np.prod(shape))
      count = tf.cast(tf.reduce_prod(tf.gather(tf.shape(y), reduction_axes)), y.dtype)
      local = tf.concat([tf.reshape(tf.reduce_sum(d, axis=reduction_axes), [-1]),
                         tf.reshape(tf.reduce_sum(tf.square(d), axis=reduction_axes), [-1]),
                         tf.reshape(count, [1])], 0)
      # The layer's moving-mean name: unique per layer, the same on every replica.
      total = cross_replica_sum(local, self.moving_mean.name)
      n = total[2 * channels]
      m1 = total[:channels] / n
      mean = tf.reshape(m1, shape) + shift
      variance = tf.reshape(tf.maximum(total[channels:2 * channels] / n - tf.square(m1), 0.0),
                            shape)
      if not keep_dims:
        mean = tf.squeeze(mean, reduction_axes)
        variance = tf.squeeze(variance, reduction_axes)
      return tf.cast(mean, x.dtype), tf.cast(variance, x.dtype)
