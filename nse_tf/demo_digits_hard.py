"""demo_digits_hard: the demo's task and the first proxy task, from scikit-learn's digits.

Why it exists. On `demo_digits` every network is at its ceiling (random architectures of
equal cost: 97.9 ± 0.3 %), so a search has nothing to find; on `demo_shapes` one network
needs ~120 steps and a K = 4 supernet ~1,000 steps to leave chance, too slow for a CPU
search. This task sits between: scikit-learn's 8x8 digits, each drawn into a 16x16 image
with a random affine distortion (rotation ±25°, scale 1.5–2.2×, shear ±0.2, shift ±2.5 px),
a fragment of another digit behind it (60 % of images, at 30–70 % contrast), random dark
background and bright foreground colours, and Gaussian pixel noise (σ 3–15 % of the range).
Bright-on-dark is fixed on purpose: with random polarity the same networks were at
~24 % (chance: 10 %) after 300 steps. Measured (tiny macro, 16x16, random flops27
architectures of 250–300 MFLOPs): after 600 SGD steps of 64, 87.8 % mean validation
accuracy, standard deviation 1.36 points across ten architectures against 0.57 points
across two training seeds of one architecture (benchmarks/search_quality.py). The numbers
behind the choice are in the README (Data, Search quality).

Splits. Digits are split by *source image* so that no scikit-learn digit appears in two
splits: the 359-digit stratified validation part of `demo_digits` gives the 2,000
validation images; the other 1,438 digits are split again, stratified, 20 / 80: the
first 2,400 train images (exactly the default 20 % held-out part that the search carves
out of the train split) are drawn from the 20 %, the remaining 9,600 from the 80 %. The
search's held-out accuracy therefore measures digits that its weights never saw.

Deterministic: seeded numpy (PCG64) and scipy's bilinear affine_transform; about 2 s once
per process.
"""

from __future__ import annotations

import functools
from typing import Tuple

import numpy as np

SIZE = 16
NUM_TRAIN = 12_000
NUM_HOLDOUT_PART = 2_400     # = data.DEMO_HOLDOUT_FRACTION of NUM_TRAIN
NUM_VALIDATION = 2_000


def _split_stratified(labels: np.ndarray, fraction: float, rng) -> Tuple[np.ndarray, np.ndarray]:
  first = []
  for c in range(10):
    members = np.nonzero(labels == c)[0]
    first.append(rng.permutation(members)[:int(round(len(members) * fraction))])
  first = np.sort(np.concatenate(first))
  return first, np.setdiff1d(np.arange(len(labels)), first)


def render(base: np.ndarray, base_labels: np.ndarray, num: int, seed: int,
           size: int = SIZE, zoom: float = 1.0) -> Tuple[np.ndarray, np.ndarray]:
  """`num` distorted images [num, size, size, 3] uint8 and labels [num] int32.

  base: [B, G, G] uint8 grey glyphs (0 = background; scikit-learn's digits: G = 8). Each
  image draws one base glyph uniformly, so classes are as balanced as the base glyphs.
  zoom: multiplies the glyph's scale (1.5–2.2×) and the fragment's, for glyphs drawn
  larger than the 8x8 digits (nse_tf/demo_glyphs.py).
  """
  from scipy import ndimage  # pylint: disable=g-import-not-at-top
  rng = np.random.default_rng(seed)
  glyphs = base.astype(np.float64) / 255.0
  idx = rng.integers(0, len(base), num)
  strokes = np.empty((num, size, size), np.float64)
  centre_in = np.full(2, (base.shape[1] - 1) / 2.0)
  for k, i in enumerate(idx):
    angle = np.deg2rad(rng.uniform(-25, 25))
    scale = rng.uniform(1.5, 2.2) * zoom
    shear = rng.uniform(-0.2, 0.2)
    rot = np.array([[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]])
    inv = np.linalg.inv(rot @ np.array([[1.0, shear], [0.0, 1.0]]) * scale)
    centre_out = size / 2 + rng.uniform(-2.5, 2.5, 2)
    img = ndimage.affine_transform(glyphs[i], inv, offset=centre_in - inv @ (centre_out - 0.5),
                                   output_shape=(size, size), order=1, mode="constant")
    if rng.random() < 0.6:            # a fragment of another digit, somewhere, fainter
      j = rng.integers(0, len(base))
      inv2 = np.eye(2) / (rng.uniform(1.2, 1.8) * zoom)
      frag = ndimage.affine_transform(glyphs[j], inv2,
                                      offset=centre_in - inv2 @ rng.uniform(0, size, 2),
                                      output_shape=(size, size), order=1, mode="constant")
      img = np.maximum(img, frag * rng.uniform(0.3, 0.7))
    strokes[k] = img
  background = rng.uniform(0.0, 0.35, (num, 1, 1, 3))
  foreground = rng.uniform(0.65, 1.0, (num, 1, 1, 3))
  images = background + (foreground - background) * strokes[..., None]
  images += rng.normal(0.0, 1.0, images.shape) * rng.uniform(0.03, 0.15, (num, 1, 1, 1))
  images = np.clip(np.rint(images * 255.0), 0, 255).astype(np.uint8)
  return images, base_labels[idx].astype(np.int32)


@functools.lru_cache(maxsize=None)
def load() -> Tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
  """(train_images, train_labels, val_images, val_labels), read-only; see the module doc."""
  from nse_tf import demo_data  # pylint: disable=g-import-not-at-top
  train_x, train_y, val_x, val_y = demo_data.load_demo("demo_digits")
  grey = lambda x: x[..., 0]
  hold_idx, fit_idx = _split_stratified(train_y, NUM_HOLDOUT_PART / NUM_TRAIN,
                                        np.random.default_rng(20261130))
  parts = [render(grey(train_x[hold_idx]), train_y[hold_idx], NUM_HOLDOUT_PART, seed=11),
           render(grey(train_x[fit_idx]), train_y[fit_idx], NUM_TRAIN - NUM_HOLDOUT_PART,
                  seed=12)]
  tr_x = np.concatenate([p[0] for p in parts])
  tr_y = np.concatenate([p[1] for p in parts])
  va_x, va_y = render(grey(val_x), val_y, NUM_VALIDATION, seed=13)
  for a in (tr_x, tr_y, va_x, va_y):
    a.setflags(write=False)
  return tr_x, tr_y, va_x, va_y
