"""Tests of nse_tf.data: demo data, tfds pipelines (on tiny locally built tfds datasets),
determinism, iterator checkpoints, the held-out split and distribution."""

import hashlib
import os
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import tensorflow as tf  # noqa: E402
import tensorflow_datasets as tfds  # noqa: E402

from nse_tf import data, demo_data  # noqa: E402

MEAN = np.array(data.IMAGENET_MEAN_RGB, np.float32)
STD = np.array(data.IMAGENET_STDDEV_RGB, np.float32)


# ------------------------------------------------------------------ tiny tfds datasets

class _TinyImages:
  """20 train + 6 test images of varying size; no download, builds in about a second."""

  VERSION = tfds.core.Version("1.0.0")
  ENCODING = "png"

  def _info(self):
    return tfds.core.DatasetInfo(
        builder=self,
        features=tfds.features.FeaturesDict({
            "image": tfds.features.Image(shape=(None, None, 3), encoding_format=self.ENCODING),
            "label": tfds.features.ClassLabel(num_classes=3)}),
        supervised_keys=("image", "label"))

  def _split_generators(self, dl_manager):
    del dl_manager
    return {"train": self._generate_examples(0, 20), "test": self._generate_examples(1, 6)}

  def _generate_examples(self, seed, n):
    rng = np.random.default_rng(seed)
    for i in range(n):
      h, w = int(rng.integers(24, 48)), int(rng.integers(24, 48))
      yield i, {"image": rng.integers(0, 256, (h, w, 3), dtype=np.uint8), "label": i % 3}


class NseTinyPng(_TinyImages, tfds.core.GeneratorBasedBuilder):
  ENCODING = "png"


class NseTinyJpeg(_TinyImages, tfds.core.GeneratorBasedBuilder):
  ENCODING = "jpeg"


@pytest.fixture(scope="module")
def tiny_tfds_dir(tmp_path_factory):
  data_dir = str(tmp_path_factory.mktemp("tfds"))
  config = tfds.download.DownloadConfig(try_download_gcs=False)
  for name in ("nse_tiny_png", "nse_tiny_jpeg"):
    tfds.builder(name, data_dir=data_dir).download_and_prepare(download_config=config)
  return data_dir


# ------------------------------------------------------------------ helpers

def _take(ds, n):
  return [(x.numpy(), y.numpy()) for x, y in ds.take(n)]


def _assert_same_batches(a, b):
  assert len(a) == len(b)
  for (xa, ya), (xb, yb) in zip(a, b):
    np.testing.assert_array_equal(xa, xb)
    np.testing.assert_array_equal(ya, yb)


def _hashes(ds):
  """Per-example hashes of image bytes + label over one pass of ds."""
  out = []
  for x, y in ds:
    for xi, yi in zip(x.numpy(), y.numpy()):
      out.append(hashlib.sha1(xi.tobytes() + bytes([int(yi)])).hexdigest())
  return out


# ------------------------------------------------------------------ demo data

@pytest.mark.parametrize("name", data.DEMO_DATASETS)
def test_demo_shapes_dtypes_and_info(name):
  d = data.get_data(name, image_size=32)
  info = d.info
  assert info.name == name and info.image_size == 32
  assert info.num_classes == {"demo_glyphs": 26, "demo_compass": 8}.get(name, 10)
  assert info.num_holdout == round((info.num_train + info.num_holdout) * 0.2)
  x, y = next(iter(d.train(4, seed=3)))
  assert x.shape == (4, 32, 32, 3) and x.dtype == tf.float32
  assert y.shape == (4,) and y.dtype == tf.int32
  assert np.all((y.numpy() >= 0) & (y.numpy() < info.num_classes))
  for ds in (d.holdout(4), d.validation(4)):
    x, y = next(iter(ds))
    assert x.shape == (4, 32, 32, 3) and x.dtype == tf.float32 and y.dtype == tf.int32
    pixels = x.numpy() * STD + MEAN            # undo the normalisation: back in [0, 255]
    assert pixels.min() > -1e-3 and pixels.max() < 255 + 1e-3


