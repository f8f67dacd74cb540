"""CLI and library: retrain a found (or released) NSENet from scratch (SPEC §6), resumably.

  python -m nse_tf.retrain --arch_json=runs/demo/final_arch.json --flagfile=flags/retrain_demo.cfg \
      --model_dir=runs/retrain_demo
  python -m nse_tf.retrain --arch=NSENet-27 --flagfile=flags/retrain_imagenet.cfg \
      --data_dir=DIR --strategy=mirrored --model_dir=runs/nsenet27
  python -m nse_tf.retrain --arch=NSENet-27 --recipe=efficientnet --flagfile=... --model_dir=...

The paper's recipe is the default (SPEC §6: 350 epochs, global batch 2048, lr 0.8 with a
linear warm-up and cosine decay, SGD Nesterov 0.9, weight decay 4e-5 on conv/fc kernels,
EMA 0.9999 whose weights are evaluated and deployed). `--recipe=efficientnet` switches to
EfficientNet-B0's: swish, squeeze-and-excitation, AutoAugment (or RandAugment), dropout
0.2, stochastic depth 0.2 and label smoothing 0.1; any flag given explicitly wins.

Writes under --model_dir (names fixed: export.py and detection/ read them):
  arch.json            the Architecture (JSON v1)
  model_config.json    what build_nsenet needs to rebuild the network, plus preprocessing
  retrain_config.json  every resolved setting (a resume with other values is refused)
  ckpt/                training checkpoints: model, optimizer, EMA, step, data iterator
  final/               tf.train.Checkpoint(model=<classifier>) with the weights to deploy
                       (the EMA weights when EMA is on): tf.train.latest_checkpoint(final/)
  metrics.json         top-1/top-5 on the validation split, params, MFLOPs, time
  tb/                  TensorBoard: loss, accuracy, lr, validation top-1/top-5
Re-running the same command resumes; on a finished run it only prints the metrics.
`nse_tf.retrainer.load_trained_model(model_dir)` rebuilds and restores the deployable model;
the training itself (RetrainConfig, Retrainer) is the library nse_tf/retrainer.py.
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from typing import Any, Dict

from absl import flags

from nse_tf import cli
from nse_tf import common_flags
from nse_tf import fileio
from nse_tf import retrain_run
from nse_tf import run_dir
from nse_tf import run_lock
from nse_tf.retrainer import RetrainConfig, Retrainer


def define_flags(fv: flags.FlagValues = flags.FLAGS) -> None:
  """Retrain's flags: its own, the dataset, the strategy and the training schedule."""
  common_flags.define_data_flags(fv)
  common_flags.define_strategy_flags(fv)
  common_flags.define_training_flags(fv, defaults={
      f.name: f.default for f in dataclasses.fields(RetrainConfig)
      if f.name in common_flags.ROUND_TRAINING_DEFAULTS})
  flags.DEFINE_string("arch", None, "A released network (NSENet-27, NSENet, NSENet-GPU) or a "
                      "compact architecture string.", flag_values=fv)
  flags.DEFINE_string("arch_json", None, "An Architecture JSON file (e.g. a search's "
                      "final_arch.json).", flag_values=fv)
  flags.DEFINE_string("model_dir", None, "Where checkpoints, logs and the trained model go. "
                      "Re-running on the same directory resumes.", flag_values=fv)
  flags.DEFINE_enum("recipe", "paper", ["paper", "efficientnet"],
                    "paper: ReLU, no SE, no augmentation beyond crop/flip. efficientnet: swish, "
                    "SE, AutoAugment, dropout 0.2, stochastic depth 0.2, label smoothing 0.1.",
                    flag_values=fv)
  flags.DEFINE_enum("activation", None, ["relu", "swish"], "Default: the recipe's.", flag_values=fv)
  flags.DEFINE_bool("se", None, "Squeeze-and-excitation in every op. Default: the recipe's.",
                    flag_values=fv)
  flags.DEFINE_float("dropout", None, "Dropout before the fc. Default: the recipe's.",
                     flag_values=fv)
  flags.DEFINE_float("drop_path", None, "Stochastic depth rate of the last layer. Default: the "
                     "recipe's.", flag_values=fv)
  flags.DEFINE_float("label_smoothing", None, "Label smoothing. Default: the recipe's.",
                     flag_values=fv)
  flags.DEFINE_enum("augment", None, ["none", "randaugment", "autoaugment"],
                    "tf-models augmentation policy on top of crop/flip. Default: the recipe's.",
                    flag_values=fv)
  flags.DEFINE_integer("randaug_layers", 2, "RandAugment: ops per image (N).", flag_values=fv)
  flags.DEFINE_float("randaug_magnitude", 9.0, "RandAugment: magnitude (M).", flag_values=fv)
  flags.DEFINE_float("ema_decay", 0.9999, "Exponential moving average of the weights, evaluated "
                     "and deployed; 0 turns it off.", flag_values=fv)
  flags.DEFINE_float("eval_every", 10.0, "Evaluate on the validation split every this many "
                     "epochs (0: only at the end).", flag_values=fv)
  flags.DEFINE_integer("eval_batch", 256, "Global batch of evaluation.", flag_values=fv)
  flags.DEFINE_integer("log_every", 50, "Steps between TensorBoard summaries.", flag_values=fv)
  flags.DEFINE_bool("progress", True, "Progress bars.", flag_values=fv)
  flags.DEFINE_bool("overwrite", False, "Delete this retrain's outputs in --model_dir first.",
                    flag_values=fv)


