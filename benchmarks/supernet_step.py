"""Does a sampled path of the supernet cost what its standalone network costs?

For the same sampled architectures (flops27 working sets, uniform gates), the median
weight-step time (forward, backward, the search's SGD update) of
  * the supernet, inactive branches skipped with tf.cond and the off ops' momentum/decay
    update deferred until they run again (what the search runs),
  * the same supernet computing every branch and multiplying by the gate, every
    weight updated every step (the naive baseline),
  * the standalone network of that architecture (nsenet.build_nsenet),
at the same batch, side by side in one run. Prints ratios; CI never runs this.

  python benchmarks/supernet_step.py                       # 32x32 demo case + 224 case
  python benchmarks/supernet_step.py --resolutions=32 --archs=10 --steps=10
"""

import contextlib
import statistics
import time

import numpy as np
import tensorflow as tf
import tf_keras as keras
from absl import flags

from nse_tf import arch as arch_lib
from nse_tf import cli, cost, machine, nsenet, optim, spaces, supernet


def define_flags(fv: flags.FlagValues = flags.FLAGS) -> None:
  """The tool's flags (defined by cli.run, not at import)."""
  flags.DEFINE_list("resolutions", ["32", "224"], "Input resolutions to measure.", flag_values=fv)
  flags.DEFINE_list("batches", ["32", "8"], "Batch per resolution (same order).", flag_values=fv)
  flags.DEFINE_integer("archs", 10, "Sampled architectures per resolution.", flag_values=fv)
  flags.DEFINE_integer("steps", 8, "Timed steps per architecture (after 2 warm-up steps).",
                       flag_values=fv)
  flags.DEFINE_integer("max_ops", 5, "Working-set size K per layer.", flag_values=fv)
  flags.DEFINE_float("scale", 1.0, "Channel scale of the macro.", flag_values=fv)
  flags.DEFINE_integer("seed", 0, "Seed of working sets and gates.", flag_values=fv)
  flags.DEFINE_bool("skip_off_ops", False, "As the search's --skip_off_ops: off ops' weights "
                    "get no momentum/decay update.", flag_values=fv)


FLAGS = flags.FLAGS


def _timed(step_fn, args, steps):
  for _ in range(2):
    step_fn(*args)
  times = []
  for _ in range(steps):
    t0 = time.perf_counter()
    out = step_fn(*args)
    float(out)  # wait for the result
    times.append(time.perf_counter() - t0)
  return statistics.median(times)


def _train_step(model, call, gated=False):
  # The search's own optimiser (SGD Nesterov 0.9, L2 4e-5 on kernels) for every
  # variant. `gated`: as in the search, the ops that were off get their momentum/decay
  # update deferred (or skipped with --skip_off_ops) instead of a zero-gradient update.
  opt = optim.SearchSGD(0.01, momentum=0.9, nesterov=True, l2=4e-5,
                          skip_off_ops=FLAGS.skip_off_ops)
  opt.build(model.trainable_variables)
  if gated:
    opt.set_op_groups(model.op_variable_groups())

  @tf.function
  def step(images, labels, *gates):
    if gated:
      opt.catch_up(gates[0])
    with opt.gated(gates[0]) if gated else contextlib.nullcontext():
      with tf.GradientTape() as tape:
        logits = call(images, *gates)
        loss = tf.reduce_mean(keras.losses.sparse_categorical_crossentropy(
            labels, logits, from_logits=True))
      grads = tape.gradient(loss, model.trainable_variables)
      opt.apply_gradients([(tf.zeros_like(v) if g is None else g, v)
                           for g, v in zip(grads, model.trainable_variables)])
    return loss

  return step


def run_resolution(res, batch):
  rng = np.random.default_rng(FLAGS.seed)
  pool = spaces.get_pool("flops27")
  kinds = spaces.layer_kinds("flops")
  ws = [sorted(rng.choice(len(pool), FLAGS.max_ops, replace=False).tolist()) for _ in kinds]
  table = cost.CostTable("flops27", "flops", resolution=res, scale=FLAGS.scale)
  images = tf.random.normal([batch, res, res, 3])
  labels = tf.zeros([batch], tf.int32)
  nets = {}
  for skip in (True, False):
    net = supernet.Supernet("flops27", "flops", ws, table, 10, res, FLAGS.scale,
                            skip_inactive=skip)
    net.build_all()
    step = _train_step(net, lambda x, g, net=net: net(x, gates=g, training=True), gated=skip)
    t0 = time.perf_counter()
    step(images, labels, tf.ones([net.total_ops]))
    print(f"  {'cond' if skip else 'mask'} supernet compiled in {time.perf_counter() - t0:.0f} s")
    nets[skip] = step
  sampler = supernet.GateSampler(kinds, [len(w) for w in ws], seed=FLAGS.seed)
  alive = [np.ones(len(w), bool) for w in ws]
  rows = []
  for a in range(FLAGS.archs):
    gates = sampler.weight_gates(alive)
    layers, off = [], 0
    for w in ws:
      layers.append([pool[i] for i, g in zip(w, gates[off:off + len(w)]) if g > 0])
      off += len(w)
    arch = arch_lib.Architecture("flops27", "flops", tuple(map(tuple, layers)), FLAGS.scale)
    g = tf.constant(gates)
    t_cond = _timed(nets[True], (images, labels, g), FLAGS.steps)
    t_mask = _timed(nets[False], (images, labels, g), FLAGS.steps)
    keras.backend.clear_session()
    model = nsenet.build_nsenet(arch, 10, (res, res, 3))
    t_alone = _timed(_train_step(model, lambda x, m=model: m(x, training=True)),
                     (images, labels), FLAGS.steps)
    macs = cost.arch_cost(arch, res, 10).macs / 1e6
    rows.append((t_cond, t_mask, t_alone))
    print(f"  arch {a}: {macs:7.1f} MFLOPs  supernet {t_cond * 1e3:7.1f} ms  "
          f"mask-all {t_mask * 1e3:7.1f} ms  standalone {t_alone * 1e3:7.1f} ms  "
          f"ratio {t_cond / t_alone:.2f}  mask ratio {t_mask / t_alone:.2f}")
  cond, mask, alone = (np.array(c) for c in zip(*rows))
  print(f"resolution {res}, batch {batch}: median over {len(rows)} archs — supernet/standalone "
        f"{np.median(cond / alone):.2f}, mask-all/standalone {np.median(mask / alone):.2f}")
  return np.median(cond / alone), np.median(mask / alone)


def main(_):
  print(f"{machine.one_line(machine.describe())}, devices: "
        f"{[d.device_type for d in tf.config.list_logical_devices()]}")
  summary = []
  for res, batch in zip(FLAGS.resolutions, FLAGS.batches):
    print(f"== {res}x{res}, batch {batch}, flops27, K = {FLAGS.max_ops}")
    summary.append((res, batch) + run_resolution(int(res), int(batch)))
  print("\nsummary (median weight-step time ratios; target supernet/standalone <= 1.15):")
  for res, batch, r_cond, r_mask in summary:
    print(f"  {res}x{res} batch {batch}: supernet/standalone {r_cond:.2f}   "
          f"mask-all/standalone {r_mask:.2f}")


if __name__ == "__main__":
  cli.run(main, define_flags)
