"""EfficientDet-D0 configs and registered experiments on tf-models' RetinaNet task.

tf-models picks a backbone or decoder through a `OneOfConfig`; the documented way to
add one is a config subclass with the new field. `Backbone` adds `nsenet`,
`Decoder` adds `bifpn`, `EfficientDet` (a `RetinaNet` model config) uses both, and
`EfficientDetTask` (a `RetinaNetTask` config) holds it. tf-models' RetinaNet head,
anchors, focal/Huber losses, detection generator (NMS) and COCO evaluator are used
unchanged, configured to D0 (Tan et al. 2020; SPEC §7):

  input 512², levels P3-P7; BiFPN 64 channels × 3 cells, swish; head 3 separable convs
  × 64, weights shared across levels, BN per level; anchors 3 scales × {1, 2, 0.5},
  size 4; focal α 0.25 γ 1.5; Huber δ 0.1 × 50; SGD 0.9, lr 0.08 per 64 images with a
  linear warm-up, cosine, 300 epochs, global clip-norm 10, weight decay 4e-5,
  EMA 0.9998, scale jitter 0.1-2.0 and flips, float32.

Experiments (the COCO 2017 TFRecords of tf-models' `create_coco_tf_record` are expected
under `coco/` by default, as in tf-models' own COCO experiments; override
`task.train_data.input_path`, `task.validation_data.input_path` and
`task.annotation_file`):

  efficientdet_d0_nsenet_coco         backbone NSENet (released, levels 3-5)
  efficientdet_d0_efficientnetb0_coco backbone tf-models EfficientNet-B0 (SE 0.25)
  efficientdet_d0_mobilenetv2_coco    backbone tf-models MobileNetV2 1.0, P5 from its
                                      1280-channel head conv (mobilenet_head)

Example:
  >>> from official.core import exp_factory
  >>> import nse_tf_detection.registry_imports  # registers everything
  >>> cfg = exp_factory.get_exp_config('efficientdet_d0_nsenet_coco')
  >>> cfg.task.model.decoder.bifpn.num_filters
  64
"""

from __future__ import annotations

import dataclasses
import os
from typing import Optional

from official.core import config_definitions as cfg
from official.core import exp_factory
from official.modeling import hyperparams
from official.modeling import optimization
from official.vision.configs import backbones
from official.vision.configs import common
from official.vision.configs import decoders
from official.vision.configs import retinanet

from nse_tf import errors


class DetectionConfigError(errors.UsageError):
  """A detection config value that cannot work; the message says what to change."""


# D0 in one place (google/automl efficientdet 'efficientdet-d0').
D0 = dict(image_size=512, min_level=3, max_level=7, fpn_num_filters=64, fpn_cell_repeats=3,
          box_class_repeats=3, anchor_scale=4.0, num_scales=3, aspect_ratios=(1.0, 2.0, 0.5),
          focal_alpha=0.25, focal_gamma=1.5, huber_delta=0.1, box_loss_weight=50,
          lr_per_64=0.08, warmup_epochs=1.0, warmup_lr_per_64=0.008, epochs=300,
          clip_norm=10.0, weight_decay=4e-5, ema_decay=0.9998, jitter=(0.1, 2.0),
          activation="swish", batch_norm_momentum=0.99, batch_norm_epsilon=1e-3)

COCO_INPUT_PATH_BASE = retinanet.COCO_INPUT_PATH_BASE
COCO_TRAIN_EXAMPLES = retinanet.COCO_TRAIN_EXAMPLES
COCO_VAL_EXAMPLES = retinanet.COCO_VAL_EXAMPLES
COCO_NUM_CLASSES = 91  # category ids 1..90, 0 is background (tf-models' convention)


