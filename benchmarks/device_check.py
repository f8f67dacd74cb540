"""Ready check for an accelerator machine: what the search, the retrain and the detector
cost per step on whatever devices TensorFlow sees, in float32 and mixed precision.

One command, the first thing to run on a new GPU machine (CI never runs it; the tests run
it once on the CPU at tiny sizes). Everything runs under MirroredStrategy over all
visible GPUs (one replica on a CPU-only machine), with synthetic in-memory inputs so that
the input pipeline is not what is measured (tf-models' benchmarks do the same). Per
precision (--precisions: float32, and --mixed_precision's bfloat16 and float16):

  supernet      the search's compiled weight step and θ step (RoundTrainer of a flops27
                supernet of --macro, K = --max_ops per layer, at --resolution), on
                --paths sampled paths; beside each path, the standalone network of that
                path (nsenet.build_nsenet, the search's SGD) at the same batch, interleaved
                call by call: img/s and supernet / standalone (median over paths)
  retrain       the retrain's training step (Retrainer: SGD, EMA) of --retrain_arch
  detector      one EfficientDet-D0 training step (tf-models' task and optimiser) with the
                --detector_arch NSENet backbone at --detector_size², on a synthetic COCO set
                written to a temporary folder

Batches are per replica (--per_replica_batch, --detector_batch); where a step runs out of
device memory the batch is halved and tried again, and the table says which batch ran.
First calls (trace + graph optimisation + first run) are printed too. A cell that fails
prints its error and the command exits 1 at the end.

  python benchmarks/device_check.py          # on a GPU: 224², batch 128/replica, 3 precisions
  python benchmarks/device_check.py --resolution=16 --per_replica_batch=4 --macro=tiny \\
      --paths=2 --precisions=float32 --num_classes=10 --retrain_arch=<compact> \\
      --detector_size=128 --detector_batch=2 --detector_arch=<compact>   # CPU smoke run
"""

import importlib.util
import json
import os
import statistics
import tempfile
import time

from absl import flags

from nse_tf import cli, common_flags, machine

try:   # run as a script, benchmarks/ is the first entry of sys.path
  import round_cost  # pylint: disable=g-import-not-at-top
except ImportError:   # loaded from its path (the tests)
  _spec = importlib.util.spec_from_file_location(
      "round_cost", os.path.join(os.path.dirname(os.path.abspath(__file__)), "round_cost.py"))
  round_cost = importlib.util.module_from_spec(_spec)
  _spec.loader.exec_module(round_cost)

PRECISIONS = ("float32", "bfloat16", "float16")
SECTIONS = ("supernet", "retrain", "detector")


def define_flags(fv: flags.FlagValues = flags.FLAGS) -> None:
  """The tool's flags (defined by cli.run, not at import)."""
  flags.DEFINE_list("precisions", list(PRECISIONS), "float32 and/or the mixed precisions "
                    "(as --mixed_precision).", flag_values=fv)
  flags.DEFINE_list("sections", list(SECTIONS), "What to measure.", flag_values=fv)
  flags.DEFINE_integer("resolution", 224, "Input resolution of the supernet and retrain.",
                       flag_values=fv)
  flags.DEFINE_integer("per_replica_batch", 128, "Batch per replica (halved on running out "
                       "of memory).", flag_values=fv)
  flags.DEFINE_string("macro", "flops", "Macro-architecture of the supernet.", flag_values=fv)
  flags.DEFINE_integer("max_ops", 5, "Working-set size K per layer.", flag_values=fv)
  flags.DEFINE_integer("paths", 3, "Sampled paths (supernet vs standalone).", flag_values=fv)
  flags.DEFINE_integer("steps", 5, "Timed calls per variant (after the first call and one "
                       "warm-up call).", flag_values=fv)
  flags.DEFINE_integer("num_classes", 1000, "Classes of the synthetic images.",
                       flag_values=fv)
  flags.DEFINE_string("retrain_arch", "NSENet", "Released name or compact architecture "
                      "for the retrain step.", flag_values=fv)
  flags.DEFINE_integer("detector_size", 512, "EfficientDet input size.", flag_values=fv)
  flags.DEFINE_integer("detector_batch", 16, "EfficientDet batch per replica.",
                       flag_values=fv)
  flags.DEFINE_string("detector_arch", "NSENet", "Backbone: released name or compact "
                      "architecture.", flag_values=fv)
  flags.DEFINE_integer("seed", 0, "Seed of working sets, gates and inputs.", flag_values=fv)
  flags.DEFINE_enum("graph_optimization", "on", list(common_flags.GRAPH_OPTIMIZATION),
                    "As the search's flag: TensorFlow's graph optimiser on or off (with it "
                    "off, shorter first calls but, on a CPU, slower steps).", flag_values=fv)
  flags.DEFINE_string("json_out", None, "Also write the results as JSON here.",
                      flag_values=fv)


