"""How far to trust a latency table: predicted vs measured end to end on this device.

  python tools/check_latency_lut.py                       # the latency demo configuration, TF
  python tools/check_latency_lut.py --backend=tflite      # the same for the TFLite interpreter
  python tools/check_latency_lut.py --latency_lut=my_lut.json --resolution=224 --num_archs=50
  python tools/check_latency_lut.py --search_dir=runs/latency_demo   # a search's final network

Builds --num_archs random standalone architectures (≤ --max_ops ops per layer) of the
table's space and macro, measures each end to end (`nsenet.build_nsenet`, the same
backend, batch, threads and statistic as the table, interleaved so load from other jobs
hits all alike), and prints predicted vs measured per architecture, the mean absolute
percentage error (MAPE) and Kendall's τ, and saves a scatter plot and a JSON report
under --output_dir. The table is built first when it does not exist (or is
incomplete); with no arguments that is the demo configuration: latency19 on the
latency macro at 96x96, batch 1, one thread (TensorFlow: about 2-3 minutes for the
table and 6-8 for the check on this 2-core machine; TFLite converts every block and
every network: about 16 and 12 minutes). On a machine shared with other jobs add
--clock=cpu (CPU time instead of elapsed time; see nse_tf/latency.py).

With --search_dir it measures the search's final_arch.json instead and says whether
its measured latency lies inside the search's interval.
"""

import json
import os
import time

from absl import flags

from absl import logging

from nse_tf import cli


def define_flags(fv: flags.FlagValues = flags.FLAGS) -> None:
  """The tool's flags (defined by cli.run, not at import)."""
  flags.DEFINE_string("latency_lut", None, "Table JSON (default: runs/latency/lut_{backend}_"
                      "{macro}{resolution}_b{batch}_t{threads}.json, built if missing).",
                      flag_values=fv)
  flags.DEFINE_enum("space", "latency19", ["flops27", "flops72", "latency19"], "Op pool.",
                    flag_values=fv)
  flags.DEFINE_enum("macro", "latency", ["flops", "latency", "tiny"], "Macro.", flag_values=fv)
  flags.DEFINE_integer("resolution", 96, "Input resolution (the demo default: 96).", flag_values=fv)
  flags.DEFINE_float("scale", 1.0, "Channel scale.", flag_values=fv)
  flags.DEFINE_integer("num_classes", 1000, "Classifier outputs.", flag_values=fv)
  flags.DEFINE_integer("batch_size", 1, "Batch (must match the table).", flag_values=fv)
  flags.DEFINE_enum("backend", "tf", ["tf", "tflite"], "Backend (must match the table).",
                    flag_values=fv)
  flags.DEFINE_integer("threads", 1, "Threads (must match the table).", flag_values=fv)
  flags.DEFINE_enum("clock", "wall", ["wall", "cpu"], "wall: elapsed time; cpu: CPU time of "
                    "this process, robust to other jobs on a shared machine (must match the "
                    "table).", flag_values=fv)
  flags.DEFINE_integer("num_archs", 30, "Random architectures to measure.", flag_values=fv)
  flags.DEFINE_integer("max_ops", 3, "At most this many ops per layer in a random architecture.",
                       flag_values=fv)
  flags.DEFINE_integer("seed", 0, "Seed of the random architectures.", flag_values=fv)
  flags.DEFINE_integer("warmup", 10, "Untimed calls per network (and per table entry).",
                       flag_values=fv)
  flags.DEFINE_integer("repeats", 30, "Timed calls per network (and per table entry).",
                       flag_values=fv)
  flags.DEFINE_integer("calibration_archs", 5, "Networks the table build calibrates on (other "
                       "random networks than the checked ones).", flag_values=fv)
  flags.DEFINE_integer("chunk", 10, "Networks compiled and timed together (interleaved).",
                       flag_values=fv)
  flags.DEFINE_string("search_dir", None, "Check a search's final_arch.json against its interval.",
                      flag_values=fv)
  flags.DEFINE_string("output_dir", "runs/latency_check", "Where the report and plot go.",
                      flag_values=fv)


FLAGS = flags.FLAGS


def _default_lut(backend, macro, resolution, batch, threads, clock):
  suffix = "" if clock == "wall" else f"_{clock}"
  return os.path.join("runs", "latency",
                      f"lut_{backend}_{macro}{resolution}_b{batch}_t{threads}{suffix}.json")


