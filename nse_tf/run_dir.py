"""A command's output directory: resume only with the same settings; --overwrite clears it.

The search (`config.json`) and the retrain (`retrain_config.json`) record every resolved
setting at their first write. A later start in the same directory resumes only when the
settings that change the result are equal (`resume_free` names the others: progress bars,
checkpoint frequency, data location, strategy); otherwise it is refused with the
differences listed, before anything is written. --overwrite removes the command's own
outputs (and nothing else in the folder) after every check and before the first write.
"""

from __future__ import annotations

import json
import os
import shutil
from typing import Any, Container, Dict, Sequence, Tuple

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


# Several workers (MultiWorkerMirroredStrategy): the chief writes the run directory,
# every other worker a directory of its own inside it (nse_tf.distribute.finish_workers
# removes that at the end). Read from TF_CONFIG, before TensorFlow starts.


def worker_task(strategy_name: str) -> Tuple[bool, str, int]:
  """(is_chief, task_type, task_id) of this process from TF_CONFIG (what
  MultiWorkerMirroredStrategy's resolver reads); without a cluster: the chief.

  The chief is task 'chief' when the cluster has one, else worker 0.
  """
  raw = os.environ.get("TF_CONFIG")
  if strategy_name != "multi_worker" or not raw:
    return True, "chief", 0
  try:
    config = json.loads(raw)
    task_type = config["task"]["type"]
    task_id = int(config["task"].get("index", 0))
    has_chief = "chief" in config.get("cluster", {})
  except (ValueError, KeyError, TypeError) as e:
    raise errors.UsageError(f"TF_CONFIG is not a cluster description ({e}): expected "
                            '{"cluster": {"worker": ["host:port", ...]}, "task": {"type": '
                            '"worker", "index": 0}}') from None
  chief = task_type == "chief" or (task_type == "worker" and task_id == 0 and not has_chief)
  return chief, task_type, task_id


def worker_output_dir(strategy_name: str, output_dir: str) -> str:
  """`output_dir` on the chief; OUTPUT_DIR/.<type>-<id> on the other workers."""
  chief, task_type, task_id = worker_task(strategy_name)
  return output_dir if chief else os.path.join(output_dir, f".{task_type}-{task_id}")
