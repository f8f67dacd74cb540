"""Input pipelines for image classification: tfds datasets and embedded demo data.

`get_data(name, image_size=…)` returns an `ImageData` that makes `tf.data` pipelines for
three splits:

* ``train``: the dataset's train split minus the held-out part; random resized crop +
  optional horizontal flip; seeded shuffling, reshuffled every epoch.
* ``holdout``: the first ``holdout_examples`` examples of the *train* split (SPEC §3: 50,000
  ImageNet train images; the official validation set is never used in the search), with
  test-time preprocessing. θ steps read it shuffled and repeated, candidate evaluation
  reads it once, in order, counting every example exactly once.
* ``validation``: the dataset's validation (or test) split, test-time preprocessing.

Nothing is ever downloaded. tfds datasets must already be prepared under ``data_dir``
(`check_prepared` says how, in well under a second, without touching the network); the
demo datasets ship with scikit-learn (``demo_digits``) or are generated (``demo_shapes``).

Determinism and resumption. All randomness is stateless: the shuffling order of epoch e is
a function of (seed, epoch) and the augmentation of the k-th element a pipeline yields is
a function of (seed, k), with k counted by `Dataset.enumerate` after the repeat. Two
pipelines built with the same seed therefore yield bit-identical batches, and an iterator
saved with `tf.train.Checkpoint(iterator=it)` and restored into a freshly built pipeline
continues with exactly the batches the original would have produced. For the demo data an
iterator checkpoint is a handful of integers; for tfds data it also holds the shuffle
buffer of encoded images (``shuffle_buffer`` examples).

Distribution. `ImageData.dataset_fn(split, global_batch)` returns the function that
`strategy.distribute_datasets_from_function` wants: per-replica batches, and one shard per
input pipeline (tfds files are sharded by tfds itself, demo arrays by index).
"""

from __future__ import annotations

import dataclasses
import os
import re
from typing import Callable, Optional, Tuple

import numpy as np
import tensorflow as tf

from nse_tf import demo_data
from nse_tf import errors

DEMO_DATASETS = demo_data.DEMO_DATASETS

IMAGENET_MEAN_RGB = (0.485 * 255, 0.456 * 255, 0.406 * 255)
IMAGENET_STDDEV_RGB = (0.229 * 255, 0.224 * 255, 0.225 * 255)
EVAL_CROP_FRACTION = 0.875            # centre crop of images larger than image_size
IMAGENET_HOLDOUT = 50_000             # SPEC §3
DEMO_HOLDOUT_FRACTION = 0.2
TFDS_HOLDOUT_FRACTION = 0.1           # other tfds datasets, capped at IMAGENET_HOLDOUT
DEFAULT_SHUFFLE_BUFFER = 10_000       # tfds only; the demo data is shuffled by index

# Datasets whose classes change under a mirror image (digits, characters, house numbers,
# directions).
_NO_FLIP = ("demo_digits", "demo_digits_hard", "demo_glyphs", "demo_compass", "mnist", "emnist",
            "kmnist", "svhn_cropped", "omniglot", "binarized_mnist")

# Stream ids that keep the different uses of one user seed apart.
_STREAM_SHUFFLE = 1
_STREAM_AUGMENT = 2


class DataError(errors.NSEError):
  """A dataset is unknown, unprepared, or cannot serve the requested pipeline."""


@dataclasses.dataclass(frozen=True)
class DatasetInfo:
  name: str
  num_classes: int
  num_train: int          # train examples after the held-out part is removed
  num_holdout: int
  num_validation: int
  image_size: int
  # Readable class names where known (tfds ClassLabel names, the demos' own); else ids.
  class_names: Tuple[str, ...] = ()

  def __post_init__(self):
    if not self.class_names:
      object.__setattr__(self, "class_names", tuple(str(i) for i in range(self.num_classes)))


# ---------------------------------------------------------------------------- demo data
# The embedded datasets themselves (scikit-learn's digits, the generated demo_shapes and
# demo_digits_hard) are made in nse_tf/demo_data.py, without TensorFlow.
describe_demo_datasets = demo_data.describe_demo_datasets
load_demo = demo_data.load_demo


