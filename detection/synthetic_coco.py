"""A small synthetic detection data set in exactly the COCO 2017 layout (no download).

  python detection/synthetic_coco.py --output_dir=runs/synthetic_coco      # ~20 s

Images of filled shapes (circle, square, triangle, diamond, cross, ring: the first
`--num_classes`) in random colours and sizes on textured backgrounds (smooth colour
fields, noise, distracting strokes), deterministic for a seed. Writes

  OUTPUT_DIR/images/{train2017,val2017}/000000000001.jpg ...
  OUTPUT_DIR/annotations/instances_{train2017,val2017}.json   COCO instances (pycocotools)
  OUTPUT_DIR/tfrecords/{train,val}-00000-of-0000N.tfrecord     tf-models' layout

The TFRecords are made by tf-models' own `create_coco_tf_record.create_tf_example` from
the JPEGs and the instances JSON, so they are exactly what tf-models writes for COCO.
Every file is staged in OUTPUT_DIR/.staging and renamed into place; the manifest
`synthetic_coco.json` is written last. Re-running with the same settings finds the
manifest and does nothing; other settings are refused unless --overwrite.
"""

from __future__ import annotations

import io
import json
import os
import shutil
from typing import Dict, List, Sequence, Tuple

import numpy as np
from PIL import Image, ImageDraw

from nse_tf import fileio
from nse_tf import cli
from nse_tf import errors

SHAPES = ("circle", "square", "triangle", "diamond", "cross", "ring")
SPLITS = (("train", "train2017"), ("val", "val2017"))
MANIFEST = "synthetic_coco.json"
FORMAT_VERSION = 1


class SyntheticDataError(errors.UsageError):
  """Bad generator settings or an output directory holding something else."""


def _background(rng: np.random.Generator, size: int) -> np.ndarray:
  """Smooth colour field + fine noise + a few distracting strokes, float32 [0, 255]."""
  grid = rng.uniform(40, 215, (4, 4, 3)).astype(np.float32)
  field = np.asarray(Image.fromarray(grid.astype(np.uint8)).resize((size, size),
                                                                   Image.BILINEAR),
                     np.float32)
  field += rng.normal(0, 12, (size, size, 3)).astype(np.float32)
  img = Image.fromarray(np.clip(field, 0, 255).astype(np.uint8))
  draw = ImageDraw.Draw(img)
  for _ in range(rng.integers(2, 6)):
    pts = [tuple(rng.uniform(0, size, 2)) for _ in range(2)]
    draw.line(pts, fill=tuple(int(c) for c in rng.integers(0, 256, 3)),
              width=int(rng.integers(1, 3)))
  return np.asarray(img, np.float32)


