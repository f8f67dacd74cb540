"""tf-models' vision training driver with the EfficientDet-D0 / NSENet registrations.

Every tf-models flag works unchanged (--experiment, --mode, --model_dir, --config_file,
--params_override, --gin_file, --tpu, ...); re-running on the same --model_dir resumes
from its last checkpoint, as with tf-models.

  # CPU demo on generated data (no download):
  python detection/synthetic_coco.py --output_dir=runs/synthetic_coco
  python detection/train.py --experiment=efficientdet_d0_nsenet_coco --mode=train_and_eval \
      --model_dir=runs/det_demo \
      --config_file=detection/configs/efficientdet_d0_nsenet_synthetic.yaml

  # COCO 2017 (TFRecords from tf-models' create_coco_tf_record.py):
  python detection/train.py --experiment=efficientdet_d0_nsenet_coco --mode=train_and_eval \
      --model_dir=runs/d0_nsenet --params_override="task.train_data.input_path=COCO/train*,\
task.validation_data.input_path=COCO/val*,task.annotation_file=COCO/instances_val2017.json,\
runtime.distribution_strategy=mirrored,runtime.num_gpus=8"

Initialise the NSENet backbone from a retrain run with
`task.model.backbone.nsenet.init_from=RETRAIN_MODEL_DIR`.
"""

from __future__ import annotations

import os
import sys

from absl import flags
from absl import logging

from nse_tf import cli

FLAGS = flags.FLAGS


def _check_inputs(params, mode: str) -> None:
  """Missing data fails here with the fix, not deep inside tf.data."""
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  task = params.task
  needs = []
  if "train" in mode:
    needs.append(("task.train_data.input_path", task.train_data))
  if "eval" in mode:
    needs.append(("task.validation_data.input_path", task.validation_data))
  for name, data in needs:
    if data.tfds_name:
      continue
    patterns = data.input_path if isinstance(data.input_path, (list, tuple)) else (
        str(data.input_path).split(","))
    if not [f for p in patterns if p for f in tf.io.gfile.glob(p)]:
      raise cli.UsageError(
          f"{name}={data.input_path!r} matches no files: make TFRecords with tf-models' "
          "create_coco_tf_record.py (COCO) or detection/synthetic_coco.py (demo), "
          "then set it (--params_override or --config_file)")
  if "eval" in mode and getattr(task, "use_coco_metrics", False) and task.annotation_file:
    if not tf.io.gfile.exists(task.annotation_file):
      raise cli.UsageError(f"task.annotation_file={task.annotation_file!r} does not exist: "
                           "point it at the instances JSON of the validation split")


def _type_errors(value, default, path: str):
  """Where an override changed a field's type (tf-models' ParamsDict accepts any value)."""
  if isinstance(default, dict) and isinstance(value, dict):
    for key, sub in value.items():
      if key in default:
        yield from _type_errors(sub, default[key], f"{path}.{key}" if path else key)
    return
  if default is None or value is None:
    return
  if isinstance(default, bool):
    ok = isinstance(value, bool)
  elif isinstance(default, int):
    ok = isinstance(value, int) and not isinstance(value, bool)
  elif isinstance(default, float):
    ok = isinstance(value, (int, float)) and not isinstance(value, bool)
  elif isinstance(default, str):
    ok = isinstance(value, str)
  else:
    return   # lists, tuples and nested configs in lists: tf-models checks their shape
  if not ok:
    yield f"{path}={value!r} (expected {type(default).__name__})"


def _parse_configuration():
  """tf-models' parse_configuration, with every way a flag value can be wrong in one line."""
  import yaml  # pylint: disable=g-import-not-at-top
  from official.core import exp_factory  # pylint: disable=g-import-not-at-top
  from official.core import train_utils  # pylint: disable=g-import-not-at-top
  try:
    params = train_utils.parse_configuration(FLAGS)
  except LookupError as e:  # exp_factory / hyperparams: unknown experiment or field
    raise cli.UsageError(f"bad --experiment, --config_file or --params_override: "
                         f"{e.args[0] if e.args else e}") from None
  except yaml.YAMLError as e:
    where = " ".join(str(e).split())
    raise cli.UsageError(f"--params_override or --config_file is not valid YAML: {where}") \
        from None
  except (ValueError, AttributeError, TypeError) as e:
    raise cli.UsageError(f"bad configuration: {e}") from None
  wrong = list(_type_errors(params.as_dict(),
                            exp_factory.get_exp_config(FLAGS.experiment).as_dict(), ""))
  if wrong:
    raise cli.UsageError(f"wrong value type in --params_override or --config_file: "
                         f"{'; '.join(wrong)}")
  return params


