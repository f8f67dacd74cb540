"""Multiply-adds (MFLOPs in the NAS sense) and parameters of a network.

  python tools/count_flops.py --arch=NSENet-27
  python tools/count_flops.py --arch_json=runs/demo/final_arch.json --input_size=32 --num_classes=10
  python tools/count_flops.py --keras_app=MobileNetV2
  python tools/count_flops.py --arch=NSENet --verify   # also ask TensorFlow's profiler
  python tools/count_flops.py --detector=efficientdet_d0_nsenet_coco --input_size=512
  python tools/count_flops.py --detector=all --input_size=512   # the three D0 backbones

Convention (nse_tf/cost.py): convs and fc count as multiply-accumulates, BN/activations/
adds/max-pool are free, average pooling counts its output elements.

--detector builds the model of a registered tf-models experiment (detection/) and
counts the whole detector on a batch-1 graph: backbone, decoder (BiFPN) and class/box
heads; anchor decoding and NMS (post-processing) are excluded.
"""

from absl import flags

from nse_tf import arch as arch_lib
from nse_tf import cli
from nse_tf import cost


def define_flags(fv: flags.FlagValues = flags.FLAGS) -> None:
  """The tool's flags (defined by cli.run, not at import)."""
  flags.DEFINE_string("arch", None, "Released network name (NSENet-27, NSENet, NSENet-GPU) or a "
                      "compact architecture string.", flag_values=fv)
  flags.DEFINE_string("arch_json", None, "Path to an Architecture JSON (e.g. final_arch.json).",
                      flag_values=fv)
  flags.DEFINE_string("keras_app", None, "Any tf_keras.applications model name, e.g. MobileNetV2.",
                      flag_values=fv)
  flags.DEFINE_string("detector", None, "A registered detection experiment (e.g. "
                      "efficientdet_d0_nsenet_coco), or 'all' for the three EfficientDet-D0 "
                      "backbones side by side.", flag_values=fv)
  flags.DEFINE_integer("input_size", None, "Square input resolution (default 224; for "
                       "--detector the experiment's own, 512 for D0).", flag_values=fv)
  flags.DEFINE_integer("num_classes", 1000, "Classifier outputs.", flag_values=fv)
  flags.DEFINE_bool("se", False, "NSENet with squeeze-and-excitation (retraining option).",
                    flag_values=fv)
  flags.DEFINE_bool("per_layer", False, "Also print MACs per searchable layer.", flag_values=fv)
  flags.DEFINE_bool("verify", False, "Build the network and compare with TensorFlow's profiler.",
                    flag_values=fv)


FLAGS = flags.FLAGS


def _count_keras_app(name: str, size: int):
  import tf_keras as keras  # pylint: disable=g-import-not-at-top
  apps = {n for n in dir(keras.applications) if n[:1].isupper()}
  if name not in apps:
    raise cli.UsageError(f"unknown --keras_app {name!r}; tf_keras.applications has e.g. "
                         "MobileNetV2, EfficientNetB0, ResNet50 (case-sensitive)")
  model = getattr(keras.applications, name)(weights=None, input_shape=(size, size, 3),
                                            classes=FLAGS.num_classes)
  return model, cost.count_graph(model, (size, size, 3)), model.count_params()


def detector_counts(experiment: str, input_size=None):
  """(experiment, size, {'backbone', 'decoder', 'head', 'total'} MACs, params), no NMS."""
  from official.core import exp_factory  # pylint: disable=g-import-not-at-top
  import nse_tf_detection.registry_imports  # noqa: F401  pylint: disable=g-import-not-at-top,unused-import
  from nse_tf_detection import flops  # pylint: disable=g-import-not-at-top
  try:
    params = exp_factory.get_exp_config(experiment)
  except LookupError:  # registry.lookup: unknown name
    raise cli.UsageError(f"unknown --detector experiment {experiment!r}; e.g. "
                         "efficientdet_d0_nsenet_coco, or 'all'") from None
  if not hasattr(params.task, "model") or not hasattr(params.task.model, "decoder"):
    raise cli.UsageError(f"--detector {experiment!r} is not a detection experiment")
  size = input_size or params.task.model.input_size[0]
  stride = 2 ** params.task.model.max_level
  if size % stride:
    raise cli.UsageError(f"--input_size must be a multiple of {stride} for {experiment}, "
                         f"got {size}")
  counts, n_params = flops.count_detector(flops.build_detector(params, size), size)
  return experiment, size, counts, n_params


