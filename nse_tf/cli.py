"""Shared plumbing for the command-line programs: one clear line per user error."""

from __future__ import annotations

import os
import sys
from typing import Callable, Sequence

from absl import app


class UsageError(ValueError):
  """A bad flag value or combination, reported without a traceback."""


def user_errors():
  """Exception types that are the user's input, not a bug: printed as one line."""
  from nse_tf.arch import ArchitectureError  # pylint: disable=g-import-not-at-top
  from nse_tf.spaces import SpaceError  # pylint: disable=g-import-not-at-top
  # FloatingPointError: a diverged run (NaN loss), reported with the flag to change.
  errors = [UsageError, ArchitectureError, SpaceError, FileNotFoundError, PermissionError,
            FloatingPointError]
  # Only from modules already loaded: they import TensorFlow.
  for module, name in (("nse_tf.data", "DataError"), ("nse_tf.trainer", "ConfigError"),
                       ("nse_tf.evolution", "SearchError"),
                       ("nse_tf.distribute", "StrategyError")):
    mod = sys.modules.get(module)
    if mod is not None and hasattr(mod, name):
      errors.append(getattr(mod, name))
  return tuple(errors)


def run(main: Callable[[Sequence[str]], int | None]) -> None:
  """absl's app.run, with user errors printed as 'error: …' and exit status 2."""
  os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

  def wrapped(argv):
    if len(argv) > 1:
      raise app.UsageError(f"unexpected positional arguments: {' '.join(argv[1:])}")
    try:
      return main(argv)
    except user_errors() as e:  # pylint: disable=catching-non-exception
      print(f"error: {e}", file=sys.stderr)
      sys.exit(2)

  app.run(wrapped)
