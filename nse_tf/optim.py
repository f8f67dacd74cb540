"""The optimiser and learning-rate schedule of the supernet and of the retrain.

  WarmupCosine  linear warm-up from start_lr to peak_lr, then cosine decay to 0 (SPEC §4, §6)
  SearchSGD     SGD with PyTorch's momentum/Nesterov semantics and coupled L2 on conv/fc
                kernels; for the supernet also the reference's updates of ops that were off
  decays(v)     whether weight decay applies to a variable

SearchSGD extends tf_keras's SGD through three non-public members of tf_keras's optimizer
(`_var_key`, `_index_dict`, `_distributed_apply_gradients_fn`): there is no public way to
update only the variables of the ops that ran, inside the optimiser's distributed apply.
They are used here and nowhere else, and `check_keras_internals()` (run when a SearchSGD
is built, and by tests/test_trainer.py) fails with one clear message if a tf_keras upgrade
removes or changes them.
"""

from __future__ import annotations

import contextlib
import inspect
import math
from typing import Any, List, Optional, Sequence

import numpy as np
import tensorflow as tf
import tf_keras as keras

from nse_tf import errors


class KerasInternalsError(errors.NSEError):
  """tf_keras changed a non-public member that SearchSGD builds on."""


def check_keras_internals() -> None:
  """Raises KerasInternalsError unless tf_keras's SGD has what SearchSGD overrides/uses."""
  sgd = keras.optimizers.SGD
  problems = []
  for name in ("_var_key", "_distributed_apply_gradients_fn", "update_step", "build"):
    if not callable(getattr(sgd, name, None)):
      problems.append(f"SGD.{name} is missing")
  fn = getattr(sgd, "_distributed_apply_gradients_fn", None)
  if callable(fn):
    params = list(inspect.signature(fn).parameters)
    if params[:3] != ["self", "distribution", "grads_and_vars"]:
      problems.append(f"SGD._distributed_apply_gradients_fn takes {params}, expected "
                      "(self, distribution, grads_and_vars, **kwargs)")
  if problems:
    raise KerasInternalsError(
        f"tf_keras {keras.__version__} changed the optimizer internals that "
        f"nse_tf.optim.SearchSGD relies on ({'; '.join(problems)}); install the tf_keras "
        "version pinned in setup.py")


@keras.utils.register_keras_serializable(package="nse_tf")
class WarmupCosine(keras.optimizers.schedules.LearningRateSchedule):
  """Linear warm-up from `start_lr` to `peak_lr`, then cosine decay to 0."""

  def __init__(self, peak_lr: float, total_steps: int, warmup_steps: int, start_lr: float):
    self.peak_lr = float(peak_lr)
    self.total_steps = int(total_steps)
    self.warmup_steps = int(warmup_steps)
    self.start_lr = float(start_lr)

  def __call__(self, step):
    step = tf.cast(step, tf.float32)
    warm = tf.cast(max(self.warmup_steps, 1), tf.float32)
    warm_lr = self.start_lr + (self.peak_lr - self.start_lr) * step / warm
    decay_steps = tf.cast(max(self.total_steps - self.warmup_steps, 1), tf.float32)
    progress = tf.clip_by_value((step - self.warmup_steps) / decay_steps, 0.0, 1.0)
    cos_lr = 0.5 * self.peak_lr * (1.0 + tf.cos(math.pi * progress))
    return tf.where(step < self.warmup_steps, warm_lr, cos_lr)

  def get_config(self):
    return dict(peak_lr=self.peak_lr, total_steps=self.total_steps,
                warmup_steps=self.warmup_steps, start_lr=self.start_lr)


def decays(variable) -> bool:
  """Weight decay applies to conv/fc kernels only (not BN, biases or θ)."""
  name = variable.name
  return "kernel" in name and "theta" not in name


