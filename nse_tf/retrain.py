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
`load_trained_model(model_dir)` rebuilds and restores the deployable Keras model.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import time
from typing import Any, Callable, Dict, List, Optional

from absl import flags

from nse_tf import cli
from nse_tf import fileio
from nse_tf import retrain_run
from nse_tf import run_dir
from nse_tf import common_flags
from nse_tf import run_lock


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


@dataclasses.dataclass
class RetrainConfig:
  """Hyper-parameters of a retrain; SPEC §6 (the paper recipe) as defaults."""
  global_batch: int = 2048
  epochs: float = 350.0
  steps_per_epoch: Optional[int] = None    # default: num_train // global_batch
  lr: float = 0.8
  warmup_epochs: float = 5.0
  warmup_start_lr: float = 0.0
  momentum: float = 0.9
  nesterov: bool = True
  weight_decay: float = 4e-5
  label_smoothing: float = 0.0
  ema_decay: float = 0.9999
  activation: str = "relu"
  se: bool = False
  dropout: float = 0.0
  drop_path: float = 0.0
  augment: str = "none"
  randaug_layers: int = 2
  randaug_magnitude: float = 9.0
  mixed_precision: Optional[str] = None
  sync_bn: bool = False
  checkpoint_every: int = 1000
  eval_every: float = 10.0
  eval_batch: int = 256
  log_every: int = 50
  seed: int = 0
  progress: bool = True

  def validate(self):
    def bad(msg):
      raise cli.UsageError(msg)
    if self.global_batch < 1 or self.epochs <= 0:
      bad(f"--global_batch and --epochs must be positive (got {self.global_batch}, {self.epochs})")
    if self.steps_per_epoch is not None and self.steps_per_epoch < 1:
      bad(f"--steps_per_epoch must be >= 1, got {self.steps_per_epoch}")
    if self.lr <= 0 or self.weight_decay < 0:
      bad("--lr must be > 0 and --weight_decay >= 0")
    if not 0.0 <= self.ema_decay < 1.0:
      bad(f"--ema_decay must be in [0, 1) (0 = off), got {self.ema_decay}")
    if not 0.0 <= self.label_smoothing < 1.0:
      bad(f"--label_smoothing must be in [0, 1), got {self.label_smoothing}")
    if not 0.0 <= self.dropout < 1.0 or not 0.0 <= self.drop_path < 1.0:
      bad(f"--dropout and --drop_path must be in [0, 1) (got {self.dropout}, {self.drop_path})")
    if self.activation not in ("relu", "swish"):
      bad(f"--activation must be relu or swish, got {self.activation!r}")
    if self.augment not in ("none", "randaugment", "autoaugment"):
      bad(f"--augment must be none, randaugment or autoaugment, got {self.augment!r}")
    if self.mixed_precision not in (None, "", "bfloat16", "float16"):
      bad(f"--mixed_precision must be bfloat16 or float16, got {self.mixed_precision!r}")
    if self.eval_batch < 1 or self.checkpoint_every < 1 or self.log_every < 1:
      bad("--eval_batch, --checkpoint_every and --log_every must be >= 1")
    if self.eval_every < 0:
      bad(f"--eval_every must be >= 0, got {self.eval_every}")


def model_config(arch, cfg: RetrainConfig, info) -> Dict[str, Any]:
  """model_config.json: everything build_nsenet and a server need to rebuild the model."""
  from nse_tf import data as data_lib  # pylint: disable=g-import-not-at-top
  return {
      "format_version": retrain_run.MODEL_CONFIG_VERSION,
      "num_classes": int(info.num_classes),
      "image_size": int(info.image_size),
      "activation": cfg.activation,
      "se": bool(cfg.se),
      "dropout": float(cfg.dropout),
      "drop_path": float(cfg.drop_path),
      "dataset": info.name,
      "class_names": list(info.class_names),
      # Test-time preprocessing of the data pipelines (nse_tf.data), for serving.
      "preprocessing": {"mean_rgb": list(data_lib.IMAGENET_MEAN_RGB),
                        "stddev_rgb": list(data_lib.IMAGENET_STDDEV_RGB),
                        "eval_crop_fraction": data_lib.EVAL_CROP_FRACTION,
                        "resize": "bilinear"},
      "arch_name": arch.metadata.get("name"),
  }


