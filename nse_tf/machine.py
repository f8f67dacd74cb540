"""What a run ran on: the CPU, its vector instruction sets, the cores, the GPUs, the
library versions and the settings that pick other kernels on the same CPU.

The same command gives the same bits on one machine (`--deterministic`), but not on
another: TensorFlow's CPU kernels (oneDNN) are chosen by instruction set (and, on the
evidence of the README's demo runs, by more than that: a Zen 5 capped at AVX2 did not
round as a Zen 3 with AVX2 does), and SGD carries a last-bit difference into another
trajectory. "AMD EPYC" names several generations, so the description adds the CPU's
family and model numbers and the instruction sets that decide the kernels, and the
settings that change them on one CPU (oneDNN's instruction-set cap or oneDNN turned off,
and the threads one op may use). A search records the machines that ran it in
`state.json` and says so when it goes on on another one, `train_round` writes it into
`round.json`, the latency tables compare its CPU and GPUs, and the benchmarks print it
above their tables.
"""

from __future__ import annotations

import os
import platform
from typing import Any, Dict, List, Optional

# The instruction sets that decide which oneDNN kernels run (and so the float rounding);
# the others in /proc/cpuinfo do not change a result.
ISA_FLAGS = ("avx", "avx2", "fma", "avx512f", "avx512_vnni", "avx512_bf16", "avx512_fp16",
             "amx_tile", "amx_bf16", "amx_int8")

# Environment settings that pick other kernels on the same CPU (and so other rounding):
# oneDNN capped at an older instruction set (checked: ONEDNN_MAX_CPU_ISA=AVX2 on an
# AVX-512 CPU changed the demo's outcome), or oneDNN turned off.
# TF_NUM_INTRAOP_THREADS does what --intra_op_threads does where that is left at 0.
KERNEL_ENV = ("ONEDNN_MAX_CPU_ISA", "DNNL_MAX_CPU_ISA", "TF_ENABLE_ONEDNN_OPTS",
              "TF_NUM_INTRAOP_THREADS")

# The fields whose difference means a run's bits may differ (not the Python version).
COMPARED = ("cpu", "cpu_id", "isa", "cores", "gpus", "tensorflow", "kernels")


def cpu_info(path: str = "/proc/cpuinfo") -> Dict[str, str]:
  """The first processor's model name, family/model/stepping numbers and vector
  instruction sets, from /proc/cpuinfo (Linux); elsewhere the model name from `platform`
  and the other fields empty."""
  fields: Dict[str, str] = {}
  try:
    with open(path, encoding="utf-8", errors="replace") as f:
      for line in f:
        if not line.strip():
          if fields:
            break                  # the first processor's block is enough
          continue
        key, _, value = line.partition(":")
        fields.setdefault(key.strip().lower(), value.strip())
  except OSError:
    pass
  name = fields.get("model name") or platform.processor() or platform.machine()
  ids = [f"{k} {fields[k]}" for k in ("cpu family", "model", "stepping") if fields.get(k)]
  flags = set(fields.get("flags", "").split())
  return {"cpu": name, "cpu_id": ", ".join(ids), "isa": " ".join(f for f in ISA_FLAGS
                                                                   if f in flags)}


def gpu_names() -> List[str]:
  """The GPUs TensorFlow sees, by name where the driver gives one (e.g. 'NVIDIA H100')."""
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  names = []
  for dev in tf.config.list_physical_devices("GPU"):
    try:
      names.append(tf.config.experimental.get_device_details(dev).get("device_name", dev.name))
    except Exception:  # pylint: disable=broad-except
      names.append(dev.name)
  return names


def kernel_settings() -> str:
  """What picks other kernels on this CPU than TensorFlow's defaults: the KERNEL_ENV
  variables that are set, and the threads one op may use where set (--intra_op_threads);
  '' where nothing is."""
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  parts = [f"{k}={os.environ[k]}" for k in KERNEL_ENV if os.environ.get(k)]
  n = tf.config.threading.get_intra_op_parallelism_threads()
  if n:
    parts.append(f"{n} thread{'s' if n > 1 else ''} per op")
  return ", ".join(parts)


def describe() -> Dict[str, Any]:
  """This machine: `cpu` (model name), `cpu_id` (family, model, stepping), `isa` (the
  vector instruction sets), `cores`, `gpus` (names), `tensorflow`, `python`, `kernels`
  (kernel_settings)."""
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  return {**cpu_info(), "cores": os.cpu_count(), "gpus": gpu_names(),
          "tensorflow": tf.__version__, "python": platform.python_version(),
          "kernels": kernel_settings()}


def one_line(d: Dict[str, Any]) -> str:
  """e.g. 'AMD EPYC (cpu family 25, model 1, stepping 1; avx avx2 fma), 2 cores,
  TensorFlow 2.20.0, Python 3.11.7'."""
  detail = "; ".join(x for x in (d.get("cpu_id"), d.get("isa")) if x)
  text = d.get("cpu") or "unknown CPU"
  if detail:
    text += f" ({detail})"
  text += f", {d.get('cores')} cores"
  if d.get("gpus"):
    text += ", GPUs: " + ", ".join(d["gpus"])
  if d.get("tensorflow"):
    text += f", TensorFlow {d['tensorflow']}"
  text += f", Python {d.get('python')}"
  if d.get("kernels"):
    text += f"; kernels: {d['kernels']}"
  return text


def differences(recorded: Optional[Dict[str, Any]], current: Dict[str, Any]) -> List[str]:
  """The COMPARED fields in which two descriptions differ ([] when `recorded` is None: a
  run from before machines were recorded; a field the record lacks, written before it
  was recorded, is not compared)."""
  if not recorded:
    return []
  return [k for k in COMPARED if k in recorded and recorded[k] != current.get(k)]