FLAGS = flags.FLAGS


class SyntheticImages:
  """The part of nse_tf.data.ImageData the trainers read, serving one fixed random batch.

  Every split repeats one in-memory batch of random normalised images and labels: the
  device's step time is measured, not the host's input pipeline.
  """

  def __init__(self, resolution, num_classes, seed):
    from nse_tf import data  # pylint: disable=g-import-not-at-top
    self.resolution, self.seed = resolution, seed
    self.info = data.DatasetInfo(name="synthetic", num_classes=num_classes,
                                 num_train=1_000_000, num_holdout=50_000,
                                 num_validation=50_000, image_size=resolution)

  def dataset_fn(self, split, global_batch_size, **_):
    import tensorflow as tf  # pylint: disable=g-import-not-at-top
    del split

    def fn(ctx):
      b = ctx.get_per_replica_batch_size(global_batch_size)
      g = tf.random.Generator.from_seed(self.seed + ctx.input_pipeline_id)
      images = g.normal([b, self.resolution, self.resolution, 3])
      labels = g.uniform([b], 0, self.info.num_classes, dtype=tf.int32)
      return tf.data.Dataset.from_tensors((images, labels)).repeat()

    return fn


def _is_oom(e):
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  return isinstance(e, tf.errors.ResourceExhaustedError) or "out of memory" in str(e).lower()


def _free_memory():
  import gc  # pylint: disable=g-import-not-at-top
  import tf_keras as keras  # pylint: disable=g-import-not-at-top
  keras.backend.clear_session()
  gc.collect()


def with_batch_fallback(run, per_replica_batch):
  """run(per_replica_batch) -> dict; on running out of device memory, halves the batch."""
  b = per_replica_batch
  while True:
    try:
      out = run(b)
      out["per_replica_batch"] = b
      return out
    except Exception as e:  # pylint: disable=broad-except
      if not _is_oom(e) or b == 1:
        raise
      print(f"    out of memory at batch {b} per replica; trying {b // 2}", flush=True)
      _free_memory()
      b //= 2


def _precision(p):
  return None if p == "float32" else p


