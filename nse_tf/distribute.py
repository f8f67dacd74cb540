"""tf.distribute strategy from a flag: default | mirrored | multi_worker | tpu.

The per-replica batch is global / replicas; losses are summed per replica and
divided by the *global* batch (see trainer.py), so every strategy computes the same
update as the default strategy at the same global batch.
"""

from __future__ import annotations

import os
import shutil
from typing import Dict, Optional, Tuple

import numpy as np
import tensorflow as tf

from nse_tf import errors

STRATEGIES = ("default", "mirrored", "multi_worker", "tpu")


class StrategyError(errors.NSEError):
  pass


def configure_logical_cpus(count: int) -> None:
  """Splits the CPU into `count` logical devices (tests, demos of MirroredStrategy).

  Must run before TensorFlow initialises its devices.
  """
  cpus = tf.config.list_physical_devices("CPU")
  try:
    tf.config.set_logical_device_configuration(
        cpus[0], [tf.config.LogicalDeviceConfiguration() for _ in range(count)])
  except RuntimeError as e:
    if len(tf.config.list_logical_devices("CPU")) == count:
      return    # split before TensorFlow started (e.g. by a test harness): as asked
    raise StrategyError(
        f"cannot split the CPU into {count} logical devices after TensorFlow started: {e}") from None


def get_strategy(name: str = "default", tpu: Optional[str] = None,
                 num_cpu_replicas: int = 0) -> tf.distribute.Strategy:
  """Builds the strategy named by `--strategy`.

  Args:
    name: 'default' (one device), 'mirrored' (all local GPUs, or logical CPUs),
      'multi_worker' (TF_CONFIG cluster), 'tpu'.
    tpu: TPU address or name for 'tpu' ('' or 'local' for a TPU VM).
    num_cpu_replicas: with 'mirrored' and no GPU, split the CPU into this many
      logical devices (0: one device).
  """
  if name not in STRATEGIES:
    raise StrategyError(f"unknown --strategy {name!r}; expected one of {', '.join(STRATEGIES)}")
  if name == "default":
    return tf.distribute.get_strategy()
  if name == "mirrored":
    devices = None
    if not tf.config.list_physical_devices("GPU") and num_cpu_replicas > 1:
      configure_logical_cpus(num_cpu_replicas)
      devices = [d.name for d in tf.config.list_logical_devices("CPU")]
    return tf.distribute.MirroredStrategy(devices)
  if name == "multi_worker":
    return tf.distribute.MultiWorkerMirroredStrategy()
  if tpu is None:
    raise StrategyError("--strategy=tpu needs --tpu (a TPU name/address, or 'local' on a TPU VM)")
  resolver = tf.distribute.cluster_resolver.TPUClusterResolver(
      tpu="" if tpu == "local" else tpu)
  tf.config.experimental_connect_to_cluster(resolver)
  tf.tpu.experimental.initialize_tpu_system(resolver)
  return tf.distribute.TPUStrategy(resolver)


def per_replica_batch(global_batch: int, strategy: tf.distribute.Strategy) -> int:
  replicas = strategy.num_replicas_in_sync
  if global_batch % replicas:
    raise StrategyError(
        f"global batch {global_batch} is not divisible by the {replicas} replicas; "
        f"use a multiple of {replicas}")
  return global_batch // replicas


# ---------------------------------------------------------------- several workers
# tf.distribute's convention for MultiWorkerMirroredStrategy: every worker runs the same
# command with the same flags (TF_CONFIG tells it its task); the chief writes the run
# directory, the other workers write what they must (their checkpoints, which saving
# reads through collectives) to a location of their own that they delete at the end.


def worker_rank(strategy) -> Optional[Tuple[int, int]]:
  """(this worker's index, number of workers) under MultiWorkerMirroredStrategy with two
  or more tasks, "chief" first (so that messages can name workers); None otherwise."""
  if not isinstance(strategy, tf.distribute.MultiWorkerMirroredStrategy):
    return None
  resolver = strategy.cluster_resolver
  spec = resolver.cluster_spec()
  order = [(job, i) for job in sorted(spec.jobs, key=lambda j: j != "chief")
           for i in range(spec.num_tasks(job))]
  if len(order) < 2:
    return None
  return order.index((resolver.task_type, resolver.task_id)), len(order)


def gather_from_workers(strategy, rows: np.ndarray) -> Dict[int, np.ndarray]:
  """{worker index: its `rows`}: every worker passes an array of one shape and dtype
  (float64 or int64) and gets all of them, exchanged with one all-gather. With one worker
  (or another strategy) only its own."""
  rank = worker_rank(strategy)
  if rank is None:
    return {0: np.asarray(rows)}
  me, _ = rank
  rows = np.asarray(rows)
  mine = tf.constant(np.concatenate([np.full((1,) + rows.shape[1:], me, rows.dtype),
                                     rows], axis=0)[None])   # [1, 1 + n, ...]
  gathered = strategy.run(tf.function(
      lambda: tf.distribute.get_replica_context().all_gather(mine, axis=0)))
  # One row per replica: a worker with several local replicas appears once per replica.
  out = {}
  for block in strategy.experimental_local_results(gathered)[0].numpy():
    out[int(block[0].flat[0])] = block[1:]
  return out


def finish_workers(strategy, output_dir: str, worker_dir: str) -> None:
  """The end of a multi-worker command: a barrier (no worker leaves while another still
  runs collectives, which would fail it), then a non-chief removes its own directory."""
  if not isinstance(strategy, tf.distribute.MultiWorkerMirroredStrategy):
    return
  one = strategy.run(lambda: tf.ones([]))
  strategy.reduce(tf.distribute.ReduceOp.SUM, one, axis=None).numpy()
  if os.path.realpath(worker_dir) != os.path.realpath(output_dir):
    from nse_tf import run_lock  # pylint: disable=g-import-not-at-top
    run_lock.release(worker_dir)
    shutil.rmtree(worker_dir, ignore_errors=True)