def test_sizes_and_defaults():
  digits = data.get_data("demo_digits", image_size=32)
  shapes = data.get_data("demo_shapes", image_size=32)
  assert digits.info.num_train + digits.info.num_holdout + digits.info.num_validation == 1797
  assert (shapes.info.num_train, shapes.info.num_holdout, shapes.info.num_validation) == (
      4800, 1200, 1000)
  assert not digits.flip and shapes.flip
  assert digits.min_crop_scale == shapes.min_crop_scale == 0.8
  assert data.default_flip("imagenet2012") and not data.default_flip("mnist")
  assert data.default_min_crop_scale("imagenet2012") == 0.08
  assert data.default_min_crop_scale("cifar10", native_size=32) == 0.25
  assert "demo_shapes" in data.describe_demo_datasets()
  custom = data.get_data("demo_digits", image_size=16, min_crop_scale=0.3, flip=True,
                         holdout_examples=100)
  assert (custom.min_crop_scale, custom.flip, custom.info.num_holdout) == (0.3, True, 100)


def test_eval_preprocessing_is_exact_normalisation_at_native_size():
  d = data.get_data("demo_digits", image_size=8)   # native size: no resize, no crop
  _, _, val_images, val_labels = demo_data._demo_digits()
  x, y = next(iter(d.validation(16)))
  np.testing.assert_allclose(x.numpy() * STD + MEAN, val_images[:16], atol=1e-3)
  np.testing.assert_array_equal(y.numpy(), val_labels[:16])


def test_demo_generation_cached_and_deterministic():
  a = demo_data._demo_shapes()
  assert demo_data._demo_shapes() is a                   # lru_cache: free second time
  images, labels = demo_data.generate_shapes(50, seed=1)
  np.testing.assert_array_equal(images, demo_data.generate_shapes(50, seed=1)[0])
  assert images.shape == (50, 32, 32, 3) and images.dtype == np.uint8
  assert sorted(np.bincount(labels)) == [5] * 10


# ------------------------------------------------------------------ determinism / resume

@pytest.mark.parametrize("name", data.DEMO_DATASETS)
def test_same_seed_same_batches(name):
  d1 = data.get_data(name, image_size=32)
  d2 = data.get_data(name, image_size=32)
  a = _take(d1.train(8, seed=5), 3)
  _assert_same_batches(a, _take(d2.train(8, seed=5), 3))
  other = _take(d1.train(8, seed=6), 1)
  assert not np.array_equal(a[0][0], other[0][0])
  _assert_same_batches(_take(d1.holdout(8, seed=1), 2), _take(d2.holdout(8, seed=1), 2))


def test_epochs_reshuffle_deterministically():
  d = data.get_data("demo_digits", image_size=8, holdout_examples=0)
  n = d.info.num_train
  labels = np.concatenate([y for _, y in _take(d.train(n, seed=0, augment=False), 2)])
  first, second = labels[:n], labels[n:]
  assert np.array_equal(np.sort(first), np.sort(second))   # every example once per epoch
  assert not np.array_equal(first, second)                 # in a new order


def test_iterator_checkpoint_restores_exact_batches(tmp_path):
  d = data.get_data("demo_digits", image_size=32)
  per_epoch = d.info.num_train // 64
  it = iter(d.train(64, seed=11))
  for _ in range(per_epoch - 1):       # stop just before an epoch boundary
    next(it)
  path = tf.train.Checkpoint(iterator=it).write(str(tmp_path / "it"))
  expected = [(x.numpy(), y.numpy()) for x, y in (next(it) for _ in range(3))]
  fresh = iter(data.get_data("demo_digits", image_size=32).train(64, seed=11))
  tf.train.Checkpoint(iterator=fresh).read(path).assert_consumed()
  _assert_same_batches([(x.numpy(), y.numpy()) for x, y in (next(fresh) for _ in range(3))],
                       expected)
  size = sum(f.stat().st_size for f in tmp_path.iterdir())
  assert size < 100_000, f"iterator checkpoint of demo data is {size} bytes"


# ------------------------------------------------------------------ held-out split

def test_holdout_disjoint_from_train_and_deterministic():
  d = data.get_data("demo_shapes", image_size=32)
  hold = _hashes(d.holdout(100, repeat=False, shuffle=False))
  assert hold == _hashes(data.get_data("demo_shapes", image_size=32).holdout(
      100, repeat=False, shuffle=False))
  train = _hashes(d.train(100, repeat=False, augment=False))
  val = _hashes(d.validation(100))
  assert len(set(hold)) == d.info.num_holdout
  assert len(set(train)) == d.info.num_train
  assert not set(hold) & set(train)
  assert not set(val) & (set(train) | set(hold))
  no_hold = data.get_data("demo_shapes", image_size=32, holdout_examples=0)
  assert (no_hold.info.num_train, no_hold.info.num_holdout) == (6000, 0)
  assert set(_hashes(no_hold.train(100, repeat=False, augment=False))) == set(hold) | set(train)
  with pytest.raises(data.DataError, match="holdout"):
    no_hold.holdout(8)
  with pytest.raises(data.DataError):
    data.get_data("demo_shapes", image_size=32, holdout_examples=6000)