RECIPES: Dict[str, Dict[str, Any]] = {
    "paper": dict(activation="relu", se=False, dropout=0.0, drop_path=0.0,
                  label_smoothing=0.0, augment="none"),
    "efficientnet": dict(activation="swish", se=True, dropout=0.2, drop_path=0.2,
                         label_smoothing=0.1, augment="autoaugment"),
}

# Settings a resume may change without changing the result.
_RESUME_FREE = {"progress", "checkpoint_every", "log_every", "data_dir", "strategy", "tpu",
                "cpu_replicas", "eval_every", "eval_batch"}
_OUTPUTS = ("arch.json", "model_config.json", "retrain_config.json", "metrics.json", "ckpt",
            "final", "tb")


def _value(fv: flags.FlagValues, name: str, recipe: Dict[str, Any]):
  """A flag's value, else the recipe's for the recipe's flags not given."""
  flag = fv[name]
  if name in recipe and flag.value is None:
    return recipe[name]
  return flag.value


def retrain_config(fv: flags.FlagValues) -> RetrainConfig:
  recipe = RECIPES[fv.recipe]
  cfg = RetrainConfig(
      global_batch=fv.global_batch, epochs=fv.epochs,
      steps_per_epoch=fv.steps_per_epoch, lr=fv.lr,
      warmup_epochs=fv.warmup_epochs,
      warmup_start_lr=fv.warmup_start_lr, weight_decay=fv.weight_decay,
      label_smoothing=_value(fv, "label_smoothing", recipe), ema_decay=fv.ema_decay,
      activation=_value(fv, "activation", recipe), se=_value(fv, "se", recipe),
      dropout=_value(fv, "dropout", recipe), drop_path=_value(fv, "drop_path", recipe),
      augment=_value(fv, "augment", recipe), randaug_layers=fv.randaug_layers,
      randaug_magnitude=fv.randaug_magnitude, mixed_precision=fv.mixed_precision,
      sync_bn=fv.sync_bn, checkpoint_every=fv.checkpoint_every,
      eval_every=fv.eval_every, eval_batch=fv.eval_batch, log_every=fv.log_every,
      seed=fv.seed, progress=fv.progress)
  cfg.validate()
  return cfg


def _refuse_other_retrain(model_dir: str, arch, resolved: Dict[str, Any], overwrite: bool):
  """Refuses a resume with another architecture or configuration (read-only)."""
  from nse_tf import arch as arch_lib  # pylint: disable=g-import-not-at-top
  if overwrite:
    return
  arch_path = os.path.join(model_dir, "arch.json")
  if os.path.exists(arch_path):
    old = arch_lib.Architecture.load(arch_path)
    if old != arch:
      raise cli.UsageError(f"{model_dir} holds a retrain of another architecture "
                           f"({old.to_compact()}); use another --model_dir or --overwrite")
  run_dir.refuse_changed_config(model_dir, "retrain_config.json", resolved, _RESUME_FREE,
                                "retrain")


