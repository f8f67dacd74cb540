"""Build a latency look-up table on this device (resumable).

  python tools/build_latency_lut.py --output=runs/latency/lut_tf.json                 # latency19 @ latency, 224, batch 1
  python tools/build_latency_lut.py --backend=tflite --output=runs/latency/lut_tflite.json
  python tools/build_latency_lut.py --batch_size=128 --output=runs/latency/lut_b128.json   # like the reference GPU table
  python tools/build_latency_lut.py --macro=tiny --resolution=128 --num_classes=10 --output=runs/latency_demo/latency_lut.json

Measures every op of the space at every distinct layer position of the macro (input
H×W, C_in, C_out, stride), the fixed parts (stem, 1x1 head conv, pool, fc), the
element-wise average of 2..--max_branches branches and the per-call overhead, with
--warmup calls and --repeats timed calls each (interleaved in chunks, so load from
other jobs spreads evenly). The JSON file records the device (CPU model, threads,
TensorFlow version, backend, batch) and every entry's count/mean/std/min/median in ms.
Re-running the same command continues a killed build; running it for another
macro or resolution adds that configuration's entries to the same file. Afterwards it
prints the latency range of the space, to choose --tau and --interval of a
latency-constrained search (flags/latency.cfg).
Takes about 2-4 minutes for latency19 on the latency macro at 128x128 on one CPU core
(TFLite: longer, every entry is converted).
"""

import time

from absl import flags

from absl import logging

from nse_tf import cli


def define_flags(fv: flags.FlagValues = flags.FLAGS) -> None:
  """The tool's flags (defined by cli.run, not at import)."""
  flags.DEFINE_string("output", None, "Table JSON to write (extended/resumed if it exists).",
                      flag_values=fv)
  flags.DEFINE_enum("space", "latency19", ["flops27", "flops72", "latency19"], "Op pool.",
                    flag_values=fv)
  flags.DEFINE_enum("macro", None, ["flops", "latency", "tiny"], "Macro (default: the pool's).",
                    flag_values=fv)
  flags.DEFINE_integer("resolution", 224, "Input resolution of the network the table predicts.",
                       flag_values=fv)
  flags.DEFINE_float("scale", 1.0, "Channel scale of the networks the table predicts.",
                     flag_values=fv)
  flags.DEFINE_integer("num_classes", 1000, "Classifier outputs (the fc entry).", flag_values=fv)
  flags.DEFINE_integer("batch_size", 1, "Batch of every measurement: 1 as a phone or a CPU server "
                       "serves; 128 to mirror the reference GPU table.", flag_values=fv)
  flags.DEFINE_enum("backend", "tf", ["tf", "tflite"], "tf: a TensorFlow concrete function; "
                    "tflite: the TFLite interpreter, what mobile deployment runs.", flag_values=fv)
  flags.DEFINE_integer("threads", 1, "Intra-/inter-op threads (TensorFlow) or interpreter "
                       "threads (TFLite); recorded in the table.", flag_values=fv)
  flags.DEFINE_enum("clock", "wall", ["wall", "cpu"], "wall: elapsed time, the latency on an "
                    "idle device; cpu: CPU time of this process (all threads), robust to other "
                    "jobs on a shared machine and equal to wall time on an idle one at 1 thread.",
                    flag_values=fv)
  flags.DEFINE_integer("warmup", 10, "Untimed calls per entry.", flag_values=fv)
  flags.DEFINE_integer("repeats", 50, "Timed calls per entry.", flag_values=fv)
  flags.DEFINE_enum("statistic", "median", ["median", "q25", "min", "mean"],
                    "Statistic the predictor reads (all are stored).", flag_values=fv)
  flags.DEFINE_integer("max_branches", 7, "Measure the average of up to this many branches "
                       "(K ops + the identity).", flag_values=fv)
  flags.DEFINE_list("ops", None, "Measure only these ops (default: the whole pool).",
                    flag_values=fv)
  flags.DEFINE_integer("calibration_archs", 5, "After the blocks, measure this many random "
                       "networks end to end and scale predictions by the median measured/predicted "
                       "ratio (removes the cache bias of isolated blocks; 0: off).", flag_values=fv)
  flags.DEFINE_integer("chunk", 16, "Entries compiled and timed together (interleaved).",
                       flag_values=fv)
  flags.DEFINE_bool("overwrite", False, "Start the table over (another device or settings).",
                    flag_values=fv)
  flags.DEFINE_bool("progress", True, "Progress bar.", flag_values=fv)


FLAGS = flags.FLAGS


def main(_):
  if not FLAGS.output:
    raise cli.UsageError("--output is required (the table JSON to write)")
  if FLAGS.resolution < 32:
    raise cli.UsageError(f"--resolution must be >= 32, got {FLAGS.resolution}")
  if FLAGS.batch_size < 1 or FLAGS.threads < 1 or FLAGS.repeats < 1 or FLAGS.warmup < 0:
    raise cli.UsageError("--batch_size, --threads and --repeats must be >= 1, --warmup >= 0")
  import os  # pylint: disable=g-import-not-at-top
  from nse_tf import latency, latency_measure  # pylint: disable=g-import-not-at-top
  if os.path.exists(FLAGS.output) and not FLAGS.overwrite:
    try:
      latency.load_json(FLAGS.output)     # a foreign or corrupt file: say so before measuring
    except latency.LatencyError as e:
      raise cli.UsageError(str(e)) from None
  logging.set_verbosity(logging.WARNING)   # the TFLite converter's INFO chatter
  latency_measure.pin_threads(FLAGS.threads)    # before TensorFlow runs anything
  t0 = time.time()
  try:
    latency_measure.build_table(
        FLAGS.output, space=FLAGS.space, macro=FLAGS.macro, resolution=FLAGS.resolution,
        scale=FLAGS.scale, num_classes=FLAGS.num_classes, batch_size=FLAGS.batch_size,
        backend=FLAGS.backend, threads=FLAGS.threads, warmup=FLAGS.warmup,
        repeats=FLAGS.repeats, statistic=FLAGS.statistic, max_branches=FLAGS.max_branches,
        ops=FLAGS.ops, overwrite=FLAGS.overwrite, progress=FLAGS.progress, chunk=FLAGS.chunk,
        clock=FLAGS.clock, calibration_archs=FLAGS.calibration_archs)
  except latency.LatencyError as e:
    raise cli.UsageError(str(e)) from None
  if FLAGS.ops:
    print(f"wrote {FLAGS.output} ({len(FLAGS.ops)} ops) in {time.time() - t0:.0f} s")
    return 0
  table = latency.LatencyTable.load(FLAGS.output, FLAGS.space, FLAGS.macro, FLAGS.resolution,
                                    FLAGS.scale, FLAGS.num_classes)
  print(f"wrote {FLAGS.output} in {time.time() - t0:.0f} s: {table.device['backend']}, batch "
        f"{table.device['batch_size']}, {table.device['threads']} thread(s), "
        f"{table.device['cpu']}")
  print(latency.describe_range(table))
  return 0


if __name__ == "__main__":
  cli.run(main, define_flags)
