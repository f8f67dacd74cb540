"""Multiply-adds of a whole detector, split into backbone, decoder and head.

The counting convention is the project's (nse_tf/cost.py: convs and matmuls as
multiply-accumulates, average pools by output elements, everything else free), applied to
a batch-1 graph of backbone → decoder → class/box heads. Anchor decoding and NMS are
post-processing and excluded, as in the EfficientDet paper's FLOPs.
"""

from __future__ import annotations

from typing import Dict, Tuple

import tf_keras as keras

from nse_tf import cost


def used_backbone(model: keras.Model) -> keras.Model:
  """The backbone cut to the levels the decoder reads.

  tf-models' EfficientNet and MobileNet backbones also compute their classification
  head conv (320 → 1280, ~105 MFLOPs at 512²) as an extra endpoint that no detector
  uses; EfficientDet's published FLOPs do not include it. A functional backbone is
  re-wired to the used outputs, which keeps only the layers they depend on.
  """
  backbone = model.backbone
  if model.decoder is not None and isinstance(getattr(model.decoder, "input", None), dict):
    levels = sorted(model.decoder.input)
  else:
    levels = [str(l) for l in range(model.head.get_config()["min_level"],
                                     model.head.get_config()["max_level"] + 1)]
  outputs = getattr(backbone, "output", None)
  if not getattr(backbone, "_is_graph_network", False) or not isinstance(outputs, dict):
    return backbone
  return keras.Model(backbone.input, {l: outputs[l] for l in levels if l in outputs})


def detector_parts(model: keras.Model, size: int) -> Dict[str, keras.Model]:
  """Keras models for backbone, backbone+decoder and the whole detector (no NMS)."""
  images = keras.Input(shape=(size, size, 3), batch_size=1)
  features = used_backbone(model)(images)
  decoded = model.decoder(features) if model.decoder is not None else features
  cls_out, box_out = model.head(decoded)[:2]
  return {"backbone": keras.Model(images, features),
          "backbone+decoder": keras.Model(images, decoded),
          "detector": keras.Model(images, [cls_out, box_out])}


def count_detector(model: keras.Model, size: int) -> Tuple[Dict[str, int], int]:
  """({'backbone', 'decoder', 'head', 'total'} MACs, parameters) of a RetinaNet-style model."""
  parts = detector_parts(model, size)
  shape = (size, size, 3)
  macs = {k: cost.count_graph(m, shape)["total"] for k, m in parts.items()}
  counts = {"backbone": macs["backbone"],
            "decoder": macs["backbone+decoder"] - macs["backbone"],
            "head": macs["detector"] - macs["backbone+decoder"],
            "total": macs["detector"]}
  return counts, parts["detector"].count_params()


def build_detector(params, size: int) -> keras.Model:
  """The task's model of an experiment config at a square input size."""
  from official.core import task_factory  # pylint: disable=g-import-not-at-top
  import nse_tf_detection.registry_imports  # noqa: F401  pylint: disable=g-import-not-at-top,unused-import
  params.task.model.input_size = [size, size, 3]
  return task_factory.get_task(params.task).build_model()
