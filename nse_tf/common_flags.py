"""Flags shared by the commands (search, train_round, retrain), and their conversion.

Nothing is defined at import: each command calls the `define_*_flags` it reads in its
own `define_flags(flag_values)`, so its `--help` lists only what it uses and several
commands can be parsed side by side in one process (`cli.parse`)."""

from __future__ import annotations

from typing import Any, Mapping, Optional

from absl import flags

from nse_tf.train_config import GATE_SAMPLING

# Defaults of a search round's training flags: train_config.TrainConfig's (SPEC §4; a test
# keeps the two equal; trainer imports TensorFlow, which --help should not wait for).
ROUND_TRAINING_DEFAULTS = dict(global_batch=1024, epochs=100.0, lr=0.4, warmup_epochs=2.0,
                               warmup_start_lr=0.1, weight_decay=4e-5, checkpoint_every=200)


def define_data_flags(fv: flags.FlagValues = flags.FLAGS) -> None:
  """The dataset: --dataset, --data_dir, --image_size, --holdout_examples."""
  flags.DEFINE_string("dataset", "demo_digits", "demo_digits | demo_digits_hard | demo_shapes "
                      "(embedded, no download) or any prepared tfds image-classification "
                      "dataset.", flag_values=fv)
  flags.DEFINE_string("data_dir", None, "tfds data directory (prepared data).", flag_values=fv)
  flags.DEFINE_integer("image_size", 32, "Training resolution.", flag_values=fv)
  flags.DEFINE_integer("holdout_examples", None, "Held-out part of train for θ steps "
                       "(default: 50,000 for ImageNet, 20 % for the demos).", flag_values=fv)


def define_strategy_flags(fv: flags.FlagValues = flags.FLAGS) -> None:
  """The tf.distribute strategy: --strategy, --tpu, --cpu_replicas."""
  flags.DEFINE_enum("strategy", "default", ["default", "mirrored", "multi_worker", "tpu"],
                    "tf.distribute strategy.", flag_values=fv)
  flags.DEFINE_string("tpu", None, "TPU name/address for --strategy=tpu.", flag_values=fv)
  flags.DEFINE_integer("cpu_replicas", 0, "With --strategy=mirrored and no GPU: split the CPU "
                       "into this many logical devices.", flag_values=fv)


def define_training_flags(fv: flags.FlagValues = flags.FLAGS,
                          defaults: Optional[Mapping[str, Any]] = None) -> None:
  """Training of a round or a retrain: batch, schedule, precision, checkpoints, seed.

  `defaults`: the command's own defaults by flag name, from its config dataclass (the
  retrain's SPEC §6 recipe differs from a search round's), so that `--help` shows them.
  """
  d = dict(ROUND_TRAINING_DEFAULTS, **(defaults or {}))
  flags.DEFINE_integer("global_batch", d["global_batch"], "Global batch (split over "
                       "replicas).", flag_values=fv)
  flags.DEFINE_float("epochs", d["epochs"], "Epochs of training.", flag_values=fv)
  flags.DEFINE_integer("steps_per_epoch", None, "Default: train examples // global batch.",
                       flag_values=fv)
  flags.DEFINE_float("lr", d["lr"], "Peak learning rate (SGD Nesterov).", flag_values=fv)
  flags.DEFINE_float("warmup_epochs", d["warmup_epochs"], "Linear warm-up epochs.",
                     flag_values=fv)
  flags.DEFINE_float("warmup_start_lr", d["warmup_start_lr"], "Learning rate at step 0.",
                     flag_values=fv)
  flags.DEFINE_float("weight_decay", d["weight_decay"], "L2 on conv/fc kernels (not BN, "
                     "biases, θ).", flag_values=fv)
  flags.DEFINE_enum("mixed_precision", None, ["bfloat16", "float16"], "Mixed precision.",
                    flag_values=fv)
  flags.DEFINE_bool("sync_bn", False, "Batch norm over the global batch (mirrored or tpu; "
                    "see README).", flag_values=fv)
  flags.DEFINE_integer("checkpoint_every", d["checkpoint_every"], "Steps between "
                       "checkpoints.", flag_values=fv)
  flags.DEFINE_integer("seed", 0, "Seed of queues, gates, data order and initialisation.",
                       flag_values=fv)
  flags.DEFINE_bool("deterministic", True, "The same command gives the same bits: "
                    "TensorFlow op determinism, one op at a time (inter-op parallelism 1; "
                    "each op still uses every core) and grappler's memory optimiser off "
                    "(its accumulations sum in thread order; README, The search).",
                    flag_values=fv)
  flags.DEFINE_integer("intra_op_threads", 0, "Threads each TensorFlow op may use (0: "
                       "TensorFlow's choice, one per core). With small tensors (the 16x16 "
                       "demo and proxy searches) 1 took 20-30 % less CPU time at about "
                       "the same wall time on 2 cores (README Benchmarks; "
                       "benchmarks/intra_op_threads.py measures it). Settings differ in "
                       "the float rounding, which can change what a search prunes and "
                       "picks.", lower_bound=0, flag_values=fv)


