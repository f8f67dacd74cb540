"""CLI and library: export a retrained NSENet for TF Serving (SavedModel) and TFLite.

  python -m nse_tf.export --model_dir=runs/retrain_demo --export_dir=exports/nsenet
  python -m nse_tf.export --model_dir=runs/retrain_demo --export_dir=exports/nsenet --tflite
  tensorflow_model_server --model_name=nsenet --model_base_path=$PWD/exports/nsenet --rest_api_port=8501

`--model_dir` is a finished `python -m nse_tf.retrain` directory (arch.json,
model_config.json, final/). The SavedModel goes to `export_dir/<version>/` (the next free
integer, 1 first; written to a temporary folder and renamed, so a server polling
export_dir never sees half a model). It has two signatures:

  serving_default  image_bytes: string [N], each an encoded JPEG/PNG/GIF/BMP (any size;
                   grayscale and RGBA are converted to RGB, animations give their first
                   frame). Decoding, the centre crop, the bilinear resize and the ImageNet
                   normalisation of the validation pipeline run inside the graph.
                   Returns classes int32 [N, k], probabilities float32 [N, k],
                   class_names string [N, k], valid bool [N], error string [N]. An input
                   that cannot be decoded (not an image, corrupt, truncated, or larger than
                   --max_pixels) does not fail the request: its row has valid = false,
                   classes -1, probabilities 0 and the reason in `error`; the other
                   images of the batch are answered normally.
  serving_images   images: float32 [N, H, W, 3], RGB pixel values in [0, 255] (any H, W;
                   cropped and resized like above). Returns the same top-k outputs plus
                   logits [N, num_classes] and probabilities_all [N, num_classes].

`assets.extra/` holds arch.json, model_config.json and metrics.json. `--tflite` also writes
`export_dir/tflite/model_float.tflite` and `model_int8.tflite` (full-integer, int8 input
and output, calibrated on --calibration_examples training images); both take one
normalised image [1, S, S, 3] and return logits. After exporting, the tool checks the
outputs against the Keras model on validation images and prints the differences
(`--verify_examples`; 0 skips).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import warnings
from typing import Any, Dict, Optional

from absl import flags

from nse_tf import cli
from nse_tf import errors
from nse_tf import fileio
from nse_tf import retrainer
from nse_tf import retrain_run

def define_flags(fv: flags.FlagValues = flags.FLAGS) -> None:
  """Export's flags (nothing of the search's or the retrain's)."""
  flags.DEFINE_string("model_dir", None, "A finished retrain (python -m nse_tf.retrain "
                      "--model_dir=…): its arch.json, model_config.json and final/ weights.",
                      flag_values=fv)
  flags.DEFINE_string("data_dir", None, "tfds data directory (prepared data), for the "
                      "calibration and verification images of a tfds dataset.", flag_values=fv)
  flags.DEFINE_string("export_dir", None, "Base directory of the exported versions "
                      "(TF Serving's --model_base_path).", flag_values=fv)
  flags.DEFINE_integer("version", None, "Version sub-directory (default: the next free "
                       "integer, 1 first). An existing version is never overwritten.",
                       flag_values=fv)
  flags.DEFINE_integer("top_k", 5, "Classes returned per image (capped at the class count).",
                       flag_values=fv)
  flags.DEFINE_integer("max_pixels", 40_000_000, "Encoded images with more pixels are "
                       "refused (flagged invalid) before decoding, to bound server memory.",
                       flag_values=fv)
  flags.DEFINE_bool("tflite", False, "Also write float and int8 TFLite models.", flag_values=fv)
  flags.DEFINE_integer("calibration_examples", 200, "Training images for int8 calibration.",
                       flag_values=fv)
  flags.DEFINE_integer("verify_examples", 200, "Validation images on which the exported "
                       "models are compared with the Keras model (0: no check).", flag_values=fv)


SUPPORTED = "JPEG, PNG, GIF or BMP"


