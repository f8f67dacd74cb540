"""Does the search find better networks than chance? (the protocol of seed Fig. 3)

Trains from scratch, with the same budget, the architecture a finished search picked
and N random architectures drawn uniformly from the *full* pool with cost in the
search's interval, then prints the random ones' mean ± 95 % CI next to the NSE result.
Also prints, per round, the best held-out accuracy of the front at or below a fixed
cost (does the front improve over rounds?). Uses the search's dataset; demo_shapes is
the embedded set on which architectures actually differ. CI never runs this.

  python -m nse_tf.search --flagfile=flags/demo.cfg --dataset=demo_shapes --epochs=12 \
      --eval_examples=600 --output_dir=runs/shapes
  python benchmarks/nse_vs_random.py --search_dir=runs/shapes --num_random=10 --epochs=6
"""

import csv
import json
import math
import os
import statistics
import time

import numpy as np
import tensorflow as tf
import tf_keras as keras
from absl import app, flags

from nse_tf import arch as arch_lib
from nse_tf import cost, data, nsenet, spaces

flags.DEFINE_string("search_dir", None, "Output dir of a finished search.")
flags.DEFINE_integer("num_random", 10, "Random architectures to train.")
flags.DEFINE_integer("epochs", 6, "Training epochs per network (the same for all).")
flags.DEFINE_integer("batch", 128, "Batch size.")
flags.DEFINE_float("lr", 0.1, "Peak learning rate (SGD Nesterov, cosine).")
flags.DEFINE_integer("seed", 0, "Seed of the random architectures and of training.")
flags.DEFINE_float("fixed_cost", None, "Cost for the per-round front comparison (default: "
                   "the interval's upper bound).")
FLAGS = flags.FLAGS


def random_in_interval(space, macro, table, lo, hi, max_ops, rng, max_draws=200000):
  pool = len(spaces.get_pool(space))
  kinds = spaces.layer_kinds(macro)
  for _ in range(max_draws):
    layers = []
    for kind in kinds:
      n = rng.integers(0 if kind == "N" else 1, max_ops + 1)
      layers.append(tuple(sorted(rng.choice(pool, n, replace=False).tolist())))
    if lo < table.indices_cost(layers) < hi:
      return arch_lib.Architecture.from_indices(space, layers, macro=macro)
  raise RuntimeError(f"no random architecture with cost in ({lo}, {hi})")


def train_and_eval(a, d, image_size, seed):
  keras.backend.clear_session()
  keras.utils.set_random_seed(seed)
  model = nsenet.build_nsenet(a, d.info.num_classes, (image_size, image_size, 3))
  steps = max(1, d.info.num_train // FLAGS.batch)
  sched = keras.optimizers.schedules.CosineDecay(FLAGS.lr, FLAGS.epochs * steps)
  model.compile(keras.optimizers.SGD(sched, momentum=0.9, nesterov=True),
                keras.losses.SparseCategoricalCrossentropy(from_logits=True),
                metrics=["accuracy"])
  model.fit(d.train(FLAGS.batch, seed=seed), epochs=FLAGS.epochs, steps_per_epoch=steps,
            verbose=0)
  return model.evaluate(d.validation(256), verbose=0)[1]


def ci95(values):
  m = statistics.mean(values)
  if len(values) < 2:
    return m, float("nan")
  t = {2: 12.71, 3: 4.30, 4: 3.18, 5: 2.78, 6: 2.57, 7: 2.45, 8: 2.36, 9: 2.31, 10: 2.26,
       11: 2.23, 12: 2.20, 15: 2.14, 20: 2.09, 30: 2.05}
  k = min((n for n in t if n >= len(values)), default=None)
  return m, (t[k] if k else 1.96) * statistics.stdev(values) / math.sqrt(len(values))


def main(_):
  out = FLAGS.search_dir
  with open(os.path.join(out, "config.json")) as f:
    cfg = json.load(f)
  final = arch_lib.Architecture.load(os.path.join(out, "final_arch.json"))
  macro = cfg["macro"] or spaces.DEFAULT_MACRO[cfg["space"]]
  lo, hi = (float(v) for v in cfg["interval"])
  d = data.get_data(cfg["dataset"], data_dir=cfg.get("data_dir"), image_size=cfg["image_size"],
                    holdout_examples=0)
  table = cost.CostTable(cfg["space"], macro, cfg["cost_resolution"], cfg["scale"],
                         num_classes=d.info.num_classes)
  nse = final.with_scale(cfg["scale"])
  print(f"search {out}: {cfg['dataset']}, {cfg['space']}@{macro}, interval ({lo:g}, {hi:g}) "
        f"MFLOPs; training each network {FLAGS.epochs} epochs, batch {FLAGS.batch}")
  t0 = time.time()
  nse_acc = train_and_eval(nse, d, cfg["image_size"], FLAGS.seed)
  print(f"NSE  {table.arch_cost(nse):7.1f} MFLOPs  top-1 {100 * nse_acc:.2f} %  "
        f"({time.time() - t0:.0f} s)  {nse.to_compact()}")
  rng = np.random.default_rng(FLAGS.seed)
  accs = []
  for i in range(FLAGS.num_random):
    a = random_in_interval(cfg["space"], macro, table, lo, hi, cfg["max_ops"], rng)
    t0 = time.time()
    acc = train_and_eval(a, d, cfg["image_size"], FLAGS.seed)
    accs.append(acc)
    print(f"rand {table.arch_cost(a):7.1f} MFLOPs  top-1 {100 * acc:.2f} %  "
          f"({time.time() - t0:.0f} s)  {a.to_compact()}")
  m, h = ci95(accs)
  better = sum(acc < nse_acc for acc in accs)
  print(f"\nrandom ({len(accs)}): {100 * m:.2f} ± {100 * h:.2f} % (95 % CI); "
        f"NSE: {100 * nse_acc:.2f} %; NSE beats {better}/{len(accs)} random architectures")
  fixed = FLAGS.fixed_cost if FLAGS.fixed_cost is not None else hi
  print(f"\nfront's best held-out accuracy (supernet, inherited weights) at cost <= {fixed:g}:")
  r = 1
  while os.path.exists(os.path.join(out, f"round_{r:02d}", "candidates.csv")):
    with open(os.path.join(out, f"round_{r:02d}", "candidates.csv")) as f:
      rows = [row for row in csv.DictReader(f) if row["is_pareto"] == "1"
              and float(row["cost"]) <= fixed]
    best = max((float(row["accuracy"]) for row in rows), default=float("nan"))
    print(f"  round {r}: {100 * best:.2f} %")
    r += 1


if __name__ == "__main__":
  flags.mark_flag_as_required("search_dir")
  app.run(main)