def test_holdout_evaluation_counts_every_example_once():
  d = data.get_data("demo_digits", image_size=32, holdout_examples=101)
  sizes = [len(y) for _, y in d.holdout(16, repeat=False, shuffle=False)]
  assert sum(sizes) == 101 and sizes[-1] == 101 % 16
  # Two input pipelines: the shards partition the held-out set.
  shards = []
  for pid in range(2):
    ctx = tf.distribute.InputContext(num_input_pipelines=2, input_pipeline_id=pid,
                                     num_replicas_in_sync=2)
    shards.append(_hashes(d.holdout(16, repeat=False, shuffle=False, input_context=ctx)))
  whole = _hashes(d.holdout(16, repeat=False, shuffle=False))
  assert not set(shards[0]) & set(shards[1])
  assert sorted(shards[0] + shards[1]) == sorted(whole)


# ------------------------------------------------------------------ errors

def test_unknown_dataset_is_a_clear_data_error():
  start = time.time()
  with pytest.raises(data.DataError, match="no_such_dataset_xyz"):
    data.get_data("no_such_dataset_xyz", image_size=32)
  with pytest.raises(data.DataError, match="demo_digits"):
    data.check_prepared("no_such_dataset_xyz", None)
  assert time.time() - start < 5
  data.check_prepared("demo_shapes", None)


def test_unprepared_tfds_dataset_raises_fast_with_the_build_command(tmp_path):
  start = time.time()
  with pytest.raises(data.DataError) as err:
    data.get_data("cifar10", data_dir=str(tmp_path), image_size=32)
  assert f"tfds build cifar10 --data_dir={tmp_path}" in str(err.value)
  with pytest.raises(data.DataError) as err:
    data.check_prepared("imagenet2012", str(tmp_path))
  message = str(err.value)
  assert "ILSVRC2012_img_train.tar" in message and "ILSVRC2012_img_val.tar" in message
  assert os.path.join(str(tmp_path), "downloads", "manual") in message
  assert f"tfds build imagenet2012 --data_dir={tmp_path}" in message
  assert time.time() - start < 5
  assert not any(tmp_path.iterdir())             # nothing written, nothing downloaded


# ------------------------------------------------------------------ tfds pipelines

@pytest.mark.parametrize("name", ["nse_tiny_png", "nse_tiny_jpeg"])
def test_tfds_pipelines(tiny_tfds_dir, name):
  data.check_prepared(name, tiny_tfds_dir)
  d = data.get_data(name, data_dir=tiny_tfds_dir, image_size=32, holdout_examples=5)
  info = d.info
  assert (info.num_classes, info.num_train, info.num_holdout, info.num_validation) == (3, 15, 5, 6)
  assert d.min_crop_scale == 0.08 and d.flip        # unknown (None) image size: large-image defaults
  x, y = next(iter(d.train(4, seed=2)))
  assert x.shape == (4, 32, 32, 3) and x.dtype == tf.float32 and y.dtype == tf.int32
  _assert_same_batches(_take(d.train(4, seed=2), 6), _take(
      data.get_data(name, data_dir=tiny_tfds_dir, image_size=32, holdout_examples=5
                    ).train(4, seed=2), 6))
  hold = _hashes(d.holdout(4, repeat=False, shuffle=False))
  train = _hashes(d.train(1, repeat=False, augment=False))
  assert len(set(hold)) == 5 and len(set(train)) == 15 and not set(hold) & set(train)
  assert len(_hashes(d.validation(4))) == 6
  with pytest.raises(data.DataError):
    data.get_data(name, data_dir=tiny_tfds_dir, image_size=32, holdout_examples=0).holdout(2)


