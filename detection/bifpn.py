"""EfficientDet's BiFPN as a tf-models decoder: the `bifpn` entry of the decoder factory.

Structure (Tan et al. 2020, as in google/automl efficientdet for D0):
* P6 from the backbone's P5 by a 1x1 conv (bias) + BN + 3×3/2 max-pool, P7 from P6 by
  max-pool; backbone levels with another width are brought to `num_filters` by a 1x1
  conv + BN on each edge where they enter the first cell.
* Each cell: top-down P6'..P3' then bottom-up P4''..P7''; every node fuses its inputs
  (nearest ×2 up-sampling, 3×3/2 max-pool down-sampling) with fast normalised fusion
  Σ relu(w_i)·x_i / (Σ relu(w_i) + 1e-4), then swish → separable 3×3 conv (bias) → BN.

Like tf-models' FPN it is a functional Keras model from {level: features} to
{level: features} with `output_specs`.

Example:
  >>> import tensorflow as tf
  >>> from nse_tf_detection import bifpn
  >>> specs = {'3': tf.TensorShape([None, 16, 16, 40]), '4': tf.TensorShape([None, 8, 8, 80]),
  ...          '5': tf.TensorShape([None, 4, 4, 320])}
  >>> dec = bifpn.BiFPN(specs, min_level=3, max_level=7)
  >>> sorted(dec.output_specs)
  ['3', '4', '5', '6', '7']
"""

from __future__ import annotations

from typing import Dict, Mapping, Optional

import tensorflow as tf
import tf_keras as keras

from official.vision.modeling.decoders import factory

from nse_tf_detection.efficientdet import DetectionConfigError

EPSILON = 1e-4


@keras.utils.register_keras_serializable(package="detection")
class FastFusion(keras.layers.Layer):
  """Σ relu(w_i)·x_i / (Σ relu(w_i) + ε) with one learnable weight per input ('fast');
  or the plain sum ('sum')."""

  def __init__(self, num_inputs: int, mode: str = "fast", epsilon: float = EPSILON, **kwargs):
    super().__init__(**kwargs)
    self.num_inputs = num_inputs
    self.mode = mode
    self.epsilon = epsilon

  def build(self, input_shape):
    if self.mode == "fast":
      self.w = self.add_weight(name="weights", shape=(self.num_inputs,),
                               initializer="ones", trainable=True)
    super().build(input_shape)

  def call(self, inputs):
    if self.mode == "sum":
      return tf.add_n(inputs)
    w = tf.nn.relu(tf.cast(self.w, inputs[0].dtype))
    total = tf.reduce_sum(w) + self.epsilon
    return tf.add_n([w[i] * x for i, x in enumerate(inputs)]) / total

  def get_config(self):
    return dict(super().get_config(), num_inputs=self.num_inputs, mode=self.mode,
                epsilon=self.epsilon)


