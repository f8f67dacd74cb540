"""Export a trained detector as a SavedModel through tf-models' export module.

  python detection/export_saved_model.py --experiment=efficientdet_d0_nsenet_coco \
      --config_file=detection/configs/efficientdet_d0_nsenet_synthetic.yaml \
      --checkpoint_path=runs/det_demo --export_dir=runs/det_demo/export

Uses `official.vision.serving.detection.DetectionModule` and
`export_saved_model_lib.export_inference_graph`: the `serving_default` signature takes
encoded images (`--input_type=image_bytes`, default; or image_tensor / tf_example) and
returns `detection_boxes` (pixels, [ymin, xmin, ymax, xmax] in the input image),
`detection_classes`, `detection_scores`, `num_detections` (and `image_info`). Given a
model_dir, the latest checkpoint of its `ema_checkpoints/` is exported when there is one
(tf-models saves the EMA weights, the ones it evaluates, there at each evaluation), else
its latest training checkpoint. The export
is written to a temporary folder beside --export_dir and renamed into place, so an
interrupted export never leaves a half-written model.

  import tensorflow as tf
  model = tf.saved_model.load('runs/det_demo/export/saved_model')
  out = model.signatures['serving_default'](tf.constant([open('x.jpg', 'rb').read()]))
"""

from __future__ import annotations

import os
from typing import Optional, Sequence

from absl import flags

from nse_tf import cli
from nse_tf import fileio

FLAGS = flags.FLAGS
INPUT_TYPES = ("image_bytes", "image_tensor", "tf_example")


def load_params(experiment: str, config_files: Sequence[str] = (), params_override: str = ""):
  """The experiment config with YAML files and overrides applied, validated and locked."""
  from official.core import exp_factory  # pylint: disable=g-import-not-at-top
  from official.modeling import hyperparams  # pylint: disable=g-import-not-at-top
  import nse_tf_detection.registry_imports  # noqa: F401  pylint: disable=g-import-not-at-top,unused-import
  from nse_tf_detection import efficientdet  # pylint: disable=g-import-not-at-top
  try:
    params = exp_factory.get_exp_config(experiment)
  except LookupError:  # registry.lookup: unknown name
    raise cli.UsageError(f"unknown --experiment {experiment!r}; the detection experiments "
                         f"are {', '.join(efficientdet.EXPERIMENTS)}") from None
  for path in config_files or []:
    if not os.path.exists(path):
      raise cli.UsageError(f"--config_file {path!r} does not exist")
  for path in list(config_files or []) + ([params_override] if params_override else []):
    try:
      params = hyperparams.override_params_dict(params, path, is_strict=True)
    except (KeyError, ValueError) as e:
      raise cli.UsageError(f"cannot apply {path!r}: {e}") from None
  params.validate()
  params.lock()
  efficientdet.validate_model_config(params.task.model)
  return params


