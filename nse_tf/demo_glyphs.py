"""demo_glyphs: 26 letters from the fonts that ship with matplotlib, distorted at 16x16.

A candidate proxy task with more detail than scikit-learn's 8x8 digits: the capital
letters A-Z, each drawn by Pillow's FreeType renderer from one of 21 text fonts bundled in
matplotlib's `mpl-data/fonts/ttf` (DejaVu Sans, Sans Mono and Serif and STIX General, each
regular, bold, italic and bold italic; Computer Modern roman, bold, sans, italic and
typewriter) into a 24x24 grey glyph, then into a 16x16 RGB image with the distortions of
demo_digits_hard (`demo_digits_hard.render`: rotation ±25°, scale, shear, shift, a fainter
fragment of another glyph behind it, random colours, pixel noise), so that a letter is
about 10-15 pixels tall as the digits are there.

Splits. 12,000 train images (the first 2,400, the default held-out part, rendered with
their own seed) and 2,000 validation images, all from the same 546 glyphs (21 fonts × 26
letters) with independent distortions: this is a task about letters under distortion,
not about fonts never seen.

Deterministic: the fonts are files of the installed matplotlib, rendered without hinting
differences between runs; seeded numpy and scipy for the rest; about 2 s once per process.
"""

from __future__ import annotations

import functools
import os
from typing import List, Tuple

import numpy as np

from nse_tf import demo_data
from nse_tf import errors

SIZE = 16
GLYPH = 24                       # grey glyph canvas; the letter is ~14 px tall there
FONT_PX = 19
ZOOM = 0.5                       # × demo_digits_hard's 1.5-2.2 → letters ~10-15 px tall
LETTERS = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"
FONTS = (
    "DejaVuSans.ttf", "DejaVuSans-Bold.ttf", "DejaVuSans-Oblique.ttf",
    "DejaVuSans-BoldOblique.ttf", "DejaVuSansMono.ttf", "DejaVuSansMono-Bold.ttf",
    "DejaVuSansMono-Oblique.ttf", "DejaVuSansMono-BoldOblique.ttf", "DejaVuSerif.ttf",
    "DejaVuSerif-Bold.ttf", "DejaVuSerif-Italic.ttf", "DejaVuSerif-BoldItalic.ttf",
    "STIXGeneral.ttf", "STIXGeneralBol.ttf", "STIXGeneralItalic.ttf", "STIXGeneralBolIta.ttf",
    "cmr10.ttf", "cmb10.ttf", "cmss10.ttf", "cmti10.ttf", "cmtt10.ttf")
NUM_TRAIN = 12_000
NUM_HOLDOUT_PART = 2_400         # = data.DEMO_HOLDOUT_FRACTION of NUM_TRAIN
NUM_VALIDATION = 2_000


def font_dir() -> str:
  import matplotlib  # pylint: disable=g-import-not-at-top
  return os.path.join(os.path.dirname(matplotlib.__file__), "mpl-data", "fonts", "ttf")


@functools.lru_cache(maxsize=None)
def glyphs() -> Tuple[np.ndarray, np.ndarray]:
  """[21 × 26, GLYPH, GLYPH] uint8 grey letters, centred on their ink, and labels 0-25."""
  from PIL import Image, ImageDraw, ImageFont  # pylint: disable=g-import-not-at-top
  folder = font_dir()
  missing = [f for f in FONTS if not os.path.exists(os.path.join(folder, f))]
  if missing:
    raise errors.NSEError(f"demo_glyphs needs matplotlib's bundled fonts; {folder} lacks "
                           f"{', '.join(missing)}: reinstall matplotlib (pip install "
                           "--force-reinstall matplotlib)")
  images: List[np.ndarray] = []
  for name in FONTS:
    font = ImageFont.truetype(os.path.join(folder, name), FONT_PX)
    for ch in LETTERS:
      im = Image.new("L", (GLYPH, GLYPH), 0)
      draw = ImageDraw.Draw(im)
      left, top, right, bottom = draw.textbbox((0, 0), ch, font=font)
      draw.text(((GLYPH - (right - left)) / 2 - left, (GLYPH - (bottom - top)) / 2 - top), ch,
                fill=255, font=font)
      images.append(np.asarray(im, np.uint8))
  labels = np.tile(np.arange(len(LETTERS), dtype=np.int32), len(FONTS))
  return np.stack(images), labels


@functools.lru_cache(maxsize=None)
def load() -> Tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
  """(train_images, train_labels, val_images, val_labels), read-only; see the module doc."""
  from nse_tf import demo_digits_hard  # pylint: disable=g-import-not-at-top
  base, labels = glyphs()
  parts = [demo_digits_hard.render(base, labels, NUM_HOLDOUT_PART, seed=21, zoom=ZOOM),
           demo_digits_hard.render(base, labels, NUM_TRAIN - NUM_HOLDOUT_PART, seed=22,
                                   zoom=ZOOM)]
  tr_x = np.concatenate([p[0] for p in parts])
  tr_y = np.concatenate([p[1] for p in parts])
  va_x, va_y = demo_digits_hard.render(base, labels, NUM_VALIDATION, seed=23, zoom=ZOOM)
  return demo_data._readonly(tr_x, tr_y, va_x, va_y)  # pylint: disable=protected-access