def _check_search(latency, arch_lib):
  from nse_tf import latency_measure  # pylint: disable=g-import-not-at-top
  cfg_path = os.path.join(FLAGS.search_dir, "config.json")
  arch_path = os.path.join(FLAGS.search_dir, "final_arch.json")
  for p in (cfg_path, arch_path):
    if not os.path.exists(p):
      raise cli.UsageError(f"--search_dir: no {os.path.basename(p)} in {FLAGS.search_dir} "
                           "(not a finished search)")
  with open(cfg_path, encoding="utf-8") as f:
    cfg = json.load(f)
  if cfg.get("constraint") != "latency":
    raise cli.UsageError(f"{FLAGS.search_dir} is not a latency-constrained search")
  a = arch_lib.Architecture.load(arch_path)
  lut = a.metadata.get("latency_lut") or cfg.get("latency_lut")
  lo, hi = a.metadata["interval"]
  data = latency.load_json(lut)
  dev = data["device"]
  latency_measure.pin_threads(dev["threads"])
  table = latency.LatencyTable(data, a.space, a.macro, cfg["cost_resolution"], a.scale,
                               a.metadata["num_classes"], source=lut)
  # One network: time more calls than in the 30-network check, it costs little.
  measurer = latency_measure.Measurer(dev["backend"], dev["threads"], FLAGS.warmup,
                                      max(FLAGS.repeats, 200), clock=dev.get("clock", "wall"))
  timed = latency_measure.measure_network(a, measurer, cfg["cost_resolution"],
                                          dev["batch_size"], a.metadata["num_classes"])
  pred, meas = table.arch_cost(a), timed[table.statistic]
  inside = lo < meas < hi
  print(f"final architecture of {FLAGS.search_dir} at {cfg['cost_resolution']}x"
        f"{cfg['cost_resolution']}, {dev['backend']}, batch {dev['batch_size']}, "
        f"{dev['threads']} thread(s):")
  print(f"  predicted {pred:.3f} ms, measured {meas:.3f} ms ({table.statistic} of "
        f"{timed['count']} calls; min {timed['min']:.3f}, median {timed['median']:.3f}, mean "
        f"{timed['mean']:.3f} ± "
        f"{timed['std']:.3f}), error {100 * (pred - meas) / meas:+.1f} %")
  print(f"  requested interval ({lo:g}, {hi:g}) ms: measured latency is "
        f"{'INSIDE' if inside else 'OUTSIDE'} it; load average {_load()}")
  return 0


def _load():
  try:
    with open("/proc/loadavg", encoding="utf-8") as f:
      return " ".join(f.read().split()[:3])
  except OSError:
    return "n/a"


