"""What does one round of the search cost, phase by phase, against the standalone networks?

For the same sampled paths of one flops27 supernet (the `flops` macro, K ops per layer),
side by side in one process (per path: supernet, then standalone; medians over paths):

  weight step    the search's compiled weight step (RoundTrainer: deferred off-op updates
                 caught up, forward, backward, gated SGD) against the standalone network
                 of the path (nsenet.build_nsenet) trained with the same SGD
  θ step         the search's two-path θ step (per global batch), against that weight step
  evaluation     per candidate: BN recalibration on --recal_batches training batches plus
                 inference on --eval_images held-out images, through the supernet with the
                 path's gates (CandidateEvaluator, what the search runs) against the same
                 work on the standalone network
  first call     of every compiled function (trace + graph optimisation + first run): the
                 supernet's weight step, θ step, catch-up, recalibration and evaluation
                 steps (their sum plus the build is a round's start-up) and the standalone
                 network's training step
  peak memory    resident set size (VmHWM) of the supernet process after each phase of its
                 start-up and after --steady_steps weight steps on fresh paths (with a θ
                 step after every second one and two candidate evaluations, as a round
                 goes on: each new path adds to the peak until the steps have run every
                 op), and of a separate process that only trains the standalone network
                 of the largest path that the weight steps ran, timed or steady, for as
                 many steps (the memory target's denominator: a path's activations are
                 most of a step's memory)

Every resolution runs in its own subprocess (peak memory is per process). Data: the
demo_digits_hard pipelines at the benchmark's resolution (what the proxy search reads).
CI never runs this; the tests run it once at tiny sizes.

  python benchmarks/round_cost.py                                    # 224x224, batch 8
  python benchmarks/round_cost.py --resolutions=32 --batches=64 --eval_images=512
  python benchmarks/round_cost.py --resolutions=16 --batches=16 --paths=3 --macro=tiny  # 2 min
  python benchmarks/round_cost.py --allocator=system    # TF_ONEDNN_USE_SYSTEM_ALLOCATOR=1, MALLOC_ARENA_MAX=2
"""

import json
import logging
import os
import statistics
import subprocess
import sys
import time

from absl import flags

from nse_tf import cli, common_flags, machine


def define_flags(fv: flags.FlagValues = flags.FLAGS) -> None:
  """The tool's flags (defined by cli.run, not at import)."""
  flags.DEFINE_list("resolutions", ["224"], "Input resolutions, each in its own process "
                    "(224 alone: ~18 min on the 2-core CPU; 32: ~12 min).", flag_values=fv)
  flags.DEFINE_list("batches", ["8"], "Global batch per resolution (same order).",
                    flag_values=fv)
  flags.DEFINE_list("eval_images", ["64"], "Held-out images per candidate evaluation, per "
                    "resolution (same order).", flag_values=fv)
  flags.DEFINE_integer("recal_batches", 5, "BN recalibration batches per candidate.",
                       lower_bound=1, flag_values=fv)
  flags.DEFINE_integer("paths", 10, "Sampled paths (architectures) per resolution.",
                       lower_bound=1, flag_values=fv)
  flags.DEFINE_integer("steps", 3, "Timed calls per path and variant (after one warm-up).",
                       lower_bound=1, flag_values=fv)
  flags.DEFINE_integer("steady_steps", 20, "Weight steps on fresh paths after the start-up "
                       "(and in the standalone memory process), for the round's peak memory.",
                       lower_bound=1, flag_values=fv)
  flags.DEFINE_enum("allocator", "default", list(ALLOCATORS),
                    "The measuring processes' CPU memory allocator: 'default' leaves the "
                    "environment as it is (TensorFlow's oneDNN BFC pool for buffers of 256 "
                    "KiB and more, unless you set the variables yourself); 'system' sets "
                    "them: malloc for every buffer, in at most two arenas.", flag_values=fv)
  flags.DEFINE_string("macro", "flops", "Macro-architecture.", flag_values=fv)
  flags.DEFINE_integer("max_ops", 5, "Working-set size K per layer.", lower_bound=1,
                       flag_values=fv)
  flags.DEFINE_integer("seed", 0, "Seed of the working sets and gates.", flag_values=fv)
  flags.DEFINE_enum("graph_optimization", "on", list(common_flags.GRAPH_OPTIMIZATION),
                    "As the search's flag: TensorFlow's graph optimiser on or off.",
                    flag_values=fv)
  flags.DEFINE_bool("deterministic", True, "As the search's flag (default on, as there): "
                    "op determinism, one inter-op thread, grappler's memory optimiser off.",
                    flag_values=fv)
  flags.DEFINE_string("json_out", None, "Also write the results as JSON here.", flag_values=fv)
  # Internal: one resolution in this process ('supernet') or the standalone memory probe.
  flags.DEFINE_enum("_worker", None, ["supernet", "standalone"], "internal", flag_values=fv)
  flags.DEFINE_string("_arch", None, "internal", flag_values=fv)


