"""The embedded demo datasets: shipped with scikit-learn or generated; no download, no TF.

  demo_digits       scikit-learn's 1,797 8x8 digits, a seeded stratified 20 % validation split
  demo_shapes       7,000 generated 32x32 RGB images of 10 shape classes (`generate_shapes`)
  demo_digits_hard  distorted digits, the demo's task and the first proxy task (nse_tf/demo_digits_hard.py)
  demo_glyphs       26 letters from matplotlib's bundled fonts, distorted (nse_tf/demo_glyphs.py)
  demo_compass      the direction between two generated marks, 8 classes: the search's CPU
                    proxy task, flags/proxy.cfg (nse_tf/demo_compass.py)

`load_demo(name)` returns (train_images, train_labels, val_images, val_labels) as read-only
uint8/int32 numpy arrays, built once per process; nse_tf.data turns them into pipelines.
"""

from __future__ import annotations

import functools
from typing import Tuple

import numpy as np

from nse_tf import errors

DEMO_DATASETS = ("demo_digits", "demo_shapes", "demo_digits_hard", "demo_glyphs",
                 "demo_compass")


def describe_demo_datasets() -> str:
  """One paragraph per embedded demo dataset, for the README and CLI help."""
  return (
      "demo_digits: scikit-learn's bundled handwritten digits (1,797 8x8 grayscale images, "
      "10 classes), upscaled by the pipeline; a seeded, stratified 20% is the validation "
      "split (1,438 train / 359 validation). So easy that most networks tie near 100%: "
      "use it for smoke tests.\n"
      "demo_shapes: 7,000 generated 32x32 RGB images (6,000 train / 1,000 validation), 10 "
      "classes of shapes (disc, square, triangle, plus, ring, hollow square, star, striped "
      "disc, checkered disc, ellipse) at random position, scale, rotation and colour, on "
      "noisy gradient backgrounds with small distractor shapes and occluding lines. "
      "Deterministic (seeded numpy, about 2 s once per process) and hard enough that "
      "networks differ: a 3-conv CNN reaches about 40% validation accuracy after one CPU "
      "minute and 60% after three (demo_digits: 95% after one).\n"
      "demo_digits_hard: the demo's task (flags/demo.cfg). scikit-learn's digits drawn into "
      "16x16 RGB images with random rotation, scale, shear and shift, a faint fragment of "
      "another digit, random colours and pixel noise: 12,000 train (the first 2,400, the "
      "default held-out part, from digits the rest never uses) / 2,000 validation (from "
      "the validation digits). A tiny-macro network reaches ~70% after 150 steps of 64 and "
      "85-90% after 600; random architectures of equal cost differ by ~1.4 points (std), "
      "training seeds by ~0.6.\n"
      "demo_glyphs: the capital letters A-Z (26 classes) from the 21 text fonts bundled with "
      "matplotlib, drawn into 16x16 RGB images with demo_digits_hard's distortions: 12,000 "
      "train / 2,000 validation.\n"
      "demo_compass: in which of 8 directions (E, NE, … SE) the ring lies from the plus: two "
      "3x3 marks 7-13 pixels apart in 16x16 RGB images, with distractor strokes and noise; a "
      "task that needs spatial context rather than a glyph's shape; the search's CPU proxy "
      "task (flags/proxy.cfg). 12,000 train / 2,000 validation.")


def _readonly(*arrays):
  for a in arrays:
    a.setflags(write=False)
  return arrays


@functools.lru_cache(maxsize=None)
def _demo_digits() -> Tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
  """(train_images, train_labels, val_images, val_labels); train in a fixed random order."""
  from sklearn import datasets as sk_datasets  # pylint: disable=g-import-not-at-top
  digits = sk_datasets.load_digits()
  images = np.rint(digits.images * (255.0 / 16.0)).clip(0, 255).astype(np.uint8)
  images = np.repeat(images[..., None], 3, axis=-1)                  # [N, 8, 8, 3]
  labels = digits.target.astype(np.int32)
  rng = np.random.default_rng(20240101)
  val = []
  for c in range(10):                    # stratified: 20% of every class
    members = np.nonzero(labels == c)[0]
    val.append(rng.permutation(members)[:int(round(len(members) * 0.2))])
  val = np.sort(np.concatenate(val))
  train = rng.permutation(np.setdiff1d(np.arange(len(labels)), val))
  return _readonly(images[train], labels[train], images[val], labels[val])


SHAPE_CLASSES = ("disc", "square", "triangle", "plus", "ring", "hollow_square", "star",
                 "striped_disc", "checkered_disc", "ellipse")
_SHAPES_SIZE = 32