def _shape_mask(shape: str, size: int, box: Tuple[int, int, int, int]) -> np.ndarray:
  """Boolean mask of one filled shape inside box (x0, y0, x1, y1), exclusive ends."""
  x0, y0, x1, y1 = box
  w, h = x1 - x0, y1 - y0
  m = Image.new("L", (size, size), 0)
  d = ImageDraw.Draw(m)
  last = (x1 - 1, y1 - 1)
  if shape == "circle":
    d.ellipse([x0, y0, *last], fill=255)
  elif shape == "square":
    d.rectangle([x0, y0, *last], fill=255)
  elif shape == "triangle":
    d.polygon([(x0 + w / 2, y0), (x0, y1 - 1), (x1 - 1, y1 - 1)], fill=255)
  elif shape == "diamond":
    d.polygon([(x0 + w / 2, y0), (x1 - 1, y0 + h / 2), (x0 + w / 2, y1 - 1),
               (x0, y0 + h / 2)], fill=255)
  elif shape == "cross":
    t = max(2, w // 3)
    d.rectangle([x0 + (w - t) // 2, y0, x0 + (w - t) // 2 + t - 1, y1 - 1], fill=255)
    t = max(2, h // 3)
    d.rectangle([x0, y0 + (h - t) // 2, x1 - 1, y0 + (h - t) // 2 + t - 1], fill=255)
  elif shape == "ring":
    d.ellipse([x0, y0, *last], fill=255)
    t = max(2, min(w, h) // 4)
    d.ellipse([x0 + t, y0 + t, x1 - 1 - t, y1 - 1 - t], fill=0)
  return np.asarray(m) > 0


def make_image(seed: int, split: int, index: int, image_size: int, num_classes: int,
               max_objects: int = 4, min_frac: float = 0.2, max_frac: float = 0.55):
  """One image (uint8 HxWx3) and its objects [(category_id, (x, y, w, h), area)].

  Objects are placed one by one; a new one may not cover more than 30 % of an earlier
  one, so every annotated object stays visible.
  """
  rng = np.random.default_rng([seed, split, index])
  img = _background(rng, image_size)
  masks, objects = [], []
  for _ in range(int(rng.integers(1, max_objects + 1))):
    for _attempt in range(10):
      cls = int(rng.integers(0, num_classes))
      w = int(rng.uniform(min_frac, max_frac) * image_size)
      h = int(np.clip(w * rng.uniform(0.75, 1.33), min_frac * image_size,
                      max_frac * image_size))
      x0 = int(rng.integers(0, image_size - w + 1))
      y0 = int(rng.integers(0, image_size - h + 1))
      mask = _shape_mask(SHAPES[cls], image_size, (x0, y0, x0 + w, y0 + h))
      if all((mask & m).sum() <= 0.3 * m.sum() for m in masks):
        break
    else:
      continue
    colour = rng.uniform(0, 255, 3).astype(np.float32)
    texture = rng.normal(0, 10, (image_size, image_size, 3)).astype(np.float32)
    img[mask] = np.clip(colour + texture[mask], 0, 255)
    for m in masks:  # earlier objects lose the pixels the new one covers
      m &= ~mask
    masks.append(mask)
    objects.append(cls + 1)
  out = []
  for cls, m in zip(objects, masks):
    ys, xs = np.nonzero(m)
    if len(xs) == 0:
      continue
    x, y = int(xs.min()), int(ys.min())
    out.append((cls, (x, y, int(xs.max()) + 1 - x, int(ys.max()) + 1 - y), int(m.sum())))
  return img.astype(np.uint8), out


def _jpeg(img: np.ndarray) -> bytes:
  buf = io.BytesIO()
  Image.fromarray(img).save(buf, format="JPEG", quality=95)
  return buf.getvalue()


def settings_dict(num_train: int, num_val: int, image_size: int, num_classes: int, seed: int,
                  train_shards: int) -> Dict[str, int]:
  return dict(version=FORMAT_VERSION, num_train=num_train, num_val=num_val,
              image_size=image_size, num_classes=num_classes, seed=seed,
              train_shards=train_shards)


def check_settings(num_train: int, num_val: int, image_size: int, num_classes: int,
                   train_shards: int) -> None:
  if num_train < 1 or num_val < 1:
    raise SyntheticDataError(f"--num_train and --num_val must be >= 1, got {num_train}, "
                             f"{num_val}")
  if not 64 <= image_size <= 2048:
    raise SyntheticDataError(f"--image_size must be in 64..2048, got {image_size}")
  if not 1 <= num_classes <= len(SHAPES):
    raise SyntheticDataError(f"--num_classes must be in 1..{len(SHAPES)} "
                             f"({', '.join(SHAPES)}), got {num_classes}")
  if not 1 <= train_shards <= num_train:
    raise SyntheticDataError(f"--train_shards must be in 1..num_train ({num_train}), "
                             f"got {train_shards}")


def paths(output_dir: str) -> Dict[str, str]:
  """Where the generator puts things (used by configs and tests)."""
  return dict(
      train_tfrecords=os.path.join(output_dir, "tfrecords", "train*"),
      val_tfrecords=os.path.join(output_dir, "tfrecords", "val*"),
      train_annotations=os.path.join(output_dir, "annotations", "instances_train2017.json"),
      val_annotations=os.path.join(output_dir, "annotations", "instances_val2017.json"),
      manifest=os.path.join(output_dir, MANIFEST))


def generate(output_dir: str, num_train: int = 512, num_val: int = 64, image_size: int = 128,
             num_classes: int = 3, seed: int = 0, train_shards: int = 2,
             overwrite: bool = False) -> Dict[str, str]:
  """Writes the data set (see the module docstring); returns `paths(output_dir)`."""
  check_settings(num_train, num_val, image_size, num_classes, train_shards)
  settings = settings_dict(num_train, num_val, image_size, num_classes, seed, train_shards)
  where = paths(output_dir)
  if os.path.exists(where["manifest"]):
    try:
      with open(where["manifest"], encoding="utf-8") as f:
        existing = json.load(f).get("settings")
    except (OSError, ValueError):
      existing = None
    if existing == settings:
      return where
    if not overwrite:
      raise SyntheticDataError(
          f"{output_dir} already holds a synthetic data set made with other settings "
          f"({existing}); pass --overwrite or choose another --output_dir")
  # Imported here: tf-models' converter pulls in TensorFlow and pycocotools.
  from official.vision.data import create_coco_tf_record  # pylint: disable=g-import-not-at-top
  from official.vision.data import tfrecord_lib  # pylint: disable=g-import-not-at-top

  try:
    os.makedirs(output_dir, exist_ok=True)
  except OSError as e:
    raise SyntheticDataError(f"cannot create --output_dir {output_dir!r}: {e.strerror}") from None
  if os.path.exists(where["manifest"]):
    os.remove(where["manifest"])  # the old set is being replaced: no longer complete
  staging = os.path.join(output_dir, ".staging")
  shutil.rmtree(staging, ignore_errors=True)
  categories = [{"id": i + 1, "name": SHAPES[i], "supercategory": "shape"}
                for i in range(num_classes)]
  counts = {}
  for split_id, ((split, folder), count) in enumerate(zip(SPLITS, (num_train, num_val))):
    image_dir = os.path.join(staging, "images", folder)
    os.makedirs(image_dir)
    images, annotations = [], []
    for i in range(count):
      image_id = i + 1
      img, objects = make_image(seed, split_id, i, image_size, num_classes)
      name = f"{image_id:012d}.jpg"
      with open(os.path.join(image_dir, name), "wb") as f:
        f.write(_jpeg(img))
      images.append({"id": image_id, "file_name": name, "height": image_size,
                     "width": image_size, "license": 0, "coco_url": "", "flickr_url": "",
                     "date_captured": ""})
      for cls, (x, y, w, h), area in objects:
        annotations.append({"id": len(annotations) + 1, "image_id": image_id,
                            "category_id": cls, "bbox": [x, y, w, h], "area": area,
                            "iscrowd": 0,
                            "segmentation": [[x, y, x + w, y, x + w, y + h, x, y + h]]})
    instances = {"info": {"description": "nse-tf synthetic shapes (COCO layout)",
                          "version": "1.0", "year": 2026},
                 "licenses": [{"id": 0, "name": "generated", "url": ""}],
                 "images": images, "annotations": annotations, "categories": categories}
    ann_path = os.path.join(staging, "annotations", f"instances_{folder}.json")
    fileio.atomic_write_text(ann_path, json.dumps(instances))
    # tf-models' own converter, exactly as create_coco_tf_record.py runs it.
    by_image: Dict[int, List[dict]] = {}
    for a in annotations:
      by_image.setdefault(a["image_id"], []).append(a)
    id_to_name = {c["id"]: c["name"] for c in categories}
    records = create_coco_tf_record.generate_annotations(
        images=images, image_dirs=[image_dir], img_to_obj_annotation=by_image,
        id_to_name_map=id_to_name)
    os.makedirs(os.path.join(staging, "tfrecords"), exist_ok=True)
    shards = train_shards if split == "train" else 1
    tfrecord_lib.write_tf_record_dataset(
        os.path.join(staging, "tfrecords", split), records,
        create_coco_tf_record.create_tf_example, shards, multiple_processes=0)
    counts[split] = dict(images=count, objects=len(annotations))
  # Move everything into place, then write the manifest that marks the set complete.
  for root, _, files in os.walk(staging):
    for name in files:
      src = os.path.join(root, name)
      dst = os.path.join(output_dir, os.path.relpath(src, staging))
      os.makedirs(os.path.dirname(dst), exist_ok=True)
      os.replace(src, dst)
  shutil.rmtree(staging, ignore_errors=True)
  for split, folder in SPLITS:  # drop shards of an earlier, differently sharded set
    for name in os.listdir(os.path.join(output_dir, "tfrecords")):
      if name.startswith(split + "-") and not name.endswith(
          f"-of-{(train_shards if split == 'train' else 1):05d}.tfrecord"):
        os.remove(os.path.join(output_dir, "tfrecords", name))
  fileio.atomic_write_text(where["manifest"], json.dumps(
      {"settings": settings, "counts": counts, "categories": categories}, indent=1))
  return where


def main(argv: Sequence[str]) -> int:
  del argv
  from absl import logging  # pylint: disable=g-import-not-at-top
  logging.set_verbosity(logging.WARNING)  # tf-models' writer logs every 100 images
  FLAGS = flags.FLAGS  # pylint: disable=invalid-name
  if not FLAGS.output_dir:
    raise SyntheticDataError("--output_dir is required")
  where = generate(FLAGS.output_dir, FLAGS.num_train, FLAGS.num_val, FLAGS.image_size,
                   FLAGS.num_classes, FLAGS.seed, FLAGS.train_shards, FLAGS.overwrite)
  with open(where["manifest"], encoding="utf-8") as f:
    counts = json.load(f)["counts"]
  print(f"synthetic COCO in {FLAGS.output_dir}: train {counts['train']['images']} images / "
        f"{counts['train']['objects']} objects, val {counts['val']['images']} images / "
        f"{counts['val']['objects']} objects, {FLAGS.num_classes} classes, "
        f"{FLAGS.image_size}x{FLAGS.image_size}")
  for k in ("train_tfrecords", "val_tfrecords", "val_annotations"):
    print(f"  {k}: {where[k]}")
  return 0


if __name__ == "__main__":
  from absl import flags  # pylint: disable=g-import-not-at-top
  flags.DEFINE_string("output_dir", None, "Where to write the data set.")
  flags.DEFINE_integer("num_train", 512, "Training images.")
  flags.DEFINE_integer("num_val", 64, "Validation images.")
  flags.DEFINE_integer("image_size", 128, "Square image size in pixels.")
  flags.DEFINE_integer("num_classes", 3, f"Shape classes, the first N of {', '.join(SHAPES)}.")
  flags.DEFINE_integer("seed", 0, "Seed: the same seed gives the same bytes.")
  flags.DEFINE_integer("train_shards", 2, "TFRecord shards of the training split.")
  flags.DEFINE_bool("overwrite", False, "Replace a data set made with other settings.")
  cli.run(main)
