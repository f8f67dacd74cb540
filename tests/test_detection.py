"""EfficientDet-D0 / NSENet as a tf-models extension (detection/), on tiny shapes.

One tiny detector (128×128, a 6-op NSENet at scale 0.25, D0's BiFPN and head) is built
once per module and shared; the data is a 12-image synthetic COCO set.
"""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import tensorflow as tf
import tf_keras as keras

from official.core import exp_factory
from official.core import task_factory
from official.modeling import hyperparams
from official.vision.modeling.backbones import factory as backbone_factory
from official.vision.modeling.decoders import factory as decoder_factory

import nse_tf_detection.registry_imports  # noqa: F401
from nse_tf_detection import efficientdet
from nse_tf_detection import flops
from nse_tf_detection import nsenet_backbone
from nse_tf_detection import synthetic_coco
from nse_tf_detection import task as task_lib
from nse_tf_detection.efficientdet import DetectionConfigError
from nse_tf import arch as arch_lib
from nse_tf import nsenet
from nse_tf import spaces

SIZE = 128
NUM_CLASSES = 4  # background + 3 shapes


def tiny_arch(scale=0.25):
  """The flops macro with one dw_k3_e1 in each R/E layer and empty N layers."""
  kinds = spaces.layer_kinds("flops")
  return arch_lib.Architecture.from_indices(
      "flops27", [() if k == "N" else (0,) for k in kinds], macro="flops", scale=scale)


def tiny_params(data=None, arch=None, **nsenet_fields):
  params = exp_factory.get_exp_config("efficientdet_d0_nsenet_coco")
  override = {
      "task": {
          "model": {"num_classes": NUM_CLASSES, "input_size": [SIZE, SIZE, 3],
                    "backbone": {"nsenet": dict(dict(arch=(arch or tiny_arch()).to_compact()),
                                                **nsenet_fields)},
                    "detection_generator": {"pre_nms_score_threshold": 0.0,
                                            "pre_nms_top_k": 200, "max_num_detections": 20}},
          "train_data": {"global_batch_size": 2, "shuffle_buffer_size": 4,
                         "parser": {"aug_scale_min": 1.0, "aug_scale_max": 1.0}},
          "validation_data": {"global_batch_size": 2},
      },
      "trainer": {"train_steps": 4, "optimizer_config": {
          "learning_rate": {"cosine": {"decay_steps": 4}},
          "warmup": {"linear": {"warmup_steps": 1}}}},
  }
  if data:
    override["task"]["train_data"]["input_path"] = data["train_tfrecords"]
    override["task"]["validation_data"]["input_path"] = data["val_tfrecords"]
    override["task"]["annotation_file"] = data["val_annotations"]
  params.override(override, is_strict=True)
  params.validate()
  return params


@pytest.fixture(scope="module")
def data(tmp_path_factory):
  out = str(tmp_path_factory.mktemp("synthetic_coco"))
  return synthetic_coco.generate(out, num_train=8, num_val=4, image_size=SIZE, num_classes=3,
                                 seed=1, train_shards=1)


@pytest.fixture(scope="module")
def task_and_model(data):
  params = tiny_params(data)
  task = task_factory.get_task(params.task)
  model = task.build_model()
  model(tf.zeros([1, SIZE, SIZE, 3]), training=False)
  return params, task, model


# ---------------------------------------------------------------- registration