FLAGS = flags.FLAGS

# What --allocator sets in the measuring processes' environment. Both are read once, at
# start: TensorFlow's when it first allocates, glibc's when the process starts.
ALLOCATORS = {"default": {},
              "system": {"TF_ONEDNN_USE_SYSTEM_ALLOCATOR": "1", "MALLOC_ARENA_MAX": "2"}}


def peak_rss_mib() -> float:
  """This process's peak resident set size so far (VmHWM), MiB."""
  with open("/proc/self/status", encoding="ascii") as f:
    for line in f:
      if line.startswith("VmHWM:"):
        return int(line.split()[1]) / 1024.0
  return float("nan")


class _ExpectedRetracing(logging.Filter):
  """Drops TensorFlow's "… calls to <function …> triggered tf.function retracing" warning:
  each standalone network here has compiled steps of its own, traced once each, which
  that warning counts as retracing of one function."""

  def filter(self, record):
    return "triggered tf.function retracing" not in record.getMessage()


def _first_call(fn, *args):
  t0 = time.perf_counter()
  out = fn(*args)
  _wait(out)
  return time.perf_counter() - t0


def _wait(out):
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  for t in tf.nest.flatten(out):
    if hasattr(t, "numpy"):
      t.numpy()


def _interleaved(calls, n):
  """Median time of each (fn, args) in `calls`, called in turn `n` times."""
  times = [[] for _ in calls]
  for _ in range(n):
    for k, (fn, args) in enumerate(calls):
      t0 = time.perf_counter()
      _wait(fn(*args))
      times[k].append(time.perf_counter() - t0)
  return [statistics.median(t) for t in times]


def round_setup(res, batch, macro, max_ops, seed, mixed_precision=None):
  """Random working sets (flops27, `max_ops` per layer), a round's TrainConfig for timing
  (θ every step, no checkpoints) and the cost table at `res`."""
  import numpy as np  # pylint: disable=g-import-not-at-top
  from nse_tf import cost, spaces, trainer  # pylint: disable=g-import-not-at-top
  rng = np.random.default_rng(seed)
  pool = spaces.get_pool("flops27")
  ws = [sorted(rng.choice(len(pool), max_ops, replace=False).tolist())
        for _ in spaces.layer_kinds(macro)]
  cfg = trainer.TrainConfig(global_batch=batch, epochs=1, steps_per_epoch=10_000,
                            warmup_epochs=0.01, lr=0.05, tau=1e6, theta_every=1,
                            progress=False, seed=seed, checkpoint_every=10**9,
                            mixed_precision=mixed_precision)
  return ws, cfg, cost.CostTable("flops27", macro, resolution=res)


def _setup(res, batch, eval_images):
  """The demo_digits_hard data at `res`, the working sets and the round's trainer."""
  from nse_tf import data  # pylint: disable=g-import-not-at-top
  d = data.get_data("demo_digits_hard", image_size=res)
  return (d, *round_setup(res, batch, FLAGS.macro, FLAGS.max_ops, FLAGS.seed))


