"""The multi-branch supernet with fitness indicators θ (SPEC §3–§4).

Every searchable layer is a `MultiBranchLayer` over its working set S_l. Gates are
sampled on the host (`GateSampler`, numpy) and fed to one compiled step as a flat
float tensor, so one trace serves every architecture and every replica sees the
same gates. An op whose gate is off is skipped with `tf.cond`: it runs no kernel
and gets an exactly-zero gradient.

Two call modes:
  * weights: `model(images, gates=g)`; y = (x + Σ_{on} op(x)) / (|S|+1) in a normal
    layer, Σ_{on} op(x) / |S| in a reduction/expansion layer.
  * θ: `model.call_theta(images, g1, g2, same)`; per layer the two-path
    straight-through estimator y = o(g¹)(π₁ + 1 − sg π₁) + sg(o(g²))(π₂ − sg π₂)
    with π from θ in the graph, and the expected cost Σ_l π₁c(g¹) + π₂c(g²). Its
    branches build input gradients only, none for the weights (_INPUT_ONLY_GRADS).
"""

from __future__ import annotations

import itertools
import json
from typing import Dict, List, NamedTuple, Optional, Sequence, Tuple

import numpy as np
import tensorflow as tf
import tf_keras as keras

from nse_tf import ops as ops_lib
from nse_tf import spaces

P_SCALE, P_FLOOR = 0.999, 5e-4     # p = 0.999·σ(θ) + 5e-4 (SPEC §4)
ENUMERATE_MAX = 5                   # enumerate θ-step pattern pairs up to |S_l| ops


# The θ step differentiates path 1 for θ only, but TensorFlow builds a `tf.cond`'s
# gradient with respect to every input of its branches, the captured weights included,
# and a conv's gradient function builds the filter gradient beside the input gradient.
# Grappler deletes those unused gradients later, after they have cost tracing, graph
# optimisation and memory. Inside the θ step's branches these op types take gradient
# functions that build only what reaches the branch's input: the same ops, so the same
# input gradients; no gradient for the weights.
_INPUT_ONLY_GRADS = {"ReadVariableOp": "NseNoWeightGrad",
                     "Conv2D": "NseConv2DInputGrad",
                     "DepthwiseConv2dNative": "NseDepthwiseInputGrad"}


@tf.RegisterGradient("NseNoWeightGrad")
def _no_weight_grad(op, grad):
  del op, grad
  return [None]


def _input_grad_only(backprop_input, attrs):
  """A conv's gradient function with the input gradient only (no filter gradient)."""
  def grad_fn(op, grad):
    return [backprop_input(input_sizes=tf.shape(op.inputs[0]), filter=op.inputs[1],
                           out_backprop=grad, **{a: op.get_attr(a) for a in attrs}), None]
  return grad_fn


_CONV_ATTRS = ("strides", "padding", "explicit_paddings", "data_format", "dilations")
tf.RegisterGradient("NseConv2DInputGrad")(_input_grad_only(
    tf.raw_ops.Conv2DBackpropInput, _CONV_ATTRS + ("use_cudnn_on_gpu",)))
tf.RegisterGradient("NseDepthwiseInputGrad")(_input_grad_only(
    tf.raw_ops.DepthwiseConv2dNativeBackpropInput, _CONV_ATTRS))


def _call_op(op, x, training, weight_grads: bool):
  """op(x); with weight_grads False, gradients reach x only (see _INPUT_ONLY_GRADS).

  Only inside a `tf.cond` branch: the override is an op attribute that TensorFlow's
  symbolic gradients read (cond_v2 builds a branch's gradient that way); a GradientTape
  over ops outside any cond ignores it, so `mixed` without skip_inactive (the
  benchmark's compute-every-branch baseline) does not call this.
  """
  if weight_grads:
    return op(x, training=training)
  with tf.compat.v1.get_default_graph().gradient_override_map(_INPUT_ONLY_GRADS):
    return op(x, training=training)


def keep_prob(theta):
  """p = 0.999 σ(θ) + 5e-4, for numpy arrays or tensors."""
  if isinstance(theta, np.ndarray):
    return P_SCALE / (1.0 + np.exp(-theta)) + P_FLOOR
  return P_SCALE * tf.sigmoid(theta) + P_FLOOR


