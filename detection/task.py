"""The EfficientDet task: tf-models' RetinaNet task for `EfficientDetTask` configs.

tf-models looks a task up by its config class, so the D0 config subclass gets the
RetinaNet task registered under it. Two additions: the model config is validated before
building (errors say which field to change), and `initialize` — which tf-models' trainer
calls only when `model_dir` has no checkpoint yet — copies a retrain run's NSENet
weights into the backbone when `backbone.nsenet.init_from` is set, before the usual
`init_checkpoint` handling.
"""

from __future__ import annotations

from absl import logging
import tf_keras as keras

from official.core import task_factory
from official.vision.tasks import retinanet as retinanet_task

from nse_tf_detection import efficientdet
from nse_tf_detection import nsenet_backbone


@task_factory.register_task_cls(efficientdet.EfficientDetTask)
class EfficientDetTask(retinanet_task.RetinaNetTask):
  """RetinaNet task (anchors, focal/Huber losses, NMS, COCO evaluator) for D0 configs."""

  def build_model(self) -> keras.Model:
    efficientdet.validate_model_config(self.task_config.model)
    return super().build_model()

  def initialize(self, model: keras.Model):
    backbone_cfg = self.task_config.model.backbone
    if backbone_cfg.type == "nsenet" and backbone_cfg.nsenet.init_from:
      n = nsenet_backbone.load_retrain_weights(model.backbone.network,
                                               backbone_cfg.nsenet.init_from)
      logging.info("initialised %d NSENet layers from %s", n, backbone_cfg.nsenet.init_from)
    super().initialize(model)