def theta_args(tr, alive):
  """Arguments of RoundTrainer `tr`'s θ step: gates drawn from its θ, as the search does."""
  import numpy as np  # pylint: disable=g-import-not-at-top
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  g1, g2, same = tr.sampler.theta_gates(alive, tr.model.thetas_numpy())
  return (tr.holdout_iter, tf.constant(g1), tf.constant(g2), tf.constant(same),
          tf.constant(np.concatenate(alive).astype(np.float32)))


def _path_arch(ws, gates, macro):
  """The architecture of the path that `gates` select from working sets `ws` (flops27)."""
  from nse_tf import arch as arch_lib, spaces  # pylint: disable=g-import-not-at-top
  pool = spaces.get_pool("flops27")
  layers, off = [], 0
  for w in ws:
    layers.append(tuple(pool[i] for i, g in zip(w, gates[off:off + len(w)]) if g > 0))
    off += len(w)
  return arch_lib.Architecture("flops27", macro, tuple(layers), 1.0)


class Standalone:
  """One path's network with the search's SGD: training step, recalibration, inference.

  Built and trained under `strategy` (default: the default one) and `mixed_precision`
  (None, 'bfloat16' or 'float16': the policy while building, float16 with loss scaling,
  as the search's trainer does).
  """

  def __init__(self, arch, data, res, batch, seed, strategy=None, mixed_precision=None):
    import tensorflow as tf  # pylint: disable=g-import-not-at-top
    import tf_keras as keras  # pylint: disable=g-import-not-at-top
    from nse_tf import loop, nsenet, optim  # pylint: disable=g-import-not-at-top
    strategy = strategy or tf.distribute.get_strategy()
    fp16 = mixed_precision == "float16"
    keras.utils.set_random_seed(seed)
    with loop.build_policy(mixed_precision), strategy.scope():
      model = self.model = nsenet.build_nsenet(arch, data.info.num_classes, (res, res, 3))
      sgd = optim.SearchSGD(0.05, momentum=0.9, nesterov=True, l2=4e-5)
      opt = keras.mixed_precision.LossScaleOptimizer(sgd) if fp16 else sgd
      opt.build(model.trainable_variables)
    self.train_iter = loop.distributed_iterator(strategy,
                                                data.dataset_fn("train", batch, seed=seed))
    self.recal_iter = loop.distributed_iterator(strategy,
                                                data.dataset_fn("train", batch, seed=seed + 17))
    gb = float(batch)

    def step_fn(images, labels):
      with tf.GradientTape() as tape:
        logits = tf.cast(model(images, training=True), tf.float32)
        loss = tf.reduce_sum(keras.losses.sparse_categorical_crossentropy(
            labels, logits, from_logits=True)) / gb
        scaled = loop.scaled_loss(loss, opt, fp16)
      grads = loop.gradients(tape, scaled, model.trainable_variables, opt, fp16)
      opt.apply_gradients(zip(grads, model.trainable_variables))
      return loss

    @tf.function(autograph=False)
    def train_step(iterator):
      loss = strategy.run(step_fn, args=next(iterator))
      return strategy.reduce(tf.distribute.ReduceOp.SUM, loss, axis=None)

    @tf.function(autograph=False)
    def recal_step(iterator):
      out = strategy.run(lambda images, _: tf.cast(model(images, training=True)[0, 0],
                                                    tf.float32), args=next(iterator))
      return strategy.reduce(tf.distribute.ReduceOp.SUM, out, axis=None)

    @tf.function(autograph=False)
    def eval_step(images, labels):
      pred = tf.argmax(model(images, training=False), -1, output_type=tf.int32)
      return tf.reduce_sum(tf.cast(tf.equal(pred, tf.cast(labels, tf.int32)), tf.float32))

    self.train_step, self.recal_step, self.eval_step = train_step, recal_step, eval_step

  def evaluate(self, batches, recal):
    for _ in range(recal):
      _wait(self.recal_step(self.recal_iter))
    return sum(float(self.eval_step(x, y)) for x, y in batches)