class MultiBranchLayer(keras.layers.Layer):
  """A searchable layer: candidate ops of its working set, θ per op, identity if N."""

  def __init__(self, layer: spaces.LayerSpec, op_names: Sequence[str],
               op_costs: Sequence[float], activation: str = "relu", sync_bn: bool = False,
               skip_inactive: bool = True, **kwargs):
    super().__init__(name=kwargs.pop("name", f"mbl{layer.index:02d}"), **kwargs)
    # False: compute every branch and multiply by its gate (benchmark baseline).
    self.skip_inactive = skip_inactive
    self.spec = layer
    self.op_names = list(op_names)
    self.is_normal = layer.kind == "N"
    self.branches = [ops_lib.build_op(op, layer, activation=activation, sync_bn=sync_bn,
                                      name=op) for op in self.op_names]
    self.op_costs = tf.constant(list(op_costs) or [0.0], tf.float32)[:len(self.op_names)]
    # θ stays float32 under mixed precision (no autocast): log-probabilities.
    self.theta = self.add_weight("theta", shape=(len(self.op_names),), dtype=tf.float32,
                                 initializer="zeros", trainable=True,
                                 experimental_autocast=False)

  @property
  def num_ops(self) -> int:
    return len(self.op_names)

  def _zeros_out(self, x):
    s = self.spec
    shape = tf.shape(x)
    ho = (shape[1] - 1) // s.stride + 1
    wo = (shape[2] - 1) // s.stride + 1
    return tf.zeros(tf.stack([shape[0], ho, wo, s.c_out]), x.dtype)

  def mixed(self, x, gates, training=None, weight_grads: bool = True):
    """Average of the active branches (and the identity of a normal layer).

    weight_grads=False (θ mode): the branches' gradients reach x, not their weights
    (where inactive branches are skipped with tf.cond, the default; see _call_op).
    """
    if not self.branches:
      return x
    if not self.skip_inactive:
      acc = x if self.is_normal else 0.0
      for i, op in enumerate(self.branches):
        acc = acc + tf.cast(gates[i], x.dtype) * op(x, training=training)
      count = tf.reduce_sum(gates) + (1.0 if self.is_normal else 0.0)
      return acc / tf.maximum(tf.cast(count, acc.dtype), 1.0)
    acc = x if self.is_normal else self._zeros_out(x)
    for i, op in enumerate(self.branches):
      acc = tf.cond(gates[i] > 0,
                    lambda op=op, acc=acc: acc + _call_op(op, x, training, weight_grads),
                    lambda acc=acc: acc)
    count = tf.reduce_sum(gates) + (1.0 if self.is_normal else 0.0)
    return acc / tf.maximum(tf.cast(count, acc.dtype), 1.0)

  @tf.autograph.experimental.do_not_convert
  def call(self, x, gates=None, training=None):
    return self.mixed(x, gates, training)

  def log_prob(self, gates, alive):
    """log P(g) under Π Bernoulli(p_o), over the ops still alive (θ in the graph)."""
    p = keep_prob(self.theta)
    lp = gates * tf.math.log(p) + (1.0 - gates) * tf.math.log(1.0 - p)
    return tf.reduce_sum(lp * alive)

  def call_theta(self, x, g1, g2, same, alive, training=None, weight_grads: bool = False):
    """Two-path estimator: forward value o(g¹), straight-through θ gradient.

    Returns (y, expected layer cost π₁c(g¹) + π₂c(g²)). The θ step needs no weight
    gradients; weight_grads=True builds them anyway (tests compare the two).
    """
    if not self.branches:
      return x, tf.constant(0.0)
    o1 = self.mixed(x, g1, training, weight_grads=weight_grads)
    c1 = tf.reduce_sum(g1 * self.op_costs)
    c2 = tf.reduce_sum(g2 * self.op_costs)

    def two_paths():
      pi1 = tf.sigmoid(self.log_prob(g1, alive) - self.log_prob(g2, alive))
      pi2 = 1.0 - pi1
      o2 = tf.stop_gradient(self.mixed(x, g2, training))
      d = o1.dtype
      y = (o1 * tf.cast(pi1 + 1.0 - tf.stop_gradient(pi1), d)
           + o2 * tf.cast(pi2 - tf.stop_gradient(pi2), d))
      return y, pi1 * c1 + pi2 * c2

    def one_path():  # a single possible pattern: no θ gradient, no second pass
      return o1, c1 + 0.0 * tf.reduce_sum(self.theta)

    return tf.cond(same, one_path, two_paths)


