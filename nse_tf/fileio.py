"""Writing files and folders so that a crash, a kill or a full disk never leaves half of one.

Every output of the project goes through here (no TensorFlow import):
  atomic_write(path, write)   a temp file in the same folder, fsync, rename; the temp file
                              is removed on any failure, so the old file (if any) survives
  atomic_write_text / atomic_write_bytes
  atomic_directory(final)     a temp folder that becomes `final` in one rename on success
  read_jsonl(path)            an append-only JSON-lines log, without lines cut by a kill
  append_jsonl(path, record)  one record appended as a line of its own
  load_json(path, error, fix) a JSON object, or one `error` naming the file and the fix
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from typing import Any, Callable, Dict, Iterator, List, Type


def _umask() -> int:
  mask = os.umask(0o022)
  os.umask(mask)
  return mask


def atomic_write(path: str, write: Callable[[Any], None], binary: bool = False,
                 makedirs: bool = True) -> str:
  """Calls write(file) on a temp file next to `path`, then renames it onto `path`.

  The file gets the usual mode (0666 less the umask), not mkstemp's 0600. makedirs=False:
  a missing folder is a FileNotFoundError (nothing is created).
  """
  path = os.fspath(path)
  directory = os.path.dirname(os.path.abspath(path))
  if makedirs:
    os.makedirs(directory, exist_ok=True)
  fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.", suffix=".tmp", dir=directory)
  try:
    with os.fdopen(fd, "wb" if binary else "w", **({} if binary else {"encoding": "utf-8"})) as f:
      write(f)
      f.flush()
      os.fsync(f.fileno())
    os.chmod(tmp, 0o666 & ~_umask())
    os.replace(tmp, path)
  except BaseException:
    with contextlib.suppress(OSError):   # never leave a half-written temp file behind
      os.unlink(tmp)
    raise
  return path


def atomic_write_text(path: str, text: str) -> str:
  """Writes `text` (UTF-8) to `path` through a temp file in the same folder."""
  return atomic_write(path, lambda f: f.write(text))


def atomic_write_bytes(path: str, payload: bytes) -> str:
  """Writes `payload` to `path` through a temp file in the same folder."""
  return atomic_write(path, lambda f: f.write(payload), binary=True)


@contextlib.contextmanager
def atomic_directory(final: str, replace: bool = False) -> Iterator[str]:
  """Yields a temp folder next to `final`; on success it is renamed to `final`.

  replace=False: an existing `final` is an error (the rename refuses a non-empty folder).
  replace=True: an existing `final` is removed just before the rename. On any failure the
  temp folder is removed and `final` is left as it was.
  """
  final = os.path.abspath(os.fspath(final))
  parent = os.path.dirname(final)
  os.makedirs(parent, exist_ok=True)
  tmp = os.path.join(parent, f".{os.path.basename(final)}.tmp{os.getpid()}")
  shutil.rmtree(tmp, ignore_errors=True)
  try:
    os.makedirs(tmp)
    yield tmp
    if replace and os.path.exists(final):
      shutil.rmtree(final)
    os.rename(tmp, final)
  finally:
    shutil.rmtree(tmp, ignore_errors=True)


def read_jsonl(path: str) -> List[Any]:
  """The records of an append-only JSON-lines log. A line cut short by a kill (or any other
  line that is not JSON) is skipped, and the records after it are still read."""
  records = []
  if os.path.exists(path):
    with open(path, encoding="utf-8") as f:
      for line in f:
        try:
          records.append(json.loads(line))
        except json.JSONDecodeError:
          continue
  return records


def append_jsonl(path: str, record: Any) -> None:
  """Appends `record` as one line. After a line cut short by a kill (no newline at the end
  of the file) it starts a new line first, so that the record is not glued to the cut one
  and lost with it."""
  with open(path, "a+b") as f:
    end = f.seek(0, os.SEEK_END)
    torn = False
    if end:
      f.seek(end - 1)
      torn = f.read(1) != b"\n"
    f.write((("\n" if torn else "") + json.dumps(record) + "\n").encode("utf-8"))


def load_json(path: str, error: Type[Exception], fix: str) -> Dict[str, Any]:
  """A JSON object from `path`; a corrupt or non-object file raises `error` saying `fix`."""
  try:
    with open(path, encoding="utf-8") as f:
      data = json.load(f)
  except json.JSONDecodeError as e:
    raise error(f"{path} is corrupt ({e}); {fix}") from None
  except UnicodeDecodeError as e:
    raise error(f"{path} is not a text file ({e.reason}); {fix}") from None
  if not isinstance(data, dict):
    raise error(f"{path} holds a JSON {type(data).__name__}, not an object; {fix}")
  return data