def main(argv, fv: flags.FlagValues = flags.FLAGS):
  from nse_tf import arch as arch_lib  # pylint: disable=g-import-not-at-top
  from nse_tf.fileio import atomic_write_text  # pylint: disable=g-import-not-at-top
  if not fv.model_dir:
    raise cli.UsageError("--model_dir is required (where the checkpoints and the trained "
                         "model go)")
  arch = arch_lib.resolve(fv.arch, fv.arch_json)
  cfg = retrain_config(fv)
  common_flags.check_output_dir(fv.model_dir, "--model_dir")
  # Several workers: the chief writes --model_dir, the others a directory of their own.
  out = run_dir.worker_output_dir(fv.strategy, fv.model_dir)
  run_lock.acquire(out, "retrain")
  holdout = fv.holdout_examples if fv["holdout_examples"].present else 0
  resolved = dict(dataclasses.asdict(cfg), dataset=fv.dataset, image_size=fv.image_size,
                  holdout_examples=holdout, arch=arch.to_compact())
  _refuse_other_retrain(out, arch, resolved, fv.overwrite)
  from nse_tf import cost, data, distribute  # pylint: disable=g-import-not-at-top
  common_flags.setup_tensorflow(fv.deterministic, intra_op_threads=fv.intra_op_threads)
  strategy = distribute.get_strategy(fv.strategy, fv.tpu, fv.cpu_replicas)
  d = data.get_data(fv.dataset, data_dir=fv.data_dir, image_size=fv.image_size,
                    holdout_examples=holdout)
  metrics_path = os.path.join(out, "metrics.json")
  if (not fv.overwrite and os.path.exists(metrics_path)
      and os.path.exists(os.path.join(out, "final"))):
    print(f"{out} is a finished retrain:")
    metrics = fileio.load_json(metrics_path, cli.UsageError, "delete it or use --overwrite")
    print(json.dumps(metrics, indent=1))
    return 0
  if fv.overwrite:
    run_dir.remove_outputs(out, _OUTPUTS)
  start = time.time()
  # Built (and its settings checked) before the first write: a refused start leaves
  # nothing that would block the corrected command.
  r = Retrainer(arch, cfg, strategy, d, out, report=lambda line: print(line, flush=True))
  atomic_write_text(os.path.join(out, "retrain_config.json"),
                    json.dumps(resolved, indent=1, sort_keys=True) + "\n")
  arch.save(os.path.join(out, retrain_run.ARCH))
  atomic_write_text(os.path.join(out, retrain_run.MODEL_CONFIG),
                    json.dumps(r.model_config, indent=1) + "\n")
  c = cost.arch_cost(arch, resolution=fv.image_size, num_classes=d.info.num_classes,
                     se=cfg.se)
  print(f"retraining {arch.metadata.get('name') or arch.to_compact()} on {d.info.name} "
        f"({d.info.num_train} images) at {fv.image_size}x{fv.image_size}: "
        f"{c.macs / 1e6:.2f} MFLOPs, {c.params / 1e6:.3f} M params; "
        f"{r.total_steps} steps of {cfg.global_batch} on "
        f"{strategy.num_replicas_in_sync} replica(s); recipe {fv.recipe}")
  if r.restored:
    print(f"resuming at step {int(r.step.numpy())} of {r.total_steps}")
  history = r.train()
  result = r.evaluate()
  r.write_final()
  metrics = {
      "top1": round(result["top1"], 6), "top5": round(result["top5"], 6),
      "top5_k": min(5, d.info.num_classes), "validation_examples": result["examples"],
      "weights": "ema" if r.ema is not None else "raw",
      "params": int(r.model.count_params()),
      "mflops": round(c.macs / 1e6, 3), "mflops_at_224": round(
          cost.arch_cost(arch, 224, num_classes=d.info.num_classes, se=cfg.se).macs / 1e6, 3),
      "image_size": fv.image_size, "dataset": d.info.name, "steps": r.total_steps,
      "epochs": cfg.epochs, "train_seconds_this_run": round(time.time() - start, 1),
      "last_train_loss": history[-1]["loss"] if history else None,
      "arch": arch.to_compact(), "recipe": fv.recipe,
  }
  if r.ema is not None:
    raw = r.evaluate(use_ema=False)
    metrics.update(top1_raw_weights=round(raw["top1"], 6), top5_raw_weights=round(raw["top5"], 6))
  atomic_write_text(metrics_path, json.dumps(metrics, indent=1) + "\n")
  print(f"\nvalidation top-1 {100 * metrics['top1']:.2f} %, top-{metrics['top5_k']} "
        f"{100 * metrics['top5']:.2f} % on {metrics['validation_examples']} images "
        f"({metrics['weights']} weights); {metrics['params']} params, "
        f"{metrics['mflops']} MFLOPs at {fv.image_size}x{fv.image_size}")
  print(f"wrote {metrics_path} and {os.path.join(out, 'final')}/")
  distribute.finish_workers(strategy, fv.model_dir, out)
  return 0


def run():
  cli.run(main, define_flags)


if __name__ == "__main__":
  run()
