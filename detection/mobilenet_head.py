"""tf-models' MobileNet with its 1x1 head conv as level 5: the `mobilenet_head` backbone.

EfficientDet-D0 with a MobileNetV2 backbone (the NSE paper's detection comparison,
2.24 B FLOPs) does not say which MobileNetV2 features feed the BiFPN. tf-models'
`mobilenet` backbone exposes the last block of each stride as levels 2-5 (24, 32, 96
and 320 channels for MobileNetV2 1.0) and computes the classification head conv (1x1,
320 → 1280, stride 32) as one more endpoint that no decoder reads. This backbone keeps
levels 2-4 and takes level 5 from that head conv, the 1280-channel feature that the TF
Object Detection API's MobileNetV2 SSD and FPN feature extractors use as their top
feature (`layer_19`). Counted at 512² it brings the detector to 2.20 B multiply-adds
(−1.7 % from the published 2.24 B) instead of 2.05 B (−8.5 %) with block 16's 320
channels; see the README (EfficientDet-D0).

The network and its weights are tf-models' own (`mobilenet.build_mobilenet` from the same
`backbone.mobilenet_head` fields as `backbone.mobilenet`); only the endpoint map differs.
"""

from __future__ import annotations

from typing import Optional

import tf_keras as keras

from official.vision.configs import backbones
from official.vision.modeling.backbones import factory
from official.vision.modeling.backbones import mobilenet


@keras.utils.register_keras_serializable(package="nse_tf")
class MobileNetHeadBackbone(keras.Model):
  """Levels 2-4 of a tf-models MobileNet and its head conv (stride 32) as level 5."""

  def __init__(self, network: keras.Model, **kwargs):
    ends = network.output
    head = str(max(int(level) for level in ends))     # one above the last block level
    if head == "5":
      raise ValueError(f"{network.name} has no head conv endpoint above level 5 "
                       f"(endpoints {sorted(ends)})")
    outputs = {level: t for level, t in ends.items() if int(level) < 5}
    outputs["5"] = ends[head]
    super().__init__(inputs=network.inputs, outputs=outputs, **kwargs)
    self._network_config = network.get_config()
    self._input_shape_list = list(network.inputs[0].shape)
    self._output_specs = {level: t.get_shape() for level, t in outputs.items()}

  @property
  def output_specs(self):
    return self._output_specs

  def get_config(self):
    return {"network": self._network_config, "input_shape": self._input_shape_list,
            "name": self.name}

  @classmethod
  def from_config(cls, config, custom_objects=None):
    del custom_objects
    specs = keras.layers.InputSpec(shape=config["input_shape"])
    return cls(mobilenet.MobileNet(input_specs=specs, **config["network"]),
               name=config.get("name"))


@factory.register_backbone_builder("mobilenet_head")
def build_mobilenet_head_backbone(
    input_specs: keras.layers.InputSpec, backbone_config, norm_activation_config,
    l2_regularizer: Optional[keras.regularizers.Regularizer] = None) -> keras.Model:
  """tf-models backbone builder for `backbone.type: mobilenet_head`."""
  assert backbone_config.type == "mobilenet_head", backbone_config.type
  plain = backbones.Backbone(type="mobilenet", mobilenet=backbones.MobileNet(
      **backbone_config.mobilenet_head.as_dict()))
  network = mobilenet.build_mobilenet(input_specs, plain, norm_activation_config,
                                      l2_regularizer)
  return MobileNetHeadBackbone(network, name="mobilenet_head")
