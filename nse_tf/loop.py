"""The training-loop core shared by the supernet round (trainer.py) and the retrain (retrain.py).

Both loops run on the host, one compiled distributed step per iteration, and share:
  Schedule            steps per epoch, total and warm-up steps from epochs and the data
  build_policy()      the mixed-precision policy while the model and optimiser are built
                      (the global policy is restored afterwards, even on an error)
  build_sgd()         optim.WarmupCosine + optim.SearchSGD (+ the float16 loss-scale wrapper)
  gradients()         loss scaling under float16, and zeros for variables without gradient
  distributed_iterator()  a strategy's iterator over a dataset_fn, `skip` global batches on
  iterators_checkpointable()  whether tf.train.Checkpoint can hold the iterators
  restore_newest_intact(), save_checkpoint()  resume from the newest readable checkpoint
                      (the same step on every worker);
                      a failed save (full disk) leaves no partial files
  EpochProgress       "epoch i/n" and a Keras progress bar per epoch
  fewer_gc_passes()   Python's cyclic collector rarely while a round builds and traces its
                      steps, then one full collection
"""

from __future__ import annotations

import contextlib
import dataclasses
import gc
import math
import os
import shutil
from typing import Any, Callable, Dict, Iterator, Optional, Sequence

import numpy as np
import tensorflow as tf
import tf_keras as keras
from absl import logging

from nse_tf import errors
from nse_tf import optim


class CheckpointError(errors.NSEError):
  """No checkpoint of a run directory can be read back."""