def export_detector(params, checkpoint_path: Optional[str], export_dir: str,
                    input_type: str = "image_bytes", batch_size: Optional[int] = None,
                    input_image_size: Optional[Sequence[int]] = None,
                    overwrite: bool = False, keras_traces: bool = False):
  """Writes export_dir/{saved_model, checkpoint, params.yaml}.

  Returns (SavedModel path, the checkpoint exported).

  checkpoint_path: a checkpoint file prefix or a model_dir (its latest EMA checkpoint,
  else its latest checkpoint);
  None exports freshly initialised weights (for tests only).
  keras_traces: also trace every Keras layer's call into the SavedModel (what
  `model.save(save_traces=True)` does), needed only to revive the detector as a Keras
  model; serving uses the signatures. Off by default: it is most of the export time.
  """
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  from official.vision.serving import export_saved_model_lib  # pylint: disable=g-import-not-at-top
  if input_type not in INPUT_TYPES:
    raise cli.UsageError(f"--input_type must be one of {', '.join(INPUT_TYPES)}, "
                         f"got {input_type!r}")
  if checkpoint_path is not None:
    if tf.io.gfile.isdir(checkpoint_path):
      # tf-models keeps the EMA (evaluated) weights in ema_checkpoints/: prefer them.
      found = (tf.train.latest_checkpoint(os.path.join(checkpoint_path, "ema_checkpoints"))
               or tf.train.latest_checkpoint(checkpoint_path))
      if not found:
        raise cli.UsageError(f"no checkpoint in {checkpoint_path!r}: train first, or give "
                             "a checkpoint prefix such as MODEL_DIR/ckpt-1200")
      checkpoint_path = found
    elif not tf.io.gfile.exists(checkpoint_path + ".index"):
      raise cli.UsageError(f"--checkpoint_path {checkpoint_path!r} is neither a model_dir "
                           "nor a checkpoint prefix (PREFIX.index not found)")
  if os.path.exists(export_dir) and not overwrite:
    raise cli.UsageError(f"--export_dir {export_dir!r} exists; pass --overwrite or choose "
                         "another folder")
  size = list(input_image_size or params.task.model.input_size[:2])
  with fileio.atomic_directory(export_dir, replace=True) as tmp, _keras_traces(keras_traces):
    export_saved_model_lib.export_inference_graph(
        input_type=input_type, batch_size=batch_size, input_image_size=size, params=params,
        checkpoint_path=checkpoint_path, export_dir=tmp,
        export_checkpoint_subdir="checkpoint", export_saved_model_subdir="saved_model")
  return os.path.join(export_dir, "saved_model"), checkpoint_path


def _keras_traces(enabled: bool):
  """tf_keras' save_traces switch for tf.saved_model.save (a no-op if it moved)."""
  import contextlib  # pylint: disable=g-import-not-at-top
  try:
    from tf_keras.src.saving.legacy.saved_model import utils  # pylint: disable=g-import-not-at-top
  except ImportError:
    return contextlib.nullcontext()
  return utils.keras_option_scope(save_traces=enabled)


def main(argv) -> int:
  del argv
  from absl import logging  # pylint: disable=g-import-not-at-top
  logging.set_verbosity(logging.WARNING)  # tf-models' exporter logs every signature input
  for name in ("experiment", "export_dir", "checkpoint_path"):
    if not getattr(FLAGS, name):
      raise cli.UsageError(f"--{name} is required")
  params = load_params(FLAGS.experiment, FLAGS.config_file, FLAGS.params_override)
  size = None
  if FLAGS.input_image_size:
    try:
      size = [int(v) for v in FLAGS.input_image_size.split(",")]
    except ValueError:
      size = []
    if len(size) != 2 or min(size) < 1:
      raise cli.UsageError(f"--input_image_size must be 'height,width', got "
                           f"{FLAGS.input_image_size!r}")
  path, ckpt = export_detector(params, FLAGS.checkpoint_path, FLAGS.export_dir, FLAGS.input_type,
                         FLAGS.batch_size, size, FLAGS.overwrite, FLAGS.keras_traces)
  print(f"SavedModel: {path} (signature serving_default, input {FLAGS.input_type}) "
        f"from {ckpt}")
  return 0


if __name__ == "__main__":
  flags.DEFINE_string("experiment", None, "A registered experiment, e.g. "
                      "efficientdet_d0_nsenet_coco.")
  flags.DEFINE_multi_string("config_file", None, "YAML overrides, applied in order.")
  flags.DEFINE_string("params_override", "", "YAML/JSON string or file applied last.")
  flags.DEFINE_string("checkpoint_path", None, "A model_dir (latest checkpoint) or a "
                      "checkpoint prefix.")
  flags.DEFINE_string("export_dir", None, "Output folder (saved_model/, checkpoint/, "
                      "params.yaml).")
  flags.DEFINE_enum("input_type", "image_bytes", list(INPUT_TYPES), "Serving input.")
  flags.DEFINE_integer("batch_size", None, "Fixed batch size (default: any).")
  flags.DEFINE_string("input_image_size", None, "height,width the images are resized to "
                      "(default: the model's input size).")
  flags.DEFINE_bool("overwrite", False, "Replace an existing --export_dir.")
  flags.DEFINE_bool("keras_traces", False, "Also save every Keras layer's traced call "
                    "(only to reload it as a Keras model; slow).")
  cli.run(main)