def _shape_distance(name: str, u: np.ndarray, v: np.ndarray) -> np.ndarray:
  """Signed distance-like field of a shape (negative inside), in shape radii."""
  if name in ("disc", "striped_disc", "checkered_disc"):
    return np.sqrt(u * u + v * v) - 1.0
  if name == "square":
    return np.maximum(np.abs(u), np.abs(v)) - 0.8
  if name == "triangle":
    d = np.maximum(np.maximum(-v, u * 0.8660254 + v * 0.5), -u * 0.8660254 + v * 0.5)
    return (d - 0.5) * 1.3
  if name == "plus":
    au, av = np.abs(u), np.abs(v)
    return np.minimum(np.maximum(au - 1.0, av - 0.3), np.maximum(av - 1.0, au - 0.3))
  if name == "ring":
    return np.abs(np.sqrt(u * u + v * v) - 0.75) - 0.25
  if name == "hollow_square":
    return np.abs(np.maximum(np.abs(u), np.abs(v)) - 0.65) - 0.18
  if name == "star":
    r = np.sqrt(u * u + v * v)
    return (r - (0.62 + 0.38 * np.cos(5 * np.arctan2(v, u)))) * 0.7
  if name == "ellipse":
    return (np.sqrt(u * u + (v / 0.45) ** 2) - 1.0) * 0.6
  raise ValueError(name)


def _draw_shapes(rng, canvas, classes, radius, cx, cy, colour, colour2):
  """Alpha-blends one anti-aliased, randomly rotated shape into each image of canvas."""
  f32 = np.float32
  ys, xs = np.mgrid[0:_SHAPES_SIZE, 0:_SHAPES_SIZE].astype(f32) + f32(0.5)
  n = canvas.shape[0]
  angle = rng.uniform(0, 2 * np.pi, n).astype(f32)
  freq = rng.uniform(2.5, 3.5, n).astype(f32)
  for c in np.unique(classes):
    idx = np.nonzero(classes == c)[0]
    name = SHAPE_CLASSES[c]
    r = radius[idx, None, None]
    dx = (xs[None] - cx[idx, None, None]) / r
    dy = (ys[None] - cy[idx, None, None]) / r
    ca, sa = np.cos(angle[idx])[:, None, None], np.sin(angle[idx])[:, None, None]
    u, v = dx * ca + dy * sa, dy * ca - dx * sa
    alpha = np.clip(f32(0.5) - _shape_distance(name, u, v) * r, 0, 1)[..., None]
    col = np.broadcast_to(colour[idx, None, None, :], alpha.shape[:3] + (3,))
    if name in ("striped_disc", "checkered_disc"):
      f = freq[idx, None, None]
      pattern = np.sin(np.pi * u * f)
      if name == "checkered_disc":
        pattern = pattern * np.sin(np.pi * v * f)
      col = np.where((pattern > 0)[..., None], col, colour2[idx, None, None, :])
    canvas[idx] += (col - canvas[idx]) * alpha


def _far_colour(rng, ref: np.ndarray, min_dist: float) -> np.ndarray:
  """Random RGB colours at least min_dist (mostly) away from ref [n, 3]."""
  col = rng.uniform(0, 255, ref.shape).astype(np.float32)
  for _ in range(20):
    bad = np.linalg.norm(col - ref, axis=-1) < min_dist
    if not bad.any():
      break
    col[bad] = rng.uniform(0, 255, (int(bad.sum()), 3))
  return col


def _interp_matrix(n_in: int, n_out: int) -> np.ndarray:
  pos = np.clip((np.arange(n_out) + 0.5) * n_in / n_out - 0.5, 0, n_in - 1)
  lo = np.floor(pos).astype(int)
  hi = np.minimum(lo + 1, n_in - 1)
  m = np.zeros((n_out, n_in), np.float32)
  m[np.arange(n_out), lo] += 1 - (pos - lo)
  m[np.arange(n_out), hi] += pos - lo
  return m