def check_supernet(strategy, precision, per_replica):
  """The search's weight and θ steps vs each path's standalone network, img/s."""
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  from nse_tf import cost, supernet, trainer  # pylint: disable=g-import-not-at-top
  res, replicas = FLAGS.resolution, strategy.num_replicas_in_sync
  gb = per_replica * replicas
  data = SyntheticImages(res, FLAGS.num_classes, FLAGS.seed)
  ws, cfg, table = round_cost.round_setup(res, gb, FLAGS.macro, FLAGS.max_ops, FLAGS.seed,
                                          _precision(precision))
  first = {}
  t0 = time.perf_counter()
  tr = trainer.RoundTrainer(cfg, strategy, data, table, space="flops27", macro=FLAGS.macro,
                            working_sets=ws, num_classes=FLAGS.num_classes, resolution=res)
  first["build"] = time.perf_counter() - t0
  alive = tr.alive_masks()
  sampler = supernet.GateSampler(tr.kinds, [len(w) for w in ws], seed=FLAGS.seed + 1)
  next_theta_args = lambda: round_cost.theta_args(tr, alive)

  gates = [sampler.weight_gates(alive, None) for _ in range(FLAGS.paths)]
  first["weight_step"] = round_cost._first_call(tr._weight_step, tr.train_iter,
                                                tf.constant(gates[0]))
  first["theta_step"] = round_cost._first_call(tr._theta_step, *next_theta_args())
  nets = []
  for g in gates:   # every standalone network built before timing (see round_cost.py)
    arch = round_cost._path_arch(ws, g, FLAGS.macro)
    sa = round_cost.Standalone(arch, data, res, gb, FLAGS.seed, strategy=strategy,
                               mixed_precision=_precision(precision))
    nets.append((g, arch, sa, round_cost._first_call(sa.train_step, sa.train_iter)))
  round_cost._wait(tr._weight_step(tr.train_iter, tf.constant(gates[0])))
  round_cost._wait(tr._theta_step(*next_theta_args()))
  rows = []
  for g, arch, sa, alone_first in nets:
    round_cost._wait(sa.train_step(sa.train_iter))
    gt = tf.constant(g)
    sw, aw = round_cost._interleaved(
        [(tr._weight_step, (tr.train_iter, gt)), (sa.train_step, (sa.train_iter,))],
        FLAGS.steps)
    st, = round_cost._interleaved([(tr._theta_step, next_theta_args())], FLAGS.steps)
    rows.append({"arch": arch.to_compact(),
                 "mflops": cost.arch_cost(arch, res, FLAGS.num_classes).macs / 1e6,
                 "super_weight": sw, "alone_weight": aw, "super_theta": st,
                 "alone_first_call": alone_first})
  med = lambda k: statistics.median(r[k] for r in rows)
  first["standalone_step"] = med("alone_first_call")
  out = {"global_batch": gb, "first_call": first, "paths": rows,
         "weight_step_s": med("super_weight"), "theta_step_s": med("super_theta"),
         "standalone_step_s": med("alone_weight"),
         "supernet_over_standalone": statistics.median(
             r["super_weight"] / r["alone_weight"] for r in rows)}
  return out


def check_retrain(strategy, precision, per_replica):
  """The retrain's compiled training step (SGD, EMA) of --retrain_arch."""
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  from nse_tf import arch as arch_lib, retrainer  # pylint: disable=g-import-not-at-top
  arch = arch_lib.resolve(FLAGS.retrain_arch)
  gb = per_replica * strategy.num_replicas_in_sync
  data = SyntheticImages(FLAGS.resolution, FLAGS.num_classes, FLAGS.seed)
  cfg = retrainer.RetrainConfig(global_batch=gb, epochs=1, steps_per_epoch=10**6,
                                lr=0.1, warmup_epochs=0.0, eval_every=0.0,
                                checkpoint_every=10**9, progress=False, seed=FLAGS.seed,
                                eval_batch=gb, mixed_precision=_precision(precision))
  with tempfile.TemporaryDirectory(prefix="device_check_retrain_") as tmp:
    t0 = time.perf_counter()
    rt = retrainer.Retrainer(arch, cfg, strategy, data, tmp)
    build = time.perf_counter() - t0
    step = tf.constant(0, tf.int64)
    first = round_cost._first_call(rt._train_step, rt.train_iter, step)
    round_cost._wait(rt._train_step(rt.train_iter, step))
    t, = round_cost._interleaved([(rt._train_step, (rt.train_iter, step))], FLAGS.steps)
    rt.writer.close()
  return {"global_batch": gb, "arch": arch.to_compact(), "step_s": t,
          "first_call": {"build": build, "train_step": first}}