def test_tfds_iterator_checkpoint(tiny_tfds_dir, tmp_path):
  def build():
    return data.get_data("nse_tiny_jpeg", data_dir=tiny_tfds_dir, image_size=32,
                         holdout_examples=5).train(4, seed=9)
  it = iter(build())
  for _ in range(5):                   # past the first epoch (15 examples)
    next(it)
  path = tf.train.Checkpoint(iterator=it).write(str(tmp_path / "it"))
  expected = [(x.numpy(), y.numpy()) for x, y in (next(it) for _ in range(4))]
  fresh = iter(build())
  tf.train.Checkpoint(iterator=fresh).read(path).assert_consumed()
  _assert_same_batches([(x.numpy(), y.numpy()) for x, y in (next(fresh) for _ in range(4))],
                       expected)


# ------------------------------------------------------------------ distribution

def test_distribute_datasets_from_function_mirrored_two_cpus(mirrored_two_cpus):
  strategy = mirrored_two_cpus
  assert strategy.num_replicas_in_sync == 2
  d = data.get_data("demo_digits", image_size=16, holdout_examples=50)
  ds = strategy.distribute_datasets_from_function(d.dataset_fn("train", 8, seed=1))
  x, _ = next(iter(ds))
  xs = strategy.experimental_local_results(x)
  assert len(xs) == 2 and all(t.shape == (4, 16, 16, 3) for t in xs), [t.shape for t in xs]
  n = 0
  for _, y in strategy.distribute_datasets_from_function(
      d.dataset_fn("holdout", 8, repeat=False, shuffle=False)):
    n += sum(int(t.shape[0]) for t in strategy.experimental_local_results(y))
  assert n == 50, n


def test_tfds_sharded_holdout_partitions(tiny_tfds_dir):
  d = data.get_data("nse_tiny_png", data_dir=tiny_tfds_dir, image_size=32, holdout_examples=7)
  shards = []
  for pid in range(2):
    ctx = tf.distribute.InputContext(num_input_pipelines=2, input_pipeline_id=pid,
                                     num_replicas_in_sync=2)
    shards.append(_hashes(d.holdout(2, repeat=False, shuffle=False, input_context=ctx)))
  assert shards[0] and shards[1] and not set(shards[0]) & set(shards[1])
  assert sorted(shards[0] + shards[1]) == sorted(_hashes(d.holdout(2, repeat=False, shuffle=False)))


def _check_proxy_arrays(name, classes, min_share, centred=True):
  """A 16x16 proxy task's arrays: shapes, dtypes, read-only, every class in the held-out
  part, the rest and validation (each at least min_share of an even share), and (if
  `centred`) a bright symbol on a dark background (the centre brighter than the corners on
  average)."""
  tr_x, tr_y, va_x, va_y = data.load_demo(name)
  assert tr_x.shape == (12_000, 16, 16, 3) and va_x.shape == (2_000, 16, 16, 3)
  assert tr_x.dtype == va_x.dtype == np.uint8 and tr_y.dtype == va_y.dtype == np.int32
  assert not tr_x.flags.writeable
  for labels in (tr_y[:2_400], tr_y[2_400:], va_y):    # held-out part, rest, validation
    counts = np.bincount(labels, minlength=classes)
    assert len(counts) == classes and counts.min() > min_share * len(labels) / classes
  if centred:
    assert tr_x[:, 6:10, 6:10].mean() > tr_x[:, :3, :3].mean() + 20


def test_demo_digits_hard_shape_classes_and_disjoint_sources():
  from nse_tf import demo_digits_hard as dh  # pylint: disable=g-import-not-at-top
  _check_proxy_arrays("demo_digits_hard", 10, 0.7)
  d = data.get_data("demo_digits_hard", image_size=16)
  assert (d.info.num_train, d.info.num_holdout, d.info.num_validation) == (9_600, 2_400, 2_000)
  assert not d.flip
  # The held-out part is drawn from scikit-learn digits that the rest never uses.
  base_y = data.load_demo("demo_digits")[1]
  hold, fit = dh._split_stratified(base_y, dh.NUM_HOLDOUT_PART / dh.NUM_TRAIN,
                                   np.random.default_rng(20261130))
  assert len(np.intersect1d(hold, fit)) == 0 and len(hold) + len(fit) == len(base_y)
  assert abs(len(hold) / len(base_y) - 0.2) < 0.01


