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

import dataclasses
import json
import threading
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np
import tensorflow as tf
import tf_keras as keras
from absl import logging

from nse_tf import loop
from nse_tf import supernet as supernet_lib
from nse_tf import sync_bn as sync_bn_lib
from nse_tf import train_config as train_config_lib


# The configuration lives in a TensorFlow-free module (the commands build it before
# TensorFlow starts); these names stay importable from here.
ConfigError = train_config_lib.ConfigError
TrainConfig = train_config_lib.TrainConfig


class _Background:
  """Runs `fn` in a daemon thread; `join()` waits and re-raises what it raised."""

  def __init__(self, fn, name: str):
    self._error: Optional[BaseException] = None
    self._thread = threading.Thread(target=self._run, args=(fn,), name=name, daemon=True)
    self._thread.start()

  def _run(self, fn):
    try:
      fn()
    except BaseException as e:  # pylint: disable=broad-except  (re-raised by join)
      self._error = e

  def join(self) -> None:
    self._thread.join()
    if self._error is not None:
      raise self._error


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
    if config.gate_sampling == "interval" and config.gate_interval is None:
      raise ConfigError("--gate_sampling=interval draws the weight steps' paths inside the "
                        "search's cost interval; run it with python -m nse_tf.search "
                        "(--interval), or pick another --gate_sampling")
    self.cfg = config
    self.strategy = strategy
    self.data = data
    self.model_dir = model_dir
    self.kinds = [l.kind for l in _resolved_layers(macro, resolution, scale)]
    self.working_sets = [list(ws) for ws in working_sets]
    self.protected = ([list(map(bool, p)) for p in protected] if protected is not None else
                      [[False] * len(ws) for ws in self.working_sets])
    check_strategy(config, strategy)
    self.schedule = loop.Schedule.of(config, data.info.num_train)
    self.steps_per_epoch = self.schedule.steps_per_epoch
    self.total_steps = self.schedule.total_steps

    keras.utils.set_random_seed(config.seed)
    with loop.build_policy(config.mixed_precision), strategy.scope():
      self.model = supernet_lib.Supernet(
          space, macro, self.working_sets, cost_table, num_classes, resolution, scale,
          activation=activation, sync_bn=config.sync_bn)
      self.model.build_all()
      # self.sgd: the SearchSGD itself (inside the loss-scale wrapper under float16).
      self.lr_schedule, self.weight_opt, self.sgd = loop.build_sgd(
          config, self.schedule, skip_off_ops=config.skip_off_ops)
      self.theta_opt = keras.optimizers.Adam(config.theta_lr, beta_1=config.theta_beta1,
                                             beta_2=config.theta_beta2, epsilon=1e-8)
      self.weight_opt.build(self.model.weight_variables)
      self.theta_opt.build(self.model.theta_variables)
      self.sgd.set_op_groups(self.model.op_variable_groups())
      self.step = tf.Variable(0, dtype=tf.int64, trainable=False, name="step")
      n = self.model.total_ops
      self.alive_var = tf.Variable(np.ones(n, bool), trainable=False, name="alive")
    # Host state as strings, outside the strategy: MultiWorkerMirroredStrategy broadcasts
    # a distributed variable's initial value, and collectives carry no strings. Every
    # worker derives the same values (same seed, same steps), so nothing needs syncing.
    self.rng_var = tf.Variable("", trainable=False, name="host_rng")
    self.log_var = tf.Variable("[]", trainable=False, name="prune_log")

    self.sampler = supernet_lib.GateSampler(self.kinds, [len(ws) for ws in self.working_sets],
                                            seed=config.seed)
    self._gate_interval = None
    if config.gate_sampling == "interval":
      # The supernet's own cost table: what its θ step's expected cost is made of.
      self._gate_interval = supernet_lib.CostInterval(
          [m.op_costs.numpy() for m in self.model.mbls], self.model.fixed_cost,
          *config.gate_interval)
      # A probe with its own generator (the round's draws stay as they are): refuse a
      # space whose p = 0.5 paths never cost within the interval (e.g. the flops macro's,
      # all far above ImageNet's (300, 350) MFLOPs) rather than train on the nearest.
      share, cheapest, dearest = supernet_lib.GateSampler(
          self.kinds, self.sampler.sizes, seed=config.seed + 1).interval_share(
              [np.ones(n, bool) for n in self.sampler.sizes], self._gate_interval)
      if share == 0.0:
        lo, hi = config.gate_interval
        costs = (f" (they cost {cheapest:.4g}..{dearest:.4g})" if np.isfinite(cheapest)
                 else "")
        raise ConfigError(
            f"--gate_sampling=interval: none of {supernet_lib.INTERVAL_DRAWS:,} p = 0.5 paths "
            f"of this round's space costs within ({lo:g}, {hi:g}){costs}; use "
            "--gate_sampling=uniform, or an --interval those paths reach")
    self.train_iter = self._iterator("train", config.seed, 0)
    self.holdout_iter = self._iterator("holdout", config.seed + 1, 0)
    state = dict(model=self.model, weight_opt=self.weight_opt, theta_opt=self.theta_opt,
                 step=self.step, alive=self.alive_var, host_rng=self.rng_var,
                 prune_log=self.log_var)
    # Iterators are checkpointed where the strategy supports it; elsewhere (e.g.
    # MirroredStrategy) the deterministic pipelines are rebuilt and skipped forward.
    self._iterators_in_checkpoint = loop.iterators_checkpointable(self.train_iter,
                                                                  self.holdout_iter)
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
    # The round-end catch-up runs once per round: eagerly (a fraction of a second,
    # the same element-wise arithmetic) rather than compiled (12 s of tracing and
    # graph optimisation for the flops supernet at 224x224); compiled on TPUs.
    self._catch_up_all = (tf.function(self.sgd.catch_up, autograph=False)
                          if isinstance(strategy, tf.distribute.TPUStrategy)
                          else self.sgd.catch_up)
    self.history: List[Dict[str, float]] = []
    self.restored = self._restore()

  # ------------------------------------------------------------ checkpoints
  def _restore(self) -> bool:
    if not self.manager:
      return False
    restored = loop.restore_newest_intact(
        self.checkpoint, self.manager,
        f"delete {self.model_dir} to train this round again from its start (the search "
        "resumes there), or start over with --overwrite", strategy=self.strategy)
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
    return loop.distributed_iterator(
        self.strategy, self.data.dataset_fn(split, self.cfg.global_batch, seed=seed), skip_steps)

  def save(self):
    if not self.manager:
      return
    self.rng_var.assign(self.sampler.state)
    loop.save_checkpoint(self.manager, int(self.step.numpy()))

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
        scaled = loop.scaled_loss(loss, opt, fp16)
      grads = loop.gradients(tape, scaled, wvars, opt, fp16, zeros_for_none=True)
      loop.apply_gradients(opt, zip(grads, wvars), strategy)
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
      loop.apply_gradients(opt, zip(grads, tvars), strategy)
      return ce, reg / replicas, expected / replicas

    sgd = self.sgd

    @tf.function(autograph=False)
    def theta_step(iterator, g1, g2, same, alive):
      sgd.catch_up(tf.maximum(g1, g2))
      images, labels = next(iterator)
      out = strategy.run(step_fn, args=(images, labels, g1, g2, same, alive))
      return tuple(strategy.reduce(tf.distribute.ReduceOp.SUM, o, axis=None) for o in out)

    return theta_step

  def _trace_ahead(self, also: Optional[Callable[[], None]] = None
                   ) -> Tuple[Optional[_Background], List[_Background]]:
    """Traces the θ step in a background thread while the weight step's first call
    optimises its graph and runs (the round-end catch-up is eager here: compiled only
    under TPUStrategy, where there is no trace-ahead).

    A compiled step's first call is Python tracing (holds the GIL) and then graph
    optimisation and the first run (C++, without the GIL). Tracing the weight step
    here, then the others in a thread during its first call, overlaps the two on a CPU
    with two or more cores. On the 2-core CPU the flops supernet's first three steps
    (build, two weight steps, a θ step, the catch-up) took 114-122 s instead of
    139-149 s at 224x224, K = 5, batch 8 (peak memory +3 %), and 14 s less at 32x32,
    K = 3; results bit-identical, since the functions and their input signatures are
    those the loop calls them with. Not under multi-worker or TPU strategies, where
    every worker must create its collective ops in one order.

    `also` (e.g. tracing the round's candidate evaluation) runs in a second thread once
    the θ step is traced; the loop waits for it at the round's end. Returns the θ
    thread (joined before the first θ step) and the list that receives the other.
    """
    later: List[_Background] = []
    if (self._weight_step.experimental_get_tracing_count() or
        isinstance(self.strategy, (tf.distribute.MultiWorkerMirroredStrategy,
                                   tf.distribute.TPUStrategy))):
      return None, later
    n, layers = self.model.total_ops, len(self.model.mbls)
    gates = tf.TensorSpec([n], tf.float32)
    self._weight_step.get_concrete_function(self.train_iter, gates)

    def trace():
      self._theta_step.get_concrete_function(self.holdout_iter, gates, gates,
                                             tf.TensorSpec([layers], tf.bool), gates)
      if also is not None:
        later.append(_Background(also, name="nse-trace-ahead-2"))

    return _Background(trace, name="nse-trace-ahead"), later

  # -------------------------------------------------------------------- loop
  def train(self, stop_at: Optional[int] = None,
            trace_also: Optional[Callable[[], None]] = None) -> RoundResult:
    """Trains to the end of the round (or up to step `stop_at`, for tests).

    trace_also: work to overlap with training where the loop traces ahead (tracing
    what runs after the round); it must not change any state the round reads.
    """
    cfg = self.cfg
    end = self.total_steps if stop_at is None else min(stop_at, self.total_steps)
    alive = self.alive_masks()
    pruned = self.pruned
    step = int(self.step.numpy())
    progress = loop.EpochProgress(self.schedule, ["loss", "acc", "cost", "alive"], cfg.progress)
    last: Dict[str, float] = {}
    ahead, later = self._trace_ahead(trace_also) if step < end else (None, [])
    while step < end:
      progress.start_step(step)
      thetas = self.model.thetas_numpy()
      probs = ([supernet_lib.keep_prob(t) for t in thetas]
               if cfg.gate_sampling == "theta" else None)
      gates = self.sampler.weight_gates(alive, probs, count=cfg.gate_sampling == "count",
                                        within=self._gate_interval)
      loss, acc = self._weight_step(self.train_iter, tf.constant(gates))
      last = {"loss": float(loss), "acc": float(acc)}
      step += 1
      if step % cfg.theta_every == 0:
        if ahead is not None:
          ahead.join()
          ahead = None
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
      progress.end_step(step, last)
      if self.manager and (step % cfg.checkpoint_every == 0 or step == end):
        self.save()
    if ahead is not None:
      ahead.join()
    for work in later:
      work.join()
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