# ------------------------------------------------------------------ schedule
@dataclasses.dataclass(frozen=True)
class Schedule:
  steps_per_epoch: int
  total_steps: int
  warmup_steps: int

  @classmethod
  def of(cls, cfg, num_train: int) -> "Schedule":
    """From a config with global_batch, epochs, steps_per_epoch (None: one pass), warmup_epochs."""
    spe = cfg.steps_per_epoch or max(1, num_train // cfg.global_batch)
    return cls(spe, max(1, int(round(cfg.epochs * spe))), int(round(cfg.warmup_epochs * spe)))

  @property
  def epochs(self) -> int:
    return math.ceil(self.total_steps / self.steps_per_epoch)


# ------------------------------------------------------ building the model
@contextlib.contextmanager
def build_policy(mixed_precision: Optional[str]) -> Iterator[None]:
  """`mixed_<bfloat16|float16>` while building (None: unchanged); restored afterwards."""
  before = keras.mixed_precision.global_policy()
  if mixed_precision:
    keras.mixed_precision.set_global_policy(f"mixed_{mixed_precision}")
  try:
    yield
  finally:
    keras.mixed_precision.set_global_policy(before)


# While a round builds and traces: the young generation is scanned every 100,000 net
# allocations instead of CPython's 700, and the older ones rarely.
FEWER_GC_THRESHOLDS = (100_000, 50, 1000)


@contextlib.contextmanager
def fewer_gc_passes() -> Iterator[None]:
  """Python's cyclic garbage collector rarely inside; its thresholds restored and one full
  collection on the way out (also on an error).

  Building a supernet and tracing its steps creates millions of Python objects that live
  as long as the round (layers, the traced graphs), and with CPython's default thresholds
  (700, 10, 10) the collector scans them over and over: 4,741 young, 431 middle and 16 full
  passes in a 224x224 flops round's build, two weight steps and a θ step, about 8 % of its
  CPU time. Nothing computed changes; the round's cyclic garbage (its traced graphs, once
  its trainer is dropped) is freed by the collection on exit, so wrap the code that drops
  the round's objects too.
  """
  old = gc.get_threshold()
  gc.set_threshold(*FEWER_GC_THRESHOLDS)
  try:
    yield
  finally:
    gc.set_threshold(*old)
    gc.collect()


def build_sgd(cfg, schedule: Schedule, skip_off_ops: bool = False):
  """(lr schedule, optimiser, the SearchSGD inside it) for a config with lr,
  warmup_start_lr, momentum, nesterov, weight_decay and mixed_precision.

  Under float16 the optimiser is a LossScaleOptimizer around the SearchSGD.
  """
  lr = optim.WarmupCosine(cfg.lr, schedule.total_steps, schedule.warmup_steps,
                          cfg.warmup_start_lr)
  sgd = optim.SearchSGD(lr, cfg.momentum, cfg.nesterov, l2=cfg.weight_decay,
                        skip_off_ops=skip_off_ops)
  opt = keras.mixed_precision.LossScaleOptimizer(sgd) if cfg.mixed_precision == "float16" \
      else sgd
  return lr, opt, sgd


def gradients(tape: tf.GradientTape, loss, variables: Sequence[tf.Variable], optimizer,
              loss_scale: bool, zeros_for_none: bool = False):
  """d loss / d variables, through the float16 loss scale when `loss_scale` is on.

  Call after the tape's `with` block; with loss_scale the loss must have been scaled
  inside it (`scaled_loss`).
  """
  grads = tape.gradient(loss, variables)
  if loss_scale:
    grads = optimizer.get_unscaled_gradients(grads)
  if zeros_for_none:   # ops that did not run: a zero gradient (the reference's semantics)
    grads = [tf.zeros_like(v) if g is None else g for g, v in zip(grads, variables)]
  return grads


def apply_gradients(optimizer, grads_and_vars, strategy) -> None:
  """optimizer.apply_gradients inside strategy.run, without the cross-replica sum where
  there is only one replica (nothing to sum: the same update).

  tf_keras sums through ReplicaContext.all_reduce, a tf.custom_gradient, which in a traced
  graph registers a gradient function in TensorFlow's global registry that is never
  removed and holds the step's tensors: every traced step's whole graph then stayed in
  memory until the process ended, and a search traces new steps every round (~0.5 GB
  each for the flops supernet's weight and θ steps). Under MirroredStrategy tf_keras sums
  through merge_call, which registers nothing.
  """
  optimizer.apply_gradients(grads_and_vars,
                            skip_gradients_aggregation=strategy.num_replicas_in_sync == 1)


def scaled_loss(loss, optimizer, loss_scale: bool):
  return optimizer.get_scaled_loss(loss) if loss_scale else loss


# ------------------------------------------------------------------- input
def distributed_iterator(strategy, dataset_fn: Callable, skip: int = 0,
                         map_fn: Optional[Callable] = None):
  """iter() over strategy.distribute_datasets_from_function(dataset_fn), with the first
  `skip` global batches dropped (a resume where iterators are not checkpointed) and
  `map_fn` applied to every batch."""

  def dataset(ctx):
    ds = dataset_fn(ctx)
    if skip:
      ds = ds.skip(skip * ctx.num_replicas_in_sync // ctx.num_input_pipelines)
    if map_fn is not None:
      ds = ds.map(map_fn, num_parallel_calls=tf.data.AUTOTUNE).prefetch(tf.data.AUTOTUNE)
    return ds

  return iter(strategy.distribute_datasets_from_function(dataset))


def iterators_checkpointable(*iterators) -> bool:
  """Whether tf.train.Checkpoint can save these iterators (not so for MirroredStrategy's).

  There is no public test for "is trackable"; this is the one place that uses
  tf.__internal__ for it, checked by tests/test_trainer.py.
  """
  trackable = tf.__internal__.tracking.Trackable
  return all(isinstance(it, trackable) for it in iterators)


# ------------------------------------------------------------- checkpoints
def restore_newest_intact(checkpoint: tf.train.Checkpoint, manager: tf.train.CheckpointManager,
                          fix: str, strategy=None) -> Optional[str]:
  """Restores the newest checkpoint that reads back whole; returns its path (None: none yet).

  A checkpoint cut short (a full disk, a copy interrupted, a bad sector) must not end
  a week-long run: the older one the manager keeps is tried next, with a warning
  naming what was skipped. The unreadable files are left in place (the next save of
  that step number overwrites them). When none can be read, CheckpointError says so
  and `fix` says what to do.

  Under MultiWorkerMirroredStrategy (`strategy`) every worker must resume at the same
  step; a worker killed during a save may hold one checkpoint fewer than the others.
  The workers exchange their newest intact step and all resume at the lowest
  (`agree_across_workers`).
  """
  path = _restore_newest_local(checkpoint, manager, fix)
  steps = steps_of_workers(strategy, checkpoint_step(path))
  return path if steps is None else agree_across_workers(checkpoint, manager, path, steps, fix)


def checkpoint_step(path: Optional[str]) -> int:
  """The number of a `ckpt-N` path; -1 for None (no checkpoint)."""
  return -1 if path is None else int(path.rsplit("-", 1)[1])


def steps_of_workers(strategy, step: int) -> Optional[Dict[int, int]]:
  """{worker index: its `step`}, exchanged with a collective; None with one worker."""
  from nse_tf import distribute  # pylint: disable=g-import-not-at-top
  if distribute.worker_rank(strategy) is None:
    return None
  return {w: int(v[0]) for w, v in
          distribute.gather_from_workers(strategy, np.array([step], np.int64)).items()}


def agree_across_workers(checkpoint, manager, path: Optional[str], steps: Dict[int, int],
                         fix: str) -> Optional[str]:
  """Given every worker's newest intact step (`steps`), restores the lowest one here too.

  Every worker computes the same decision from the same `steps`. A worker with no
  checkpoint while others have one cannot be brought to their step: CheckpointError on
  every worker (nothing is restored differently on any of them).
  """
  low, high = min(steps.values()), max(steps.values())
  if low == high:
    return path
  behind = ", ".join(str(w) for w in sorted(steps) if steps[w] == low)
  if low < 0:
    raise CheckpointError(
        f"worker(s) {behind} have no checkpoint while others would resume at step "
        f"{high}; all workers must resume from the same step. {fix}")
  mine = checkpoint_step(path)
  if mine == low:
    return path
  target = os.path.join(manager.directory, f"ckpt-{low}")
  if target not in manager.checkpoints:
    raise CheckpointError(
        f"worker(s) {behind} can resume only at step {low}, and this worker has no "
        f"checkpoint of that step in {manager.directory} (it has "
        f"{[checkpoint_step(p) for p in manager.checkpoints]}). {fix}")
  try:
    checkpoint.restore(target).assert_existing_objects_matched()
  except (tf.errors.OpError, ValueError, AssertionError, IndexError, OSError,
          RuntimeError) as e:
    raise CheckpointError(f"{target} cannot be read back ({str(e).strip()[:200]}), and "
                          f"worker(s) {behind} can resume only at step {low}. {fix}") from None
  logging.warning("resuming at step %d, the newest step every worker has (worker(s) %s "
                  "hold nothing later; this worker had step %d)", low, behind, mine)
  return target


def _restore_newest_local(checkpoint, manager, fix) -> Optional[str]:
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


# ---------------------------------------------------------------- progress
class EpochProgress:
  """Prints "epoch i/n" at each epoch's start and a Keras progress bar over its steps."""

  def __init__(self, schedule: Schedule, metrics: Sequence[str], enabled: bool = True):
    self.schedule, self.metrics, self.enabled = schedule, list(metrics), enabled
    self.bar = None

  def start_step(self, step: int) -> None:
    """Before running step `step` (0-based)."""
    s = self.schedule
    if self.enabled and (self.bar is None or step % s.steps_per_epoch == 0):
      epoch = step // s.steps_per_epoch
      print(f"epoch {epoch + 1}/{s.epochs}")
      self.bar = keras.utils.Progbar(min(s.steps_per_epoch,
                                         s.total_steps - epoch * s.steps_per_epoch),
                                     stateful_metrics=self.metrics)

  def end_step(self, step: int, values: Dict[str, Any]) -> None:
    """After step `step` (1-based: the steps done)."""
    if self.bar is not None:
      spe = self.schedule.steps_per_epoch
      self.bar.update(step - (step - 1) // spe * spe,
                      [(k, v) for k, v in values.items() if k in self.metrics])