DETECTORS = ("efficientdet_d0_efficientnetb0_coco", "efficientdet_d0_mobilenetv2_coco",
             "efficientdet_d0_nsenet_coco")
PUBLISHED_D0 = {"efficientdet_d0_efficientnetb0_coco": 2.50,
                "efficientdet_d0_mobilenetv2_coco": 2.24,
                "efficientdet_d0_nsenet_coco": 2.18}  # B FLOPs (SPEC §7)


def _main_detector():
  from absl import logging  # pylint: disable=g-import-not-at-top
  logging.set_verbosity(logging.WARNING)  # tf-models' builders log every block at INFO
  names = DETECTORS if FLAGS.detector == "all" else (FLAGS.detector,)
  rows = [detector_counts(n, FLAGS.input_size) for n in names]
  width = max(len(r[0]) for r in rows)
  print(f"{'detector':{width}}  size  backbone  BiFPN    head     total MFLOPs  Mparams  "
        "published")
  for name, size, c, params in rows:
    pub = PUBLISHED_D0.get(name)
    pub_s = (f"{pub * 1e3:.0f} ({100 * (c['total'] / (pub * 1e9) - 1):+.1f} %)"
             if pub and size == 512 else "-")
    print(f"{name:{width}}  {size:4d}  {c['backbone'] / 1e6:8.2f}  {c['decoder'] / 1e6:7.2f}  "
          f"{c['head'] / 1e6:7.2f}  {c['total'] / 1e6:12.2f}  {params / 1e6:7.3f}  {pub_s}")
  print("multiply-adds of a batch-1 graph (convs, matmuls, average pools); anchor decoding "
        "and NMS excluded")
  return 0


def main(_):
  given = [f for f in ("arch", "arch_json", "keras_app", "detector") if getattr(FLAGS, f)]
  if len(given) != 1:
    raise cli.UsageError("give exactly one of --arch, --arch_json, --keras_app or --detector")
  if FLAGS.input_size is not None and FLAGS.input_size < 32:
    raise cli.UsageError(f"--input_size must be >= 32, got {FLAGS.input_size}")
  if FLAGS.detector:
    return _main_detector()
  size = FLAGS.input_size or 224
  if FLAGS.keras_app:
    _, counts, params = _count_keras_app(FLAGS.keras_app, size)
    print(f"{FLAGS.keras_app} @ {size}x{size}: {counts['total'] / 1e6:.2f} MFLOPs (multiply-adds), "
          f"{params / 1e6:.3f} Mparams")
    print("  by op: " + ", ".join(f"{k} {v / 1e6:.2f}M" for k, v in counts.items() if k != "total"))
    return 0
  a = arch_lib.resolve(FLAGS.arch, FLAGS.arch_json)
  c = cost.arch_cost(a, size, FLAGS.num_classes, se=FLAGS.se)
  label = a.metadata.get("name") or FLAGS.arch_json or "architecture"
  print(f"{label} ({a.space}@{a.macro}, scale {a.scale:g}) @ {size}x{size}: "
        f"{c.macs / 1e6:.2f} MFLOPs (multiply-adds), {c.params / 1e6:.3f} Mparams")
  if FLAGS.per_layer:
    for (i, macs), ops in zip(cost.per_layer_macs(a, size), a.layers):
      print(f"  layer {i:2d}: {macs / 1e6:8.2f} M  {' + '.join(ops) or '-'}")
  if FLAGS.verify:
    from nse_tf import nsenet  # pylint: disable=g-import-not-at-top
    model = nsenet.build_nsenet(a, FLAGS.num_classes, (size, size, 3), se=FLAGS.se)
    prof = cost.profiler_macs(model, (size, size, 3))
    pool = cost.count_graph(model, (size, size, 3)).get("AvgPool", 0)
    print(f"  TensorFlow profiler (convs + matmul, /2) + pool: {(prof + pool) / 1e6:.2f} M "
          f"({100 * ((prof + pool) / c.macs - 1):+.3f} %); Keras params {model.count_params():,}")
  return 0


if __name__ == "__main__":
  cli.run(main, define_flags)
