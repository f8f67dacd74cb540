"""NSENet as a tf-models backbone: the `nsenet` entry of the backbone factory.

Wraps `nse_tf.nsenet.build_nsenet(arch, backbone=True)` (strides 4..32 keyed '2'..'5')
into a backbone with tf-models' contract: a Keras model from images to
{level: feature map} with `output_specs`, here levels min_level..5 (3..5 by default).
Weight decay follows tf-models: the task's L2 regulariser is applied to every conv
kernel of the network.

A retrain run (SPEC §6) initialises the backbone: its model_dir holds `arch.json`,
`model_config.json` ({"num_classes", "image_size", "activation", "se", ...}) and
`final/` with `tf.train.Checkpoint(model=<build_nsenet classifier>)`. The classifier is
rebuilt, restored, and its weights copied layer by layer (names are deterministic)
into the backbone; the 1x1 head conv and fc are not part of the backbone.

Example:
  >>> import tf_keras as keras
  >>> from nse_tf_detection import nsenet_backbone
  >>> bb = nsenet_backbone.NSENetBackbone('NSENet', keras.layers.InputSpec(
  ...     shape=[None, 128, 128, 3]))
  >>> sorted(bb.output_specs), bb.output_specs['5'].as_list()[:3]
  (['3', '4', '5'], [None, 4, 4])
"""

from __future__ import annotations

from typing import Optional, Union

from absl import logging
import tensorflow as tf
import tf_keras as keras

from official.vision.modeling.backbones import factory

from nse_tf import arch as arch_lib
from nse_tf import nsenet
from nse_tf import retrain_run as retrain_run_lib

from nse_tf_detection.efficientdet import DetectionConfigError

MAX_LEVEL = 5


def retrain_run(model_dir: str):
  """(Architecture, model_config dict, checkpoint path) of a retrain model_dir."""
  run = retrain_run_lib.read(model_dir, error=DetectionConfigError)
  return run.arch, run.config, run.checkpoint


def resolve_arch(arch: str = "", arch_json: str = "", init_from: str = "",
                 scale: float = 0.0) -> arch_lib.Architecture:
  """The backbone's Architecture from the config fields (checked against init_from)."""
  if arch or arch_json:
    a = arch_lib.resolve(arch or None, arch_json or None)
    if init_from:
      run_arch, _, _ = retrain_run(init_from)
      if run_arch.key() != a.key():
        raise DetectionConfigError(
            f"the backbone architecture ({a.to_compact()}) differs from the one of the "
            f"retrain run in {init_from} ({run_arch.to_compact()}): leave arch/arch_json "
            "empty to take it from the run")
  elif init_from:
    a, _, _ = retrain_run(init_from)
  else:
    raise DetectionConfigError("the nsenet backbone needs arch, arch_json or init_from")
  if init_from and scale and abs(scale - a.scale) > 1e-9:
    raise DetectionConfigError(
        f"backbone.nsenet.scale={scale:g} but the retrain run in {init_from} was trained at "
        f"scale {a.scale:g}: leave scale at 0 to use the run's")
  return a.with_scale(scale) if scale else a