def build_model(arch, config: Dict[str, Any], training_options: bool = False,
                sync_bn: bool = False):
  """The Keras classifier of `arch` as described by a model_config dict."""
  from nse_tf import nsenet  # pylint: disable=g-import-not-at-top
  size = int(config["image_size"])
  return nsenet.build_nsenet(
      arch, num_classes=int(config["num_classes"]), input_shape=(size, size, 3),
      activation=config["activation"], se=bool(config["se"]),
      dropout=float(config.get("dropout", 0.0)),
      drop_path=float(config.get("drop_path", 0.0)) if training_options else 0.0,
      sync_bn=sync_bn)


def load_trained_model(model_dir: str):
  """Rebuilds the finished retrain in `model_dir` and restores its deployable weights.

  Reads the run directory (nse_tf.retrain_run: arch.json, model_config.json and the
  checkpoint under final/, the EMA weights when EMA was on). Stochastic depth is left
  out: it has no weights and is a no-op at inference.

  Raises:
    FileNotFoundError: model_dir is not a finished retrain (the message says what is
      missing and how to finish it).
  """
  return restore_model(retrain_run.read(model_dir))


def restore_model(run):
  """The Keras classifier of a retrain_run.RetrainRun with its final/ weights."""
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  model = build_model(run.arch, run.config)
  status = tf.train.Checkpoint(model=model).read(run.checkpoint)
  status.assert_existing_objects_matched().expect_partial()   # (no save_counter is fine)
  return model


class EMA:
  """Exponential moving average of all model variables (weights and BN statistics).

  decay_t = min(decay, (1 + t) / (10 + t)) as in tf.train.ExponentialMovingAverage
  with num_updates, so short runs are not dominated by the initialisation.
  """

  def __init__(self, model, decay: float):
    import tensorflow as tf  # pylint: disable=g-import-not-at-top
    self.decay = float(decay)
    self.variables = list(model.variables)
    self.module = tf.Module(name="ema")
    self.module.shadow = [
        tf.Variable(v.read_value(), trainable=False, name=f"ema/{v.name.split(':')[0]}",
                    synchronization=tf.VariableSynchronization.ON_WRITE,
                    aggregation=tf.VariableAggregation.ONLY_FIRST_REPLICA)
        for v in self.variables]

  @property
  def shadow(self):
    return self.module.shadow

  def update(self, step):
    """Call in cross-replica context after the optimizer step; `step` counts updates."""
    import tensorflow as tf  # pylint: disable=g-import-not-at-top
    t = tf.cast(step, tf.float32)
    decay = tf.minimum(self.decay, (1.0 + t) / (10.0 + t))
    for s, v in zip(self.shadow, self.variables):
      s.assign(decay * s + (1.0 - decay) * tf.cast(v.read_value(), s.dtype))

  def swap(self):
    """Exchanges model and shadow values (twice = no change)."""
    for s, v in zip(self.shadow, self.variables):
      tmp = v.read_value()
      v.assign(s.read_value())
      s.assign(tmp)


