"""One writer per run directory: an advisory OS lock held for the whole run.

Two processes writing one run directory (a search and its accidental second start, a
retrain launched twice) would each believe they own it and leave a silent mixture of
both. Every command that writes a run directory therefore takes `acquire(dir)` first,
before it writes or deletes anything there, and keeps it until the process ends.

The lock is `fcntl.flock` on `DIR/.lock`, not the file's existence: the kernel drops
it when the holder dies, however it dies (SIGKILL, OOM killer, a reboot), so a killed
run never leaves a stale lock that blocks its own resumption. The file only carries
who holds it (pid, host, start time, command) for the refusal message; a holder that
ends normally empties it, so a non-empty file found unlocked means the last holder
died, which is noted when the next run takes over. flock works on local filesystems
and on NFS (Linux emulates it with NFS byte-range locks); on a filesystem without
locking the run says so and stops rather than run unprotected.
"""

from __future__ import annotations

import atexit
import datetime
import errno
import json
import os
import socket
import sys
from typing import Dict, Optional

from absl import logging

from nse_tf import errors

LOCK_NAME = ".lock"
_held: Dict[str, int] = {}   # realpath of the directory -> open descriptor holding the lock


class RunLockError(errors.NSEError):
  """The run directory is in use by another process (or cannot be locked)."""


def _describe(info: dict) -> str:
  parts = [f"pid {info.get('pid', '?')} on {info.get('host', '?')}"]
  if info.get("started"):
    parts.append(f"started {info['started']}")
  if info.get("command"):
    parts.append(f"command: {info['command']}")
  return ", ".join(parts)


def _read_info(fd: int) -> Optional[dict]:
  os.lseek(fd, 0, os.SEEK_SET)
  raw = b""
  while True:
    chunk = os.read(fd, 65536)
    if not chunk:
      break
    raw += chunk
  if not raw.strip():
    return None
  try:
    info = json.loads(raw.decode("utf-8", "replace"))
    return info if isinstance(info, dict) else {}
  except ValueError:
    return {}


def acquire(directory: str, what: str = "run") -> str:
  """Locks `directory` (created if needed) for this process; returns the lock file's path.

  Raises RunLockError naming the holder when another live process holds it. Taking a
  lock this process already holds is a no-op. The lock is released when the process
  exits (or by `release`).
  """
  import fcntl  # pylint: disable=g-import-not-at-top  (POSIX only)
  os.makedirs(directory, exist_ok=True)
  key = os.path.realpath(directory)
  path = os.path.join(directory, LOCK_NAME)
  if key in _held:
    return path
  fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
  try:
    try:
      fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as e:
      if e.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
        raise RunLockError(f"cannot lock {path} ({e.strerror}): this filesystem does not "
                           "support file locks; use a local or NFS directory") from None
      info = _read_info(fd) or {}
      raise RunLockError(
          f"{directory} is in use by another {info.get('what', what)} ({_describe(info)}); "
          f"wait for it to end (or stop it), or use another directory") from None
    previous = _read_info(fd)
    if previous is not None:
      logging.warning("%s: taking over the lock of %s, which is no longer running",
                      directory, _describe(previous))
    info = {"pid": os.getpid(), "host": socket.gethostname(), "what": what,
            "started": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
            "command": " ".join([os.path.basename(sys.executable)] + sys.argv)[:2000]}
    payload = (json.dumps(info) + "\n").encode("utf-8")
    os.ftruncate(fd, 0)
    os.lseek(fd, 0, os.SEEK_SET)
    os.write(fd, payload)
    os.fsync(fd)
  except BaseException:
    os.close(fd)
    raise
  _held[key] = fd
  return path


def release(directory: str) -> None:
  """Empties the lock file (a clean end, nothing to take over) and unlocks it."""
  fd = _held.pop(os.path.realpath(directory), None)
  if fd is None:
    return
  try:
    os.ftruncate(fd, 0)
  except OSError:
    pass   # a full or read-only filesystem: the next holder only logs a note
  finally:
    os.close(fd)     # closing the last descriptor drops the flock


def held(directory: str) -> bool:
  return os.path.realpath(directory) in _held


@atexit.register
def _release_all():
  for key in list(_held):
    release(key)