# ------------------------------------------------------------------ graph pieces

def _magic(image_bytes):
  """Format of encoded images by their magic bytes: 0 unknown, 1 JPEG, 2 PNG, 3 GIF, 4 BMP."""
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  head = lambda n: tf.strings.substr(image_bytes, 0, n)
  fmt = tf.zeros_like(image_bytes, tf.int32)
  fmt = tf.where(tf.equal(head(3), b"\xff\xd8\xff"), 1, fmt)
  fmt = tf.where(tf.equal(head(8), b"\x89PNG\r\n\x1a\n"), 2, fmt)
  fmt = tf.where(tf.logical_or(tf.equal(head(6), b"GIF87a"), tf.equal(head(6), b"GIF89a")), 3,
                 fmt)
  fmt = tf.where(tf.equal(head(2), b"BM"), 4, fmt)
  return fmt


def _header_pixels(data, fmt):
  """Pixel count an encoded image claims in its header (read without decoding)."""
  import tensorflow as tf  # pylint: disable=g-import-not-at-top

  def be32(offset):   # big-endian uint32
    b = tf.cast(tf.io.decode_raw(tf.strings.substr(data, offset, 4), tf.uint8), tf.int64)
    return ((b[0] * 256 + b[1]) * 256 + b[2]) * 256 + b[3]

  def le(offset, n):  # little-endian unsigned
    b = tf.cast(tf.io.decode_raw(tf.strings.substr(data, offset, n), tf.uint8), tf.int64)
    return tf.reduce_sum(b * (256 ** tf.range(n, dtype=tf.int64)))

  def bmp():
    w, h = le(18, 4), le(22, 4)
    h = tf.where(h >= 2 ** 31, 2 ** 32 - h, h)     # negative height: top-down rows
    return w * h

  def jpeg():
    return tf.reduce_prod(tf.cast(tf.image.extract_jpeg_shape(data)[:2], tf.int64))

  return tf.switch_case(fmt - 1, [jpeg, lambda: be32(16) * be32(20),
                                  lambda: le(6, 2) * le(8, 2), bmp])