@dataclasses.dataclass
class NSENet(hyperparams.Config):
  """NSENet backbone.

  Attributes:
    arch: a released name ('NSENet', 'NSENet-27', 'NSENet-GPU') or a compact
      architecture string; empty when `arch_json` or `init_from` gives it.
    arch_json: path to an Architecture JSON (e.g. a search's final_arch.json).
    scale: channel scale override (0: the architecture's own); < 1 for CPU demos.
    activation: '' = the retrain run's activation when `init_from` is set, else
      `norm_activation.activation` (as tf-models' EfficientNet does).
    se: squeeze-and-excitation in every op (must match a retrain checkpoint).
    init_from: a retrain run's model_dir (arch.json, model_config.json, final/);
      its classifier weights initialise the backbone before training starts.
    min_level: lowest level exposed (3: stride 8); the highest is 5 (stride 32).
  """
  arch: str = ""
  arch_json: str = ""
  scale: float = 0.0
  activation: str = ""
  se: bool = False
  init_from: str = ""
  min_level: int = 3


@dataclasses.dataclass
class MobileNetHead(backbones.MobileNet):
  """`backbone.mobilenet`'s fields; level 5 is the 1x1 head conv's output
  (nse_tf_detection/mobilenet_head.py)."""


@dataclasses.dataclass
class Backbone(backbones.Backbone):
  """tf-models' backbone OneOfConfig plus `nsenet` and `mobilenet_head`."""
  nsenet: NSENet = dataclasses.field(default_factory=NSENet)
  mobilenet_head: MobileNetHead = dataclasses.field(default_factory=MobileNetHead)


@dataclasses.dataclass
class BiFPN(hyperparams.Config):
  """EfficientDet's BiFPN (levels min_level..max_level of the model config).

  Attributes:
    num_filters: channels of every level (D0: 64).
    num_cells: repeated BiFPN cells (D0: 3).
    fusion: 'fast' normalised fusion relu(w)/(Σw + 1e-4) (D0), or 'sum'.
    use_separable_conv: separable 3×3 convs after each fusion (D0) or dense ones.
  """
  num_filters: int = 64
  num_cells: int = 3
  fusion: str = "fast"
  use_separable_conv: bool = True


@dataclasses.dataclass
class Decoder(decoders.Decoder):
  """tf-models' decoder OneOfConfig plus `bifpn`."""
  bifpn: BiFPN = dataclasses.field(default_factory=BiFPN)


@dataclasses.dataclass
class EfficientDet(retinanet.RetinaNet):
  """A RetinaNet model config whose backbone/decoder may be `nsenet`/`bifpn`."""
  backbone: Backbone = dataclasses.field(
      default_factory=lambda: Backbone(type="nsenet", nsenet=NSENet(arch="NSENet")))
  decoder: Decoder = dataclasses.field(
      default_factory=lambda: Decoder(type="bifpn", bifpn=BiFPN()))


@dataclasses.dataclass
class EfficientDetTask(retinanet.RetinaNetTask):
  model: EfficientDet = dataclasses.field(default_factory=EfficientDet)