@keras.utils.register_keras_serializable(package="nse_tf")
class BiFPN(keras.Model):
  """BiFPN over levels min_level..max_level, `num_cells` cells of `num_filters` channels."""

  def __init__(self, input_specs: Mapping[str, tf.TensorShape], min_level: int = 3,
               max_level: int = 7, num_filters: int = 64, num_cells: int = 3,
               fusion: str = "fast", use_separable_conv: bool = True,
               activation: str = "swish", use_sync_bn: bool = False,
               norm_momentum: float = 0.99, norm_epsilon: float = 1e-3,
               kernel_regularizer: Optional[keras.regularizers.Regularizer] = None,
               **kwargs):
    backbone_max = max(int(k) for k in input_specs)
    missing = [l for l in range(min_level, min(backbone_max, max_level) + 1)
               if str(l) not in input_specs]
    if missing:
      raise DetectionConfigError(f"BiFPN needs backbone levels {min_level}..{backbone_max}; "
                                 f"the backbone has no level(s) {missing}")
    if backbone_max >= max_level or backbone_max < min_level:
      raise DetectionConfigError(f"BiFPN makes levels above the backbone's top level "
                                 f"{backbone_max} by pooling: need min_level <= "
                                 f"{backbone_max} < max_level, got {min_level}..{max_level}")
    self._config_dict = dict(
        input_specs={k: v.as_list() for k, v in input_specs.items()}, min_level=min_level,
        max_level=max_level, num_filters=num_filters, num_cells=num_cells, fusion=fusion,
        use_separable_conv=use_separable_conv, activation=activation, use_sync_bn=use_sync_bn,
        norm_momentum=norm_momentum, norm_epsilon=norm_epsilon,
        kernel_regularizer=keras.regularizers.serialize(kernel_regularizer))
    bn_cls = (keras.layers.experimental.SyncBatchNormalization if use_sync_bn
              else keras.layers.BatchNormalization)

    def bn(name):
      return bn_cls(momentum=norm_momentum, epsilon=norm_epsilon, name=name)

    def conv1x1(name):
      return keras.layers.Conv2D(num_filters, 1, padding="same", use_bias=True,
                                 kernel_regularizer=kernel_regularizer, name=name)

    def pool(name):
      return keras.layers.MaxPool2D(3, 2, padding="same", name=name)

    inputs = {str(l): keras.Input(shape=input_specs[str(l)][1:], name=f"P{l}_in")
              for l in range(min_level, backbone_max + 1)}
    feats: Dict[int, tf.Tensor] = {l: inputs[str(l)] for l in range(min_level, backbone_max + 1)}
    # Extra levels: 1x1 conv + BN (only where the width differs) then max-pool.
    x = feats[backbone_max]
    for l in range(backbone_max + 1, max_level + 1):
      if x.shape[-1] != num_filters:
        x = bn(f"P{l}_bn")(conv1x1(f"P{l}_conv")(x))
      x = pool(f"P{l}_pool")(x)
      feats[l] = x

    def resample(x, target_level, source_level, name):
      if x.shape[-1] != num_filters:  # first cell only: lateral 1x1 conv + BN per edge
        x = bn(f"{name}_bn")(conv1x1(f"{name}_conv")(x))
      if source_level > target_level:
        x = keras.layers.UpSampling2D(2 ** (source_level - target_level),
                                      interpolation="nearest", name=f"{name}_up")(x)
      elif source_level < target_level:
        x = pool(f"{name}_down")(x)
      return x

    def node(name, level, sources):
      parts = [resample(x, level, src, f"{name}_in{i}_P{src}")
               for i, (src, x) in enumerate(sources)]
      x = FastFusion(len(parts), fusion, name=f"{name}_fuse")(parts)
      x = keras.layers.Activation(activation, name=f"{name}_act")(x)
      if use_separable_conv:
        x = keras.layers.SeparableConv2D(num_filters, 3, padding="same", use_bias=True,
                                         depthwise_regularizer=kernel_regularizer,
                                         pointwise_regularizer=kernel_regularizer,
                                         name=f"{name}_conv")(x)
      else:
        x = keras.layers.Conv2D(num_filters, 3, padding="same", use_bias=True,
                                kernel_regularizer=kernel_regularizer, name=f"{name}_conv")(x)
      return bn(f"{name}_bn")(x)

    for cell in range(num_cells):
      top_down = {max_level: feats[max_level]}
      for l in range(max_level - 1, min_level - 1, -1):
        top_down[l] = node(f"cell{cell}_td_P{l}", l,
                           [(l, feats[l]), (l + 1, top_down[l + 1])])
      out = {min_level: top_down[min_level]}
      for l in range(min_level + 1, max_level + 1):
        sources = [(l, feats[l])]
        if l < max_level:
          sources.append((l, top_down[l]))
        sources.append((l - 1, out[l - 1]))
        out[l] = node(f"cell{cell}_bu_P{l}", l, sources)
      feats = out

    endpoints = {str(l): feats[l] for l in range(min_level, max_level + 1)}
    super().__init__(inputs=inputs, outputs=endpoints, **kwargs)
    self._output_specs = {k: v.get_shape() for k, v in endpoints.items()}

  @property
  def output_specs(self):
    return self._output_specs

  def get_config(self):
    return dict(self._config_dict)

  @classmethod
  def from_config(cls, config, custom_objects=None):
    config = dict(config)
    config["input_specs"] = {k: tf.TensorShape(v) for k, v in config["input_specs"].items()}
    config["kernel_regularizer"] = keras.regularizers.get(config.get("kernel_regularizer"))
    return cls(**config)


@factory.register_decoder_builder("bifpn")
def build_bifpn_decoder(input_specs: Mapping[str, tf.TensorShape], model_config,
                        l2_regularizer: Optional[keras.regularizers.Regularizer] = None
                        ) -> keras.Model:
  """tf-models decoder builder for `decoder.type: bifpn`."""
  decoder_cfg = model_config.decoder.get()
  assert model_config.decoder.type == "bifpn", model_config.decoder.type
  norm = model_config.norm_activation
  return BiFPN(input_specs=input_specs, min_level=model_config.min_level,
               max_level=model_config.max_level, num_filters=decoder_cfg.num_filters,
               num_cells=decoder_cfg.num_cells, fusion=decoder_cfg.fusion,
               use_separable_conv=decoder_cfg.use_separable_conv,
               activation=norm.activation, use_sync_bn=norm.use_sync_bn,
               norm_momentum=norm.norm_momentum, norm_epsilon=norm.norm_epsilon,
               kernel_regularizer=l2_regularizer)
