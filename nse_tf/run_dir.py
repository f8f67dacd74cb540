"""A command's output directory: resume only with the same settings; --overwrite clears it.

The search (`config.json`) and the retrain (`retrain_config.json`) record every resolved
setting at their first write. A later start in the same directory resumes only when the
settings that change the result are equal (`resume_free` names the others: progress bars,
checkpoint frequency, data location, strategy); otherwise it is refused with the
differences listed, before anything is written. --overwrite removes the command's own
outputs (and nothing else in the folder) after every check and before the first write.
"""

from __future__ import annotations

import os
import shutil
from typing import Any, Container, Dict, Sequence

from nse_tf import errors, fileio


def refuse_changed_config(out: str, config_name: str, config: Dict[str, Any],
                          resume_free: Container[str], what: str) -> None:
  """Raises UsageError when out/config_name records other result-changing settings."""
  path = os.path.join(out, config_name)
  if not os.path.exists(path):
    return
  old = fileio.load_json(path, errors.UsageError,
                         "delete it, or use --overwrite to start over")
  diff = sorted(k for k in set(old) | set(config)
                if k not in resume_free and old.get(k) != config.get(k))
  if diff:
    details = ", ".join(f"{k}: {old.get(k)!r} -> {config.get(k)!r}" for k in diff)
    raise errors.UsageError(f"{out} holds a {what} with another configuration ({details}); "
                            "use the same flags to resume, or --overwrite to start over")


def remove_outputs(out: str, names: Sequence[str], prefixes: Sequence[str] = ()) -> None:
  """Deletes out's entries named in `names` or starting with one of `prefixes`."""
  for name in os.listdir(out):
    if name in names or any(name.startswith(p) for p in prefixes):
      p = os.path.join(out, name)
      shutil.rmtree(p) if os.path.isdir(p) else os.remove(p)
