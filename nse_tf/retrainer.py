"""Retraining a found (or released) NSENet from scratch (SPEC §6): the library.

  RetrainConfig       the hyper-parameters (SPEC §6's paper recipe as defaults)
  Retrainer           the training loop (nse_tf.loop's core): strategy, mixed precision,
                      EMA, resumable checkpoints, periodic validation, final/ weights
  model_config()      model_config.json: how to rebuild the classifier and serve it
  build_model(), load_trained_model(), restore_model()   the classifier of a retrain run
  EMA                 exponential moving average of the weights (nse_tf/ema.py)

The command (flags, recipes, the run directory) is nse_tf/retrain.py; what a finished
run leaves is described and read in nse_tf/retrain_run.py.
"""

from __future__ import annotations

import dataclasses
import math
import os
from typing import Any, Callable, Dict, List, Optional

from nse_tf import errors
from nse_tf import fileio
from nse_tf import retrain_run
from nse_tf import train_config
from nse_tf.ema import EMA


@dataclasses.dataclass
class RetrainConfig(train_config.LoopConfig):
  """Hyper-parameters of a retrain; SPEC §6 (the paper recipe) as defaults."""
  global_batch: int = 2048
  epochs: float = 350.0
  lr: float = 0.8
  warmup_epochs: float = 5.0
  warmup_start_lr: float = 0.0
  checkpoint_every: int = 1000
  log_every: int = 50
  label_smoothing: float = 0.0
  ema_decay: float = 0.9999
  activation: str = "relu"
  se: bool = False
  dropout: float = 0.0
  drop_path: float = 0.0
  augment: str = "none"
  randaug_layers: int = 2
  randaug_magnitude: float = 9.0
  eval_every: float = 10.0
  eval_batch: int = 256

  def validate(self):
    def bad(msg):
      raise errors.UsageError(msg)
    self.validate_loop(errors.UsageError)
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
    if self.eval_batch < 1:
      bad("--eval_batch must be >= 1")
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
      raise errors.UsageError(f"--global_batch {config.global_batch} and --eval_batch "
                           f"{config.eval_batch} must be multiples of the {replicas} replicas")
    if data.info.num_train < config.global_batch:
      raise errors.UsageError(f"--global_batch {config.global_batch} is larger than the "
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
    self._eval_step = None    # traced at the first evaluation, for the validation batches
    self.restored = self._restore()

  # ------------------------------------------------------------ checkpoints
  def _restore(self) -> bool:
    from nse_tf import loop  # pylint: disable=g-import-not-at-top
    latest = loop.restore_newest_intact(
        self.checkpoint, self.manager,
        f"delete {self.manager.directory} to retrain from the start, or use --overwrite",
        strategy=self.strategy)
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

  def _make_eval_step(self, batch_spec):
    """The compiled evaluation step for batches of `batch_spec` (the validation dataset's
    element spec, whose batch dimension is unknown): one trace serves the full batches and
    the last, smaller one, which would otherwise be traced again."""
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

    @tf.function(input_signature=[batch_spec])
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
      if self._eval_step is None:
        self._eval_step = self._make_eval_step(ds.element_spec)
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