# ---------------------------------------------------------------------------- tfds

def _import_tfds():
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  return tfds


def _default_data_dir() -> str:
  return os.environ.get("TFDS_DATA_DIR", os.path.join(os.path.expanduser("~"),
                                                      "tensorflow_datasets"))


def _prepare_command(name: str, data_dir: str) -> str:
  return f"tfds build {name.split(':')[0]} --data_dir={data_dir}"


def _builder(dataset: str, data_dir: Optional[str]):
  """The tfds builder of a prepared dataset, or DataError. Reads only local metadata."""
  tfds = _import_tfds()
  searched = data_dir or _default_data_dir()
  if re.match(r"^[\w-]+:[A-Za-z_]", dataset):   # "namespace:name", not "name:1.0.0"
    raise DataError(f"{dataset!r}: namespaced/community tfds datasets are not supported "
                    "(loading them may download); prepare the data and use its plain name.")
  try:
    builder = tfds.builder(dataset, data_dir=data_dir)
  except Exception as e:  # DatasetNotFoundError, bad config/version, …
    first_line = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    raise DataError(
        f"Unknown dataset {dataset!r}: it is neither an embedded demo dataset "
        f"({', '.join(DEMO_DATASETS)}) nor a tfds dataset ({first_line}). "
        "See https://www.tensorflow.org/datasets/catalog for tfds names.") from e
  if not builder.is_prepared():
    msg = (f"tfds dataset {dataset!r} is not prepared in {searched!r} (looked for "
           f"{builder.data_dir}). Nothing is downloaded at run time; prepare it once with:\n"
           f"  {_prepare_command(dataset, searched)}")
    if dataset.startswith("imagenet2012"):
      msg += (f"\nImageNet needs a manual download: register at "
              f"https://image-net.org/download-images, put ILSVRC2012_img_train.tar and "
              f"ILSVRC2012_img_val.tar in {os.path.join(searched, 'downloads', 'manual')}/ "
              f"then run\n  tfds build imagenet2012 --data_dir={searched}")
    elif getattr(builder, "MANUAL_DOWNLOAD_INSTRUCTIONS", None):
      msg += ("\nThis dataset needs a manual download into "
              f"{os.path.join(searched, 'downloads', 'manual')}/ first:\n"
              f"{builder.MANUAL_DOWNLOAD_INSTRUCTIONS.strip()}")
    raise DataError(msg)
  return builder


def check_prepared(dataset: str, data_dir: Optional[str] = None) -> None:
  """Raises DataError unless `dataset` is a demo dataset or a prepared tfds dataset.

  Fast (local metadata only) and never touches the network.
  """
  if dataset in DEMO_DATASETS:
    return
  _builder(dataset, data_dir)


# ---------------------------------------------------------------------------- preprocessing

def default_min_crop_scale(dataset: str, native_size: Optional[int] = None) -> float:
  """Smallest area fraction of the random resized crop.

  0.08 (Inception-style) for ImageNet-like data; milder for tiny images, where a crop of
  8% of 32x32 would keep 9x9 pixels and rarely the object. The demos are trained for
  minutes, not hundreds of epochs: 0.8 (about CIFAR's pad-4-and-crop) learns fastest there
  (demo_shapes, small CNN, 2 CPU minutes: 61% validation accuracy at 0.8, 47% at 0.5).
  """
  if dataset in DEMO_DATASETS:
    return 0.8
  if native_size is not None and native_size <= 64:
    return 0.25
  return 0.08


def default_flip(dataset: str) -> bool:
  return dataset.split("/")[0].split(":")[0] not in _NO_FLIP


def _seed_key(seed: int, stream: int, pipeline_id: int) -> int:
  """A 63-bit key mixing the user's seed, the use (stream) and the input pipeline."""
  state = np.random.SeedSequence([int(seed) & 0xFFFFFFFFFFFFFFFF, stream, pipeline_id])
  return int(state.generate_state(1, np.uint64)[0] >> np.uint64(1))


def _normalize(image: tf.Tensor) -> tf.Tensor:
  return (image - tf.constant(IMAGENET_MEAN_RGB)) / tf.constant(IMAGENET_STDDEV_RGB)