def test_registered_experiments_are_d0():
  for name in efficientdet.EXPERIMENTS:
    cfg = exp_factory.get_exp_config(name)
    cfg.validate()
    m = cfg.task.model
    assert isinstance(cfg.task, efficientdet.EfficientDetTask)
    assert m.input_size == [512, 512, 3] and (m.min_level, m.max_level) == (3, 7)
    assert m.decoder.type == "bifpn"
    assert (m.decoder.bifpn.num_filters, m.decoder.bifpn.num_cells) == (64, 3)
    assert m.decoder.bifpn.fusion == "fast" and m.norm_activation.activation == "swish"
    assert (m.head.num_convs, m.head.num_filters) == (3, 64)
    assert m.head.use_separable_conv and m.head.share_level_convs
    assert m.anchor.num_scales == 3 and m.anchor.aspect_ratios == [1.0, 2.0, 0.5]
    assert m.anchor.anchor_size == 4.0 and m.num_classes == 91
    losses = cfg.task.losses
    assert (losses.focal_loss_alpha, losses.focal_loss_gamma) == (0.25, 1.5)
    assert (losses.huber_loss_delta, losses.box_loss_weight) == (0.1, 50)
    assert losses.l2_weight_decay == 4e-5
    parser = cfg.task.train_data.parser
    assert (parser.aug_scale_min, parser.aug_scale_max, parser.aug_rand_hflip) == (0.1, 2.0, True)
    assert cfg.task.train_data.dtype == "float32"
    assert cfg.runtime.mixed_precision_dtype == "float32"
    opt = cfg.trainer.optimizer_config
    assert opt.optimizer.type == "sgd" and opt.optimizer.sgd.momentum == 0.9
    assert opt.optimizer.sgd.global_clipnorm == 10.0
    assert opt.ema.average_decay == 0.9998
    batch = cfg.task.train_data.global_batch_size
    assert opt.learning_rate.type == "cosine"
    assert opt.learning_rate.cosine.initial_learning_rate == pytest.approx(0.08 * batch / 64)
    steps_per_epoch = efficientdet.COCO_TRAIN_EXAMPLES // batch
    assert cfg.trainer.train_steps == 300 * steps_per_epoch
    assert opt.learning_rate.cosine.decay_steps == 300 * steps_per_epoch
    assert opt.warmup.type == "linear" and opt.warmup.linear.warmup_steps == steps_per_epoch
  types = [exp_factory.get_exp_config(n).task.model.backbone.type for n in efficientdet.EXPERIMENTS]
  assert types == ["nsenet", "efficientnet", "mobilenet_head"]
  effnet = exp_factory.get_exp_config("efficientdet_d0_efficientnetb0_coco").task.model.backbone
  assert effnet.efficientnet.model_id == "b0" and effnet.efficientnet.se_ratio == 0.25
  assert "nsenet" in backbone_factory._REGISTERED_BACKBONE_CLS
  assert "bifpn" in decoder_factory._REGISTERED_DECODER_CLS
  task = task_factory.get_task(exp_factory.get_exp_config(efficientdet.EXPERIMENTS[0]).task)
  assert isinstance(task, task_lib.EfficientDetTask)


def test_yaml_override_and_unknown_key():
  params = exp_factory.get_exp_config("efficientdet_d0_nsenet_coco")
  path = os.path.join(os.path.dirname(os.path.dirname(__file__)), "detection", "configs",
                      "efficientdet_d0_nsenet_synthetic.yaml")
  params = hyperparams.override_params_dict(params, path, is_strict=True)
  params.validate()
  efficientdet.validate_experiment(params)
  assert params.task.model.backbone.nsenet.scale == 0.5
  with pytest.raises(KeyError):
    params.override({"task": {"model": {"decoder": {"bifpn": {"num_filter": 3}}}}})


@pytest.mark.parametrize("override,pattern", [
    ({"model": {"input_size": [100, 100, 3]}}, r"divisible by 2\*\*max_level = 128"),
    ({"model": {"num_classes": 1}}, "num_classes must be >= 2"),
    ({"model": {"max_level": 5}}, "min_level <= 5 < max_level"),
    ({"model": {"decoder": {"bifpn": {"fusion": "avg"}}}}, "fusion must be 'fast' or 'sum'"),
    ({"model": {"backbone": {"nsenet": {"arch": ""}}}}, "needs one of arch"),
    ({"model": {"backbone": {"nsenet": {"arch_json": "x.json"}}}}, "not both"),
    ({"model": {"backbone": {"nsenet": {"activation": "gelu"}}}}, "activation"),
    ({"train_data": {"dtype": "bfloat16"}}, "dtype=float32"),
])
def test_config_validation(override, pattern):
  params = exp_factory.get_exp_config("efficientdet_d0_nsenet_coco")
  params.override({"task": override}, is_strict=True)
  with pytest.raises(DetectionConfigError, match=pattern):
    efficientdet.validate_experiment(params)


def test_unknown_released_arch_names_the_choices():
  params = tiny_params()
  params.task.model.backbone.nsenet.arch = "NSENet-99"
  with pytest.raises(ValueError, match="unknown released network 'NSENet-99'"):
    task_factory.get_task(params.task).build_model()


# ---------------------------------------------------------------- model