def _shapes_chunk(rng, labels: np.ndarray) -> np.ndarray:
  n, s, f32 = len(labels), _SHAPES_SIZE, np.float32
  ys, xs = np.mgrid[0:s, 0:s].astype(f32) / s
  # Background: a linear gradient between two colours plus smooth low-frequency blotches.
  c1 = rng.uniform(0, 255, (n, 3)).astype(f32)
  c2 = np.clip(c1 + rng.normal(0, 60, (n, 3)), 0, 255).astype(f32)
  th = rng.uniform(0, 2 * np.pi, n).astype(f32)
  t = ((xs[None] - 0.5) * np.cos(th)[:, None, None] + (ys[None] - 0.5) * np.sin(th)[:, None, None]
       + f32(0.5))
  canvas = c1[:, None, None] + (c2 - c1)[:, None, None] * t[..., None]
  blotch = rng.standard_normal((n, 5, 5, 3), dtype=f32) * rng.uniform(0, 35, (n, 1, 1, 1)).astype(f32)
  m = _interp_matrix(5, s)
  canvas += np.einsum("yi,nijc,xj->nyxc", m, blotch, m, optimize=True)
  bg = canvas.mean(axis=(1, 2))
  # 0-2 small distractor shapes of random classes behind the object.
  num_distractors = rng.integers(0, 3, n)
  for k in range(2):
    sel = np.nonzero(num_distractors > k)[0]
    m_ = len(sel)
    sub = canvas[sel]
    _draw_shapes(rng, sub, rng.integers(0, 10, m_), rng.uniform(2.0, 3.8, m_).astype(f32),
                 rng.uniform(0, s, m_).astype(f32), rng.uniform(0, s, m_).astype(f32),
                 _far_colour(rng, bg[sel], 40), _far_colour(rng, bg[sel], 40))
    canvas[sel] = sub
  # The object: radius 6-11.5 px, may be partly cut by the border.
  radius = rng.uniform(6.0, 11.5, n).astype(f32)
  cx = rng.uniform(radius * 0.6, s - radius * 0.6).astype(f32)
  cy = rng.uniform(radius * 0.6, s - radius * 0.6).astype(f32)
  fg = _far_colour(rng, bg, 70)
  _draw_shapes(rng, canvas, labels, radius, cx, cy, fg, _far_colour(rng, fg, 90))
  # Up to two occluding line segments on top, then pixel noise.
  for _ in range(2):
    on = (rng.random(n) < 0.3).astype(f32)[:, None, None]
    x0, y0 = rng.uniform(0, s, (2, n, 1, 1)).astype(f32)
    a = rng.uniform(0, np.pi, (n, 1, 1)).astype(f32)
    half_length = rng.uniform(3, 8, (n, 1, 1)).astype(f32)
    px, py = xs[None] * s + f32(0.5) - x0, ys[None] * s + f32(0.5) - y0
    along, across = px * np.cos(a) + py * np.sin(a), py * np.cos(a) - px * np.sin(a)
    d = np.maximum(np.abs(across) - f32(0.6), np.abs(along) - half_length)
    alpha = (np.clip(f32(0.5) - d, 0, 1) * on)[..., None]
    canvas += (_far_colour(rng, bg, 40)[:, None, None] - canvas) * alpha
  canvas += (rng.standard_normal(canvas.shape, dtype=f32)
             * rng.uniform(2, 16, (n, 1, 1, 1)).astype(f32))
  return np.clip(np.rint(canvas), 0, 255).astype(np.uint8)


def generate_shapes(num_examples: int, seed: int, chunk: int = 500):
  """Deterministic demo_shapes images [N, 32, 32, 3] uint8 and balanced labels [N] int32."""
  rng = np.random.default_rng(seed)
  labels = np.arange(num_examples) % len(SHAPE_CLASSES)
  rng.shuffle(labels)
  images = np.empty((num_examples, _SHAPES_SIZE, _SHAPES_SIZE, 3), np.uint8)
  for start in range(0, num_examples, chunk):
    images[start:start + chunk] = _shapes_chunk(rng, labels[start:start + chunk])
  return images, labels.astype(np.int32)


@functools.lru_cache(maxsize=None)
def _demo_shapes() -> Tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
  train_images, train_labels = generate_shapes(6000, seed=1)
  val_images, val_labels = generate_shapes(1000, seed=2)
  return _readonly(train_images, train_labels, val_images, val_labels)


def _demo_digits_hard():
  from nse_tf import demo_digits_hard  # pylint: disable=g-import-not-at-top
  return demo_digits_hard.load()


def _demo_glyphs():
  from nse_tf import demo_glyphs  # pylint: disable=g-import-not-at-top
  return demo_glyphs.load()


def _demo_compass():
  from nse_tf import demo_compass  # pylint: disable=g-import-not-at-top
  return demo_compass.load()


_DEMO_LOADERS = {"demo_digits": _demo_digits, "demo_shapes": _demo_shapes,
                 "demo_digits_hard": _demo_digits_hard, "demo_glyphs": _demo_glyphs,
                 "demo_compass": _demo_compass}


def class_names(name: str) -> Tuple[str, ...]:
  """Readable class names of a demo dataset; () where the label is the name (digits)."""
  if name == "demo_shapes":
    return SHAPE_CLASSES
  if name == "demo_glyphs":
    from nse_tf import demo_glyphs  # pylint: disable=g-import-not-at-top
    return tuple(demo_glyphs.LETTERS)
  if name == "demo_compass":
    from nse_tf import demo_compass  # pylint: disable=g-import-not-at-top
    return demo_compass.DIRECTIONS
  return ()


def load_demo(name: str) -> Tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
  """(train_images, train_labels, val_images, val_labels) of an embedded demo dataset."""
  if name not in _DEMO_LOADERS:
    raise errors.UsageError(f"unknown demo dataset {name!r}; expected one of {DEMO_DATASETS}")
  return _DEMO_LOADERS[name]()