def main(_):
  from nse_tf import arch as arch_lib  # pylint: disable=g-import-not-at-top
  # pylint: disable-next=g-import-not-at-top
  from nse_tf import latency, latency_check, latency_measure, stats
  logging.set_verbosity(logging.WARNING)   # the TFLite converter's INFO chatter
  try:
    if FLAGS.search_dir:
      return _check_search(latency, arch_lib)
    if FLAGS.num_archs < 2:
      raise cli.UsageError(f"--num_archs must be >= 2 (Kendall's τ), got {FLAGS.num_archs}")
    lut = FLAGS.latency_lut or _default_lut(FLAGS.backend, FLAGS.macro, FLAGS.resolution,
                                            FLAGS.batch_size, FLAGS.threads, FLAGS.clock)
    latency_measure.pin_threads(FLAGS.threads)
    t0 = time.time()
    latency_measure.build_table(lut, space=FLAGS.space, macro=FLAGS.macro,
                                resolution=FLAGS.resolution,
                        scale=FLAGS.scale, num_classes=FLAGS.num_classes,
                        batch_size=FLAGS.batch_size, backend=FLAGS.backend,
                        threads=FLAGS.threads, warmup=FLAGS.warmup, repeats=FLAGS.repeats,
                        clock=FLAGS.clock, calibration_archs=FLAGS.calibration_archs)
    build_s = time.time() - t0
    table = latency.LatencyTable.load(lut, FLAGS.space, FLAGS.macro, FLAGS.resolution,
                                      FLAGS.scale, FLAGS.num_classes, backend=FLAGS.backend,
                                      batch_size=FLAGS.batch_size)
  except latency.LatencyError as e:
    raise cli.UsageError(str(e)) from None
  from nse_tf import cost  # pylint: disable=g-import-not-at-top
  archs = cost.random_architectures(FLAGS.space, FLAGS.num_archs, seed=FLAGS.seed,
                                    max_ops=FLAGS.max_ops, macro=FLAGS.macro, scale=FLAGS.scale)
  dev = table.device
  measurer = latency_measure.Measurer(FLAGS.backend, FLAGS.threads, FLAGS.warmup, FLAGS.repeats,
                              clock=FLAGS.clock)
  os.makedirs(FLAGS.output_dir, exist_ok=True)
  stem = (f"latency_check_{FLAGS.backend}_{FLAGS.macro}{FLAGS.resolution}_b{FLAGS.batch_size}"
          f"{'' if FLAGS.clock == 'wall' else '_' + FLAGS.clock}")
  if dev.get("clock", "wall") != FLAGS.clock:
    raise cli.UsageError(f"{lut} was measured with the {dev.get('clock', 'wall')} clock, not "
                         f"--clock={FLAGS.clock}")
  print(f"table {lut} ({build_s:.0f} s): {dev['cpu']}, {dev['backend']}, {FLAGS.clock} clock, "
        f"batch {dev['batch_size']}, {dev['threads']} thread(s), TF {dev['tensorflow']}, statistic "
        f"{table.statistic}, calibration x{table.calibration:.3f}; load average {_load()}")
  print(f"measuring {len(archs)} random {FLAGS.space}@{FLAGS.macro} networks at "
        f"{FLAGS.resolution}x{FLAGS.resolution} end to end ...", flush=True)
  t0 = time.time()
  measured = []
  for start in range(0, len(archs), FLAGS.chunk):
    part = archs[start:start + FLAGS.chunk]
    runs = [measurer.compile(latency_measure.network_model(a, FLAGS.resolution, FLAGS.batch_size,
                                                   FLAGS.num_classes)) for a in part]
    measured += measurer.measure_interleaved(runs)
    del runs
    import tf_keras as keras  # pylint: disable=g-import-not-at-top
    keras.backend.clear_session()
    print(f"  {len(measured)}/{len(archs)}", flush=True)
  preds = [table.arch_cost(a) for a in archs]
  meas = [m[table.statistic] for m in measured]
  print(f"\n{'#':>3} {'predicted':>10} {'measured':>10} {'error':>8}  ops  architecture")
  for i, (a, p, m) in enumerate(zip(archs, preds, meas)):
    print(f"{i:3d} {p:10.3f} {m:10.3f} {100 * (p - m) / m:+7.1f}%  {sum(map(len, a.layers)):3d}  "
          f"{a.to_compact()[:60]}...")
  err = latency_check.mape(preds, meas)
  tau = stats.kendall_tau(preds, meas)
  print(f"\n{FLAGS.backend}: MAPE {err:.2f} %, Kendall's tau {tau:.3f} over {len(archs)} "
        f"architectures ({min(meas):.2f}-{max(meas):.2f} ms measured), {time.time() - t0:.0f} s; "
        f"load average {_load()}")
  report = {"latency_lut": lut, "device": dev, "statistic": table.statistic,
            "resolution": FLAGS.resolution, "space": FLAGS.space, "macro": FLAGS.macro,
            "mape_percent": err, "kendall_tau": tau, "load_average": _load(),
            "archs": [{"arch": a.to_compact(), "predicted_ms": p, "measured": m}
                      for a, p, m in zip(archs, preds, measured)]}
  from nse_tf.fileio import atomic_write_text  # pylint: disable=g-import-not-at-top
  atomic_write_text(os.path.join(FLAGS.output_dir, stem + ".json"),
                    json.dumps(report, indent=1) + "\n")
  png = os.path.join(FLAGS.output_dir, stem + ".png")
  latency_check.plot_check(png, preds, meas, title=(
      f"{FLAGS.space}@{FLAGS.macro} {FLAGS.resolution}px, {FLAGS.backend}, batch "
      f"{FLAGS.batch_size}: MAPE {err:.1f} %, Kendall τ {tau:.3f}"))
  others = []
  for st in latency.STATISTICS:
    t_st = latency.LatencyTable.load(lut, FLAGS.space, FLAGS.macro, FLAGS.resolution,
                                     FLAGS.scale, FLAGS.num_classes, statistic=st)
    p_st, m_st = [t_st.arch_cost(a) for a in archs], [m[st] for m in measured]
    others.append(f"{st} MAPE {latency_check.mape(p_st, m_st):.1f} % tau "
                  f"{stats.kendall_tau(p_st, m_st):.3f}")
  print("every statistic (table and networks alike): " + "; ".join(others))
  print(f"wrote {png} and {stem}.json")
  return 0


if __name__ == "__main__":
  cli.run(main, define_flags)