def test_output_shapes_per_level(task_and_model):
  params, _, model = task_and_model
  backbone_specs = {k: v.as_list() for k, v in model.backbone.output_specs.items()}
  assert sorted(backbone_specs) == ["3", "4", "5"]
  for level, shape in backbone_specs.items():
    assert shape[1:3] == [SIZE // 2 ** int(level)] * 2
  decoder_specs = {k: v.as_list() for k, v in model.decoder.output_specs.items()}
  assert sorted(decoder_specs) == ["3", "4", "5", "6", "7"]
  out = model(tf.zeros([2, SIZE, SIZE, 3]), training=True)
  assert sorted(out["cls_outputs"]) == ["3", "4", "5", "6", "7"]
  for level in range(3, 8):
    hw = max(1, SIZE // 2 ** level)
    assert decoder_specs[str(level)] == [None, hw, hw, 64]
    assert out["cls_outputs"][str(level)].shape == (2, hw, hw, 9 * NUM_CLASSES)
    assert out["box_outputs"][str(level)].shape == (2, hw, hw, 9 * 4)
  # Head: convs shared across levels, one BN per level and conv.
  head_vars = [v.name for v in model.head.trainable_variables]
  assert len([n for n in head_vars if "classnet-conv_0/depthwise_kernel" in n]) == 1
  assert len([n for n in head_vars if "classnet-conv-norm_" in n and "gamma" in n]) == 5 * 3
  # Weight decay reaches the NSENet backbone (tf-models sums model.losses).
  assert model.backbone.losses and float(tf.add_n(model.backbone.losses)) > 0


def test_nsenet_backbone_matches_build_nsenet():
  arch = tiny_arch()
  bb = nsenet_backbone.NSENetBackbone(arch, keras.layers.InputSpec(shape=[None, SIZE, SIZE, 3]),
                                      min_level=2)
  ref = nsenet.build_nsenet(arch, input_shape=(SIZE, SIZE, 3), backbone=True)
  ref.set_weights(bb.network.get_weights())
  x = tf.random.stateless_normal([1, SIZE, SIZE, 3], seed=[1, 2])
  got, want = bb(x, training=False), ref(x, training=False)
  assert sorted(got) == ["2", "3", "4", "5"]
  for level in got:
    np.testing.assert_allclose(got[level].numpy(), want[level].numpy(), atol=1e-5)
  assert want["5"].shape[-1] == bb.output_specs["5"][-1]


def test_backbone_and_bifpn_serialize_deserialize():
  """tf-models' backbone-test pattern: get_config -> from_config gives the same network."""
  from nse_tf_detection import bifpn  # pylint: disable=import-outside-toplevel
  reg = keras.regularizers.L2(4e-5)
  bb = nsenet_backbone.NSENetBackbone(tiny_arch(), keras.layers.InputSpec(
      shape=[None, SIZE, SIZE, 3]), min_level=3, kernel_regularizer=reg)
  config = bb.get_config()
  assert config["input_specs"] == [None, SIZE, SIZE, 3] and config["min_level"] == 3
  again = nsenet_backbone.NSENetBackbone.from_config(config)
  assert again.get_config() == config
  assert {k: v.as_list() for k, v in again.output_specs.items()} == {
      k: v.as_list() for k, v in bb.output_specs.items()}
  assert again.count_params() == bb.count_params() and len(again.losses) == len(bb.losses)
  fpn = bifpn.BiFPN(bb.output_specs, min_level=3, max_level=6, num_filters=16, num_cells=1,
                    kernel_regularizer=reg)
  config = fpn.get_config()
  again = bifpn.BiFPN.from_config(config)
  assert again.get_config() == config and again.count_params() == fpn.count_params()
  # Registered: Keras' own (de)serialisation finds both classes by name.
  for obj in (bb, fpn):
    name = keras.utils.get_registered_name(type(obj))
    assert name.startswith("nse_tf>")
    rebuilt = keras.utils.deserialize_keras_object(keras.utils.serialize_keras_object(obj))
    assert type(rebuilt) is type(obj) and rebuilt.get_config() == obj.get_config()


def test_mobilenetv2_feeds_p5_from_its_head_conv():
  """efficientdet_d0_mobilenetv2_coco: tf-models' MobileNetV2 (same layers and weights),
  levels 2-4 from its blocks and level 5 from the 1280-channel head conv."""
  from nse_tf_detection import mobilenet_head  # pylint: disable=import-outside-toplevel
  params = exp_factory.get_exp_config("efficientdet_d0_mobilenetv2_coco")
  config = params.task.model.backbone
  assert config.type == "mobilenet_head" and config.mobilenet_head.model_id == "MobileNetV2"
  specs = keras.layers.InputSpec(shape=[None, SIZE, SIZE, 3])
  reg = keras.regularizers.L2(4e-5)
  norm = params.task.model.norm_activation
  bb = backbone_factory.build_backbone(specs, config, norm, reg)
  assert {k: v.as_list() for k, v in bb.output_specs.items()} == {
      "2": [None, SIZE // 4, SIZE // 4, 24], "3": [None, SIZE // 8, SIZE // 8, 32],
      "4": [None, SIZE // 16, SIZE // 16, 96], "5": [None, SIZE // 32, SIZE // 32, 1280]}
  from official.vision.configs import backbones  # pylint: disable=import-outside-toplevel
  plain = backbone_factory.build_backbone(specs, backbones.Backbone(
      type="mobilenet", mobilenet=backbones.MobileNet(model_id="MobileNetV2")), norm, reg)
  assert bb.count_params() == plain.count_params() and len(bb.losses) == len(plain.losses) > 0
  images = tf.random.normal([1, SIZE, SIZE, 3])
  plain.set_weights(bb.get_weights())
  got, want = bb(images, training=False), plain(images, training=False)
  for level in ("2", "3", "4"):
    np.testing.assert_array_equal(got[level].numpy(), want[level].numpy())
  np.testing.assert_array_equal(got["5"].numpy(), want["6"].numpy())   # the head conv
  again = mobilenet_head.MobileNetHeadBackbone.from_config(bb.get_config())
  assert again.count_params() == bb.count_params() and len(again.losses) == len(bb.losses)
  assert keras.utils.get_registered_name(type(bb)).startswith("nse_tf>")
  rebuilt = keras.utils.deserialize_keras_object(keras.utils.serialize_keras_object(bb))
  assert type(rebuilt) is type(bb) and rebuilt.count_params() == bb.count_params()


def test_fast_fusion_is_normalised():
  from nse_tf_detection import bifpn  # pylint: disable=import-outside-toplevel
  fuse = bifpn.FastFusion(2)
  a, b = tf.ones([1, 2, 2, 1]), 3 * tf.ones([1, 2, 2, 1])
  fuse([a, b])
  fuse.w.assign([1.0, -5.0])  # relu: the second input is switched off
  np.testing.assert_allclose(fuse([a, b]).numpy(), 1 / (1 + 1e-4), rtol=1e-6)
  fuse.w.assign([1.0, 3.0])
  np.testing.assert_allclose(fuse([a, b]).numpy(), (1 + 9) / (4 + 1e-4), rtol=1e-6)


def test_detector_flops_split_and_head_analytic(task_and_model):
  _, _, model = task_and_model
  counts, params = flops.count_detector(model, SIZE)
  assert counts["total"] == counts["backbone"] + counts["decoder"] + counts["head"]
  assert params == model.count_params()
  # Head by hand: per level, 3 separable convs 64→64 (+ the predictor) for each tower.
  head = 0
  for level in range(3, 8):
    hw = max(1, SIZE // 2 ** level) ** 2
    for out_ch in (9 * NUM_CLASSES, 9 * 4):
      head += hw * (3 * (9 * 64 + 64 * 64) + 9 * 64 + 64 * out_ch)
  assert counts["head"] == head
  # BiFPN by hand: 1x1 convs for P6 and the first cell's laterals, 8 separable convs a cell.
  c = {int(k): v[-1] for k, v in model.backbone.output_specs.items()}
  hw = {l: max(1, SIZE // 2 ** l) ** 2 for l in range(3, 8)}
  bifpn = hw[6] * 4 * c[5] * 64  # P6 conv on P5 (stride-32 map has hw[5] = 4 * hw[6])
  bifpn += hw[3] * c[3] * 64 + 2 * hw[4] * c[4] * 64 + 2 * hw[5] * c[5] * 64
  per_cell = sum(hw[l] * (9 * 64 + 64 * 64) for l in (6, 5, 4, 3, 4, 5, 6, 7))
  assert counts["decoder"] == bifpn + 3 * per_cell


# ---------------------------------------------------------------- task: train, eval

@pytest.mark.slow
def test_one_train_step_and_one_eval_step_with_coco_evaluator(task_and_model):
  params, task, model = task_and_model
  optimizer = task.create_optimizer(params.trainer.optimizer_config, params.runtime)
  optimizer.shadow_copy(model)  # the EMA slots, as tf-models' trainer makes them
  train_ds = task.build_inputs(params.task.train_data)
  images, labels = next(iter(train_ds))
  assert images.shape == (2, SIZE, SIZE, 3) and images.dtype == tf.float32
  before = [w.numpy().copy() for w in model.trainable_weights]
  logs = task.train_step((images, labels), model, optimizer, metrics=task.build_metrics())
  assert np.isfinite(float(logs["loss"]))
  # Every conv kernel moves (BN gammas and fusion weights sit at 1.0, where the first
  # warm-up step's update can be below float32 resolution).
  same = [w.name for b, w in zip(before, model.trainable_weights)
          if "kernel" in w.name and np.array_equal(b, w.numpy())]
  assert not same, same
  val_ds = task.build_inputs(params.task.validation_data)
  state = None
  for batch in val_ds.take(2):  # the 4 validation images
    step_logs = task.validation_step(batch, model, metrics=task.build_metrics(training=False))
    state = task.aggregate_logs(state, step_logs)
  result = task.reduce_aggregated_logs(state)
  for key in ("AP", "AP50", "AP75", "ARmax100"):
    assert key in result and 0.0 <= float(result[key]) <= 1.0
  assert task.coco_metric._annotation_file == params.task.annotation_file  # its GT, not the data


def test_float16_step_with_the_weight_ema():
  """D0 keeps an EMA of the weights; under float16 tf_keras' loss-scale wrapper calls it
  with an argument tf-models' EMA does not take (TypeError at the first step before)."""
  params = exp_factory.get_exp_config("efficientdet_d0_nsenet_coco")
  params.override({"runtime": {"mixed_precision_dtype": "float16"}}, is_strict=True)
  opt = task_lib.EfficientDetTask.create_optimizer(params.trainer.optimizer_config,
                                                   params.runtime)
  assert isinstance(opt, keras.mixed_precision.LossScaleOptimizer)
  ema = opt.inner_optimizer
  model = keras.Sequential([keras.layers.Dense(2)])
  model.build((None, 3))
  ema.shadow_copy(model)
  before = [w.numpy().copy() for w in model.trainable_weights]

  @tf.function
  def step(x):
    with tf.GradientTape() as tape:
      scaled = opt.get_scaled_loss(tf.reduce_sum(model(x) ** 2))
    grads = opt.get_unscaled_gradients(tape.gradient(scaled, model.trainable_variables))
    opt.apply_gradients(zip(grads, model.trainable_variables))

  step(tf.ones([4, 3]))
  assert int(opt.iterations.numpy()) == 1
  assert all(not np.array_equal(b, w.numpy()) for b, w in zip(before, model.trainable_weights))
  # float32 keeps tf-models' own optimiser untouched.
  plain = task_lib.EfficientDetTask.create_optimizer(
      exp_factory.get_exp_config("efficientdet_d0_nsenet_coco").trainer.optimizer_config)
  assert type(plain).__name__ == "ExponentialMovingAverage"


def test_init_from_retrain_run(tmp_path, task_and_model):
  params, _, _ = task_and_model
  arch = tiny_arch()
  run = tmp_path / "retrain"
  (run / "final").mkdir(parents=True)
  arch.save(str(run / "arch.json"))
  (run / "model_config.json").write_text(json.dumps(
      {"num_classes": 10, "image_size": 32, "activation": "relu", "se": False,
       "dropout": 0.0}))
  classifier = nsenet.build_nsenet(arch, num_classes=10, input_shape=(32, 32, 3))
  for w in classifier.weights:  # recognisable values
    w.assign(tf.random.stateless_uniform(w.shape, seed=[len(w.name), 7]))
  tf.train.Checkpoint(model=classifier).save(str(run / "final" / "ckpt"))

  cfg = tiny_params(arch=None, init_from=str(run))
  cfg.task.model.backbone.nsenet.arch = ""  # taken from the run's arch.json
  task = task_factory.get_task(cfg.task)
  model = task.build_model()
  task.initialize(model)
  inner = model.backbone.network
  stem = inner.get_layer("stem_conv").kernel.numpy()
  np.testing.assert_array_equal(stem, classifier.get_layer("stem_conv").kernel.numpy())
  copied = [l for l in inner.layers if l.weights]
  for layer in copied:
    for a, b in zip(layer.get_weights(), classifier.get_layer(layer.name).get_weights()):
      np.testing.assert_array_equal(a, b)

  bad = tiny_params(arch=arch.with_scale(0.5), init_from=str(run))
  with pytest.raises(DetectionConfigError, match="differs from the one of the retrain run"):
    task_factory.get_task(bad.task).build_model()
  bad = tiny_params(init_from=str(run), se=True)
  bad.task.model.backbone.nsenet.arch = ""
  with pytest.raises(DetectionConfigError, match="se=True"):
    task_factory.get_task(bad.task).build_model()
  bad = tiny_params(init_from=str(tmp_path / "nowhere"))
  with pytest.raises(DetectionConfigError, match="not a directory"):
    task_factory.get_task(bad.task).build_model()


# ---------------------------------------------------------------- export

@pytest.mark.slow
def test_export_round_trip(tmp_path, data):
  from nse_tf_detection import export_saved_model  # pylint: disable=import-outside-toplevel
  from official.vision.serving import detection as serving  # pylint: disable=import-outside-toplevel
  # One BiFPN cell and one head conv: SavedModel export traces every Keras layer, and
  # the full D0 structure is covered above.
  params = tiny_params(data)
  params.override({"task": {"model": {"decoder": {"bifpn": {"num_cells": 1}},
                                      "head": {"num_convs": 1}}}})
  model = task_factory.get_task(params.task).build_model()
  model(tf.zeros([1, SIZE, SIZE, 3]), training=False)
  ckpt = tf.train.Checkpoint(model=model).save(str(tmp_path / "ckpt" / "ckpt"))
  export_dir = str(tmp_path / "export")
  path, used = export_saved_model.export_detector(params, str(tmp_path / "ckpt"), export_dir)
  assert used == ckpt  # a folder: its latest checkpoint
  assert sorted(os.listdir(export_dir)) == ["checkpoint", "params.yaml", "saved_model"]
  loaded = tf.saved_model.load(path)
  serve = loaded.signatures["serving_default"]
  jpeg = open(os.path.join(os.path.dirname(data["val_annotations"]), "..", "images",
                           "val2017", "000000000001.jpg"), "rb").read()
  out = serve(tf.constant([jpeg, jpeg]))
  for key in ("detection_boxes", "detection_classes", "detection_scores", "num_detections"):
    assert key in out
  assert out["detection_boxes"].shape == (2, 20, 4)
  assert int(out["num_detections"][0]) == 20
  # Same detections as the in-memory model through tf-models' serving module.
  module = serving.DetectionModule(params, model=model, batch_size=None,
                                   input_image_size=[SIZE, SIZE])
  want = module.serve(tf.io.decode_jpeg(jpeg)[None])
  np.testing.assert_allclose(out["detection_scores"][0].numpy(),
                             want["detection_scores"][0].numpy(), atol=1e-5)
  np.testing.assert_allclose(out["detection_boxes"][0].numpy(),
                             want["detection_boxes"][0].numpy(), atol=1e-3)
  with pytest.raises(Exception, match="exists"):
    export_saved_model.export_detector(params, ckpt, export_dir)


# ---------------------------------------------------------------- synthetic data

def test_synthetic_coco_layout_and_determinism(data, tmp_path):
  from official.vision.dataloaders import tf_example_decoder  # pylint: disable=import-outside-toplevel
  from pycocotools.coco import COCO  # pylint: disable=import-outside-toplevel
  coco = COCO(data["val_annotations"])
  assert sorted(coco.getCatIds()) == [1, 2, 3] and len(coco.getImgIds()) == 4
  files = tf.io.gfile.glob(data["val_tfrecords"])
  assert [os.path.basename(f) for f in files] == ["val-00000-of-00001.tfrecord"]
  decoder = tf_example_decoder.TfExampleDecoder()
  for raw in tf.data.TFRecordDataset(files):
    ex = decoder.decode(raw)
    image_id = int(ex["source_id"].numpy())
    anns = coco.loadAnns(coco.getAnnIds(imgIds=[image_id]))
    assert ex["image"].shape == (SIZE, SIZE, 3)
    want = np.array([[a["bbox"][1], a["bbox"][0], a["bbox"][1] + a["bbox"][3],
                      a["bbox"][0] + a["bbox"][2]] for a in anns]) / SIZE
    np.testing.assert_allclose(ex["groundtruth_boxes"].numpy(), want, atol=1e-6)
    assert list(ex["groundtruth_classes"].numpy()) == [a["category_id"] for a in anns]
  img1, objs1 = synthetic_coco.make_image(1, 1, 0, SIZE, 3)
  img2, objs2 = synthetic_coco.make_image(1, 1, 0, SIZE, 3)
  assert np.array_equal(img1, img2) and objs1 == objs2
  assert not np.array_equal(img1, synthetic_coco.make_image(2, 1, 0, SIZE, 3)[0])
  # Same settings: nothing to do; other settings: refused unless overwrite.
  out_dir = os.path.dirname(data["manifest"])
  mtime = os.path.getmtime(data["manifest"])
  synthetic_coco.generate(out_dir, num_train=8, num_val=4, image_size=SIZE, num_classes=3,
                          seed=1, train_shards=1)
  assert os.path.getmtime(data["manifest"]) == mtime
  with pytest.raises(synthetic_coco.SyntheticDataError, match="other settings"):
    synthetic_coco.generate(out_dir, num_train=8, num_val=4, image_size=SIZE, num_classes=3,
                            seed=2, train_shards=1)
  with pytest.raises(synthetic_coco.SyntheticDataError, match="num_classes"):
    synthetic_coco.generate(str(tmp_path), num_classes=9)


# ---------------------------------------------------------------- the driver

def test_train_driver_reports_missing_data_in_one_line(tmp_path, capsys):
  """tf-models' flags pass through; a user error is one `error: ` line, exit 2."""
  from absl import flags  # pylint: disable=g-import-not-at-top
  from absl.testing import flagsaver  # pylint: disable=g-import-not-at-top
  import gin  # pylint: disable=g-import-not-at-top
  from nse_tf_detection import train  # pylint: disable=g-import-not-at-top
  from nse_tf import cli  # pylint: disable=g-import-not-at-top
  if "experiment" not in flags.FLAGS:   # tf-models defines its flags on absl's global FLAGS
    train.define_flags()
  cases = [(f"task.train_data.input_path={tmp_path / 'none'}/train*", "matches no files"),
           ("task.model.num_classes: [", "not valid YAML"),                 # malformed YAML
           ("task.model.num_classes=abc", "task.model.num_classes='abc' (expected int)"),
           ("trainer.train_steps=1.5", "trainer.train_steps=1.5 (expected int)")]
  for override, needle in cases:
    with flagsaver.flagsaver():
      flags.FLAGS(["train.py", "--experiment=efficientdet_d0_nsenet_coco", "--mode=train",
                   f"--model_dir={tmp_path / 'run'}", f"--params_override={override}"])
      try:
        code = cli.call(train.main, ["train.py"])
      finally:
        gin.clear_config()             # main parses (and locks) gin's global config
    err = capsys.readouterr().err
    assert code == 2, err[-2000:]
    errors = [ln for ln in err.splitlines() if ln.startswith("error: ")]
    assert len(errors) == 1 and needle in errors[0], err[-2000:]
    assert not (tmp_path / "run").exists()      # nothing written before the checks


def test_train_driver_bad_flag_from_the_shell_is_one_line():
  """Nothing of TensorFlow's start-up log before the error (the driver imports tf-models
  to define its flags, before absl parses them)."""
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  env = {k: v for k, v in os.environ.items() if k != "TF_CPP_MIN_LOG_LEVEL"}
  proc = subprocess.run([sys.executable, os.path.join(root, "detection", "train.py"),
                         "--no_such_flag=1"], cwd=root, env=env, capture_output=True,
                        text=True, timeout=120)
  lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
  assert proc.returncode == 1 and lines == ["error: Unknown command line flag 'no_such_flag'"], \
      proc.stderr[-3000:]