class Retrainer:
  """Trains `arch` from scratch under `strategy` on `data`, checkpointing to model_dir.

  Args:
    arch: the Architecture.
    config: RetrainConfig (validated).
    strategy: a tf.distribute strategy.
    data: nse_tf.data.ImageData (train and validation pipelines; image_size is the
      training resolution).
    model_dir: output directory (checkpoints in ckpt/, TensorBoard in tb/).
    report: called with each periodic validation line (default: absl INFO log; the
      command passes `print`).
  """

  def __init__(self, arch, config: RetrainConfig, strategy, data, model_dir: str,
               report: Optional[Callable[[str], None]] = None):
    import tensorflow as tf  # pylint: disable=g-import-not-at-top
    import tf_keras as keras  # pylint: disable=g-import-not-at-top
    from nse_tf import augment, loop  # pylint: disable=g-import-not-at-top
    config.validate()
    from absl import logging  # pylint: disable=g-import-not-at-top
    self.report = report or (lambda line: logging.info("%s", line))
    self.arch, self.cfg, self.strategy, self.data = arch, config, strategy, data
    self.model_dir = model_dir
    self.model_config = model_config(arch, config, data.info)
    replicas = strategy.num_replicas_in_sync
    if config.global_batch % replicas or config.eval_batch % replicas:
      raise cli.UsageError(f"--global_batch {config.global_batch} and --eval_batch "
                           f"{config.eval_batch} must be multiples of the {replicas} replicas")
    if data.info.num_train < config.global_batch:
      raise cli.UsageError(f"--global_batch {config.global_batch} is larger than the "
                           f"{data.info.num_train} training examples of {data.info.name}")
    self.schedule = loop.Schedule.of(config, data.info.num_train)
    spe = self.steps_per_epoch = self.schedule.steps_per_epoch
    self.total_steps = self.schedule.total_steps
    self.eval_steps = int(round(config.eval_every * spe)) if config.eval_every else 0
    self.augment_fn = augment.batch_augmenter(config.augment, config.randaug_layers,
                                              config.randaug_magnitude)

    keras.utils.set_random_seed(config.seed)
    with loop.build_policy(config.mixed_precision), strategy.scope():
      self.model = build_model(arch, self.model_config, training_options=True,
                               sync_bn=config.sync_bn)
      self.lr_schedule, self.optimizer, _ = loop.build_sgd(config, self.schedule)
      self.optimizer.build(self.model.trainable_variables)
      self.ema = EMA(self.model, config.ema_decay) if config.ema_decay > 0 else None
      self.step = tf.Variable(0, dtype=tf.int64, trainable=False, name="step")
      self.best = tf.Variable(-1.0, dtype=tf.float32, trainable=False, name="best_top1")

    self.train_iter = self._iterator(0)
    state = dict(model=self.model, optimizer=self.optimizer, step=self.step, best=self.best)
    if self.ema is not None:
      state["ema"] = self.ema.module
    self._iterator_in_checkpoint = loop.iterators_checkpointable(self.train_iter)
    if self._iterator_in_checkpoint:
      state["train_iter"] = self.train_iter
    self.checkpoint = tf.train.Checkpoint(**state)
    self.manager = tf.train.CheckpointManager(self.checkpoint, os.path.join(model_dir, "ckpt"),
                                              max_to_keep=2)
    self.writer = tf.summary.create_file_writer(os.path.join(model_dir, "tb"))
    self._train_step = self._make_train_step()
    self._eval_step = self._make_eval_step()
    self.restored = self._restore()

  # ------------------------------------------------------------ checkpoints
  def _restore(self) -> bool:
    from nse_tf import loop  # pylint: disable=g-import-not-at-top
    latest = loop.restore_newest_intact(
        self.checkpoint, self.manager,
        f"delete {self.manager.directory} to retrain from the start, or use --overwrite")
    if not latest:
      return False
    if not self._iterator_in_checkpoint:
      self.train_iter = self._iterator(int(self.step.numpy()))
    return True

  def save(self):
    from nse_tf import loop  # pylint: disable=g-import-not-at-top
    loop.save_checkpoint(self.manager, int(self.step.numpy()))

  def _iterator(self, skip_steps: int):
    from nse_tf import loop  # pylint: disable=g-import-not-at-top
    return loop.distributed_iterator(
        self.strategy, self.data.dataset_fn("train", self.cfg.global_batch, seed=self.cfg.seed),
        skip_steps, self.augment_fn)

  # --------------------------------------------------------- compiled steps
  def _make_train_step(self):
    import tensorflow as tf  # pylint: disable=g-import-not-at-top
    import tf_keras as keras  # pylint: disable=g-import-not-at-top
    from nse_tf import loop  # pylint: disable=g-import-not-at-top
    model, opt, strategy, cfg, ema = self.model, self.optimizer, self.strategy, self.cfg, self.ema
    gb = float(cfg.global_batch)
    fp16 = cfg.mixed_precision == "float16"
    num_classes = int(self.model_config["num_classes"])

    def step_fn(images, labels):
      with tf.GradientTape() as tape:
        logits = tf.cast(model(images, training=True), tf.float32)
        onehot = tf.one_hot(labels, num_classes)
        ce = keras.losses.categorical_crossentropy(onehot, logits, from_logits=True,
                                                   label_smoothing=cfg.label_smoothing)
        loss = tf.reduce_sum(ce) / gb
        scaled = loop.scaled_loss(loss, opt, fp16)
      variables = model.trainable_variables
      grads = loop.gradients(tape, scaled, variables, opt, fp16)
      opt.apply_gradients(zip(grads, variables))
      correct = tf.reduce_sum(tf.cast(tf.equal(tf.argmax(logits, -1, output_type=tf.int32),
                                               tf.cast(labels, tf.int32)), tf.float32))
      return loss, correct

    @tf.function
    def train_step(iterator, step):
      images, labels = next(iterator)
      loss, correct = strategy.run(step_fn, args=(images, labels))
      if ema is not None:
        ema.update(step)
      return (strategy.reduce(tf.distribute.ReduceOp.SUM, loss, axis=None),
              strategy.reduce(tf.distribute.ReduceOp.SUM, correct, axis=None) / gb)

    return train_step

  def _make_eval_step(self):
    import tensorflow as tf  # pylint: disable=g-import-not-at-top
    model, strategy = self.model, self.strategy
    k = min(5, int(self.model_config["num_classes"]))

    def step_fn(images, labels):
      logits = tf.cast(model(images, training=False), tf.float32)
      labels = tf.cast(labels, tf.int32)
      top1 = tf.reduce_sum(tf.cast(tf.equal(tf.argmax(logits, -1, output_type=tf.int32),
                                            labels), tf.float32))
      topk = tf.reduce_sum(tf.cast(tf.nn.in_top_k(labels, logits, k), tf.float32))
      n = tf.cast(tf.shape(labels)[0], tf.float32)
      return tf.stack([top1, topk, n])

    @tf.function
    def eval_step(batch):
      out = strategy.run(step_fn, args=batch)
      return strategy.reduce(tf.distribute.ReduceOp.SUM, out, axis=None)

    return eval_step

  # -------------------------------------------------------------- evaluation
  def evaluate(self, use_ema: bool = True) -> Dict[str, float]:
    """Top-1/top-5 on the whole validation split (the EMA weights when EMA is on)."""
    import numpy as np  # pylint: disable=g-import-not-at-top
    swap = use_ema and self.ema is not None
    if swap:
      self.ema.swap()
    try:
      ds = self.strategy.distribute_datasets_from_function(
          self.data.dataset_fn("validation", self.cfg.eval_batch))
      total = np.zeros(3)
      for batch in ds:
        total += self._eval_step(batch).numpy()
    finally:
      if swap:
        self.ema.swap()
    n = max(total[2], 1.0)
    return {"top1": float(total[0] / n), "top5": float(total[1] / n),
            "examples": int(total[2])}

  # -------------------------------------------------------------------- loop
  def train(self, stop_at: Optional[int] = None) -> List[Dict[str, float]]:
    """Trains to the end (or up to step `stop_at`, for tests); returns the history."""
    import tensorflow as tf  # pylint: disable=g-import-not-at-top
    from nse_tf import loop  # pylint: disable=g-import-not-at-top
    cfg = self.cfg
    end = self.total_steps if stop_at is None else min(stop_at, self.total_steps)
    step = int(self.step.numpy())
    history: List[Dict[str, float]] = []
    progress = loop.EpochProgress(self.schedule, ["loss", "acc", "lr"], cfg.progress)
    while step < end:
      progress.start_step(step)
      loss, acc = self._train_step(self.train_iter, tf.constant(step, tf.int64))
      step += 1
      self.step.assign(step)
      last = {"step": step, "loss": float(loss), "acc": float(acc),
              "lr": float(self.lr_schedule(step - 1))}
      history.append(last)
      if not math.isfinite(last["loss"]):
        raise FloatingPointError(f"loss is {last['loss']} at step {step}; lower --lr "
                                 "(the last checkpoint is kept)")
      progress.end_step(step, last)
      if step % cfg.log_every == 0 or step == end:
        with self.writer.as_default(step=step):
          for k in ("loss", "acc", "lr"):
            tf.summary.scalar(f"train/{k}", last[k])
      if self.eval_steps and step % self.eval_steps == 0 and step < self.total_steps:
        self._log_eval(step)
      if step % cfg.checkpoint_every == 0 or step == end:
        self.save()
    self.writer.flush()
    return history

  def _log_eval(self, step: int) -> Dict[str, float]:
    import tensorflow as tf  # pylint: disable=g-import-not-at-top
    result = self.evaluate()
    self.report(f"step {step}: validation top-1 {100 * result['top1']:.2f} %, "
                f"top-5 {100 * result['top5']:.2f} %" + (" (EMA weights)" if self.ema else ""))
    with self.writer.as_default(step=step):
      tf.summary.scalar("validation/top1", result["top1"])
      tf.summary.scalar("validation/top5", result["top5"])
    self.writer.flush()
    return result

  @property
  def finished(self) -> bool:
    return int(self.step.numpy()) >= self.total_steps

  def write_final(self) -> str:
    """Saves the deployable weights (EMA when on) to model_dir/final/, atomically."""
    import tensorflow as tf  # pylint: disable=g-import-not-at-top
    final = os.path.join(self.model_dir, retrain_run.FINAL)
    if self.ema is not None:
      self.ema.swap()
    try:
      with fileio.atomic_directory(final, replace=True) as tmp:
        ckpt = tf.train.Checkpoint(model=self.model)
        tf.train.CheckpointManager(ckpt, tmp, max_to_keep=1).save(checkpoint_number=1)
    finally:
      if self.ema is not None:
        self.ema.swap()
    return final