def test_demo_digits_hard_render_is_deterministic_and_distorts():
  from nse_tf import demo_digits_hard as dh  # pylint: disable=g-import-not-at-top
  base_x, base_y = data.load_demo("demo_digits")[:2]
  a, la = dh.render(base_x[:20, ..., 0], base_y[:20], 30, seed=5)
  b, lb = dh.render(base_x[:20, ..., 0], base_y[:20], 30, seed=5)
  np.testing.assert_array_equal(a, b)
  np.testing.assert_array_equal(la, lb)
  c, _ = dh.render(base_x[:20, ..., 0], base_y[:20], 30, seed=6)
  assert not np.array_equal(a, c)
  assert set(la.tolist()) <= set(base_y[:20].tolist())
  # Same source digit, two renderings: different pixels (distortion, colour, noise).
  one, _ = dh.render(base_x[:1, ..., 0], base_y[:1], 2, seed=0)
  assert np.abs(one[0].astype(int) - one[1].astype(int)).mean() > 10


def test_demo_glyphs_shape_classes_and_deterministic():
  from nse_tf import demo_glyphs as dg  # pylint: disable=g-import-not-at-top
  _check_proxy_arrays("demo_glyphs", 26, 0.6)   # letters drawn uniformly: ±3 sd
  # 21 fonts x 26 letters, every glyph inked and centred on its canvas; rendering again (a
  # fresh FreeType pass) gives the same pixels.
  base, labels = dg.glyphs()
  assert base.shape == (21 * 26, dg.GLYPH, dg.GLYPH) and labels.max() == 25
  ink = base.astype(float)
  assert (ink.sum((1, 2)) > 255 * 15).all()
  ys = (ink.sum(2) * np.arange(dg.GLYPH)).sum(1) / ink.sum((1, 2))
  assert np.abs(ys - (dg.GLYPH - 1) / 2).max() < 3.5     # ink centroid vs box centre
  dg.glyphs.cache_clear()
  again, _ = dg.glyphs()
  np.testing.assert_array_equal(base, again)
  d = data.get_data("demo_glyphs", image_size=16)
  assert (d.info.num_classes, d.info.num_train, d.info.num_holdout) == (26, 9_600, 2_400)
  assert d.info.class_names[:3] == ("A", "B", "C") and not d.flip


def test_demo_compass_shape_classes_deterministic_and_labels_are_directions():
  from nse_tf import demo_compass as dc  # pylint: disable=g-import-not-at-top
  _check_proxy_arrays("demo_compass", 8, 0.8, centred=False)   # uniform labels: ±4 sd
  d = data.get_data("demo_compass", image_size=16)
  assert (d.info.num_classes, d.info.num_train, d.info.num_holdout) == (8, 9_600, 2_400)
  assert d.info.class_names == ("E", "NE", "N", "NW", "W", "SW", "S", "SE") and not d.flip
  a, la = dc.generate(300, seed=7, distractors=0)
  b, lb = dc.generate(300, seed=7, distractors=0)
  np.testing.assert_array_equal(a, b)
  np.testing.assert_array_equal(la, lb)
  assert not np.array_equal(a, dc.generate(300, seed=8, distractors=0)[0])
  # The label is the direction from the plus to the ring: find both marks by matching
  # their 3x3 patterns (zero-mean templates on the grey image) and measure the angle.
  windows = np.lib.stride_tricks.sliding_window_view(a.astype(float).mean(-1), (3, 3),
                                                    axis=(1, 2))       # [300, 14, 14, 3, 3]
  def best(template):
    t = template.astype(float) - template.mean()
    flat = (windows * t).sum((-2, -1)).reshape(len(a), -1).argmax(1)
    return flat % 14 + 1, flat // 14 + 1      # the mark's centre (x, y)
  (px, py), (rx, ry) = best(dc.PLUS), best(dc.RING)
  dist = np.hypot(rx - px, ry - py)
  angle = np.degrees(np.arctan2(py - ry, rx - px)) % 360      # rows grow southwards
  found = np.round(angle / 45).astype(int) % 8
  assert np.median(dist) > 7 and dist.max() < 14.5
  assert (found == la).mean() > 0.9     # rounding of the marks to pixels and noise aside


def test_demo_glyphs_missing_fonts_is_one_clear_error(monkeypatch, tmp_path):
  from nse_tf import demo_glyphs as dg  # pylint: disable=g-import-not-at-top
  from nse_tf import errors  # pylint: disable=g-import-not-at-top
  monkeypatch.setattr(dg, "font_dir", lambda: str(tmp_path))
  dg.glyphs.cache_clear()
  try:
    with pytest.raises(errors.NSEError, match="matplotlib's bundled fonts"):
      dg.glyphs()
  finally:
    dg.glyphs.cache_clear()
