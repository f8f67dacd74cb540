"""What a finished retrain leaves in its model_dir, read in one place.

`python -m nse_tf.retrain` writes, and the export (`nse_tf.export`) and the detector's
backbone (`detection/nsenet_backbone.py`, `init_from`) read:

  model_dir/arch.json          the Architecture (nse_tf.arch JSON)
  model_dir/model_config.json  how to rebuild the classifier and serve it: num_classes,
                               image_size, activation, se, dropout, ..., preprocessing,
                               format_version (MODEL_CONFIG_VERSION)
  model_dir/final/             the deployable weights (the EMA weights when EMA was on):
                               one tf.train.Checkpoint(model=<classifier>)

Paths go through tf.io.gfile, so a run on GCS (a TPU job's model_dir) reads the same way.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any, Dict, Type

ARCH = "arch.json"
MODEL_CONFIG = "model_config.json"
FINAL = "final"
MODEL_CONFIG_VERSION = 1
REQUIRED_KEYS = ("num_classes", "image_size", "activation", "se")
_HOW = "train one with python -m nse_tf.retrain --model_dir=..."


@dataclasses.dataclass
class RetrainRun:
  model_dir: str
  arch: Any                    # nse_tf.arch.Architecture
  config: Dict[str, Any]       # model_config.json
  checkpoint: str              # the final/ checkpoint prefix


def read(model_dir: str, error: Type[Exception] = FileNotFoundError) -> RetrainRun:
  """The finished retrain in `model_dir`; anything missing or wrong raises `error`.

  The message names what is missing and how to get it (train, or finish the retrain).
  """
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  from nse_tf import arch as arch_lib  # pylint: disable=g-import-not-at-top
  if not tf.io.gfile.isdir(model_dir):
    raise error(f"{model_dir!r} is not a directory: expected a finished retrain model_dir "
                f"({ARCH}, {MODEL_CONFIG}, {FINAL}/); {_HOW}")
  for name in (ARCH, MODEL_CONFIG):
    if not tf.io.gfile.exists(os.path.join(model_dir, name)):
      raise error(f"{model_dir!r} has no {name}: it is not a retrain directory ({_HOW})")
  checkpoint = tf.train.latest_checkpoint(os.path.join(model_dir, FINAL))
  if checkpoint is None:
    raise error(f"{model_dir!r} has no {FINAL}/ checkpoint: the retrain has not finished; "
                "re-run the same python -m nse_tf.retrain command to resume and finish it")
  arch = arch_lib.Architecture.load(os.path.join(model_dir, ARCH))
  return RetrainRun(model_dir, arch, read_model_config(model_dir, error), checkpoint)


def read_model_config(model_dir: str, error: Type[Exception] = FileNotFoundError
                      ) -> Dict[str, Any]:
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  path = os.path.join(model_dir, MODEL_CONFIG)
  try:
    with tf.io.gfile.GFile(path, "r") as f:
      config = json.load(f)
  except json.JSONDecodeError as e:
    raise error(f"{path} is not valid JSON ({e}); re-run the retrain with --overwrite") from None
  if not isinstance(config, dict):
    raise error(f"{path} is not a JSON object; re-run the retrain with --overwrite")
  version = config.get("format_version", MODEL_CONFIG_VERSION)
  if version != MODEL_CONFIG_VERSION:
    raise error(f"{path}: model_config format_version {version!r}, this nse_tf reads "
                f"{MODEL_CONFIG_VERSION}")
  missing = [k for k in REQUIRED_KEYS if k not in config]
  if missing:
    raise error(f"{path} lacks {', '.join(missing)}")
  return config