def run_supernet(res, batch, eval_images):
  """One resolution: start-up phases with memory, then per path supernet vs standalone."""
  import types  # pylint: disable=g-import-not-at-top
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  from nse_tf import candidate_eval, cost, distribute  # pylint: disable=g-import-not-at-top
  from nse_tf import loop, supernet, trainer  # pylint: disable=g-import-not-at-top
  d, ws, cfg, table = _setup(res, batch, eval_images)
  mflops = lambda arch: cost.arch_cost(arch, res, d.info.num_classes).macs / 1e6
  out = {"resolution": res, "batch": batch, "eval_images": eval_images,
         "first_call": {}, "peak_mib": {"start": peak_rss_mib()}}
  first, peak = out["first_call"], out["peak_mib"]
  # As the search builds and traces a round: with Python's collector mostly off (its
  # collection on the way out is not timed; the search's comes after the round).
  with loop.fewer_gc_passes():
    t0 = time.perf_counter()
    tr = trainer.RoundTrainer(cfg, distribute.get_strategy(), d, table, space="flops27",
                              macro=FLAGS.macro, working_sets=ws,
                              num_classes=d.info.num_classes, resolution=res)
    first["build"] = time.perf_counter() - t0
    peak["build"] = peak_rss_mib()
    alive = tr.alive_masks()
    sampler = supernet.GateSampler(tr.kinds, [len(w) for w in ws], seed=FLAGS.seed + 1)
    g = tf.constant(tr.sampler.weight_gates(alive, None))
    first["weight_step"] = _first_call(tr._weight_step, tr.train_iter, g)
    peak["weight_step"] = peak_rss_mib()
    next_theta_args = lambda: theta_args(tr, alive)

    first["theta_step"] = _first_call(tr._theta_step, *next_theta_args())
    peak["theta_step"] = peak_rss_mib()
    first["catch_up"] = _first_call(tr._catch_up_all)
    ecfg = types.SimpleNamespace(bn_recal_batches=FLAGS.recal_batches, eval_examples=eval_images,
                                 eval_batch=min(eval_images, 256), seed=FLAGS.seed,
                                 image_size=res)
    ev = candidate_eval.CandidateEvaluator(tr, d, ecfg)
    t0 = time.perf_counter()
    ev.accuracy(tr.sampler.weight_gates(alive, None))
    first["evaluation"] = time.perf_counter() - t0   # recal + eval steps traced and run once
    peak["evaluation"] = peak_rss_mib()
    first["round_start_up"] = sum(first.values())
    # The round goes on: fresh paths, as the search's weight steps draw them, a θ step
    # after every second weight step (theta_every = 2), and two candidates evaluated.
    steady = []
    for i in range(FLAGS.steady_steps):
      steady.append(tr.sampler.weight_gates(alive, None))
      _wait(tr._weight_step(tr.train_iter, tf.constant(steady[-1])))
      if i % 2 == 1:
        _wait(tr._theta_step(*next_theta_args()))
    for _ in range(2):
      ev.accuracy(tr.sampler.weight_gates(alive, None))
    peak["steady"] = peak["round"] = peak_rss_mib()

  eval_batches = ev.eval_batches
  # Every path's standalone network is built (and its steps traced) before any timing:
  # the first call of a compiled supernet function after new Keras variables exist took
  # about half its first-call time again (no retrace), so the supernet's functions are
  # warmed up once after all builds (and the standalone networks' functions too). No
  # keras.backend.clear_session(): it made them retrace.
  logging.getLogger("tensorflow").addFilter(_ExpectedRetracing())
  rows, nets = [], []
  for p in range(FLAGS.paths):
    gates = sampler.weight_gates(alive, None)
    arch = _path_arch(ws, gates, FLAGS.macro)
    sa = Standalone(arch, d, res, batch, FLAGS.seed)
    row = {"arch": arch.to_compact(),
           "mflops": mflops(arch),
           "alone_first_call": _first_call(sa.train_step, sa.train_iter)}
    sa.evaluate(eval_batches, 1)        # trace its recalibration and evaluation steps
    rows.append(row)
    nets.append((gates, sa))
  for _, sa in nets:                   # their functions suffer the same after later builds
    _wait(sa.train_step(sa.train_iter))
    sa.evaluate(eval_batches, 1)
  tr._weight_step(tr.train_iter, tf.constant(nets[0][0]))
  _wait(tr._theta_step(*next_theta_args()))
  ev.accuracy(nets[0][0])
  n = max(1, FLAGS.steps // 2)
  for p, (row, (gates, sa)) in enumerate(zip(rows, nets)):
    gt = tf.constant(gates)
    # Interleaved call by call, so that the machine's drift hits both variants alike.
    row["super_weight"], row["alone_weight"] = _interleaved(
        [(tr._weight_step, (tr.train_iter, gt)), (sa.train_step, (sa.train_iter,))],
        FLAGS.steps)
    row["super_theta"], = _interleaved([(tr._theta_step, next_theta_args())], FLAGS.steps)
    row["super_eval"], row["alone_eval"] = _interleaved(
        [(ev.accuracy, (gates,)), (sa.evaluate, (eval_batches, FLAGS.recal_batches))], n)
    print(f"  path {p}: {row['mflops']:7.1f} MFLOPs  weight {row['super_weight'] * 1e3:7.1f} / "
          f"{row['alone_weight'] * 1e3:7.1f} ms  θ {row['super_theta'] * 1e3:7.1f} ms  eval "
          f"{row['super_eval']:6.2f} / {row['alone_eval']:6.2f} s", file=sys.stderr, flush=True)
  out["paths"] = rows
  steady_archs = [_path_arch(ws, gates, FLAGS.macro) for gates in steady]
  out["largest_mflops"], out["largest_path"] = max(
      [(r["mflops"], r["arch"]) for r in rows]
      + [(mflops(a), a.to_compact()) for a in steady_archs])
  return out


def run_standalone_memory(arch_compact, res, batch):
  """Peak RSS of a process that only builds and trains one standalone network."""
  from nse_tf import arch as arch_lib, data  # pylint: disable=g-import-not-at-top
  d = data.get_data("demo_digits_hard", image_size=res)
  sa = Standalone(arch_lib.Architecture.from_compact(arch_compact), d, res, batch, FLAGS.seed)
  for _ in range(FLAGS.steady_steps):
    _wait(sa.train_step(sa.train_iter))
  return {"peak_mib": peak_rss_mib()}


def _subprocess(args):
  cmd = [sys.executable, os.path.abspath(__file__)] + args
  env = dict(os.environ, **ALLOCATORS[FLAGS.allocator])
  proc = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=None, text=True, check=False,
                        env=env)
  if proc.returncode != 0:
    raise RuntimeError(f"{' '.join(cmd)} exited with {proc.returncode}")
  return json.loads(proc.stdout.strip().splitlines()[-1])