@keras.utils.register_keras_serializable(package="nse_tf")
class NSENetBackbone(keras.Model):
  """NSENet feature pyramid (levels min_level..5) with tf-models' `output_specs`."""

  def __init__(self, arch: Union[arch_lib.Architecture, str],
               input_specs: keras.layers.InputSpec = keras.layers.InputSpec(
                   shape=[None, 512, 512, 3]),
               min_level: int = 3, activation: str = "relu", se: bool = False,
               sync_bn: bool = False,
               kernel_regularizer: Optional[keras.regularizers.Regularizer] = None,
               **kwargs):
    if isinstance(arch, str):
      arch = arch_lib.resolve(arch)
    shape = list(input_specs.shape[1:])
    if None in shape[:2]:
      raise DetectionConfigError("the nsenet backbone needs a static input height and width, "
                                 f"got {shape}")
    network = nsenet.build_nsenet(arch, input_shape=shape, activation=activation, se=se,
                                  backbone=True, sync_bn=sync_bn, name="nsenet")
    inputs = keras.Input(shape=shape, batch_size=input_specs.shape[0], name="images")
    features = network(inputs)
    endpoints = {str(l): features[str(l)] for l in range(min_level, MAX_LEVEL + 1)}
    super().__init__(inputs=inputs, outputs=endpoints, **kwargs)
    self._network = network
    self._arch_json = arch.to_json(indent=None)
    self._config_dict = dict(input_specs=list(input_specs.shape), min_level=min_level,
                             activation=activation, se=se, sync_bn=sync_bn,
                             kernel_regularizer=keras.regularizers.serialize(
                                 kernel_regularizer))
    self._output_specs = {l: endpoints[l].get_shape() for l in endpoints}
    if kernel_regularizer is not None:
      kernels = [w for w in network.trainable_weights if w.name.split("/")[-1].startswith(
          ("kernel", "depthwise_kernel"))]
      # One callable loss: tf-models sums `model.losses` into the total loss.
      self.add_loss(lambda: tf.add_n([kernel_regularizer(w) for w in kernels]))

  @property
  def network(self) -> keras.Model:
    """The inner build_nsenet model (layer names as in the classifier)."""
    return self._network

  @property
  def output_specs(self):
    return self._output_specs

  def get_config(self):
    return dict(arch=self._arch_json, **self._config_dict)

  @classmethod
  def from_config(cls, config, custom_objects=None):
    config = dict(config)
    config["arch"] = arch_lib.Architecture.from_json(config["arch"])
    if isinstance(config.get("input_specs"), (list, tuple)):
      config["input_specs"] = keras.layers.InputSpec(shape=list(config["input_specs"]))
    config["kernel_regularizer"] = keras.regularizers.get(config.get("kernel_regularizer"))
    return cls(**config)

  def load_retrain(self, model_dir: str) -> int:
    """Copies a retrain run's classifier weights into the backbone; returns #layers."""
    return load_retrain_weights(self._network, model_dir)


def load_retrain_weights(network: keras.Model, model_dir: str) -> int:
  """Restores the retrain classifier and copies its weights by layer name."""
  arch, config, ckpt = retrain_run(model_dir)
  classifier = nsenet.build_nsenet(
      arch, num_classes=int(config.get("num_classes", 1000)),
      input_shape=(224, 224, 3), activation=config.get("activation", "relu"),
      se=bool(config.get("se", False)), dropout=float(config.get("dropout", 0.0)))
  status = tf.train.Checkpoint(model=classifier).read(ckpt)
  try:
    status.expect_partial().assert_existing_objects_matched()
  except AssertionError as e:
    raise DetectionConfigError(f"checkpoint {ckpt} does not match the retrain run's network "
                               f"({arch.to_compact()}): {str(e)[:300]}") from None
  copied = 0
  for layer in network.layers:
    if not layer.weights:
      continue
    try:
      source = classifier.get_layer(layer.name)
    except ValueError:
      raise DetectionConfigError(
          f"layer {layer.name!r} of the backbone is not in the retrain run's network: the "
          "backbone's arch, scale or se differ from the run's") from None
    try:
      layer.set_weights(source.get_weights())
    except ValueError as e:
      raise DetectionConfigError(
          f"layer {layer.name!r}: retrain weights do not fit the backbone ({e}); the "
          "backbone's scale or se differ from the run's") from None
    copied += 1
  logging.info("NSENet backbone: %d layers initialised from %s", copied, ckpt)
  return copied


@factory.register_backbone_builder("nsenet")
def build_nsenet_backbone(input_specs: keras.layers.InputSpec, backbone_config,
                          norm_activation_config,
                          l2_regularizer: Optional[keras.regularizers.Regularizer] = None
                          ) -> keras.Model:
  """tf-models backbone builder for `backbone.type: nsenet`."""
  assert backbone_config.type == "nsenet", backbone_config.type
  c = backbone_config.nsenet
  arch = resolve_arch(c.arch, c.arch_json, c.init_from, c.scale)
  activation = c.activation
  se = c.se
  if c.init_from:
    _, run_config, _ = retrain_run(c.init_from)
    activation = activation or run_config.get("activation", "relu")
    if bool(run_config.get("se", False)) != bool(se):
      raise DetectionConfigError(
          f"backbone.nsenet.se={se} but the retrain run in {c.init_from} used se="
          f"{run_config.get('se')}: set them equal")
  activation = activation or norm_activation_config.activation
  if activation not in ("relu", "swish"):
    raise DetectionConfigError(f"NSENet supports activation 'relu' or 'swish', got "
                               f"{activation!r} (set task.model.backbone.nsenet.activation)")
  return NSENetBackbone(arch, input_specs, min_level=c.min_level, activation=activation, se=se,
                        sync_bn=norm_activation_config.use_sync_bn,
                        kernel_regularizer=l2_regularizer)
