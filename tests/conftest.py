"""Shared test set-up: quiet TensorFlow, let absl flags coexist with pytest's argv."""

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")

from absl import flags  # noqa: E402

# absl would otherwise try to parse pytest's command line ("Unknown command line flag").
flags.FLAGS(["pytest"], known_only=True)