def define_supernet_flags(fv: flags.FlagValues = flags.FLAGS) -> None:
  """The supernet and its θ (the search and one-round training): space, K, τ, …."""
  flags.DEFINE_string("output_dir", None, "Where the checkpoint, TensorBoard logs and "
                      "round.json go. Re-running on the same directory resumes.", flag_values=fv)
  flags.DEFINE_enum("space", "flops27", ["flops27", "flops72", "latency19"], "Op pool.",
                    flag_values=fv)
  flags.DEFINE_enum("macro", None, ["flops", "latency", "tiny"],
                    "Macro-architecture (default: the pool's own).", flag_values=fv)
  flags.DEFINE_float("scale", 1.0, "Channel scale of the supernet (narrow for CPU demos).",
                     flag_values=fv)
  flags.DEFINE_integer("max_ops", 5, "K: ops per layer in the working set.", flag_values=fv)
  flags.DEFINE_integer("cost_resolution", 224, "Resolution the FLOPs table (and τ) refer to.",
                       flag_values=fv)
  flags.DEFINE_bool("skip_off_ops", False, "Off ops get no momentum/decay update (the "
                    "reference runs moved them; default False).", flag_values=fv)
  flags.DEFINE_enum("gate_sampling", "uniform", list(GATE_SAMPLING),
                    "Weight-step gates: p = 0.5 (SPEC), θ-based, 'count' (the number of active "
                    "ops uniform per layer, then which ones) or 'interval' (p = 0.5 paths "
                    "redrawn until their cost lies in the search's --interval: the supernet "
                    "trains on the architectures it ranks; nse_tf.search only).", flag_values=fv)
  flags.DEFINE_integer("theta_every", 2, "A θ step every k-th weight step.", flag_values=fv)
  flags.DEFINE_float("theta_lr", 0.005, "Adam lr of θ (the paper text says 0.1; the reference "
                     "runs used 0.005).", flag_values=fv)
  flags.DEFINE_float("alpha", 1e-5, "Regulariser weight α.", flag_values=fv)
  flags.DEFINE_float("beta", 2.0, "Regulariser exponent β.", flag_values=fv)
  flags.DEFINE_float("tau", 300.0, "Cost target τ (MFLOPs at --cost_resolution).", flag_values=fv)
  flags.DEFINE_float("prune_threshold", -2.0, "Prune ops whose θ falls below this.", flag_values=fv)
  flags.DEFINE_enum("graph_optimization", "on", list(GRAPH_OPTIMIZATION),
                    "TensorFlow's graph optimiser (grappler) for the compiled supernet steps. "
                    "'off' shortens a large supernet's start-up on a CPU (flops macro, K = 5: "
                    "first calls of the weight and θ steps ~35-45 s shorter each, steps as "
                    "fast) at a higher memory peak, and costs ~7 % on small ones (the demo); "
                    "results agree to float rounding, not bit for bit (README Benchmarks).",
                    flag_values=fv)


def define_round_flags(fv: flags.FlagValues = flags.FLAGS) -> None:
  """Every flag of a supernet round (the search and nse_tf.train_round)."""
  define_supernet_flags(fv)
  define_data_flags(fv)
  define_strategy_flags(fv)
  define_training_flags(fv)



GRAPH_OPTIMIZATION = ("on", "off")