def validate_model_config(model: retinanet.RetinaNet) -> None:
  """Checks the settings a detector build would otherwise fail on obscurely."""
  if model.num_classes < 2:
    raise DetectionConfigError(
        f"task.model.num_classes must be >= 2 (background + classes), got {model.num_classes}")
  size = list(model.input_size)
  if len(size) != 3 or size[2] != 3:
    raise DetectionConfigError(f"task.model.input_size must be [height, width, 3], got {size}")
  stride = 2 ** model.max_level
  if size[0] % stride or size[1] % stride:
    raise DetectionConfigError(
        f"task.model.input_size {size[:2]} must be divisible by 2**max_level = {stride} "
        f"(e.g. {max(stride, size[0] // stride * stride)})")
  if model.decoder.type == "bifpn":
    if not model.min_level <= 5 < model.max_level:
      raise DetectionConfigError(
          f"the bifpn decoder takes backbone levels min_level..5 and makes the rest by "
          f"max-pooling: need min_level <= 5 < max_level, got {model.min_level}..{model.max_level}")
    b = model.decoder.bifpn
    if b.num_filters < 1 or b.num_cells < 1:
      raise DetectionConfigError(
          f"task.model.decoder.bifpn.num_filters and num_cells must be >= 1, got "
          f"{b.num_filters} and {b.num_cells}")
    if b.fusion not in ("fast", "sum"):
      raise DetectionConfigError(
          f"task.model.decoder.bifpn.fusion must be 'fast' or 'sum', got {b.fusion!r}")
  if model.backbone.type == "nsenet":
    n = model.backbone.nsenet
    if not (n.arch or n.arch_json or n.init_from):
      raise DetectionConfigError(
          "task.model.backbone.nsenet needs one of arch (e.g. 'NSENet'), arch_json "
          "(a final_arch.json) or init_from (a retrain model_dir)")
    if n.arch and n.arch_json:
      raise DetectionConfigError(
          "task.model.backbone.nsenet: give arch or arch_json, not both")
    if n.scale < 0:
      raise DetectionConfigError(f"task.model.backbone.nsenet.scale must be >= 0, got {n.scale}")
    if n.min_level not in (2, 3, 4, 5) or n.min_level > model.min_level:
      raise DetectionConfigError(
          f"task.model.backbone.nsenet.min_level must be in 2..{min(5, model.min_level)}, "
          f"got {n.min_level}")
    if n.activation not in ("", "relu", "swish"):
      raise DetectionConfigError(
          f"task.model.backbone.nsenet.activation must be '', 'relu' or 'swish', got "
          f"{n.activation!r}")


def validate_experiment(params: cfg.ExperimentConfig) -> None:
  """`validate_model_config` plus data checks; used by detection/train.py up front."""
  task = params.task
  if not isinstance(task, retinanet.RetinaNetTask):
    return
  validate_model_config(task.model)
  if params.runtime.mixed_precision_dtype not in (None, "", "float32"):
    return
  for name in ("train_data", "validation_data"):
    data = getattr(task, name)
    if data.dtype != "float32":
      raise DetectionConfigError(
          f"task.{name}.dtype is {data.dtype!r} but runtime.mixed_precision_dtype is float32: "
          f"set task.{name}.dtype=float32 (or a mixed-precision runtime)")


# ------------------------------------------------------------------ experiments

def _d0_backbone(name: str) -> Backbone:
  if name == "nsenet":
    return Backbone(type="nsenet", nsenet=NSENet(arch="NSENet"))
  if name == "efficientnetb0":
    return Backbone(type="efficientnet",
                    efficientnet=backbones.EfficientNet(model_id="b0", se_ratio=0.25))
  if name == "mobilenetv2":   # P5 from the 1280-channel head conv: see mobilenet_head.py
    return Backbone(type="mobilenet_head",
                    mobilenet_head=MobileNetHead(model_id="MobileNetV2", filter_size_scale=1.0))
  raise ValueError(f"unknown D0 backbone {name!r}")


