"""EfficientNet-style image augmentation for retraining: tf-models' RandAugment/AutoAugment.

`nse_tf.data` pipelines yield images already cropped, resized, flipped and normalised with
the ImageNet mean/std. tf-models' policies work on uint8 pixels, so `batch_augmenter`
returns a function for `Dataset.map` on those batches that undoes the normalisation,
applies the policy to every image of the batch, and normalises again.

The policies use TensorFlow's stateful random ops: a run with augmentation is not
bit-reproducible across a kill and resume (the plain pipelines are).
"""

from __future__ import annotations

from typing import Callable, Optional

import tensorflow as tf

from nse_tf import data as data_lib

POLICIES = ("none", "randaugment", "autoaugment")


def make_policy(name: str, randaug_layers: int = 2, randaug_magnitude: float = 9.0):
  """tf-models' augmenter for `name` ('randaugment' | 'autoaugment'), or None for 'none'."""
  if name not in POLICIES:
    raise ValueError(f"augment must be one of {', '.join(POLICIES)}, got {name!r}")
  if name == "none":
    return None
  from official.vision.ops import augment  # pylint: disable=g-import-not-at-top
  if name == "randaugment":
    return augment.RandAugment(num_layers=randaug_layers, magnitude=randaug_magnitude)
  return augment.AutoAugment(augmentation_name="v0")


def batch_augmenter(name: str, randaug_layers: int = 2, randaug_magnitude: float = 9.0
                    ) -> Optional[Callable]:
  """fn(images [B,S,S,3] normalised float32, labels) -> same, augmented; None for 'none'."""
  policy = make_policy(name, randaug_layers, randaug_magnitude)
  if policy is None:
    return None
  mean = tf.constant(data_lib.IMAGENET_MEAN_RGB, tf.float32)
  std = tf.constant(data_lib.IMAGENET_STDDEV_RGB, tf.float32)

  def one(image):
    pixels = tf.cast(tf.clip_by_value(tf.round(image * std + mean), 0.0, 255.0), tf.uint8)
    return tf.cast(policy.distort(pixels), tf.float32)

  def fn(images, labels):
    out = tf.map_fn(one, images, fn_output_signature=tf.TensorSpec(images.shape[1:], tf.float32))
    return (out - mean) / std, labels

  return fn