def setup_tensorflow(deterministic: bool, graph_optimization: Optional[str] = None,
                     intra_op_threads: int = 0):
  """--deterministic, --graph_optimization, --intra_op_threads (0: TensorFlow's default),
  and TensorFlow's INFO chatter off. Call before TensorFlow runs an op.

  Op determinism alone is not enough on CPU; two more things make the order of float
  sums depend on which op happens to run first, and --deterministic removes both:
  - TensorFlow's AddN (which sums the gradients of every tensor with three or more
    consumers, e.g. a layer's input feeding the identity and several branches) reuses
    the first input buffer it finds free and moves it to the front of the sum; with
    concurrent ops which one is free changes from run to run. Measured on the tiny
    supernet: the stem's gradient took one of two values from call to call in one
    process (7 of 30 calls differed); with one inter-op thread 40 of 40 agreed, also
    next to CPU-hogging processes. Kernels still use every core (intra-op threads).
  - Grappler's memory optimiser rewrites a large AddN into an accumulation (a
    TemporaryVariable plus one AssignAdd per input) that adds the inputs in the order
    they become ready. It does so when its static estimate of the graph's peak memory
    passes 80 % of the device's nominal size, 256 MiB for a CPU: every large step
    function (the flops supernet, a retrain at 224x224), not the tiny ones. The ready
    order is the executor's, which follows the node order of the final graph, and that
    order differs between processes (dumps of the θ step: identical through grappler;
    after partitioning and oneDNN's layout pass the same nodes in another order). On
    the flops supernet three processes fed identical graphs and inputs gave three
    different expected costs after one θ step (issue 14). With the memory optimiser
    off (RewriterConfig.memory_optimization = NO_MEM_OPT; tf.config has no switch for
    it, so the context's base ConfigProto carries it) the three agreed to the bit.

  graph_optimization: None leaves TensorFlow's graph optimiser as it is; 'on'/'off' as
  the flag. Measured on the 2-core CPU: for the flops supernet (22 layers, K = 5)
  grappler spent ~41 s of CPU time in the first call of the weight step (224x224, batch
  8: 60.7 s with it, 19.5 s without, after tracing); side by side in one process the
  first calls of the weight and θ steps took 86/107 s with it against 53/63 s without
  (tracing included), for no step-time gain (median ratios 1.00 and 1.01), but the
  round's memory peak was 8.7 GB without it against 6.4 GB with it. On the demo's tiny
  supernet the fusions win: two demo searches side by side took 423 s of CPU time with
  it and 453 s without.
  Its rewrites change the order of some float operations, so a run under one setting
  agrees with one under the other to float rounding, not bit for bit.
  """
  if intra_op_threads < 0:
    raise ValueError(f"intra_op_threads must be >= 0 (0: TensorFlow's default), got "
                     f"{intra_op_threads}")
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  from absl import logging  # pylint: disable=g-import-not-at-top
  tf.get_logger().setLevel("WARNING")
  logging.set_verbosity(logging.WARNING)   # checkpoint saver chatter; progress is printed
  if graph_optimization is not None:
    if graph_optimization not in GRAPH_OPTIMIZATION:
      raise ValueError(f"graph_optimization must be one of {GRAPH_OPTIMIZATION}, got "
                       f"{graph_optimization!r}")
    tf.config.optimizer.set_experimental_options(
        {"disable_meta_optimizer": graph_optimization == "off"})
  threading = tf.config.threading
  if intra_op_threads:
    kept = _set_thread_count(threading.set_intra_op_parallelism_threads,
                             threading.get_intra_op_parallelism_threads, intra_op_threads)
    if kept is not None:
      logging.warning("--intra_op_threads=%d: TensorFlow started before the thread count "
                      "could be set; it keeps %s", intra_op_threads,
                      f"{kept} threads per op" if kept else "its default (one per core)")
  if deterministic:
    tf.config.experimental.enable_op_determinism()
    set_memory_optimizer(False)
    if _set_thread_count(threading.set_inter_op_parallelism_threads,
                         threading.get_inter_op_parallelism_threads, 1) is not None:
      logging.warning("--deterministic: TensorFlow started before the inter-op thread "
                      "count could be set to 1; results may differ between runs")


def _set_thread_count(setter, getter, n: int) -> Optional[int]:
  """Sets a TensorFlow thread count; None where it is n now, else the count TensorFlow
  keeps (it had started: the caller set it up before us)."""
  try:
    setter(n)
  except RuntimeError:
    kept = getter()
    return kept if kept != n else None
  return None