def efficientdet_d0(backbone: str = "nsenet", train_batch_size: int = 64,
                    eval_batch_size: int = 8, input_path_base: str = COCO_INPUT_PATH_BASE,
                    annotation_file: Optional[str] = None) -> cfg.ExperimentConfig:
  """The EfficientDet-D0 COCO experiment with one of the three backbones."""
  size = D0["image_size"]
  steps_per_epoch = COCO_TRAIN_EXAMPLES // train_batch_size
  lr = D0["lr_per_64"] * train_batch_size / 64
  model = EfficientDet(
      num_classes=COCO_NUM_CLASSES,
      input_size=[size, size, 3],
      min_level=D0["min_level"],
      max_level=D0["max_level"],
      anchor=retinanet.Anchor(num_scales=D0["num_scales"],
                              aspect_ratios=list(D0["aspect_ratios"]),
                              anchor_size=D0["anchor_scale"]),
      backbone=_d0_backbone(backbone),
      decoder=Decoder(type="bifpn", bifpn=BiFPN(num_filters=D0["fpn_num_filters"],
                                                num_cells=D0["fpn_cell_repeats"])),
      head=retinanet.RetinaNetHead(num_convs=D0["box_class_repeats"],
                                   num_filters=D0["fpn_num_filters"],
                                   use_separable_conv=True, share_level_convs=True),
      detection_generator=retinanet.DetectionGenerator(
          pre_nms_top_k=5000, pre_nms_score_threshold=0.05, nms_iou_threshold=0.5,
          max_num_detections=100),
      norm_activation=common.NormActivation(
          activation=D0["activation"], use_sync_bn=False,
          norm_momentum=D0["batch_norm_momentum"], norm_epsilon=D0["batch_norm_epsilon"]))
  return cfg.ExperimentConfig(
      runtime=cfg.RuntimeConfig(mixed_precision_dtype="float32"),
      task=EfficientDetTask(
          annotation_file=annotation_file or os.path.join(input_path_base,
                                                          "instances_val2017.json"),
          model=model,
          losses=retinanet.Losses(focal_loss_alpha=D0["focal_alpha"],
                                  focal_loss_gamma=D0["focal_gamma"],
                                  huber_loss_delta=D0["huber_delta"],
                                  box_loss_weight=D0["box_loss_weight"],
                                  l2_weight_decay=D0["weight_decay"]),
          train_data=retinanet.DataConfig(
              input_path=os.path.join(input_path_base, "train*"),
              is_training=True, global_batch_size=train_batch_size, dtype="float32",
              parser=retinanet.Parser(aug_rand_hflip=True, aug_scale_min=D0["jitter"][0],
                                      aug_scale_max=D0["jitter"][1])),
          validation_data=retinanet.DataConfig(
              input_path=os.path.join(input_path_base, "val*"),
              is_training=False, global_batch_size=eval_batch_size, dtype="float32")),
      trainer=cfg.TrainerConfig(
          train_steps=D0["epochs"] * steps_per_epoch,
          validation_steps=COCO_VAL_EXAMPLES // eval_batch_size,
          validation_interval=steps_per_epoch,
          steps_per_loop=steps_per_epoch,
          summary_interval=steps_per_epoch,
          checkpoint_interval=steps_per_epoch,
          optimizer_config=optimization.OptimizationConfig({
              "optimizer": {"type": "sgd",
                            "sgd": {"momentum": 0.9, "global_clipnorm": D0["clip_norm"]}},
              "ema": {"average_decay": D0["ema_decay"], "trainable_weights_only": False},
              "learning_rate": {"type": "cosine",
                                "cosine": {"initial_learning_rate": lr,
                                           "decay_steps": D0["epochs"] * steps_per_epoch}},
              "warmup": {"type": "linear",
                         "linear": {"warmup_steps": int(D0["warmup_epochs"] * steps_per_epoch),
                                    "warmup_learning_rate":
                                        D0["warmup_lr_per_64"] * train_batch_size / 64}},
          })),
      restrictions=[
          "task.train_data.is_training != None",
          "task.validation_data.is_training != None",
      ])


@exp_factory.register_config_factory("efficientdet_d0_nsenet_coco")
def efficientdet_d0_nsenet_coco() -> cfg.ExperimentConfig:
  """EfficientDet-D0 on COCO with the released NSENet backbone."""
  return efficientdet_d0("nsenet")


@exp_factory.register_config_factory("efficientdet_d0_efficientnetb0_coco")
def efficientdet_d0_efficientnetb0_coco() -> cfg.ExperimentConfig:
  """EfficientDet-D0 on COCO with tf-models' EfficientNet-B0 backbone (the original D0)."""
  return efficientdet_d0("efficientnetb0")


@exp_factory.register_config_factory("efficientdet_d0_mobilenetv2_coco")
def efficientdet_d0_mobilenetv2_coco() -> cfg.ExperimentConfig:
  """EfficientDet-D0 on COCO with tf-models' MobileNetV2 1.0 backbone (P5: its head conv)."""
  return efficientdet_d0("mobilenetv2")


EXPERIMENTS = ("efficientdet_d0_nsenet_coco", "efficientdet_d0_efficientnetb0_coco",
               "efficientdet_d0_mobilenetv2_coco")
