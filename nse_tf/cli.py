"""Shared plumbing for the command-line programs: one clear line per user error."""

from __future__ import annotations

import errno
import os
import re
import sys
from typing import Callable, Optional, Sequence

from absl import app, flags

from nse_tf.errors import NSEError, UsageError  # noqa: F401  (UsageError: cli.UsageError)


def user_errors():
  """Exception types that are the user's input, not a bug: printed as one line.

  Every library error derives from `errors.NSEError`; FloatingPointError is a diverged
  run (NaN loss), reported with the flag to change.
  """
  return (NSEError, FileNotFoundError, PermissionError, FloatingPointError)


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
        first = re.sub(r"^\{\{[^}]*\}\}\s*", "", first)   # TF's "{{function_node …}}"
        if len(first) > 300:
          first = first[:300] + "…"
        if text not in first:        # a long path pushed the reason past the cut
          first = f"{text}: {first}"
        return f"{first}; {_hint(text.lower())}"
  return None


_LOST_WORKER_TEXTS = ("Connection reset by peer", "Failed to connect", "failed to connect",
                      "tasks have crashed", "Socket closed", "Connection refused")


def lost_worker_error(e: BaseException) -> Optional[str]:
  """One line for a multi-worker run whose peer went away (killed, preempted), or None.

  MultiWorkerMirroredStrategy's collectives then fail with UnavailableError (or the
  coordination service's error) on every surviving worker, within seconds.
  """
  tf = sys.modules.get("tensorflow")
  errors = getattr(tf, "errors", None)
  if errors is None or not isinstance(e, (errors.UnavailableError, errors.AbortedError,
                                          errors.InternalError)):
    return None
  message = str(getattr(e, "message", e))
  if not any(text in message for text in _LOST_WORKER_TEXTS):
    return None
  tasks = sorted(set(re.findall(r"/job:(\w+)/replica:\d+/task:(\d+)", message)))
  who = ", ".join(f"{job} {task}" for job, task in tasks) or "another worker"
  return (f"lost contact with {who} of the cluster (it stopped or is unreachable); this "
          "worker stops too. Re-run the same command on every worker (same flags, same "
          "TF_CONFIG) to resume from the last checkpoint")


def call(main: Callable[..., int | None], argv: Sequence[str], *args) -> int:
  """main(argv, *args) as the shell runs it: a user error or a refused write becomes one
  'error: …' line on stderr and status 2; returns the exit status."""
  try:
    return main(argv, *args) or 0
  except user_errors() as e:  # pylint: disable=catching-non-exception
    message = disk_error(e) or str(e)
  except Exception as e:  # pylint: disable=broad-except
    message = disk_error(e) or lost_worker_error(e)
    if message is None:
      raise
  print(f"error: {message}", file=sys.stderr)
  return 2


def run(main: Callable[..., int | None],
        define_flags: Optional[Callable[[flags.FlagValues], None]] = None) -> None:
  """absl's app.run, with user errors printed as 'error: …' and exit status 2.

  `define_flags(flag_values)` defines the command's flags (called here, not at import,
  so that importing a command's module defines nothing); they are made the key flags
  of the program, so that `--help` lists them also when the program is a console
  script (whose main module is not the command's module).
  """
  os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
  if define_flags is not None:
    define_flags(flags.FLAGS)
    for name in flag_names(define_flags):
      flags.FLAGS.register_key_flag_for_module(sys.argv[0], flags.FLAGS[name])

  def wrapped(argv):
    if len(argv) > 1:
      raise app.UsageError(f"unexpected positional arguments: {' '.join(argv[1:])}")
    code = call(main, argv)
    if code:
      sys.exit(code)
    return 0

  app.run(wrapped, flags_parser=_parse_flags_or_exit)


def _parse_flags_or_exit(argv):
  """absl's flag parsing for app.run, a bad flag (unknown, bad value, missing flagfile)
  printed as one 'error: …' line with exit status 1, as `invoke` does (absl's own
  parser prints 'FATAL Flags parsing error' and a second line)."""
  try:
    return flags.FLAGS(argv)
  except flags.Error as e:
    print(f"error: {_flag_error(e)}", file=sys.stderr)
    sys.exit(1)


def _flag_error(e: Exception) -> str:
  """absl's flag error text without its 'ERROR::' prefix (e.g. a missing flagfile)."""
  return str(e).replace("ERROR:: ", "", 1).strip()


def flag_names(define_flags: Callable[[flags.FlagValues], None]) -> list:
  """The names of the flags that `define_flags` defines (the command's own, sorted)."""
  scratch = flags.FlagValues()
  define_flags(scratch)
  return sorted(scratch)


def parse(define_flags: Callable[[flags.FlagValues], None], argv: Sequence[str],
          program: str = "nse") -> flags.FlagValues:
  """The command's flags, on their own FlagValues, parsed from `argv` (no program name).

  For running a command inside another program (tests, notebooks): nothing touches
  absl's global FLAGS, so several commands can be used in one process.
  """
  flag_values = flags.FlagValues()
  define_flags(flag_values)
  rest = flag_values([program, *argv])
  if len(rest) > 1:
    raise UsageError(f"unexpected positional arguments: {' '.join(rest[1:])}")
  return flag_values


def invoke(define_flags: Callable[[flags.FlagValues], None],
           main: Callable[..., int | None], argv: Sequence[str]) -> int:
  """Runs a command in this process as its shell command would: the exit status.

  Flags are parsed into their own FlagValues (see `parse`) and handed to
  `main(argv, flag_values)`; a bad flag or a user error prints one 'error: …' line on
  stderr (status 1 for flag syntax, as absl's, 2 otherwise).
  """
  try:
    flag_values = parse(define_flags, argv)
  except (flags.Error, UsageError) as e:
    print(f"error: {_flag_error(e)}", file=sys.stderr)
    return 1
  return call(main, [sys.argv[0]], flag_values)
