"""One round of supernet training (SPEC §4): weight steps, θ steps, pruning.

The loop runs on the host; each step is one compiled, distributed function:
  * weight step: gates sampled on the host (uniform p = 0.5 or θ-based), cross-
    entropy, SGD Nesterov (PyTorch semantics, coupled L2 weight decay on conv/fc
    kernels only), lr linear warm-up then cosine to 0;
  * every `theta_every`-th step a θ step on a held-out batch: two gate patterns
    per layer, CE + α·(C − τ)^β with the expected cost C in the graph, Adam(β₁ = 0);
  * after every step: ops with θ < threshold are pruned (A_l protected, an R/E
    layer keeps its last op).

Everything the trajectory depends on — weights, θ, both optimiser states, step,
alive masks, pruning log, host RNG state and the data iterators — lives in one
`tf.train.Checkpoint`, so a killed round restarts where it stopped and follows the
same trajectory.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import shutil
from typing import Any, Dict, List, Optional, Sequence

import numpy as np
import tensorflow as tf
import tf_keras as keras
from absl import logging

from nse_tf import supernet as supernet_lib
from nse_tf import sync_bn as sync_bn_lib
from nse_tf import errors


class ConfigError(errors.NSEError):
  """A training configuration that cannot run; reported as one line by the CLIs."""


@dataclasses.dataclass
class TrainConfig:
  """Hyper-parameters of one round; SPEC §4 values as defaults."""
  global_batch: int = 1024
  epochs: float = 100.0
  steps_per_epoch: Optional[int] = None   # default: num_train // global_batch
  lr: float = 0.4
  warmup_epochs: float = 2.0
  warmup_start_lr: float = 0.1
  momentum: float = 0.9
  nesterov: bool = True
  weight_decay: float = 4e-5
  skip_off_ops: bool = False               # off ops get no momentum/decay update
  gate_sampling: str = "uniform"           # 'uniform' (p = 0.5) or 'theta'
  theta_every: int = 2
  theta_lr: float = 0.005
  theta_beta1: float = 0.0
  theta_beta2: float = 0.999
  alpha: float = 1e-5
  beta: float = 2.0
  tau: float = 300.0
  prune_threshold: float = -2.0
  mixed_precision: Optional[str] = None    # None, 'bfloat16' or 'float16'
  sync_bn: bool = False
  checkpoint_every: int = 200
  log_every: int = 20
  seed: int = 0
  progress: bool = True

  def validate(self):
    if self.gate_sampling not in ("uniform", "theta"):
      raise ConfigError(f"gate_sampling must be 'uniform' or 'theta', got {self.gate_sampling!r}")
    if self.mixed_precision not in (None, "", "bfloat16", "float16"):
      raise ConfigError(f"mixed_precision must be bfloat16 or float16, got {self.mixed_precision!r}")
    if self.theta_every < 1:
      raise ConfigError(f"theta_every must be >= 1, got {self.theta_every}")
    if self.global_batch < 1 or self.epochs <= 0:
      raise ConfigError("global_batch and epochs must be positive")
    if self.beta <= 0:
      raise ConfigError(f"beta must be > 0, got {self.beta}")


class CheckpointError(ConfigError):
  """No checkpoint of a run directory can be read back."""


def restore_newest_intact(checkpoint: tf.train.Checkpoint, manager: tf.train.CheckpointManager,
                          fix: str) -> Optional[str]:
  """Restores the newest checkpoint that reads back whole; returns its path (None: none yet).

  A checkpoint cut short (a full disk, a copy interrupted, a bad sector) must not end
  a week-long run: the older one the manager keeps is tried next, with a warning
  naming what was skipped. The unreadable files are left in place (the next save of
  that step number overwrites them). When none can be read, CheckpointError says so
  and `fix` says what to do.
  """
  paths = list(reversed(manager.checkpoints))
  if not paths:
    return None
  skipped = []
  for path in paths:
    try:
      checkpoint.restore(path).assert_existing_objects_matched()
    except (tf.errors.OpError, ValueError, AssertionError, IndexError, OSError,
            RuntimeError) as e:
      reason = (str(getattr(e, "message", e)).strip().splitlines() or [type(e).__name__])[0]
      skipped.append(f"{os.path.basename(path)} ({reason[:200]})")
      logging.warning("checkpoint %s cannot be read back (%s); trying an older one", path,
                      reason[:200])
      continue
    if skipped:
      logging.warning("resumed from %s, the newest intact checkpoint; skipped: %s", path,
                      "; ".join(skipped))
    return path
  raise CheckpointError(f"no checkpoint in {manager.directory} can be read back "
                        f"({'; '.join(skipped)}); {fix}")


def save_checkpoint(manager: tf.train.CheckpointManager, number: int) -> str:
  """`manager.save`, leaving no temporary files behind when the write fails (full disk).

  TensorFlow writes `ckpt-N_temp/` and then merges it into `ckpt-N.*`; a failure in
  between would leave that folder (and unreferenced `ckpt-N.*` parts) behind.
  """
  try:
    return manager.save(checkpoint_number=number)
  except BaseException:
    directory = manager.directory
    prefix = os.path.join(directory, f"ckpt-{number}")
    referenced = prefix in manager.checkpoints
    for name in os.listdir(directory) if os.path.isdir(directory) else []:
      path = os.path.join(directory, name)
      litter = (name.startswith(f"ckpt-{number}_temp") or name.startswith("checkpoint.tmp")
                or (not referenced and name.startswith(f"ckpt-{number}.")))
      if litter:
        try:
          shutil.rmtree(path) if os.path.isdir(path) else os.remove(path)
        except OSError:
          pass
    raise


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
      for i, group in enumerate(self._groups):
        if not group:
          continue

        def op_catch_up(_, i=i, group=group):
          def run():
            for v in group:
              a = tf.cast(p[i, 0 if self._decayed(v) else 1], v.dtype)
              m = self._momentum(v)
              w0 = tf.raw_ops.ReadVariableOp(resource=v.handle, dtype=v.dtype)
              m0 = tf.raw_ops.ReadVariableOp(resource=m.handle, dtype=m.dtype)
              tf.raw_ops.AssignVariableOp(resource=v.handle, value=a[0, 0] * w0 + a[0, 1] * m0)
              tf.raw_ops.AssignVariableOp(resource=m.handle, value=a[1, 0] * w0 + a[1, 1] * m0)
            return tf.no_op()
          return tf.cond(do[i], run, tf.no_op)

        strategy.extended.update(group[0], op_catch_up, group=False)
      reset = tf.reshape(do, [-1, 1, 1, 1])
      strategy.extended.update(self.pending, lambda v: v.assign(tf.where(reset, self._eye, v)),
                               group=False)

  def get_config(self):
    cfg = super().get_config()
    cfg.update(l2=self.l2, skip_off_ops=self.skip_off_ops)
    return cfg


def check_strategy(config: TrainConfig, strategy) -> None:
  """Raises ConfigError when `config` cannot train under `strategy` (before any write).

  --sync_bn is refused under MultiWorkerMirroredStrategy whatever its size, also as a
  single worker without TF_CONFIG: a run must not be accepted or refused depending on
  how many workers happen to be up, and the candidate ops' batch norms run inside the
  tf.cond that skips an inactive branch, where moments are summed over local devices
  only.
  """
  replicas = strategy.num_replicas_in_sync
  reason = sync_bn_lib.unsupported_reason(strategy) if config.sync_bn else None
  if reason is None and isinstance(strategy, tf.distribute.MultiWorkerMirroredStrategy):
    check_strategy_name(config, "multi_worker")
  _refuse_sync_bn(reason)
  if config.global_batch % replicas:
    raise ConfigError(f"global batch {config.global_batch} is not divisible by {replicas} "
                      "replicas")


def check_strategy_name(config: TrainConfig, name: str) -> None:
  """The part of `check_strategy` known from the strategy's name, before it is built."""
  if config.sync_bn and name == "multi_worker":
    _refuse_sync_bn("is not supported under --strategy=multi_worker (with or without "
                    "TF_CONFIG)")