def make_preprocess(config: Dict[str, Any]):
  """fn(uint8/float image [H, W, 3] pixels) -> normalised float32 [S, S, 3].

  The validation pipeline of nse_tf.data: centre square crop, keeping its central 87.5 %
  when larger than S, bilinear resize to S, (x − mean) / stddev.
  """
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  size = int(config["image_size"])
  prep = config.get("preprocessing", {})
  from nse_tf import data as data_lib  # pylint: disable=g-import-not-at-top
  mean = tf.constant(prep.get("mean_rgb", data_lib.IMAGENET_MEAN_RGB), tf.float32)
  std = tf.constant(prep.get("stddev_rgb", data_lib.IMAGENET_STDDEV_RGB), tf.float32)
  fraction = float(prep.get("eval_crop_fraction", data_lib.EVAL_CROP_FRACTION))

  def fn(image):
    hw = tf.shape(image)[:2]
    side = tf.reduce_min(hw)
    crop = tf.where(side > size, tf.cast(tf.round(fraction * tf.cast(side, tf.float32)),
                                         tf.int32), side)
    image = tf.slice(image, tf.stack([(hw[0] - crop) // 2, (hw[1] - crop) // 2, 0]),
                     tf.stack([crop, crop, 3]))
    image = tf.cond(tf.equal(crop, size), lambda: tf.cast(image, tf.float32),
                    lambda: tf.image.resize(image, [size, size], method="bilinear"))
    return tf.ensure_shape((image - mean) / std, [size, size, 3])

  return fn


class ServingModule:
  """A tf.Module with the two serving signatures around a Keras classifier."""

  def __init__(self, model, config: Dict[str, Any], top_k: int = 5,
               max_pixels: int = 40_000_000):
    import tensorflow as tf  # pylint: disable=g-import-not-at-top
    self.config = config
    self.size = int(config["image_size"])
    num_classes = int(config["num_classes"])
    self.k = max(1, min(int(top_k), num_classes))
    names = list(config.get("class_names") or [str(i) for i in range(num_classes)])
    if len(names) != num_classes:
      raise errors.UsageError(f"model_config.json has {len(names)} class_names for "
                           f"{num_classes} classes")
    self.module = tf.Module(name="nsenet_serving")
    # The variables, not the Keras model, are tracked: the SavedModel then holds just the
    # two signatures' graphs (no per-layer Keras functions: smaller, several times faster
    # to save, and nothing Keras-specific to load).
    self.module.model_variables = list(model.variables)
    self.module.class_names = tf.Variable(names, trainable=False, name="class_names")
    self.preprocess = make_preprocess(config)
    self.max_pixels = int(max_pixels)
    size, k, preprocess = self.size, self.k, self.preprocess
    module = self.module

    def top_k_outputs(logits):
      probs = tf.nn.softmax(tf.cast(logits, tf.float32), axis=-1)
      scores, classes = tf.math.top_k(probs, k=k)
      return probs, scores, classes

    def decode(data, fmt):
      pixels = _header_pixels(data, fmt)
      check = tf.debugging.Assert(pixels <= self.max_pixels, [pixels])
      with tf.control_dependencies([check]):
        image = tf.io.decode_image(data, channels=3, dtype=tf.uint8, expand_animations=False)
      return preprocess(image)

    @tf.function(input_signature=[tf.TensorSpec([None], tf.string, name="image_bytes")])
    def serve_bytes(image_bytes):
      n = tf.shape(image_bytes)[0]
      fmt = _magic(image_bytes)
      ds = tf.data.Dataset.from_tensor_slices((tf.range(n), image_bytes, fmt))
      ds = ds.filter(lambda i, data, f: f > 0)
      # Any decode error (corrupt or truncated data, a refused size) drops that element
      # only: no try/except in a graph, and no failed request for the other images.
      ds = ds.map(lambda i, data, f: (i, decode(data, f))).ignore_errors()
      ds = ds.batch(tf.cast(tf.maximum(n, 1), tf.int64))
      options = tf.data.Options()
      options.autotune.enabled = False
      options.experimental_optimization.apply_default_optimizations = False
      ds = ds.with_options(options)
      idx, images = ds.reduce(
          (tf.zeros([0], tf.int32), tf.zeros([0, size, size, 3], tf.float32)),
          lambda s, e: (tf.concat([s[0], e[0]], 0), tf.concat([s[1], e[1]], 0)))
      valid = tf.scatter_nd(idx[:, None], tf.ones_like(idx, tf.bool), [n])
      # The network always sees a well-formed batch of at least one row: every request
      # row gets an image (the placeholder zeros where it is invalid), plus one spare
      # row. An empty or all-invalid request would otherwise run the convolutions on
      # a zero-size batch, which some CPU kernels reject ("input depth must be evenly
      # divisible by filter depth"), failing the whole request on some machines only.
      batch = tf.scatter_nd(idx[:, None], images, tf.stack([n + 1, size, size, 3]))
      logits = model(tf.ensure_shape(batch, [None, size, size, 3]), training=False)[:n]
      _, scores, classes = top_k_outputs(logits)
      classes = tf.where(valid[:, None], classes, -1)
      scores = tf.where(valid[:, None], scores, 0.0)
      names = tf.where(classes >= 0, tf.gather(module.class_names, tf.maximum(classes, 0)), "")
      error = tf.where(valid, "", tf.where(
          fmt > 0, f"image data is corrupt or truncated, or the image has more than "
                   f"{self.max_pixels} pixels",
          f"not a {SUPPORTED} image"))
      return {"classes": classes, "probabilities": scores, "class_names": names,
              "valid": valid, "error": error}

    @tf.function(input_signature=[tf.TensorSpec([None, None, None, 3], tf.float32,
                                                name="images")])
    def serve_images(images):
      shape = tf.shape(images)
      check = tf.debugging.Assert(
          tf.logical_or(tf.equal(shape[0], 0), tf.reduce_all(shape[1:3] > 0)),
          ["serving_images: the images need a height and width >= 1, got", shape])
      with tf.control_dependencies([check]):
        batch = tf.map_fn(preprocess, images,
                          fn_output_signature=tf.TensorSpec([size, size, 3], tf.float32))
      # One spare row, as in serve_bytes: the network never runs on an empty batch.
      batch = tf.concat([batch, tf.zeros([1, size, size, 3], tf.float32)], 0)
      logits = tf.cast(model(batch, training=False), tf.float32)[:shape[0]]
      probs, scores, classes = top_k_outputs(logits)
      return {"classes": classes, "probabilities": scores,
              "class_names": tf.gather(module.class_names, classes), "logits": logits,
              "probabilities_all": probs}

    self.module.serve_bytes = serve_bytes
    self.module.serve_images = serve_images

  def save(self, path: str) -> None:
    import tensorflow as tf  # pylint: disable=g-import-not-at-top
    tf.saved_model.save(self.module, path, signatures={
        "serving_default": self.module.serve_bytes,
        "serving_images": self.module.serve_images})


# ------------------------------------------------------------------ export steps

def next_version(export_dir: str) -> int:
  versions = [int(n) for n in os.listdir(export_dir) if re.fullmatch(r"\d+", n)] \
      if os.path.isdir(export_dir) else []
  return max(versions, default=0) + 1


def export_saved_model(model, config: Dict[str, Any], export_dir: str,
                       version: Optional[int] = None, top_k: int = 5,
                       max_pixels: int = 40_000_000,
                       extra_files: Optional[Dict[str, str]] = None) -> str:
  """Writes export_dir/<version>/ atomically; returns its path."""
  os.makedirs(export_dir, exist_ok=True)
  version = next_version(export_dir) if version is None else int(version)
  if version < 1:
    raise errors.UsageError(f"--version must be a positive integer, got {version}")
  final = os.path.join(export_dir, str(version))
  if os.path.exists(final):
    raise errors.UsageError(f"{final} already exists; TF Serving versions are immutable: "
                         "export another --version (or leave --version out for the next)")
  with fileio.atomic_directory(final) as tmp:
    ServingModule(model, config, top_k, max_pixels).save(tmp)
    extra = os.path.join(tmp, "assets.extra")
    os.makedirs(extra, exist_ok=True)
    for name, src in (extra_files or {}).items():
      if src and os.path.exists(src):
        shutil.copyfile(src, os.path.join(extra, name))
  return final


def _converter(model, size: int):
  """A TFLite converter for model(x [1, S, S, 3]) -> logits.

  The converter saves its trackable object as a SavedModel first; handing it the
  variables in a bare tf.Module rather than the Keras model keeps that about 5x faster.
  """
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  holder = tf.Module(name="nsenet_tflite")
  holder.model_variables = list(model.variables)
  holder.fn = tf.function(lambda x: model(x, training=False))
  concrete = holder.fn.get_concrete_function(tf.TensorSpec([1, size, size, 3], tf.float32,
                                                           name="images"))
  return tf.lite.TFLiteConverter.from_concrete_functions([concrete], holder)


def tflite_float(model, size: int) -> bytes:
  """Float32 TFLite model: normalised image [1, S, S, 3] -> logits."""
  return _converter(model, size).convert()


def tflite_int8(model, size: int, representative_images) -> bytes:
  """Full-integer TFLite model (int8 weights, activations, input and output).

  representative_images: iterable of normalised float32 images [S, S, 3].
  """
  import numpy as np  # pylint: disable=g-import-not-at-top
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  images = [np.asarray(im, np.float32)[None] for im in representative_images]
  if not images:
    raise errors.UsageError("int8 calibration needs at least one training image")
  converter = _converter(model, size)
  converter.optimizations = [tf.lite.Optimize.DEFAULT]
  converter.representative_dataset = lambda: ([im] for im in images)
  converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]
  converter.inference_input_type = tf.int8
  converter.inference_output_type = tf.int8
  return converter.convert()


def run_tflite(model_content: bytes, images):
  """Logits of a TFLite model (float or int8 I/O) for normalised images [N, S, S, 3]."""
  import numpy as np  # pylint: disable=g-import-not-at-top
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  try:   # LiteRT, tf.lite.Interpreter's successor, when installed
    from ai_edge_litert.interpreter import Interpreter  # pylint: disable=g-import-not-at-top
  except ImportError:
    Interpreter = None  # pylint: disable=invalid-name
  with warnings.catch_warnings():
    warnings.simplefilter("ignore")   # tf.lite.Interpreter's deprecation notice
    interp = (Interpreter or tf.lite.Interpreter)(model_content=model_content)
  interp.allocate_tensors()
  inp, out = interp.get_input_details()[0], interp.get_output_details()[0]
  results = []
  for image in np.asarray(images, np.float32):
    x = image[None]
    if inp["dtype"] != np.float32:
      scale, zero = inp["quantization"]
      info = np.iinfo(inp["dtype"])
      x = np.clip(np.round(x / scale + zero), info.min, info.max).astype(inp["dtype"])
    interp.set_tensor(inp["index"], x)
    interp.invoke()
    y = interp.get_tensor(out["index"])[0]
    if out["dtype"] != np.float32:
      scale, zero = out["quantization"]
      y = (y.astype(np.float32) - zero) * scale
    results.append(y.astype(np.float32))
  return np.stack(results)


# ------------------------------------------------------------------ data for calibration

def _data(config: Dict[str, Any], data_dir: Optional[str]):
  from nse_tf import data as data_lib  # pylint: disable=g-import-not-at-top
  return data_lib.get_data(config["dataset"], data_dir=data_dir,
                           image_size=int(config["image_size"]), holdout_examples=0)


def take_images(ds, count: int):
  """The first `count` (images, labels) of a batched pipeline, as numpy arrays."""
  import numpy as np  # pylint: disable=g-import-not-at-top
  images, labels, n = [], [], 0
  for x, y in ds:
    images.append(x.numpy())
    labels.append(y.numpy())
    n += len(y)
    if n >= count:
      break
  if not images:
    return np.zeros((0,)), np.zeros((0,), np.int32)
  return np.concatenate(images)[:count], np.concatenate(labels)[:count]


def pixels_of(normalised, config: Dict[str, Any]):
  """Undo the normalisation: RGB pixel values in [0, 255] (float32)."""
  import numpy as np  # pylint: disable=g-import-not-at-top
  prep = config.get("preprocessing", {})
  from nse_tf import data as data_lib  # pylint: disable=g-import-not-at-top
  mean = np.asarray(prep.get("mean_rgb", data_lib.IMAGENET_MEAN_RGB), np.float32)
  std = np.asarray(prep.get("stddev_rgb", data_lib.IMAGENET_STDDEV_RGB), np.float32)
  return np.asarray(normalised, np.float32) * std + mean


def verify(model, config, saved_model_path: str, images, labels,
           tflite_models: Optional[Dict[str, bytes]] = None) -> Dict[str, float]:
  """Differences between the Keras model and the exports on `images` (normalised)."""
  import numpy as np  # pylint: disable=g-import-not-at-top
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  keras_logits = model(images, training=False).numpy()
  loaded = tf.saved_model.load(saved_model_path)
  sm = loaded.signatures["serving_images"](images=tf.constant(pixels_of(images, config)))
  report = {"examples": int(len(images)),
            "keras_top1": float(np.mean(keras_logits.argmax(-1) == labels)),
            "saved_model_max_abs_logit_diff": float(np.abs(sm["logits"].numpy()
                                                           - keras_logits).max())}
  for name, content in (tflite_models or {}).items():
    logits = run_tflite(content, images)
    report[f"tflite_{name}_max_abs_logit_diff"] = float(np.abs(logits - keras_logits).max())
    report[f"tflite_{name}_top1_agreement"] = float(np.mean(logits.argmax(-1)
                                                            == keras_logits.argmax(-1)))
    report[f"tflite_{name}_top1"] = float(np.mean(logits.argmax(-1) == labels))
  return report


# ------------------------------------------------------------------------- CLI

def main(argv, fv: flags.FlagValues = flags.FLAGS):
  if not fv.model_dir or not fv.export_dir:
    raise cli.UsageError("--model_dir (a finished retrain) and --export_dir are required")
  if fv.top_k < 1 or fv.max_pixels < 1:
    raise cli.UsageError("--top_k and --max_pixels must be >= 1")
  from nse_tf import common_flags, run_lock  # pylint: disable=g-import-not-at-top
  # A path under a regular file, a read-only or a full directory: one line, before the
  # model is even loaded. One exporter at a time: two would pick the same next version.
  common_flags.check_output_dir(fv.export_dir, "--export_dir")
  run_lock.acquire(fv.export_dir, "export")
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  from absl import logging  # pylint: disable=g-import-not-at-top
  tf.get_logger().setLevel("ERROR")
  logging.set_verbosity(logging.WARNING)   # SavedModel / converter chatter
  run = retrain_run.read(fv.model_dir)
  model, config = retrainer.restore_model(run), run.config
  path = export_saved_model(
      model, config, fv.export_dir, fv.version, fv.top_k, fv.max_pixels,
      extra_files={n: os.path.join(fv.model_dir, n)
                   for n in ("arch.json", "model_config.json", "metrics.json")})
  print(f"wrote SavedModel {path} (signatures serving_default: encoded images, "
        "serving_images: float pixels)")
  size = int(config["image_size"])
  need_data = fv.tflite or fv.verify_examples > 0
  d = _data(config, fv.data_dir) if need_data else None
  tflite_models = {}
  if fv.tflite:
    out = os.path.join(fv.export_dir, "tflite")
    os.makedirs(out, exist_ok=True)
    tflite_models["float"] = tflite_float(model, size)
    calib, _ = take_images(d.train(min(64, fv.calibration_examples), seed=0, repeat=False,
                                   augment=False), fv.calibration_examples)
    tflite_models["int8"] = tflite_int8(model, size, calib)
    for name, content in tflite_models.items():
      fileio.atomic_write_bytes(os.path.join(out, f"model_{name}.tflite"), content)
      print(f"wrote {os.path.join(out, f'model_{name}.tflite')} ({len(content) / 1e6:.2f} MB)")
  if fv.verify_examples > 0:
    images, labels = take_images(d.validation(64), fv.verify_examples)
    report = verify(model, config, path, images, labels, tflite_models)
    fileio.atomic_write_text(os.path.join(fv.export_dir, "verification.json"),
                      json.dumps(report, indent=1) + "\n")
    print(f"checked on {report['examples']} validation images: Keras top-1 "
          f"{100 * report['keras_top1']:.2f} %; SavedModel vs Keras max |Δlogit| "
          f"{report['saved_model_max_abs_logit_diff']:.2e}")
    for name in tflite_models:
      print(f"  TFLite {name}: max |Δlogit| {report[f'tflite_{name}_max_abs_logit_diff']:.2e}, "
            f"top-1 agreement with Keras {100 * report[f'tflite_{name}_top1_agreement']:.1f} %, "
            f"top-1 {100 * report[f'tflite_{name}_top1']:.2f} %")
  return 0


def run():
  cli.run(main, define_flags)


if __name__ == "__main__":
  run()
