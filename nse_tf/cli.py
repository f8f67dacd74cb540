"""Shared plumbing for the command-line programs: one clear line per user error."""

from __future__ import annotations

import errno
import os
import sys
from typing import Callable, Optional, Sequence

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


_DISK_ERRNOS = (errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM,
                errno.ENOTDIR, errno.EISDIR, errno.EFBIG)
# TensorFlow's file system layer reports these errno texts inside an OpError.
_DISK_TEXTS = ("No space left on device", "Disk quota exceeded", "Read-only file system",
               "Permission denied", "Not a directory", "File too large")


def _hint(text: str) -> str:
  if "space" in text or "quota" in text or "too large" in text:
    return ("free some space (or point the run at a bigger disk), then run the same "
            "command again: it continues from what was written")
  return "make the path writable or choose another directory"


def disk_error(e: BaseException) -> Optional[str]:
  """One line for a write that the filesystem refused (full disk, read-only, ...), or None.

  Covers Python's OSError and TensorFlow's OpError (checkpoints, SavedModels and
  summaries are written by TensorFlow's C++ file system, which raises its own types,
  e.g. ResourceExhaustedError for a full disk).
  """
  if isinstance(e, OSError) and e.errno in _DISK_ERRNOS:
    where = f"{e.filename}: " if e.filename else ""
    return f"{where}{e.strerror}; {_hint(e.strerror or '')}"
  tf = sys.modules.get("tensorflow")
  errors = getattr(tf, "errors", None)
  if errors is not None and isinstance(e, errors.OpError):
    message = str(getattr(e, "message", e))
    for text in _DISK_TEXTS:
      if text in message:
        first = message.strip().splitlines()[0] if message.strip() else text
        if len(first) > 300:
          first = first[:300] + "…"
        return f"{first}; {_hint(text.lower())}"
  return None


def run(main: Callable[[Sequence[str]], int | None]) -> None:
  """absl's app.run, with user errors printed as 'error: …' and exit status 2."""
  os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

  def wrapped(argv):
    if len(argv) > 1:
      raise app.UsageError(f"unexpected positional arguments: {' '.join(argv[1:])}")
    try:
      return main(argv)
    except user_errors() as e:  # pylint: disable=catching-non-exception
      message = disk_error(e) or str(e)
      print(f"error: {message}", file=sys.stderr)
      sys.exit(2)
    except Exception as e:  # pylint: disable=broad-except
      message = disk_error(e)
      if message is None:
        raise
      print(f"error: {message}", file=sys.stderr)
      sys.exit(2)

  app.run(wrapped)
