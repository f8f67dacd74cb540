"""Standalone NSENet: a tf_keras Model built from an `Architecture`.

Follows SPEC §2.3 and §3: stem (3×3 conv stride 2, 16 channels, BN, act), one
multi-branch layer per searchable layer, then 1x1 conv → 1024 (act, no BN), global
average pool, dropout and fc. A layer with several ops averages its branches, the
identity of a normal layer counting as one branch; empty normal layers are dropped.

The backbone mode returns the feature maps at strides 4, 8, 16 and 32 keyed by
level '2'..'5' (tf-models' convention), for detection.

Example:
  >>> from nse_tf import arch, nsenet
  >>> model = nsenet.build_nsenet(arch.load_released("NSENet-27"), num_classes=10,
  ...                             input_shape=(32, 32, 3))
"""

from __future__ import annotations

import math
from typing import Dict, Optional, Sequence, Union

import tensorflow as tf
import tf_keras as keras

from nse_tf import ops as ops_lib
from nse_tf import spaces
from nse_tf.arch import Architecture


def stem(x, activation: str = "relu", sync_bn: bool = False, channels: int = 16):
  """3×3 conv stride 2 with symmetric padding 1, BN, activation."""
  x = keras.layers.ZeroPadding2D(1, name="stem_pad")(x)
  x = keras.layers.Conv2D(channels, 3, strides=2, padding="valid", use_bias=False,
                          kernel_initializer=ops_lib.conv_init(), name="stem_conv")(x)
  x = ops_lib.batch_norm("stem_bn", sync=sync_bn)(x)
  return ops_lib.activation_layer(activation, "stem_act")(x)


def head_conv(x, channels: int = 1024, activation: str = "relu"):
  """1x1 conv → `channels` with bias and activation, no BN (SPEC §2.3)."""
  x = keras.layers.Conv2D(channels, 1, use_bias=True, kernel_initializer=ops_lib.conv_init(),
                          name="head_conv")(x)
  return ops_lib.activation_layer(activation, "head_act")(x)


def classifier(x, num_classes: int, dropout: float = 0.0):
  x = keras.layers.GlobalAveragePooling2D(name="pool")(x)
  if dropout > 0:
    x = keras.layers.Dropout(dropout, name="dropout")(x)
  return keras.layers.Dense(num_classes, name="classifier",
                            kernel_initializer=keras.initializers.RandomUniform(
                                -1.0 / math.sqrt(1024), 1.0 / math.sqrt(1024)))(x)


def build_nsenet(arch: Union[Architecture, str], num_classes: int = 1000,
                 input_shape: Sequence[int] = (224, 224, 3), activation: str = "relu",
                 se: bool = False, dropout: float = 0.0, backbone: bool = False,
                 sync_bn: bool = False, name: Optional[str] = None,
                 drop_path: float = 0.0) -> keras.Model:
  """Builds the standalone network of `arch`.

  Args:
    arch: an `Architecture`, or the name of a released network ('NSENet-27').
    num_classes: classifier outputs (ignored in backbone mode).
    input_shape: (H, W, 3); any H, W (the macro's strides are fixed).
    activation: 'relu' (the paper's search and retraining) or 'swish'.
    se: squeeze-and-excitation in every op (retraining option).
    dropout: dropout rate before the fc.
    backbone: return {'2': stride-4, '3': stride-8, '4': stride-16, '5': stride-32}
      feature maps instead of logits.
    sync_bn: SyncBatchNormalization (multi-replica training).
    name: model name (default: the released name or 'nsenet').
    drop_path: stochastic depth (EfficientNet's "drop connect") for retraining: in
      training, each op branch of a normal layer (the layers with an identity path) is
      dropped per example with a rate growing linearly with depth up to `drop_path` at
      the last layer, and rescaled by 1/keep. R/E layers have no identity and are never
      dropped. 0 (the default) adds no layer at all.
  """
  if isinstance(arch, str):
    from nse_tf.arch import load_released  # pylint: disable=g-import-not-at-top
    arch = load_released(arch)
  if len(input_shape) != 3 or input_shape[-1] != 3:
    raise ValueError(f"input_shape must be (height, width, 3), got {tuple(input_shape)}")
  if not 0.0 <= drop_path < 1.0:
    raise ValueError(f"drop_path must be in [0, 1), got {drop_path}")
  if drop_path > 0:
    # tf-models' layer (registered as 'Vision>StochasticDepth'); imported only when used.
    from official.vision.modeling.layers import nn_layers  # pylint: disable=g-import-not-at-top
  resolved = spaces.resolve_macro(arch.macro, tuple(input_shape[:2]), arch.scale)
  inputs = keras.Input(shape=tuple(input_shape), name="images")
  x = stem(inputs, activation, sync_bn, resolved.stem_channels)
  stride = 2
  levels: Dict[str, tf.Tensor] = {}
  for layer, op_names in zip(resolved.layers, arch.layers):
    if layer.stride > 1:
      levels[str(int(math.log2(stride)))] = x
      stride *= layer.stride
    if not op_names:
      continue  # empty normal layer: identity
    branches = [ops_lib.build_op(op, layer, se=se, activation=activation, sync_bn=sync_bn)(x)
                for op in op_names]
    if layer.kind == "N":
      rate = drop_path * (layer.index + 1) / len(resolved.layers)
      if rate > 0:
        branches = [nn_layers.StochasticDepth(rate, name=f"l{layer.index:02d}_{op}_drop")(b)
                    for op, b in zip(op_names, branches)]
      branches = [x] + branches
    x = (branches[0] if len(branches) == 1 else
         keras.layers.Average(name=f"l{layer.index:02d}_avg")(branches))
  levels[str(int(math.log2(stride)))] = x
  model_name = name or arch.metadata.get("name", "nsenet").lower().replace("-", "_")
  if backbone:
    outputs = {lvl: levels[lvl] for lvl in ("2", "3", "4", "5") if lvl in levels}
    return keras.Model(inputs, outputs, name=model_name)
  x = head_conv(x, resolved.head_channels, activation)
  logits = classifier(x, num_classes, dropout)
  return keras.Model(inputs, logits, name=model_name)