def check_detector(strategy, precision, per_replica):
  """One EfficientDet-D0 training step: tf-models' task, optimiser and input pipeline."""
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  import tf_keras as keras  # pylint: disable=g-import-not-at-top
  from official.core import exp_factory  # pylint: disable=g-import-not-at-top
  from official.core import task_factory  # pylint: disable=g-import-not-at-top
  from official.modeling import optimization  # pylint: disable=g-import-not-at-top
  from official.modeling import performance  # pylint: disable=g-import-not-at-top
  import nse_tf_detection.registry_imports  # noqa: F401  pylint: disable=g-import-not-at-top,unused-import
  from nse_tf_detection import synthetic_coco  # pylint: disable=g-import-not-at-top
  size, gb = FLAGS.detector_size, per_replica * strategy.num_replicas_in_sync
  with tempfile.TemporaryDirectory(prefix="device_check_coco_") as tmp:
    paths = synthetic_coco.generate(tmp, num_train=max(8, gb), num_val=2, image_size=size,
                                    num_classes=3, seed=FLAGS.seed, train_shards=1)
    params = exp_factory.get_exp_config("efficientdet_d0_nsenet_coco")
    params.override({
        "runtime": {"mixed_precision_dtype": precision},
        "task": {
            "model": {"input_size": [size, size, 3],
                      "backbone": {"nsenet": {"arch": FLAGS.detector_arch}}},
            "train_data": {"input_path": paths["train_tfrecords"], "global_batch_size": gb,
                           "dtype": precision, "shuffle_buffer_size": 8},
            "validation_data": {"input_path": paths["val_tfrecords"], "global_batch_size": 2,
                                "dtype": precision},
            "annotation_file": paths["val_annotations"]}}, is_strict=True)
    params.validate()
    before = keras.mixed_precision.global_policy()
    performance.set_mixed_precision_policy(params.runtime.mixed_precision_dtype)
    try:
      t0 = time.perf_counter()
      with strategy.scope():
        task = task_factory.get_task(params.task)
        model = task.build_model()
        opt = task.create_optimizer(params.trainer.optimizer_config, params.runtime)
        inner = getattr(opt, "inner_optimizer", opt)
        if isinstance(inner, optimization.ExponentialMovingAverage) and \
            not inner.has_shadow_copy:
          inner.shadow_copy(model)   # the EMA slots, as tf-models' trainer makes them
      build = time.perf_counter() - t0
      it = iter(strategy.distribute_datasets_from_function(
          lambda ctx: task.build_inputs(params.task.train_data, ctx)))

      @tf.function
      def train_step(iterator):
        logs = strategy.run(task.train_step, args=(next(iterator), model, opt))
        return strategy.reduce(tf.distribute.ReduceOp.MEAN, logs["loss"], axis=None)

      first = round_cost._first_call(train_step, it)
      loss = float(train_step(it))
      t, = round_cost._interleaved([(train_step, (it,))], FLAGS.steps)
    finally:
      keras.mixed_precision.set_global_policy(before)
  return {"global_batch": gb, "size": size, "step_s": t, "loss": loss,
          "first_call": {"build": build, "train_step": first}}


CHECKS = {"supernet": check_supernet, "retrain": check_retrain, "detector": check_detector}


def _devices(strategy):
  """The machine (CPU and its instruction sets, GPUs, TensorFlow) and the strategy."""
  return (f"{machine.one_line(machine.describe())}; {type(strategy).__name__} with "
          f"{strategy.num_replicas_in_sync} replica(s)")