def _make_preprocess(encoding: str, image_size: int, *, train: bool, min_crop_scale: float,
                     flip: bool) -> Callable:
  """fn(element_seed [2] int64, raw image, label) -> (float32 [S,S,3], int32 label).

  encoding: "raw" (decoded uint8 HxWx3), "jpeg" (crop fused into decoding: only the
  crop window is decoded) or "image" (png/any other format tf.io.decode_image reads).
  """
  size = int(image_size)

  def fn(element_seed, raw, label):
    if encoding == "jpeg":
      hw = tf.image.extract_jpeg_shape(raw)[:2]
    else:
      if encoding == "image":
        raw = tf.io.decode_image(raw, channels=3, expand_animations=False)
      hw = tf.shape(raw)[:2]
    if train:
      crop_seed, flip_seed = tf.unstack(tf.random.experimental.stateless_split(element_seed, 2))
      begin, crop_size, _ = tf.image.stateless_sample_distorted_bounding_box(
          tf.concat([hw, [3]], axis=0),
          bounding_boxes=tf.constant([[[0.0, 0.0, 1.0, 1.0]]]),
          seed=crop_seed, min_object_covered=0.0, aspect_ratio_range=(3 / 4, 4 / 3),
          area_range=(min_crop_scale, 1.0), max_attempts=10,
          use_image_if_no_bounding_boxes=True)
      window = tf.stack([begin[0], begin[1], crop_size[0], crop_size[1]])
    else:
      # Centre square; images larger than the target keep only its central 87.5%.
      side = tf.reduce_min(hw)
      crop = tf.where(side > size,
                      tf.cast(tf.round(EVAL_CROP_FRACTION * tf.cast(side, tf.float32)), tf.int32),
                      side)
      window = tf.stack([(hw[0] - crop) // 2, (hw[1] - crop) // 2, crop, crop])
    if encoding == "jpeg":
      image = tf.image.decode_and_crop_jpeg(raw, window, channels=3)
    else:
      image = tf.slice(raw, tf.stack([window[0], window[1], 0]),
                       tf.stack([window[2], window[3], 3]))
    image = tf.image.resize(image, [size, size], method="bilinear")
    if train and flip:
      image = tf.image.stateless_random_flip_left_right(image, flip_seed)
    image = tf.ensure_shape(_normalize(image), [size, size, 3])
    return image, tf.cast(label, tf.int32)

  return fn


# ---------------------------------------------------------------------------- sources

def _pipeline_shard(input_context) -> Tuple[int, int]:
  if input_context is None:
    return 0, 1
  return int(input_context.input_pipeline_id), int(input_context.num_input_pipelines)


class _ArraySource:
  """Decoded uint8 images held in memory; shuffled by index, sharded by index."""

  encoding = "raw"

  def __init__(self, images: np.ndarray, labels: np.ndarray):
    self.images, self.labels = images, labels

  def __len__(self):
    return len(self.labels)

  def dataset(self, *, shuffle: bool, seed: int, repeat: bool, input_context,
              shuffle_buffer: int) -> tf.data.Dataset:
    del shuffle_buffer  # a full per-epoch permutation; nothing buffered
    images, labels = tf.constant(self.images), tf.constant(self.labels)
    pid, num = _pipeline_shard(input_context)
    index = tf.constant(np.arange(len(self))[pid::num], tf.int32)
    if shuffle:
      key = _seed_key(seed, _STREAM_SHUFFLE, pid)
      epochs = tf.data.Dataset.counter() if repeat else tf.data.Dataset.range(1)
      ds = epochs.flat_map(lambda epoch: tf.data.Dataset.from_tensor_slices(
          tf.random.experimental.stateless_shuffle(
              index, seed=tf.stack([tf.constant(key, tf.int64), epoch]))))
    else:
      ds = tf.data.Dataset.from_tensor_slices(index)
      if repeat:
        ds = ds.repeat()
    return ds.map(lambda i: (tf.gather(images, i), tf.gather(labels, i)))


class _TfdsSource:
  """One split (string, e.g. 'train[50000:]') of a prepared tfds dataset, undecoded."""

  def __init__(self, builder, split: str, num_examples: int, image_key: str, label_key: str):
    self.builder, self.split, self.num_examples = builder, split, num_examples
    self.image_key, self.label_key = image_key, label_key
    fmt = getattr(builder.info.features[image_key], "encoding_format", None)
    self.encoding = "jpeg" if fmt in ("jpeg", "jpg") else "image"

  def __len__(self):
    return self.num_examples

  def dataset(self, *, shuffle: bool, seed: int, repeat: bool, input_context,
              shuffle_buffer: int) -> tf.data.Dataset:
    tfds = _import_tfds()
    pid, num = _pipeline_shard(input_context)

    def read(context):
      config = tfds.ReadConfig(shuffle_seed=seed, shuffle_reshuffle_each_iteration=True,
                               input_context=context, try_autocache=False)
      return self.builder.as_dataset(
          split=self.split, shuffle_files=shuffle, read_config=config,
          decoders={self.image_key: tfds.decode.SkipDecoding()})

    if num > 1:
      try:
        ds = read(input_context)      # whole files per input pipeline
      except ValueError:              # fewer files than pipelines: shard by example
        ds = read(None).shard(num, pid)
    else:
      ds = read(None)
    ds = ds.map(lambda ex: (ex[self.image_key], ex[self.label_key]))
    if shuffle:
      ds = ds.shuffle(min(shuffle_buffer, max(len(self), 1)), seed=seed,
                      reshuffle_each_iteration=True)
    if repeat:
      ds = ds.repeat()
    return ds


# ---------------------------------------------------------------------------- ImageData

class ImageData:
  """Built by get_data(); holds everything needed to make pipelines.

  Pipelines yield (images float32 [B, S, S, 3] normalised with the ImageNet mean/std,
  labels int32 [B]).
  """

  def __init__(self, info: DatasetInfo, *, train_source, holdout_source, validation_source,
               min_crop_scale: float, flip: bool, shuffle_buffer: int = DEFAULT_SHUFFLE_BUFFER):
    self.info = info
    self.min_crop_scale = float(min_crop_scale)
    self.flip = bool(flip)
    self.shuffle_buffer = int(shuffle_buffer)
    self._sources = {"train": train_source, "holdout": holdout_source,
                     "validation": validation_source}

  def __repr__(self):
    return (f"ImageData({self.info}, min_crop_scale={self.min_crop_scale}, "
            f"flip={self.flip})")

  def _source(self, split: str):
    source = self._sources[split]
    if source is None:
      raise DataError(f"{self.info.name}: there is no {split} split"
                      + (" (holdout_examples=0)" if split == "holdout" else ""))
    return source

  def _pipeline(self, split: str, global_batch_size: int, *, train_preprocessing: bool,
                shuffle: bool, repeat: bool, drop_remainder: bool, seed: int,
                input_context) -> tf.data.Dataset:
    source = self._source(split)
    if global_batch_size < 1:
      raise DataError(f"global_batch_size must be positive, got {global_batch_size}")
    if drop_remainder and global_batch_size > len(source):
      raise DataError(f"{self.info.name}: global batch {global_batch_size} is larger than "
                      f"the {split} split ({len(source)} examples)")
    batch_size = (input_context.get_per_replica_batch_size(global_batch_size)
                  if input_context is not None else global_batch_size)
    pid, _ = _pipeline_shard(input_context)
    key = tf.constant(_seed_key(seed, _STREAM_AUGMENT, pid), tf.int64)
    preprocess = _make_preprocess(source.encoding, self.info.image_size,
                                  train=train_preprocessing,
                                  min_crop_scale=self.min_crop_scale, flip=self.flip)
    ds = source.dataset(shuffle=shuffle, seed=seed, repeat=repeat,
                        input_context=input_context, shuffle_buffer=self.shuffle_buffer)
    # The k-th element of this pipeline is augmented with seed (key, k): stateless, so
    # identical across rebuilds and restored iterators.
    ds = ds.enumerate().map(
        lambda k, element: preprocess(tf.stack([key, k]), *element),
        num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
    ds = ds.batch(batch_size, drop_remainder=drop_remainder)
    options = tf.data.Options()
    options.deterministic = True
    options.experimental_optimization.map_parallelization = True
    # Demo pipelines have no reordering buffers: checkpoint cursors, not prefetched batches.
    options.experimental_symbolic_checkpoint = source.encoding == "raw"
    return ds.with_options(options).prefetch(tf.data.AUTOTUNE)

  def train(self, global_batch_size: int, *, seed: int = 0, repeat: bool = True,
            input_context=None, augment: bool = True) -> tf.data.Dataset:
    """Weight-training batches: shuffled, augmented, drop_remainder=True."""
    return self._pipeline("train", global_batch_size, train_preprocessing=augment,
                          shuffle=True, repeat=repeat, drop_remainder=True, seed=seed,
                          input_context=input_context)

  def holdout(self, global_batch_size: int, *, seed: int = 0, repeat: bool = True,
              shuffle: bool = True, input_context=None) -> tf.data.Dataset:
    """Held-out batches with test-time preprocessing.

    θ steps: the defaults (shuffled, repeated). Candidate evaluation: repeat=False,
    shuffle=False; then the last batch is kept even if short, so every held-out example
    is counted exactly once.
    """
    return self._pipeline("holdout", global_batch_size, train_preprocessing=False,
                          shuffle=shuffle, repeat=repeat, drop_remainder=repeat, seed=seed,
                          input_context=input_context)

  def validation(self, global_batch_size: int, *, input_context=None) -> tf.data.Dataset:
    """One in-order pass over the validation split, test-time preprocessing, no drop."""
    return self._pipeline("validation", global_batch_size, train_preprocessing=False,
                          shuffle=False, repeat=False, drop_remainder=False, seed=0,
                          input_context=input_context)

  def dataset_fn(self, split: str, global_batch_size: int, **kw
                 ) -> Callable[[tf.distribute.InputContext], tf.data.Dataset]:
    """fn(input_context) for `strategy.distribute_datasets_from_function`."""
    if split not in self._sources:
      raise DataError(f"unknown split {split!r}; expected one of {tuple(self._sources)}")
    method = getattr(self, split)
    self._source(split)  # fail now, not inside the strategy

    def fn(input_context):
      return method(global_batch_size, input_context=input_context, **kw)

    return fn


# ---------------------------------------------------------------------------- get_data

def _resolve_holdout(dataset: str, num_train_split: int, holdout_examples: Optional[int]) -> int:
  if holdout_examples is None:
    if dataset in DEMO_DATASETS:
      holdout_examples = int(round(num_train_split * DEMO_HOLDOUT_FRACTION))
    else:   # 50,000 for ImageNet (SPEC §3), 10% of smaller train splits
      holdout_examples = min(IMAGENET_HOLDOUT,
                             int(round(num_train_split * TFDS_HOLDOUT_FRACTION)))
  holdout_examples = int(holdout_examples)
  if holdout_examples < 0 or holdout_examples >= num_train_split:
    raise DataError(f"{dataset}: holdout_examples={holdout_examples} must be in "
                    f"[0, {num_train_split}) (the train split has {num_train_split} examples)")
  return holdout_examples


def _get_demo(dataset, image_size, holdout_examples, min_crop_scale, flip) -> ImageData:
  train_images, train_labels, val_images, val_labels = demo_data.load_demo(dataset)
  n_hold = _resolve_holdout(dataset, len(train_labels), holdout_examples)
  info = DatasetInfo(name=dataset, num_classes=int(train_labels.max()) + 1,
                     num_train=len(train_labels) - n_hold,
                     num_holdout=n_hold, num_validation=len(val_labels),
                     image_size=int(image_size),
                     class_names=demo_data.class_names(dataset))
  # The train arrays are stored in a fixed random order, so the first n_hold are a
  # random (and always the same) sample.
  return ImageData(
      info,
      train_source=_ArraySource(train_images[n_hold:], train_labels[n_hold:]),
      holdout_source=_ArraySource(train_images[:n_hold], train_labels[:n_hold]) if n_hold else None,
      validation_source=_ArraySource(val_images, val_labels),
      min_crop_scale=default_min_crop_scale(dataset) if min_crop_scale is None else min_crop_scale,
      flip=default_flip(dataset) if flip is None else flip)


def _get_tfds(dataset, data_dir, image_size, holdout_examples, min_crop_scale, flip,
              shuffle_buffer) -> ImageData:
  tfds = _import_tfds()
  builder = _builder(dataset, data_dir)
  info = builder.info
  image_key, label_key = info.supervised_keys or ("image", "label")
  features = info.features
  if (not isinstance(image_key, str) or image_key not in features or label_key not in features
      or not isinstance(features[image_key], tfds.features.Image)
      or not isinstance(features[label_key], tfds.features.ClassLabel)):
    raise DataError(f"{dataset!r} is not an image classification dataset (need an Image "
                    f"feature and a ClassLabel feature; it has {info.supervised_keys or features})")
  splits = info.splits
  if "train" not in splits:
    raise DataError(f"{dataset!r} has no 'train' split (splits: {list(splits)})")
  num_train_split = splits["train"].num_examples
  n_hold = _resolve_holdout(dataset, num_train_split, holdout_examples)
  val_split = next((s for s in ("validation", "test") if s in splits), None)
  num_val = splits[val_split].num_examples if val_split else 0
  shape = features[image_key].shape
  native = max(shape[:2]) if None not in shape[:2] else None
  labels = features[label_key]
  names = tuple(labels.names or ())
  data_info = DatasetInfo(name=dataset, num_classes=labels.num_classes,
                          num_train=num_train_split - n_hold, num_holdout=n_hold,
                          num_validation=num_val, image_size=int(image_size),
                          class_names=names if len(names) == labels.num_classes else ())

  def source(split, n):
    return _TfdsSource(builder, split, n, image_key, label_key)

  return ImageData(
      data_info,
      train_source=source(f"train[{n_hold}:]" if n_hold else "train", num_train_split - n_hold),
      holdout_source=source(f"train[:{n_hold}]", n_hold) if n_hold else None,
      validation_source=source(val_split, num_val) if val_split else None,
      min_crop_scale=(default_min_crop_scale(dataset, native) if min_crop_scale is None
                      else min_crop_scale),
      flip=default_flip(dataset) if flip is None else flip,
      shuffle_buffer=DEFAULT_SHUFFLE_BUFFER if shuffle_buffer is None else shuffle_buffer)


def get_data(dataset: str, *, data_dir: Optional[str] = None, image_size: int,
             holdout_examples: Optional[int] = None, min_crop_scale: Optional[float] = None,
             flip: Optional[bool] = None, shuffle_buffer: Optional[int] = None) -> ImageData:
  """Pipelines for `dataset`: a demo dataset (DEMO_DATASETS) or a prepared tfds dataset.

  Args:
    dataset: "demo_digits", "demo_shapes" or a tfds name ("imagenet2012", "cifar10", …).
    data_dir: where tfds data was prepared; None = TFDS_DATA_DIR or ~/tensorflow_datasets.
    image_size: side of the square images the pipelines yield.
    holdout_examples: size of the held-out part, the first N examples of the train split;
      0 = none. None = 50,000 for imagenet2012, 20% of train for the demos, 10% (at most
      50,000) for other tfds datasets.
    min_crop_scale: smallest area fraction of the training random resized crop. None =
      0.08 for large images, 0.25 for ≤64-pixel tfds images, 0.8 for the demos.
    flip: random horizontal flip in training. None = on, except digit/character datasets
      (demo_digits, mnist, svhn_cropped, …).
    shuffle_buffer: tfds only: examples in the shuffle buffer (default 10,000).

  Raises:
    DataError: unknown or unprepared dataset, or an impossible holdout size.
  """
  if int(image_size) < 1:
    raise DataError(f"image_size must be positive, got {image_size}")
  if min_crop_scale is not None and not 0.0 < min_crop_scale <= 1.0:
    raise DataError(f"min_crop_scale must be in (0, 1], got {min_crop_scale}")
  if dataset in DEMO_DATASETS:
    return _get_demo(dataset, image_size, holdout_examples, min_crop_scale, flip)
  return _get_tfds(dataset, data_dir, image_size, holdout_examples, min_crop_scale, flip,
                   shuffle_buffer)
