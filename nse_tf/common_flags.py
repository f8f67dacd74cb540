"""Flags shared by the search and round-training CLIs, and their conversion."""

from __future__ import annotations

from absl import flags

flags.DEFINE_string("output_dir", None, "Where the checkpoint, TensorBoard logs and "
                    "round.json go. Re-running on the same directory resumes.")
flags.DEFINE_string("dataset", "demo_digits", "demo_digits | demo_digits_hard | demo_shapes "
                    "(embedded, no download) or any prepared tfds image-classification "
                    "dataset.")
flags.DEFINE_string("data_dir", None, "tfds data directory (prepared data).")
flags.DEFINE_integer("image_size", 32, "Training resolution.")
flags.DEFINE_integer("holdout_examples", None, "Held-out part of train for θ steps "
                     "(default: 50,000 for ImageNet, 20 % for the demos).")
flags.DEFINE_enum("space", "flops27", ["flops27", "flops72", "latency19"], "Op pool.")
flags.DEFINE_enum("macro", None, ["flops", "latency", "tiny"],
                  "Macro-architecture (default: the pool's own).")
flags.DEFINE_float("scale", 1.0, "Channel scale of the supernet (narrow for CPU demos).")
flags.DEFINE_integer("max_ops", 5, "K: ops per layer in the working set.")
flags.DEFINE_integer("cost_resolution", 224, "Resolution the FLOPs table (and τ) refer to.")
flags.DEFINE_enum("strategy", "default", ["default", "mirrored", "multi_worker", "tpu"],
                  "tf.distribute strategy.")
flags.DEFINE_string("tpu", None, "TPU name/address for --strategy=tpu.")
flags.DEFINE_integer("cpu_replicas", 0, "With --strategy=mirrored and no GPU: split the CPU "
                     "into this many logical devices.")
flags.DEFINE_integer("global_batch", 1024, "Global batch (split over replicas).")
flags.DEFINE_float("epochs", 100.0, "Epochs of the round.")
flags.DEFINE_integer("steps_per_epoch", None, "Default: train examples // global batch.")
flags.DEFINE_float("lr", 0.4, "Peak learning rate (SGD Nesterov).")
flags.DEFINE_float("warmup_epochs", 2.0, "Linear warm-up epochs.")
flags.DEFINE_float("warmup_start_lr", 0.1, "Learning rate at step 0.")
flags.DEFINE_float("weight_decay", 4e-5, "L2 on conv/fc kernels (not BN, biases, θ).")
flags.DEFINE_bool("skip_off_ops", False, "Off ops get no momentum/decay update (the "
                  "reference runs moved them; default False).")
flags.DEFINE_enum("gate_sampling", "uniform", ["uniform", "theta"],
                  "Weight-step gates: p = 0.5, or θ-based.")
flags.DEFINE_integer("theta_every", 2, "A θ step every k-th weight step.")
flags.DEFINE_float("theta_lr", 0.005, "Adam lr of θ (the paper text says 0.1; the reference "
                   "runs used 0.005).")
flags.DEFINE_float("alpha", 1e-5, "Regulariser weight α.")
flags.DEFINE_float("beta", 2.0, "Regulariser exponent β.")
flags.DEFINE_float("tau", 300.0, "Cost target τ (MFLOPs at --cost_resolution).")
flags.DEFINE_float("prune_threshold", -2.0, "Prune ops whose θ falls below this.")
flags.DEFINE_enum("mixed_precision", None, ["bfloat16", "float16"], "Mixed precision.")
flags.DEFINE_bool("sync_bn", False,
                  "Batch norm over the global batch (mirrored or tpu; see README).")
flags.DEFINE_integer("checkpoint_every", 200, "Steps between checkpoints.")
flags.DEFINE_integer("seed", 0, "Seed of queues, gates, data order and initialisation.")
flags.DEFINE_bool("deterministic", True, "TensorFlow op determinism and one op at a time "
                  "(inter-op parallelism 1; each op still uses every core), so that a run "
                  "depends less on thread timing. Runs in separate processes can still "
                  "differ in the last bits (see README, issue 14).")
FLAGS = flags.FLAGS


def setup_tensorflow():
  """--deterministic, and TensorFlow's INFO chatter off. Call before TensorFlow runs an op.

  Op determinism alone is not enough on CPU: TensorFlow's AddN (which sums the
  gradients of every tensor with three or more consumers, e.g. a layer's input feeding
  the identity and several branches) reuses the first input buffer it finds free and
  moves it to the front of the sum. Which buffer is free depends on which other ops
  have finished, so with concurrent ops the summation order, and the last bits of the
  gradients, change from run to run, more under load. Measured on the tiny supernet:
  the stem's gradient took one of two values from call to call in one process (7 of
  30 calls differed); with one inter-op thread, 40 of 40 calls agreed, also next to
  CPU-hogging processes. Kernels still use every core (intra-op threads). This is
  not the only source: separate processes of the demo still diverge (README).
  """
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  from absl import logging  # pylint: disable=g-import-not-at-top
  tf.get_logger().setLevel("WARNING")
  logging.set_verbosity(logging.WARNING)   # checkpoint saver chatter; progress is printed
  if FLAGS.deterministic:
    tf.config.experimental.enable_op_determinism()
    try:
      tf.config.threading.set_inter_op_parallelism_threads(1)
    except RuntimeError:   # TensorFlow already started: the caller set it up before us
      if tf.config.threading.get_inter_op_parallelism_threads() != 1:
        logging.warning("--deterministic: TensorFlow started before the inter-op thread "
                        "count could be set to 1; results may differ between runs")


def train_config():
  """trainer.TrainConfig from the flags (validated; bad values raise UsageError)."""
  from nse_tf import trainer  # pylint: disable=g-import-not-at-top
  cfg = trainer.TrainConfig(
      global_batch=FLAGS.global_batch, epochs=FLAGS.epochs,
      steps_per_epoch=FLAGS.steps_per_epoch, lr=FLAGS.lr, warmup_epochs=FLAGS.warmup_epochs,
      warmup_start_lr=FLAGS.warmup_start_lr, weight_decay=FLAGS.weight_decay,
      skip_off_ops=FLAGS.skip_off_ops, gate_sampling=FLAGS.gate_sampling,
      theta_every=FLAGS.theta_every, theta_lr=FLAGS.theta_lr, alpha=FLAGS.alpha,
      beta=FLAGS.beta, tau=FLAGS.tau, prune_threshold=FLAGS.prune_threshold,
      mixed_precision=FLAGS.mixed_precision, sync_bn=FLAGS.sync_bn,
      checkpoint_every=FLAGS.checkpoint_every, seed=FLAGS.seed)
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