class Supernet(keras.Model):
  """Stem, one MultiBranchLayer per searchable layer of the macro, head.

  Args:
    space, macro: the op pool and macro-architecture.
    working_sets: per layer, the pool indices of S_l (in pool order).
    cost_table: object with `layer_costs(l)` (pool-indexed) and `fixed`, e.g.
      `cost.CostTable` or a latency table; only used for the expected cost.
    num_classes, resolution, scale, activation, sync_bn: network options.
  """

  def __init__(self, space: str, macro: str, working_sets: Sequence[Sequence[int]],
               cost_table, num_classes: int, resolution: int = 224, scale: float = 1.0,
               activation: str = "relu", sync_bn: bool = False, dropout: float = 0.0,
               skip_inactive: bool = True, **kwargs):
    super().__init__(name=kwargs.pop("name", "supernet"), **kwargs)
    self.space, self.macro = space, macro
    self.pool = spaces.get_pool(space)
    self.resolved = spaces.resolve_macro(macro, resolution, scale)
    if len(working_sets) != len(self.resolved.layers):
      raise ValueError(f"{len(working_sets)} working sets for {len(self.resolved.layers)} layers")
    self.working_sets = [list(ws) for ws in working_sets]
    self.num_classes = num_classes
    self.resolution = resolution
    self.fixed_cost = float(cost_table.fixed)
    self.stem_pad = keras.layers.ZeroPadding2D(1, name="stem_pad")
    self.stem_conv = keras.layers.Conv2D(16, 3, strides=2, use_bias=False,
                                         kernel_initializer=ops_lib.conv_init(),
                                         name="stem_conv")
    self.stem_bn = ops_lib.batch_norm("stem_bn", sync=sync_bn)
    self.stem_act = ops_lib.activation_layer(activation, "stem_act")
    self.mbls = []
    for layer, ws in zip(self.resolved.layers, self.working_sets):
      costs = cost_table.layer_costs(layer.index)
      self.mbls.append(MultiBranchLayer(layer, [self.pool[i] for i in ws],
                                        [costs[i] for i in ws], activation, sync_bn,
                                        skip_inactive=skip_inactive))
    self.head_conv = keras.layers.Conv2D(self.resolved.head_channels, 1,
                                         kernel_initializer=ops_lib.conv_init(), name="head_conv")
    self.head_act = ops_lib.activation_layer(activation, "head_act")
    self.pool_layer = keras.layers.GlobalAveragePooling2D(name="pool")
    self.dropout = keras.layers.Dropout(dropout) if dropout > 0 else None
    self.classifier = keras.layers.Dense(num_classes, name="classifier")
    self.offsets = np.cumsum([0] + [len(ws) for ws in self.working_sets]).tolist()
    self.total_ops = self.offsets[-1]

  # -- gate plumbing --------------------------------------------------------
  def split(self, flat):
    return [flat[self.offsets[l]:self.offsets[l + 1]] for l in range(len(self.mbls))]

  def _stem(self, images, training):
    x = self.stem_conv(self.stem_pad(images))
    return self.stem_act(self.stem_bn(x, training=training))

  def _head(self, x, training):
    x = self.pool_layer(self.head_act(self.head_conv(x)))
    if self.dropout is not None:
      x = self.dropout(x, training=training)
    return tf.cast(self.classifier(x), tf.float32)

  @tf.autograph.experimental.do_not_convert
  def call(self, images, gates=None, training=None):
    """Weights mode: logits of the sub-network picked by the flat 0/1 `gates`."""
    if gates is None:
      gates = tf.ones([self.total_ops], tf.float32)
    x = self._stem(images, training)
    for mbl, g in zip(self.mbls, self.split(gates)):
      x = mbl(x, gates=g, training=training)
    return self._head(x, training)

  def call_theta(self, images, g1, g2, same, alive, training=True, weight_grads=False):
    """θ mode: (logits, expected cost incl. the fixed part) for pattern pairs.

    The branches' weights get no gradient unless weight_grads (MultiBranchLayer.mixed).
    """
    x = self._stem(images, training)
    total = tf.constant(self.fixed_cost, tf.float32)
    for l, (mbl, a, b, m) in enumerate(zip(self.mbls, self.split(g1), self.split(g2),
                                           self.split(alive))):
      x, c = mbl.call_theta(x, a, b, same[l], m, training=training,
                            weight_grads=weight_grads)
      total += tf.cast(c, tf.float32)
    return self._head(x, training), total

  def build_all(self):
    """Creates every variable (all branches on once, and the θ path)."""
    images = tf.zeros([1, self.resolution, self.resolution, 3])
    self(images, gates=tf.ones([self.total_ops]), training=False)

  # -- variable groups -----------------------------------------------------
  @property
  def theta_variables(self) -> List[tf.Variable]:
    return [m.theta for m in self.mbls]

  @property
  def weight_variables(self) -> List[tf.Variable]:
    thetas = {id(v) for v in self.theta_variables}
    return [v for v in self.trainable_variables if id(v) not in thetas]

  def op_variable_groups(self) -> List[List[tf.Variable]]:
    """The trainable weights of every op, in flat gate order (for SearchSGD)."""
    return [list(op.trainable_variables) for mbl in self.mbls for op in mbl.branches]

  def thetas_numpy(self) -> List[np.ndarray]:
    return [m.theta.numpy() for m in self.mbls]

  def bn_layers(self):
    """Every BatchNormalization of the supernet (tf.Module's public recursive listing)."""
    return [m for m in self.submodules if isinstance(m, keras.layers.BatchNormalization)]