# ------------------------------------------------------------------------- CLI

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
  run_lock.acquire(fv.model_dir, "retrain")
  holdout = fv.holdout_examples if fv["holdout_examples"].present else 0
  resolved = dict(dataclasses.asdict(cfg), dataset=fv.dataset, image_size=fv.image_size,
                  holdout_examples=holdout, arch=arch.to_compact())
  _refuse_other_retrain(fv.model_dir, arch, resolved, fv.overwrite)
  from nse_tf import cost, data, distribute  # pylint: disable=g-import-not-at-top
  common_flags.setup_tensorflow(fv.deterministic)
  strategy = distribute.get_strategy(fv.strategy, fv.tpu, fv.cpu_replicas)
  d = data.get_data(fv.dataset, data_dir=fv.data_dir, image_size=fv.image_size,
                    holdout_examples=holdout)
  out = fv.model_dir
  metrics_path = os.path.join(out, "metrics.json")
  if (not fv.overwrite and os.path.exists(metrics_path)
      and os.path.exists(os.path.join(out, "final"))):
    print(f"{out} is a finished retrain:")
    print(json.dumps(fileio.load_json(metrics_path, cli.UsageError, "delete it or use --overwrite"), indent=1))
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
  return 0


def run():
  cli.run(main, define_flags)


if __name__ == "__main__":
  run()
