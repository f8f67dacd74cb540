"""CLI: train one round of the NSE supernet (SPEC §4) and report θ and pruning.

  python -m nse_tf.train_round --flagfile=flags/demo_round.cfg --output_dir=runs/round
  python -m nse_tf.train_round --dataset=imagenet2012 --data_dir=DIR --strategy=mirrored \
      --global_batch=1024 --epochs=100 --output_dir=runs/r1

Round 1 of a search: every layer's working set S_l is the first K ops of its
seeded random permutation of the pool. Writes under --output_dir:
  ckpt/          the round's checkpoint (re-running the command resumes from it)
  tb/            TensorBoard: losses, lr, expected cost, p = σ(θ) per op, pruning
  round.json     per layer: working set, ops pruned (with step and θ), survivors
                 and their keep-probabilities; the training history's last values;
                 the machine it ran on (nse_tf/machine.py)
"""

from __future__ import annotations

import json
import os
import time

import numpy as np
from absl import flags

from nse_tf import cli
from nse_tf import common_flags
from nse_tf import run_dir
from nse_tf import run_lock


def define_flags(fv: flags.FlagValues = flags.FLAGS) -> None:
  """A round's flags (common_flags); nothing of its own."""
  common_flags.define_round_flags(fv)


def initial_working_sets(pool_size: int, num_layers: int, max_ops: int, seed: int):
  """Per layer a seeded permutation of the pool (the queue); S_l = its first K."""
  rng = np.random.default_rng(seed)
  queues = [rng.permutation(pool_size).tolist() for _ in range(num_layers)]
  return queues, [sorted(q[:max_ops]) for q in queues]


def main(argv, fv: flags.FlagValues = flags.FLAGS):
  from nse_tf import cost, data, distribute  # pylint: disable=g-import-not-at-top
  from nse_tf import loop, machine, spaces, trainer  # pylint: disable=g-import-not-at-top
  if fv.max_ops < 1:
    raise cli.UsageError(f"--max_ops must be >= 1, got {fv.max_ops}")
  if fv.gate_sampling == "interval":
    raise cli.UsageError("--gate_sampling=interval draws the weight steps' paths inside a "
                         "search's cost interval, and train_round has none; run python -m "
                         "nse_tf.search (--interval), or pick uniform, theta or count")
  common_flags.check_output_dir(fv.output_dir)
  # Several workers: the chief writes --output_dir, the others a directory of their own.
  out = run_dir.worker_output_dir(fv.strategy, fv.output_dir)
  run_lock.acquire(out, "train_round")
  macro = fv.macro or spaces.DEFAULT_MACRO[fv.space]
  pool = spaces.get_pool(fv.space)
  kinds = spaces.layer_kinds(macro)
  _, working_sets = initial_working_sets(len(pool), len(kinds), fv.max_ops, fv.seed)
  common_flags.setup_tensorflow(fv.deterministic, fv.graph_optimization,
                               fv.intra_op_threads)
  strategy = distribute.get_strategy(fv.strategy, fv.tpu, fv.cpu_replicas)
  d = data.get_data(fv.dataset, data_dir=fv.data_dir, image_size=fv.image_size,
                    holdout_examples=fv.holdout_examples)
  table = cost.CostTable(fv.space, macro, resolution=fv.cost_resolution,
                         scale=fv.scale, num_classes=d.info.num_classes)
  cfg = common_flags.train_config(fv)
  print(f"round 1 on {d.info.name}: {len(kinds)} layers x K={fv.max_ops} of {fv.space}, "
        f"{strategy.num_replicas_in_sync} replica(s), global batch {fv.global_batch}")
  start = time.time()
  with loop.fewer_gc_passes():
    t = trainer.RoundTrainer(cfg, strategy, d, table, space=fv.space, macro=macro,
                             working_sets=working_sets, num_classes=d.info.num_classes,
                             resolution=fv.image_size, scale=fv.scale,
                             model_dir=os.path.join(out, "ckpt"),
                             tb_dir=os.path.join(out, "tb"))
    if t.restored:
      print(f"resuming at step {int(t.step.numpy())} of {t.total_steps}")
    result = t.train()
  layers = []
  for l, (mbl, alive) in enumerate(zip(result.model.mbls, result.alive)):
    p = 0.999 / (1 + np.exp(-mbl.theta.numpy())) + 5e-4
    layers.append({
        "layer": l, "kind": kinds[l], "working_set": mbl.op_names,
        "pruned": [e for e in result.pruned if e["layer"] == l],
        "alive": {op: round(float(pi), 4) for op, pi, a in zip(mbl.op_names, p, alive) if a},
    })
  summary = {"dataset": d.info.name, "space": fv.space, "macro": macro,
             "steps": result.steps, "seconds": round(time.time() - start, 1),
             "last": result.history[-1] if result.history else {}, "layers": layers,
             "machine": machine.describe()}   # another CPU rounds differently
  from nse_tf.fileio import atomic_write_text  # pylint: disable=g-import-not-at-top
  atomic_write_text(os.path.join(out, "round.json"), json.dumps(summary, indent=1))
  print(f"\n{result.steps} steps; {len(result.pruned)} ops pruned; survivors per layer:")
  for entry in layers:
    ops = ", ".join(f"{op} p={p:.2f}" for op, p in entry["alive"].items()) or "- (identity)"
    print(f"  L{entry['layer']:02d} {entry['kind']}: {ops}")
  print(f"wrote {os.path.join(out, 'round.json')}")
  distribute.finish_workers(strategy, fv.output_dir, out)
  return 0


def run():
  cli.run(main, define_flags)


if __name__ == "__main__":
  run()