def set_memory_optimizer(enabled: bool) -> None:
  """Grappler's memory optimiser on (TensorFlow's default) or off, for every tf.function
  call from now on.

  Its AddN-to-accumulation rewrite sums in execution order (see setup_tensorflow).
  tf.config.optimizer has no switch for it, so the eager context's base ConfigProto,
  which every function call's grappler config starts from, carries the setting. Call
  it before other threads make calls: each thread caches its call options on its first
  call (this resets the calling thread's cache only).
  """
  from absl import logging  # pylint: disable=g-import-not-at-top
  from tensorflow.core.protobuf import config_pb2  # pylint: disable=g-import-not-at-top
  from tensorflow.core.protobuf import rewriter_config_pb2  # pylint: disable=g-import-not-at-top
  from tensorflow.python.eager import context  # pylint: disable=g-import-not-at-top
  rc = rewriter_config_pb2.RewriterConfig
  ctx = context.context()
  try:
    config = config_pb2.ConfigProto()
    if ctx._config is not None:  # pylint: disable=protected-access
      config.CopyFrom(ctx._config)  # pylint: disable=protected-access
    config.graph_options.rewrite_options.memory_optimization = (
        rc.DEFAULT_MEM_OPT if enabled else rc.NO_MEM_OPT)
    ctx._config = config  # pylint: disable=protected-access
    ctx._thread_local_data.function_call_options = None  # pylint: disable=protected-access
  except AttributeError as e:   # a TensorFlow whose eager context is laid out differently
    logging.warning("could not turn grappler's memory optimiser %s (%s); separate "
                    "processes may differ in the last bits", "on" if enabled else "off", e)


def memory_optimizer_enabled() -> bool:
  """Whether the next tf.function call runs grappler's memory optimiser."""
  from tensorflow.core.protobuf import config_pb2  # pylint: disable=g-import-not-at-top
  from tensorflow.core.protobuf import rewriter_config_pb2  # pylint: disable=g-import-not-at-top
  from tensorflow.python.eager import context  # pylint: disable=g-import-not-at-top
  config = config_pb2.ConfigProto.FromString(
      context.context().function_call_options.config_proto_serialized)
  return (config.graph_options.rewrite_options.memory_optimization
          != rewriter_config_pb2.RewriterConfig.NO_MEM_OPT)


def train_config(fv: flags.FlagValues):
  """train_config.TrainConfig from a round's flags (validated; no TensorFlow import)."""
  from nse_tf import train_config as train_config_lib  # pylint: disable=g-import-not-at-top
  cfg = train_config_lib.TrainConfig(
      global_batch=fv.global_batch, epochs=fv.epochs,
      steps_per_epoch=fv.steps_per_epoch, lr=fv.lr, warmup_epochs=fv.warmup_epochs,
      warmup_start_lr=fv.warmup_start_lr, weight_decay=fv.weight_decay,
      skip_off_ops=fv.skip_off_ops, gate_sampling=fv.gate_sampling,
      theta_every=fv.theta_every, theta_lr=fv.theta_lr, alpha=fv.alpha,
      beta=fv.beta, tau=fv.tau, prune_threshold=fv.prune_threshold,
      mixed_precision=fv.mixed_precision, sync_bn=fv.sync_bn,
      checkpoint_every=fv.checkpoint_every, seed=fv.seed)
  cfg.validate()
  return cfg


PROBE_BYTES = 256 << 10


def check_output_dir(path, flag: str = "--output_dir"):
  """Creates `path` and proves it writable, or raises UsageError naming it.

  The probe writes (and fsyncs) real bytes: creating an empty file succeeds on a full
  filesystem, which would then fail at the first checkpoint instead of here.
  """
  import errno  # pylint: disable=g-import-not-at-top
  import os  # pylint: disable=g-import-not-at-top
  from nse_tf import cli  # pylint: disable=g-import-not-at-top
  if not path:
    raise cli.UsageError(f"{flag} is required")
  probe = os.path.join(path, f".write_test{os.getpid()}")
  try:
    os.makedirs(path, exist_ok=True)
    try:
      with open(probe, "wb") as f:
        f.write(b"\0" * PROBE_BYTES)
        f.flush()
        os.fsync(f.fileno())
    finally:
      if os.path.exists(probe):
        os.remove(probe)
  except OSError as e:
    hint = (" (free some space or choose another directory)"
            if e.errno in (errno.ENOSPC, errno.EDQUOT) else "")
    raise cli.UsageError(f"cannot write to {flag} {path!r}: {e.strerror}{hint}") from None