def _common_args():
  return [f"--paths={FLAGS.paths}", f"--steps={FLAGS.steps}", f"--macro={FLAGS.macro}",
          f"--steady_steps={FLAGS.steady_steps}",
          f"--max_ops={FLAGS.max_ops}", f"--seed={FLAGS.seed}",
          f"--recal_batches={FLAGS.recal_batches}",
          f"--graph_optimization={FLAGS.graph_optimization}", _determinism_flag()]


def _determinism_flag():
  return f"--{'' if FLAGS.deterministic else 'no'}deterministic"


def _med(rows, key):
  return statistics.median(r[key] for r in rows)


def report(res_out):
  rows = res_out["paths"]
  f, m = res_out["first_call"], res_out["peak_mib"]
  ratio = lambda a, b: statistics.median(r[a] / r[b] for r in rows)
  lines = [
      f"== {res_out['resolution']}x{res_out['resolution']}, batch {res_out['batch']}, "
      f"{FLAGS.macro} macro, flops27, K = {FLAGS.max_ops}, {len(rows)} paths "
      f"(medians over paths)",
      f"  weight step        supernet {_med(rows, 'super_weight') * 1e3:8.1f} ms   standalone "
      f"{_med(rows, 'alone_weight') * 1e3:8.1f} ms   supernet/standalone "
      f"{ratio('super_weight', 'alone_weight'):.2f}",
      f"  θ step             {_med(rows, 'super_theta') * 1e3:8.1f} ms   θ step / supernet "
      f"weight step {ratio('super_theta', 'super_weight'):.2f}",
      f"  evaluation         supernet {_med(rows, 'super_eval'):8.2f} s    standalone "
      f"{_med(rows, 'alone_eval'):8.2f} s    per candidate ({FLAGS.recal_batches} recal "
      f"batches + {res_out['eval_images']} images), supernet/standalone "
      f"{ratio('super_eval', 'alone_eval'):.2f}",
      "  first call (s)     " + "  ".join(f"{k} {v:.1f}" for k, v in f.items())
      + f"  | standalone training step {_med(rows, 'alone_first_call'):.1f}",
      "  peak RSS (MiB)     " + "  ".join(f"{k} {v:.0f}" for k, v in m.items()),
      f"  standalone process, largest path run ({res_out['largest_mflops']:.0f} MFLOPs): "
      f"{res_out['standalone_peak_mib']:.0f} MiB; round peak / standalone "
      f"{m['round'] / res_out['standalone_peak_mib']:.2f}",
  ]
  return "\n".join(lines)