def _refuse_sync_bn(reason: Optional[str]) -> None:
  if reason:
    raise ConfigError(
        f"sync_bn {reason}: the candidate ops' batch norms run inside the tf.cond that "
        "skips an inactive branch, and moments are summed there only over local devices. "
        "Drop --sync_bn (per-replica batch norm, ≥ 32 images per replica) for multi_worker")


@dataclasses.dataclass
class RoundResult:
  model: supernet_lib.Supernet
  alive: List[np.ndarray]
  thetas: List[np.ndarray]
  pruned: List[Dict[str, Any]]
  steps: int
  history: List[Dict[str, float]]


class RoundTrainer:
  """Builds the supernet of a round under `strategy` and trains it, resumably.

  Args:
    config: TrainConfig.
    strategy: a tf.distribute strategy (distribute.get_strategy()).
    data: nse_tf.data.ImageData (train and holdout pipelines).
    cost_table: per-op cost table (cost.CostTable or a latency table).
    space, macro, working_sets, protected: the round's search space; `protected[l]`
      flags, per working-set position, the ops of A_l (never pruned this round).
    num_classes, resolution, scale, activation: network options.
    model_dir: where checkpoints and TensorBoard logs of this round go (None:
      no checkpoints).
  """

  def __init__(self, config: TrainConfig, strategy, data, cost_table, *, space: str,
               macro: str, working_sets: Sequence[Sequence[int]],
               protected: Optional[Sequence[Sequence[bool]]] = None, num_classes: int,
               resolution: int, scale: float = 1.0, activation: str = "relu",
               model_dir: Optional[str] = None, tb_dir: Optional[str] = None):
    config.validate()
    self.cfg = config
    self.strategy = strategy
    self.data = data
    self.model_dir = model_dir
    self.kinds = [l.kind for l in _resolved_layers(macro, resolution, scale)]
    self.working_sets = [list(ws) for ws in working_sets]
    self.protected = ([list(map(bool, p)) for p in protected] if protected is not None else
                      [[False] * len(ws) for ws in self.working_sets])
    check_strategy(config, strategy)
    spe = config.steps_per_epoch or max(1, data.info.num_train // config.global_batch)
    self.steps_per_epoch = spe
    self.total_steps = max(1, int(round(config.epochs * spe)))
    warmup = int(round(config.warmup_epochs * spe))

    keras.utils.set_random_seed(config.seed)
    policy_before = keras.mixed_precision.global_policy()
    if config.mixed_precision:
      keras.mixed_precision.set_global_policy(f"mixed_{config.mixed_precision}")
    try:
      with strategy.scope():
        self.model = supernet_lib.Supernet(
            space, macro, self.working_sets, cost_table, num_classes, resolution, scale,
            activation=activation, sync_bn=config.sync_bn)
        self.model.build_all()
        self.lr_schedule = WarmupCosine(config.lr, self.total_steps, warmup,
                                        config.warmup_start_lr)
        opt = SearchSGD(self.lr_schedule, config.momentum, config.nesterov,
                        l2=config.weight_decay, skip_off_ops=config.skip_off_ops)
        if config.mixed_precision == "float16":
          opt = keras.mixed_precision.LossScaleOptimizer(opt)
        self.weight_opt = opt
        # The SGD itself (inside the loss-scale wrapper under float16).
        self.sgd = opt.inner_optimizer if config.mixed_precision == "float16" else opt
        self.theta_opt = keras.optimizers.Adam(config.theta_lr, beta_1=config.theta_beta1,
                                               beta_2=config.theta_beta2, epsilon=1e-8)
        self.weight_opt.build(self.model.weight_variables)
        self.theta_opt.build(self.model.theta_variables)
        self.sgd.set_op_groups(self.model.op_variable_groups())
        self.step = tf.Variable(0, dtype=tf.int64, trainable=False, name="step")
        n = self.model.total_ops
        self.alive_var = tf.Variable(np.ones(n, bool), trainable=False, name="alive")
        self.rng_var = tf.Variable("", trainable=False, name="host_rng")
        self.log_var = tf.Variable("[]", trainable=False, name="prune_log")
    finally:
      keras.mixed_precision.set_global_policy(policy_before)

    self.sampler = supernet_lib.GateSampler(self.kinds, [len(ws) for ws in self.working_sets],
                                            seed=config.seed)
    self.train_iter = self._iterator("train", config.seed, 0)
    self.holdout_iter = self._iterator("holdout", config.seed + 1, 0)
    state = dict(model=self.model, weight_opt=self.weight_opt, theta_opt=self.theta_opt,
                 step=self.step, alive=self.alive_var, host_rng=self.rng_var,
                 prune_log=self.log_var)
    # Iterators are checkpointed where the strategy supports it; elsewhere (e.g.
    # MirroredStrategy) the deterministic pipelines are rebuilt and skipped forward.
    self._iterators_in_checkpoint = all(
        isinstance(it, tf.__internal__.tracking.Trackable)
        for it in (self.train_iter, self.holdout_iter))
    if self._iterators_in_checkpoint:
      state.update(train_iter=self.train_iter, holdout_iter=self.holdout_iter)
    self.checkpoint = tf.train.Checkpoint(**state)
    self.manager = (tf.train.CheckpointManager(self.checkpoint, model_dir, max_to_keep=2)
                    if model_dir else None)
    self.writer = tf.summary.create_file_writer(tb_dir) if tb_dir else None
    self._weight_step = self._make_weight_step()
    self._theta_step = self._make_theta_step()
    # Inlined into both steps, not called there as one shared tf.function: a nested
    # function call that updates the weights was not ordered before the θ step's
    # read-only uses of them (θ drifted by 1e-3 over 120 steps of the demo).
    self._catch_up_all = tf.function(self.sgd.catch_up, autograph=False)
    self.history: List[Dict[str, float]] = []
    self.restored = self._restore()

  # ------------------------------------------------------------ checkpoints
  def _restore(self) -> bool:
    if not self.manager:
      return False
    restored = restore_newest_intact(
        self.checkpoint, self.manager,
        f"delete {self.model_dir} to train this round again from its start (the search "
        "resumes there), or start over with --overwrite")
    if restored is None:
      return False
    self.sampler.state = self.rng_var.numpy().decode()
    if not self._iterators_in_checkpoint:
      step = int(self.step.numpy())
      self.train_iter = self._iterator("train", self.cfg.seed, step)
      self.holdout_iter = self._iterator("holdout", self.cfg.seed + 1,
                                         step // self.cfg.theta_every)
    logging.info("resumed round training at step %d from %s", int(self.step.numpy()), restored)
    if int(self.step.numpy()) >= self.total_steps:
      self._catch_up_all()   # a finished round: the weights its candidates are evaluated with
    return True

  def _iterator(self, split: str, seed: int, skip_steps: int):
    """Distributed iterator over `split`, `skip_steps` global batches already consumed."""
    fn = self.data.dataset_fn(split, self.cfg.global_batch, seed=seed)

    def skipped(ctx):
      ds = fn(ctx)
      if skip_steps:
        ds = ds.skip(skip_steps * ctx.num_replicas_in_sync // ctx.num_input_pipelines)
      return ds

    return iter(self.strategy.distribute_datasets_from_function(skipped))

  def save(self):
    if not self.manager:
      return
    self.rng_var.assign(self.sampler.state)
    save_checkpoint(self.manager, int(self.step.numpy()))

  # -------------------------------------------------------------- host state
  def alive_masks(self) -> List[np.ndarray]:
    flat = self.alive_var.numpy()
    return [flat[a:b].copy() for a, b in zip(self.model.offsets[:-1], self.model.offsets[1:])]

  @property
  def pruned(self) -> List[Dict[str, Any]]:
    return json.loads(self.log_var.numpy().decode())

  # --------------------------------------------------------- compiled steps
  def _make_weight_step(self):
    model, opt, strategy = self.model, self.weight_opt, self.strategy
    gb = float(self.cfg.global_batch)
    fp16 = self.cfg.mixed_precision == "float16"

    def step_fn(images, labels, gates):
      wvars = model.weight_variables
      with tf.GradientTape() as tape:
        logits = model(images, gates=gates, training=True)
        ce = keras.losses.sparse_categorical_crossentropy(labels, logits, from_logits=True)
        loss = tf.reduce_sum(ce) / gb
        scaled = opt.get_scaled_loss(loss) if fp16 else loss
      grads = tape.gradient(scaled, wvars)
      if fp16:
        grads = opt.get_unscaled_gradients(grads)
      grads = [tf.zeros_like(v) if g is None else g for g, v in zip(grads, wvars)]
      opt.apply_gradients(zip(grads, wvars))
      correct = tf.reduce_sum(tf.cast(tf.equal(tf.argmax(logits, -1, output_type=tf.int32),
                                               tf.cast(labels, tf.int32)), tf.float32))
      return loss, correct

    sgd = self.sgd

    @tf.function(autograph=False)
    def weight_step(iterator, gates):
      sgd.catch_up(gates)          # deferred off-step updates of the ops about to run
      images, labels = next(iterator)
      with sgd.gated(gates):
        loss, correct = strategy.run(step_fn, args=(images, labels, gates))
      return (strategy.reduce(tf.distribute.ReduceOp.SUM, loss, axis=None),
              strategy.reduce(tf.distribute.ReduceOp.SUM, correct, axis=None) / gb)

    return weight_step

  def _make_theta_step(self):
    model, opt, strategy, cfg = self.model, self.theta_opt, self.strategy, self.cfg
    gb = float(cfg.global_batch)
    replicas = float(strategy.num_replicas_in_sync)

    def step_fn(images, labels, g1, g2, same, alive):
      tvars = model.theta_variables
      with tf.GradientTape() as tape:
        logits, expected = model.call_theta(images, g1, g2, same, alive, training=True)
        ce = keras.losses.sparse_categorical_crossentropy(labels, logits, from_logits=True)
        ce = tf.reduce_sum(ce) / gb
        reg = cfg.alpha * tf.pow(tf.abs(expected - cfg.tau), cfg.beta)
        loss = ce + reg / replicas
      grads = tape.gradient(loss, tvars)
      grads = [tf.zeros_like(v) if g is None else g for g, v in zip(grads, tvars)]
      opt.apply_gradients(zip(grads, tvars))
      return ce, reg / replicas, expected / replicas

    sgd = self.sgd

    @tf.function(autograph=False)
    def theta_step(iterator, g1, g2, same, alive):
      sgd.catch_up(tf.maximum(g1, g2))
      images, labels = next(iterator)
      out = strategy.run(step_fn, args=(images, labels, g1, g2, same, alive))
      return tuple(strategy.reduce(tf.distribute.ReduceOp.SUM, o, axis=None) for o in out)

    return theta_step

  # -------------------------------------------------------------------- loop
  def train(self, stop_at: Optional[int] = None) -> RoundResult:
    """Trains to the end of the round (or up to step `stop_at`, for tests)."""
    cfg = self.cfg
    end = self.total_steps if stop_at is None else min(stop_at, self.total_steps)
    alive = self.alive_masks()
    pruned = self.pruned
    step = int(self.step.numpy())
    progbar = None
    last: Dict[str, float] = {}
    while step < end:
      if cfg.progress and (progbar is None or step % self.steps_per_epoch == 0):
        epoch = step // self.steps_per_epoch
        print(f"epoch {epoch + 1}/{math.ceil(self.total_steps / self.steps_per_epoch)}")
        progbar = keras.utils.Progbar(min(self.steps_per_epoch,
                                          self.total_steps - epoch * self.steps_per_epoch),
                                      stateful_metrics=["loss", "acc", "cost", "alive"])
      thetas = self.model.thetas_numpy()
      probs = ([supernet_lib.keep_prob(t) for t in thetas]
               if cfg.gate_sampling == "theta" else None)
      gates = self.sampler.weight_gates(alive, probs)
      loss, acc = self._weight_step(self.train_iter, tf.constant(gates))
      last = {"loss": float(loss), "acc": float(acc)}
      step += 1
      if step % cfg.theta_every == 0:
        g1, g2, same = self.sampler.theta_gates(alive, self.model.thetas_numpy())
        alive_flat = np.concatenate(alive).astype(np.float32)
        ce, reg, expected = self._theta_step(self.holdout_iter, tf.constant(g1),
                                             tf.constant(g2), tf.constant(same),
                                             tf.constant(alive_flat))
        last.update(theta_ce=float(ce), reg=float(reg), cost=float(expected))
      protected = self.protected
      for l, i in supernet_lib.prune(self.model.thetas_numpy(), alive, self.kinds, protected,
                                     cfg.prune_threshold):
        event = {"layer": l, "op": self.model.mbls[l].op_names[i], "step": step,
                 "theta": float(self.model.mbls[l].theta.numpy()[i])}
        pruned.append(event)
        logging.info("step %d: pruned %s from layer %d (θ = %.3f)", step, event["op"], l,
                     event["theta"])
        self._summary_text(f"pruned {event['op']} from layer {l} (θ = {event['theta']:.3f})", step)
      self.step.assign(step)
      self.alive_var.assign(np.concatenate(alive) if alive else np.zeros(0, bool))
      self.log_var.assign(json.dumps(pruned))
      last["alive"] = float(sum(a.sum() for a in alive))
      self.history.append({"step": step, **last})
      if self.writer and (step % cfg.log_every == 0 or step == end):
        self._summaries(step, last)
      if progbar is not None:
        progbar.update(step - (step - 1) // self.steps_per_epoch * self.steps_per_epoch,
                       [(k, v) for k, v in last.items() if k in ("loss", "acc", "cost", "alive")])
      if self.manager and (step % cfg.checkpoint_every == 0 or step == end):
        self.save()
    self._catch_up_all()   # the weights as if every off step had been applied
    return RoundResult(self.model, self.alive_masks(), self.model.thetas_numpy(), self.pruned,
                       int(self.step.numpy()), self.history)

  def _summaries(self, step: int, last: Dict[str, float]):
    with self.writer.as_default(step=step):
      for k, v in last.items():
        tf.summary.scalar(f"round/{k}", v)
      tf.summary.scalar("round/lr", float(self.lr_schedule(step)))
      for mbl in self.model.mbls:
        p = supernet_lib.keep_prob(mbl.theta.numpy())
        for name, value in zip(mbl.op_names, p):
          tf.summary.scalar(f"p/{mbl.name}/{name}", float(value))
    self.writer.flush()

  def _summary_text(self, text: str, step: int):
    if self.writer:
      with self.writer.as_default(step=step):
        tf.summary.text("pruning", text)


def _resolved_layers(macro, resolution, scale):
  from nse_tf import spaces  # pylint: disable=g-import-not-at-top
  return spaces.resolve_macro(macro, resolution, scale).layers
