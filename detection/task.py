"""The EfficientDet task: tf-models' RetinaNet task for `EfficientDetTask` configs.

tf-models looks a task up by its config class, so the D0 config subclass gets the
RetinaNet task registered under it. Additions: the model config is validated before
building (errors say which field to change); `initialize` — which tf-models' trainer
calls only when `model_dir` has no checkpoint yet — copies a retrain run's NSENet
weights into the backbone when `backbone.nsenet.init_from` is set, before the usual
`init_checkpoint` handling; and float16 training works with D0's weight EMA (see
`create_optimizer`).
"""

from __future__ import annotations

from absl import logging
import tensorflow as tf
import tf_keras as keras

from official.core import task_factory
from official.modeling.optimization import ema_optimizer
from official.vision.tasks import retinanet as retinanet_task

from nse_tf_detection import efficientdet
from nse_tf_detection import nsenet_backbone


class _EMAUnderLossScale(ema_optimizer.ExponentialMovingAverage):
  """tf-models' weight EMA, accepting what the float16 loss-scale wrapper passes it.

  tf_keras' LossScaleOptimizer aggregates the gradients itself and then calls its inner
  optimizer's `apply_gradients(..., experimental_aggregate_gradients=False)`; tf-models'
  ExponentialMovingAverage does not take that argument (TypeError at the first training
  step under `runtime.mixed_precision_dtype: float16`). This passes it on to the wrapped
  optimizer, then updates the averages as tf-models does. Uses the EMA's private
  `_optimizer`; tests/test_detection.py fails if that changes.
  """

  def apply_gradients(self, grads_and_vars, name=None, experimental_aggregate_gradients=True):
    result = self._optimizer.apply_gradients(
        grads_and_vars, name, experimental_aggregate_gradients=experimental_aggregate_gradients)
    ema_optimizer.maybe_merge_call(self.update_average, tf.distribute.get_strategy())
    return result


@task_factory.register_task_cls(efficientdet.EfficientDetTask)
class EfficientDetTask(retinanet_task.RetinaNetTask):
  """RetinaNet task (anchors, focal/Huber losses, NMS, COCO evaluator) for D0 configs."""

  def build_model(self) -> keras.Model:
    efficientdet.validate_model_config(self.task_config.model)
    return super().build_model()

  @classmethod
  def create_optimizer(cls, optimizer_config, runtime_config=None, dp_config=None):
    """tf-models' optimiser; with float16 loss scaling around D0's EMA, an EMA that takes
    the loss-scale wrapper's arguments (`_EMAUnderLossScale`)."""
    optimizer = super().create_optimizer(optimizer_config, runtime_config, dp_config)
    inner = getattr(optimizer, "inner_optimizer", None)
    if isinstance(optimizer, keras.mixed_precision.LossScaleOptimizer) and \
        type(inner) is ema_optimizer.ExponentialMovingAverage:  # pylint: disable=unidiomatic-typecheck
      inner.__class__ = _EMAUnderLossScale   # same state, one method more permissive
    return optimizer

  def initialize(self, model: keras.Model):
    backbone_cfg = self.task_config.model.backbone
    if backbone_cfg.type == "nsenet" and backbone_cfg.nsenet.init_from:
      n = nsenet_backbone.load_retrain_weights(model.backbone.network,
                                               backbone_cfg.nsenet.init_from)
      logging.info("initialised %d NSENet layers from %s", n, backbone_cfg.nsenet.init_from)
    super().initialize(model)