def _row(section, precision, out):
  gb = out["global_batch"]
  if section == "supernet":
    f = out["first_call"]
    return [
        f"  supernet weight step  {precision:9s} batch {gb:5d}  {out['weight_step_s'] * 1e3:9.1f} ms"
        f"  {gb / out['weight_step_s']:9.1f} img/s   supernet / standalone "
        f"{out['supernet_over_standalone']:.2f} (standalone {out['standalone_step_s'] * 1e3:.1f} "
        f"ms, {gb / out['standalone_step_s']:.1f} img/s, median of {len(out['paths'])} paths)",
        f"  supernet θ step       {precision:9s} batch {gb:5d}  {out['theta_step_s'] * 1e3:9.1f} ms"
        f"  {gb / out['theta_step_s']:9.1f} img/s",
        f"    first calls (s): build {f['build']:.1f}, weight step {f['weight_step']:.1f}, "
        f"θ step {f['theta_step']:.1f}, standalone step {f['standalone_step']:.1f}"]
  name = {"retrain": "retrain step", "detector": f"EfficientDet-D0 {out.get('size', '')}²"}
  f = out["first_call"]
  return [f"  {name[section]:21s} {precision:9s} batch {gb:5d}  {out['step_s'] * 1e3:9.1f} ms"
          f"  {gb / out['step_s']:9.1f} img/s   first call {f['train_step']:.1f} s "
          f"(build {f['build']:.1f} s)"]


def main(_):
  bad = [p for p in FLAGS.precisions if p not in PRECISIONS]
  bad += [s for s in FLAGS.sections if s not in SECTIONS]
  if bad:
    raise cli.UsageError(f"unknown --precisions/--sections entries {bad}; expected "
                         f"precisions from {PRECISIONS} and sections from {SECTIONS}")
  if FLAGS.per_replica_batch < 1 or FLAGS.detector_batch < 1 or FLAGS.paths < 1 \
      or FLAGS.steps < 1:
    raise cli.UsageError("--per_replica_batch, --detector_batch, --paths and --steps must "
                         "be >= 1")
  from nse_tf import arch as arch_lib  # pylint: disable=g-import-not-at-top
  for section, flag in (("retrain", "retrain_arch"), ("detector", "detector_arch")):
    if section in FLAGS.sections:   # a bad name fails now, not after minutes of timing
      try:
        arch_lib.resolve(getattr(FLAGS, flag))
      except arch_lib.ArchitectureError as e:
        raise cli.UsageError(f"--{flag}: {e}") from None
  from nse_tf import distribute  # pylint: disable=g-import-not-at-top
  common_flags.setup_tensorflow(False, FLAGS.graph_optimization)
  strategy = distribute.get_strategy("mirrored")
  print(f"{_devices(strategy)}; --graph_optimization={FLAGS.graph_optimization}", flush=True)
  t_start = time.perf_counter()
  results, failed = [], []
  for section in FLAGS.sections:
    batch = FLAGS.detector_batch if section == "detector" else FLAGS.per_replica_batch
    for precision in FLAGS.precisions:
      t0 = time.perf_counter()
      try:
        out = with_batch_fallback(
            lambda b, s=section, p=precision: CHECKS[s](strategy, p, b), batch)
      except Exception as e:  # pylint: disable=broad-except
        msg = f"{type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''}"
        print(f"  {section:21s} {precision:9s} FAILED: {msg[:300]}", flush=True)
        failed.append((section, precision))
        results.append({"section": section, "precision": precision, "error": msg})
        _free_memory()
        continue
      out.update(section=section, precision=precision, wall_s=time.perf_counter() - t0)
      results.append(out)
      print("\n".join(_row(section, precision, out)), flush=True)
      _free_memory()
  print(f"wall time {(time.perf_counter() - t_start) / 60:.1f} min", flush=True)
  if FLAGS.json_out:
    from nse_tf import fileio  # pylint: disable=g-import-not-at-top
    fileio.atomic_write_text(FLAGS.json_out, json.dumps(results, indent=1))
  if failed:
    raise cli.UsageError(f"{len(failed)} check(s) failed: "
                         + ", ".join(f"{s} {p}" for s, p in failed))


if __name__ == "__main__":
  cli.run(main, define_flags)
