"""demo_compass: in which of 8 directions does the ring lie from the plus? Generated, 16x16.

The search's CPU proxy task (flags/proxy.cfg), one whose answer needs spatial context. Each image holds two 3x3 marks,
a plus and a hollow square (the ring), 7-13 pixels apart, in random bright colours, on a
dark noisy background with a colour gradient and six short bright strokes (distractors of
the marks' size and colours). The label is the direction from the plus to the ring in 8
sectors of 45° (0 = east, counting anticlockwise: E, NE, N, NW, W, SW, S, SE); the angle is
drawn within ±20° of the sector's centre. No single mark says anything about the label:
a network must find both and relate their positions across up to 13 of the 16 pixels, so
receptive field and depth should matter more than on the digit and letter tasks, where a
glyph fills the image and every architecture of equal cost sees enough of it.

Measured before it was chosen (tiny macro at 16x16, random flops27 architectures of
250-300 MFLOPs, 600 SGD steps of 64; the README's Search quality section has the table):
ten random architectures of equal cost reach 88.70 ± 2.11 % and differ by 2.95 points (std)
where training seeds differ by 1.28.

Splits. 12,000 train images (the first 2,400 are the default held-out part) and 2,000
validation images, every image drawn independently (so the held-out and validation images
share nothing with the training images but the generator).

Deterministic: seeded numpy (PCG64) only; about 2 s once per process.
"""

from __future__ import annotations

import functools
from typing import Tuple

import numpy as np

from nse_tf import demo_data

SIZE = 16
NUM_TRAIN = 12_000
NUM_VALIDATION = 2_000
DIRECTIONS = ("E", "NE", "N", "NW", "W", "SW", "S", "SE")
MIN_DIST, MAX_DIST = 7.0, 13.0          # pixels between the marks' centres
JITTER = 20.0                           # degrees around the sector's centre (±22.5 wide)
DISTRACTORS = 6

PLUS = np.array([[0, 1, 0], [1, 1, 1], [0, 1, 0]], bool)
RING = np.array([[1, 1, 1], [1, 0, 1], [1, 1, 1]], bool)


def generate(num: int, seed: int, size: int = SIZE, min_dist: float = MIN_DIST,
             max_dist: float = MAX_DIST, jitter: float = JITTER,
             distractors: int = DISTRACTORS) -> Tuple[np.ndarray, np.ndarray]:
  """`num` images [num, size, size, 3] uint8 and their direction labels [num] int32."""
  rng = np.random.default_rng(seed)
  classes = len(DIRECTIONS)
  labels = rng.integers(0, classes, num).astype(np.int32)
  images = np.empty((num, size, size, 3), np.uint8)
  yy, xx = np.mgrid[0:size, 0:size] / (size - 1)
  for i in range(num):
    base = rng.uniform(0, 0.35, 3)
    slope = rng.uniform(-0.15, 0.15, 3)
    img = base + slope * (yy if rng.random() < 0.5 else xx)[..., None]
    angle = np.deg2rad(labels[i] * (360 / classes) + rng.uniform(-jitter, jitter))
    while True:   # both marks wholly inside the image (rows grow downwards: north is -y)
      dist = rng.uniform(min_dist, max_dist)
      ax, ay = rng.uniform(1, size - 2, 2)
      bx, by = ax + dist * np.cos(angle), ay - dist * np.sin(angle)
      if 1 <= bx <= size - 2 and 1 <= by <= size - 2:
        break
    for _ in range(distractors):         # short bright strokes of 2 pixels
      px, py = rng.integers(0, size - 1, 2)
      colour = rng.uniform(0.5, 1.0, 3)
      if rng.random() < 0.5:
        img[py, px:px + 2] = colour
      else:
        img[py:py + 2, px] = colour
    for mark, (x, y) in ((PLUS, (ax, ay)), (RING, (bx, by))):
      x, y = int(round(x)), int(round(y))
      img[y - 1:y + 2, x - 1:x + 2][mark] = rng.uniform(0.55, 1.0, 3)
    img = img + rng.normal(0, rng.uniform(0.03, 0.12), img.shape)
    images[i] = np.clip(img * 255, 0, 255).astype(np.uint8)
  return images, labels


@functools.lru_cache(maxsize=None)
def load() -> Tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
  """(train_images, train_labels, val_images, val_labels), read-only; see the module doc."""
  train_images, train_labels = generate(NUM_TRAIN, seed=1)
  val_images, val_labels = generate(NUM_VALIDATION, seed=2)
  return demo_data._readonly(train_images, train_labels, val_images, val_labels)  # pylint: disable=protected-access