def main(argv) -> int:
  del argv
  # Imported here so that `--help` and flag errors stay fast.
  import gin  # pylint: disable=g-import-not-at-top
  from official.common import distribute_utils  # pylint: disable=g-import-not-at-top
  from official.core import task_factory  # pylint: disable=g-import-not-at-top
  from official.core import train_lib  # pylint: disable=g-import-not-at-top
  from official.core import train_utils  # pylint: disable=g-import-not-at-top
  from official.modeling import performance  # pylint: disable=g-import-not-at-top
  from official.vision.utils import summary_manager  # pylint: disable=g-import-not-at-top

  from nse_tf_detection import efficientdet  # pylint: disable=g-import-not-at-top

  for name in ("experiment", "mode", "model_dir"):
    if not getattr(FLAGS, name):
      raise cli.UsageError(f"--{name} is required")
  gin.parse_config_files_and_bindings(FLAGS.gin_file, FLAGS.gin_params)
  for path in FLAGS.config_file or []:
    if not os.path.exists(path):
      raise cli.UsageError(f"--config_file {path!r} does not exist")
  params = _parse_configuration()
  efficientdet.validate_experiment(params)
  _check_inputs(params, FLAGS.mode)
  model_dir = FLAGS.model_dir
  from nse_tf import common_flags, run_lock  # pylint: disable=g-import-not-at-top
  common_flags.check_output_dir(model_dir, "--model_dir")
  run_lock.acquire(model_dir, "detection training")
  if "train" in FLAGS.mode:
    train_utils.serialize_config(params, model_dir)
  if params.runtime.mixed_precision_dtype:
    performance.set_mixed_precision_policy(params.runtime.mixed_precision_dtype)
  strategy = distribute_utils.get_distribution_strategy(
      distribution_strategy=params.runtime.distribution_strategy,
      all_reduce_alg=params.runtime.all_reduce_alg, num_gpus=params.runtime.num_gpus,
      tpu_address=params.runtime.tpu)
  with strategy.scope():
    task = task_factory.get_task(params.task, logging_dir=model_dir)
  metrics = {}
  reduce_logs = task.reduce_aggregated_logs

  def keep_metrics(*args, **kwargs):  # the COCO evaluator's result of the last evaluation
    out = reduce_logs(*args, **kwargs)
    metrics.clear()
    metrics.update(out or {})
    return out

  task.reduce_aggregated_logs = keep_metrics
  train_lib.run_experiment(
      distribution_strategy=strategy, task=task, mode=FLAGS.mode, params=params,
      model_dir=model_dir, summary_manager=None,
      eval_summary_manager=summary_manager.maybe_build_eval_summary_manager(
          params=params, model_dir=model_dir),
      enable_async_checkpointing=FLAGS.enable_async_checkpointing)
  train_utils.save_gin_config(FLAGS.mode, model_dir)
  if "AP" in metrics:
    print("COCO bbox AP (tf-models COCO evaluator, last evaluation): " + ", ".join(
        f"{k} {float(metrics[k]):.4f}" for k in ("AP", "AP50", "AP75", "APs", "APm", "APl")
        if k in metrics))
  return 0


def define_flags():
  """tf-models' training flags (official/common/flags.py) + the vision driver's."""
  from official.common import flags as tfm_flags  # pylint: disable=g-import-not-at-top
  from official.vision import train as vision_train  # noqa: F401  pylint: disable=g-import-not-at-top,unused-import
  import nse_tf_detection.registry_imports  # noqa: F401  pylint: disable=g-import-not-at-top,unused-import
  tfm_flags.define_flags()


if __name__ == "__main__":
  # As cli.run does, but before define_flags() imports TensorFlow: no C++ INFO lines
  # ahead of a flag error or of orbit's own output.
  os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
  define_flags()
  if not any(a.startswith(("--verbosity", "-v")) for a in sys.argv[1:]):
    # orbit prints progress and metrics itself; INFO would repeat every line.
    logging.set_verbosity(logging.WARNING)
  cli.run(main)