@keras.utils.register_keras_serializable(package="nse_tf")
class SearchSGD(keras.optimizers.SGD):
  """SGD with PyTorch's momentum/Nesterov semantics and coupled L2 weight decay.

  v ← μv + (g + λw);  w ← w − lr·(g + λw + μv) with Nesterov, w ← w − lr·v without.

  Supernet ops (`set_op_groups`, gates given while tracing with `gated`): in the
  reference runs an op that was off in a step still had a zero gradient, so momentum
  and weight decay kept moving its weights. With g = 0 that step is linear with
  scalar coefficients, [w; v] ← A_t [w; v], A_t = [[1 − lr·λ(1 + μ), −lr·μ²], [λ, μ]]
  (Nesterov; [[1 − lr·λ, −lr·μ], [λ, μ]] without), so rather than rewriting every off
  op's weights each step the optimiser multiplies its 2×2 `pending` matrix (per op,
  one for decayed kernels and one for BN/bias variables) and applies the product when
  the op runs next (`catch_up`, before the forward pass) or when the round ends
  (`catch_up()` for all). Same trajectory up to float rounding; each step then costs
  the update of the active path only. `skip_off_ops=True` leaves off ops untouched.
  """

  def __init__(self, learning_rate=0.1, momentum=0.9, nesterov=True, l2=0.0,
               skip_off_ops=False, name="SearchSGD", **kwargs):
    check_keras_internals()
    skip_off_ops = bool(kwargs.pop("skip_zero_grad", skip_off_ops))  # older configs
    super().__init__(learning_rate=learning_rate, momentum=momentum, nesterov=nesterov,
                     name=name, **kwargs)
    self.l2 = float(l2)
    self.skip_off_ops = skip_off_ops
    self._groups: Optional[List[List[tf.Variable]]] = None
    self._gates = None

  # ------------------------------------------------------------- plumbing
  def set_op_groups(self, groups: Sequence[Sequence[tf.Variable]]):
    """Registers the supernet's ops: `groups[i]` holds the variables of flat op i.

    Call inside the strategy's scope, after `build`; creates the `pending` state
    (checkpointed with the optimiser).
    """
    if not isinstance(getattr(self, "_index_dict", None), dict) or not hasattr(self, "momentums"):
      raise KerasInternalsError(
          f"tf_keras {keras.__version__}: a built SGD has no _index_dict/momentums, which "
          "nse_tf.optim.SearchSGD relies on; install the tf_keras version pinned in setup.py")
    self._groups = [list(g) for g in groups]
    self._op_of = {}
    for i, group in enumerate(self._groups):
      for v in group:
        if self._var_key(v) not in self._index_dict:
          raise ValueError(f"variable {v.name} of op {i} is not in the optimiser; build it "
                           "with every weight variable first")
        self._op_of[self._var_key(v)] = i
    eye = np.broadcast_to(np.eye(2, dtype=np.float32), (len(self._groups), 2, 2, 2))
    self._eye = tf.constant(eye)
    self.pending = tf.Variable(eye, trainable=False, name="pending_off_steps")

  @contextlib.contextmanager
  def gated(self, gates):
    """While tracing a step: `gates` (flat 0/1 per registered op) says which ops ran."""
    if self._groups is None:
      raise ValueError("SearchSGD.gated needs set_op_groups first")
    self._gates = gates
    try:
      yield self
    finally:
      self._gates = None

  def _decayed(self, variable) -> bool:
    """Whether L2 applies to `variable` (class 0 of `pending`, else class 1)."""
    return bool(self.l2) and decays(variable)

  def _momentum(self, variable):
    return self.momentums[self._index_dict[self._var_key(variable)]]

  def _apply(self, gradient, variable):
    lr = tf.cast(self.learning_rate, variable.dtype)
    mu = tf.cast(self.momentum, variable.dtype)
    g = gradient
    if self._decayed(variable):
      g = g + tf.cast(self.l2, variable.dtype) * variable
    # One fused kernel (m ← μm + g; w ← w − lr·(g + μm) with Nesterov) instead of six
    # element-wise ops with temporaries.
    return tf.raw_ops.ResourceApplyMomentum(
        var=variable.handle, accum=self._momentum(variable).handle, lr=lr, grad=g, momentum=mu,
        use_locking=False, use_nesterov=self.nesterov)

  def update_step(self, gradient, variable):
    self._apply(gradient, variable)

  def _off_step(self, lr):
    """A_t for [kernel (decayed), BN/bias] variables: shape [2 classes, 2, 2]."""
    mu = tf.cast(self.momentum, tf.float32)
    lr = tf.cast(lr, tf.float32)
    rows = []
    for lam in (self.l2, 0.0):
      lam = tf.constant(lam, tf.float32)
      if self.nesterov:
        a = [[1.0 - lr * lam * (1.0 + mu), -lr * mu * mu], [lam, mu]]
      else:
        a = [[1.0 - lr * lam, -lr * mu], [lam, mu]]
      rows.append(tf.stack([tf.stack(r) for r in a]))
    return tf.stack(rows)

  # ------------------------------------------------------------- updates
  def _distributed_apply_gradients_fn(self, distribution, grads_and_vars, **kwargs):
    if self._gates is None:
      return super()._distributed_apply_gradients_fn(distribution, grads_and_vars, **kwargs)
    if self.use_ema:
      raise ValueError("SearchSGD with op groups does not support use_ema")
    gates = self._gates
    lr = tf.identity(self.learning_rate)
    by_op: List[List[Any]] = [[] for _ in self._groups]
    for g, v in grads_and_vars:
      op = self._op_of.get(self._var_key(v))
      if op is None:
        distribution.extended.update(v, lambda var, grad: self._apply(grad, var), args=(g,),
                                     group=False)
      else:
        by_op[op].append((g, v))
    for i, pairs in enumerate(by_op):
      if not pairs:
        continue
      vs = [v for _, v in pairs]

      def op_update(_, *grads, i=i, vs=vs):
        def run():
          for grad, var in zip(grads, vs):
            self._apply(grad, var)
          return tf.no_op()
        return tf.cond(gates[i] > 0, run, tf.no_op)

      # One cond per op (not per variable); `.handle` inside an update call picks
      # each replica's copy of every variable of the group.
      distribution.extended.update(vs[0], op_update, args=tuple(g for g, _ in pairs),
                                   group=False)
    if not self.skip_off_ops:
      a = self._off_step(lr)
      off = tf.reshape(tf.cast(gates, tf.float32) <= 0, [-1, 1, 1, 1])

      def defer(p):
        return p.assign(tf.where(off, tf.einsum("cij,ncjk->ncik", a, p), p))

      distribution.extended.update(self.pending, defer, group=False)
    return self.iterations.assign_add(1)

  def catch_up(self, needed=None):
    """Applies the deferred off-step updates of the ops flagged in `needed` (all if None).

    Call in cross-replica context (e.g. at the start of a compiled step, before
    `strategy.run`) or eagerly; the ops' pending matrices return to identity.
    """
    if self._groups is None or self.skip_off_ops:
      return
    strategy = self._distribution_strategy
    with strategy.scope():
      p = tf.convert_to_tensor(self.pending)
      stale = tf.reduce_any(tf.not_equal(p, self._eye), axis=[1, 2, 3])
      do = stale if needed is None else tf.logical_and(tf.cast(needed, tf.float32) > 0, stale)
      # Every scalar the per-op branches need, split out by one op each: slicing p and
      # `do` per variable put ~20 graph nodes per variable into each step (a fifth of the
      # weight step's trace time and more of its graph optimisation), same values.
      coeffs = tf.unstack(tf.reshape(p, [-1]))       # op i, class c, row r, col k: 8i+4c+2r+k
      flags_ = tf.unstack(do)
      for i, group in enumerate(self._groups):
        if not group:
          continue

        def op_catch_up(_, i=i, group=group):
          def run():
            for v in group:
              a = coeffs[8 * i + (0 if self._decayed(v) else 4):][:4]
              if v.dtype != tf.float32:
                a = [tf.cast(x, v.dtype) for x in a]
              m = self._momentum(v)
              w0 = tf.raw_ops.ReadVariableOp(resource=v.handle, dtype=v.dtype)
              m0 = tf.raw_ops.ReadVariableOp(resource=m.handle, dtype=m.dtype)
              tf.raw_ops.AssignVariableOp(resource=v.handle, value=a[0] * w0 + a[1] * m0)
              tf.raw_ops.AssignVariableOp(resource=m.handle, value=a[2] * w0 + a[3] * m0)
            return tf.no_op()
          return tf.cond(flags_[i], run, tf.no_op)

        strategy.extended.update(group[0], op_catch_up, group=False)
      reset = tf.reshape(do, [-1, 1, 1, 1])
      strategy.extended.update(self.pending, lambda v: v.assign(tf.where(reset, self._eye, v)),
                               group=False)

  def get_config(self):
    cfg = super().get_config()
    cfg.update(l2=self.l2, skip_off_ops=self.skip_off_ops)
    return cfg