# ---------------------------------------------------------------------------
# Host-side gate sampling.


INTERVAL_DRAWS = 25600              # p = 0.5 paths tried per interval draw, and per probe


class CostInterval(NamedTuple):
  """Per-layer op costs (working-set order), the fixed cost, and the open interval."""
  costs: Sequence[np.ndarray]
  fixed: float
  lo: float
  hi: float
  max_draws: int = INTERVAL_DRAWS


class GateSampler:
  """Seeded numpy sampling of gate patterns, resumable through `state`.

  `alive[l]` is a bool array over the layer's working set (False once pruned);
  `kinds[l]` says whether the layer may be empty ('N') or not ('R'/'E').
  """

  def __init__(self, kinds: Sequence[str], sizes: Sequence[int], seed: int = 0):
    self.kinds = list(kinds)
    self.sizes = list(sizes)
    self.rng = np.random.Generator(np.random.PCG64(seed))

  @property
  def state(self) -> str:
    return json.dumps(self.rng.bit_generator.state)

  @state.setter
  def state(self, value: str):
    self.rng.bit_generator.state = json.loads(value)

  def _nonempty_ok(self, l, g):
    return self.kinds[l] == "N" or g.any()

  def weight_gates(self, alive: Sequence[np.ndarray], probs: Optional[Sequence[np.ndarray]] = None,
                   count: bool = False, within: Optional["CostInterval"] = None) -> np.ndarray:
    """One pattern per layer: each alive op on with p (0.5 or σ(θ)-based); R/E non-empty.

    count=True: the number of active ops is uniform over what the layer allows (0 or 1 up
    to every alive op), then that many alive ops uniformly (sparse and dense paths trained
    equally often; `probs` is not used).
    within: p = 0.5 draws of the whole path, redrawn until its cost lies in the interval
    (`CostInterval`; `probs` and `count` are not used).
    """
    if within is not None:
      return self._weight_gates_within(alive, within)
    out = []
    for l, a in enumerate(alive):
      p = 0.5 if probs is None else probs[l]
      if not a.any():
        out.append(np.zeros(len(a), np.float32))
        continue
      if count:
        idx = np.flatnonzero(a)
        k = self.rng.integers(0 if self.kinds[l] == "N" else 1, len(idx) + 1)
        g = np.zeros(len(a), np.float32)
        g[self.rng.permutation(idx)[:k]] = 1.0
        out.append(g)
        continue
      while True:
        g = (self.rng.random(len(a)) < p) & a
        if self._nonempty_ok(l, g):
          break
      out.append(g.astype(np.float32))
    return np.concatenate(out) if out else np.zeros(0, np.float32)

  def _paths(self, alive: Sequence[np.ndarray], within: "CostInterval", batch: int):
    """`batch` p = 0.5 paths: per-layer gates, their costs, and whether every R/E layer
    with an alive op is non-empty."""
    total = np.full(batch, within.fixed, np.float64)
    ok = np.ones(batch, bool)
    parts = []
    for l, a in enumerate(alive):
      g = (self.rng.random((batch, len(a))) < 0.5) & np.asarray(a, bool)
      if self.kinds[l] != "N" and np.any(a):
        ok &= g.any(axis=1)
      total += g.astype(np.float64) @ np.asarray(within.costs[l], np.float64)
      parts.append(g)
    return parts, total, ok

  def _weight_gates_within(self, alive: Sequence[np.ndarray], within: "CostInterval",
                           batch: int = 256) -> np.ndarray:
    """Uniform paths (p = 0.5, R/E layers non-empty) conditioned on lo < cost < hi.

    Draws `batch` whole paths at a time and keeps the first inside the interval: the
    distribution of `benchmarks/search_quality.py`'s uniform draws, which are filtered
    the same way. When none of `within.max_draws` falls inside (pruning left the
    interval out of reach of such draws), the draw nearest to it.
    """
    best, best_gap = None, np.inf
    for _ in range(max(1, within.max_draws // batch)):
      parts, total, ok = self._paths(alive, within, batch)
      inside = ok & (total > within.lo) & (total < within.hi)
      if inside.any():
        best = [g[int(np.argmax(inside))] for g in parts]
        break
      gap = np.where(ok, np.maximum(within.lo - total, total - within.hi), np.inf)
      i = int(np.argmin(gap))
      if gap[i] < best_gap:
        best, best_gap = [g[i] for g in parts], gap[i]
    if best is None:         # no draw with every R/E layer non-empty: resample per layer
      return self.weight_gates(alive)
    return np.concatenate(best).astype(np.float32) if best else np.zeros(0, np.float32)

  def interval_share(self, alive: Sequence[np.ndarray], within: "CostInterval",
                     draws: int = INTERVAL_DRAWS) -> Tuple[float, float, float]:
    """(share inside the interval, cheapest, dearest) of `draws` p = 0.5 paths."""
    parts, total, ok = self._paths(alive, within, draws)
    del parts
    total = total[ok]
    if not total.size:       # every draw left some R/E layer empty
      return 0.0, float("nan"), float("nan")
    inside = (total > within.lo) & (total < within.hi)
    return float(inside.mean()), float(total.min()), float(total.max())

  def theta_gates(self, alive: Sequence[np.ndarray], thetas: Sequence[np.ndarray]
                  ) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Two different patterns per layer from Π Bernoulli(p_o) over alive ops.

    Returns flat g1, flat g2 and a per-layer bool `same` (only one possible
    pattern: g2 = g1 and the layer gets no θ gradient).
    """
    g1s, g2s, same = [], [], []
    for l, (a, th) in enumerate(zip(alive, thetas)):
      idx = np.flatnonzero(a)
      n = len(a)
      min_on = 0 if self.kinds[l] == "N" else 1
      num_patterns = 2 ** len(idx) - (0 if min_on == 0 else 1)
      if num_patterns <= 1:
        g = np.zeros(n, np.float32)
        g[idx] = 1.0 if len(idx) else 0.0
        g1s.append(g)
        g2s.append(g)
        same.append(True)
        continue
      p = keep_prob(np.asarray(th, np.float64))[idx]
      if len(idx) <= ENUMERATE_MAX:
        pats = np.array([bits for bits in itertools.product((0, 1), repeat=len(idx))
                         if sum(bits) >= min_on], np.float64)
        probs = np.prod(np.where(pats > 0, p, 1.0 - p), axis=1)
        probs = probs / probs.sum()
        i1 = self.rng.choice(len(pats), p=probs)
        rest = probs.copy()
        rest[i1] = 0.0
        i2 = self.rng.choice(len(pats), p=rest / rest.sum())
        sub1, sub2 = pats[i1], pats[i2]
      else:
        def draw():
          while True:
            s = (self.rng.random(len(idx)) < p).astype(np.float64)
            if s.sum() >= min_on:
              return s
        sub1 = draw()
        while True:
          sub2 = draw()
          if (sub2 != sub1).any():
            break
      g1 = np.zeros(n, np.float32)
      g2 = np.zeros(n, np.float32)
      g1[idx], g2[idx] = sub1, sub2
      g1s.append(g1)
      g2s.append(g2)
      same.append(False)
    cat = lambda xs: np.concatenate(xs) if xs else np.zeros(0, np.float32)
    return cat(g1s), cat(g2s), np.array(same, bool)


def prune(thetas: Sequence[np.ndarray], alive: Sequence[np.ndarray], kinds: Sequence[str],
          protected: Sequence[Sequence[bool]], threshold: float = -2.0
          ) -> List[Tuple[int, int]]:
  """Marks ops with θ < threshold dead (in place); returns (layer, position) pruned.

  Ops of the inherited set A_l are protected for the round, and a reduction or
  expansion layer never loses its last op.
  """
  pruned = []
  for l, (th, a) in enumerate(zip(thetas, alive)):
    for i in np.argsort(th):  # lowest θ first, so the best op is the one kept
      if not a[i] or th[i] >= threshold or protected[l][i]:
        continue
      if kinds[l] != "N" and a.sum() <= 1:
        break
      a[i] = False
      pruned.append((l, int(i)))
  return pruned