def main(_):
  if len(FLAGS.batches) != len(FLAGS.resolutions) or len(FLAGS.eval_images) != len(
      FLAGS.resolutions):
    raise cli.UsageError("--resolutions, --batches and --eval_images need the same number "
                         "of entries")
  if FLAGS._worker:
    common_flags.setup_tensorflow(FLAGS.deterministic, FLAGS.graph_optimization)
  if FLAGS._worker == "supernet":
    res, batch, n = int(FLAGS.resolutions[0]), int(FLAGS.batches[0]), int(FLAGS.eval_images[0])
    print(json.dumps(run_supernet(res, batch, n)))
    return
  if FLAGS._worker == "standalone":
    res, batch = int(FLAGS.resolutions[0]), int(FLAGS.batches[0])
    print(json.dumps(run_standalone_memory(FLAGS._arch, res, batch)))
    return
  here = machine.describe()
  print(f"{machine.one_line(here)}; each resolution in its own "
        f"process; --graph_optimization={FLAGS.graph_optimization}, "
        f"{_determinism_flag()}, --allocator={FLAGS.allocator}", flush=True)
  results = []
  for res, batch, n in zip(FLAGS.resolutions, FLAGS.batches, FLAGS.eval_images):
    t0 = time.perf_counter()
    one = [f"--resolutions={res}", f"--batches={batch}", f"--eval_images={n}"]
    out = _subprocess(one + _common_args() + ["--_worker=supernet"])
    out["standalone_peak_mib"] = _subprocess(
        one + _common_args() + ["--_worker=standalone", f"--_arch={out['largest_path']}"]
    )["peak_mib"]
    out["wall_s"] = time.perf_counter() - t0
    out["machine"] = here
    print(report(out), flush=True)
    results.append(out)
  if FLAGS.json_out:
    from nse_tf import fileio  # pylint: disable=g-import-not-at-top
    fileio.atomic_write_text(FLAGS.json_out, json.dumps(results, indent=1))


if __name__ == "__main__":
  cli.run(main, define_flags)
