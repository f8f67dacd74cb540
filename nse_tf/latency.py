"""Latency look-up tables: measure every op on *this* device, save, load, predict.

A latency table holds, for one device, backend (TensorFlow or the TFLite
interpreter), batch size and thread count, the measured time of every building
block of a network, keyed by its geometry:

  op/{name}/{H}x{W}x{C_in}/{C_out}/s{stride}   one candidate op at a layer position
  avg/{n}/{H}x{W}x{C}                          the element-wise average of n branches
  null/{n}/{H}x{W}x{C}                         a call that does (almost) nothing on n
                                               inputs: the per-call overhead
  stem/{H}x{W}x3/{C}    head/{H}x{W}x{C_in}/{C_out}    pool/{H}x{W}x{C}    fc/{C_in}/{classes}

Every entry keeps its raw statistics (count, mean, std, min, median, in ms). Its
*net* latency is its chosen statistic minus the per-call overhead of a null call
on the same inputs, because a network pays the call overhead once, not once per
op. Because the keys are geometries, one file can serve several macros or
resolutions on the same device; a table asked for a macro, resolution, scale or
class count it was not measured for misses keys and is refused with the command
that builds the missing part, never silently applied.

Prediction (SPEC §3–§5): latency(arch) =
    null(input) + stem + head + pool + fc                   (the fixed part)
  + Σ_l [ Σ_{op ∈ S_l} op_l + avg_l(branches_l) ]
with branches_l = |S_l| + 1 in a normal layer with ops (the identity counts), |S_l|
in a reduction layer, and avg_l(1) = 0 (a single branch is not averaged; an empty
normal layer is dropped and costs nothing), all times one end-to-end calibration
factor per configuration (the median measured/predicted ratio of a few random
networks timed at the end of the build; ~0.93 on a 2-core CPU with TF, see
`_calibrate`). `LatencyTable.indices_cost` and
`arch_cost` compute this exactly; it is what the sampler uses, so the interval is
honest about the averaging cost.

The supernet regulariser needs a cost *linear* in the gates (`layer_costs`,
`fixed`, the interface of `cost.CostTable`). The averaging cost is folded in as a
per-op share: s_l = avg_l(M) / (M − 1) with M the most branches measured, i.e. the
line through "no op added" and "M − 1 ops added". Normal layers: c(ops) = Σ op +
s_l·|S|; reduction layers always hold ≥ 1 op, so their line is Σ op + s_l·(|S| − 1)
and the constant −s_l goes into `fixed`. The linear form is exact at both ends and
within the small curvature of avg_l in between (measured: an average of n
tensors is n − 1 adds and one scale).

Measurements (`Measurer`): warm-up calls, then `repeats` timed calls, each timed
on its own and round-robin over a chunk of blocks; batch, threads
(`tf.config.threading`, pinned before TensorFlow starts, so the table build runs in a
fresh process), clock and statistic are in the table's device description, and every
statistic (count, mean, std, min, q25, median) is stored. Two clocks:
  * wall (default): elapsed time, the latency a user sees on an idle device;
  * cpu: CPU time of the process (all threads). Other jobs time-sharing the cores do
    not inflate it, so on a shared machine it is the reproducible one. It also counts
    TensorFlow's helper threads (more than wall time on an idle machine); the
    calibration factor absorbs that, but the unit is CPU-ms, not latency.
Measured on a 2-core VM shared with two other TensorFlow jobs (load average 3-8;
latency19 on the latency macro at 96x96, batch 1, 1 thread, 30 random networks):
wall clock MAPE 12-24 % depending on the statistic (the same network's wall time
moved by up to 2x between minutes), cpu clock MAPE 5.8 %, Kendall's tau 0.86 (median).
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import math
import os
import platform
import subprocess
import sys
import time
from typing import Any, Callable, Dict, Iterable, List, Mapping, Optional, Sequence, Tuple

from nse_tf import spaces
from nse_tf import fileio
from nse_tf.fileio import atomic_write_text
from nse_tf.spaces import SpaceError
from nse_tf import errors

TABLE_VERSION = 1
BACKENDS = ("tf", "tflite")
CLOCKS = ("wall", "cpu")
STATISTICS = ("median", "q25", "min", "mean")
DEFAULT_MAX_BRANCHES = 7   # K = 6 ops plus the identity of a normal layer


class LatencyError(errors.NSEError):
  """A latency table that does not fit the request (missing entries, other device, ...)."""


# ---------------------------------------------------------------------------
# Keys and the entries a configuration needs.


def _hwc(h: int, w: int, c: int) -> str:
  return f"{h}x{w}x{c}"


def op_key(op: str, h: int, w: int, c_in: int, c_out: int, stride: int) -> str:
  return f"op/{op}/{_hwc(h, w, c_in)}/{c_out}/s{stride}"


def avg_key(n: int, h: int, w: int, c: int) -> str:
  return f"avg/{n}/{_hwc(h, w, c)}"


def null_key(n: int, h: int, w: int, c: int) -> str:
  return f"null/{n}/{_hwc(h, w, c)}"


@dataclasses.dataclass(frozen=True)
class EntrySpec:
  """What to build to measure one entry.

  kind: 'op', 'avg', 'null', 'stem', 'head', 'pool' or 'fc'; inputs: the number
  of input tensors; in_shape: (H, W, C) of each input (no batch); args: the
  kind's parameters; baseline: the key of the null entry subtracted from it.
  """
  key: str
  kind: str
  in_shape: Tuple[int, ...]
  inputs: int = 1
  args: Tuple[Tuple[str, Any], ...] = ()
  baseline: Optional[str] = None

  def arg(self, name):
    return dict(self.args)[name]


@dataclasses.dataclass(frozen=True)
class Layout:
  """The keys one (space, macro, resolution, scale, classes) configuration reads."""
  space: str
  macro: str
  resolution: Tuple[int, int]
  scale: float
  num_classes: int
  max_branches: int
  resolved: spaces.ResolvedMacro
  fixed: Tuple[str, ...]                     # keys of the fixed part (incl. the call overhead)
  op_keys: Tuple[Tuple[Optional[str], ...], ...]   # per layer, per pool op (None: cannot build)
  avg_keys: Tuple[Tuple[str, ...], ...]      # per layer: avg of n = 2..max_branches
  entries: Tuple[EntrySpec, ...]             # every entry to measure, in build order

  def describe(self) -> Dict[str, Any]:
    return {"space": self.space, "macro": self.macro, "resolution": list(self.resolution),
            "scale": self.scale, "num_classes": self.num_classes,
            "max_branches": self.max_branches}


def _resolution(resolution) -> Tuple[int, int]:
  if isinstance(resolution, int):
    return (resolution, resolution)
  h, w = resolution
  return (int(h), int(w))


def layout(space: str, macro: Optional[str] = None, resolution=224, scale: float = 1.0,
           num_classes: int = 1000, max_branches: int = DEFAULT_MAX_BRANCHES,
           ops: Optional[Sequence[str]] = None) -> Layout:
  """Every entry a latency table needs for `space` on `macro` at `resolution`.

  Args:
    ops: measure only these pool ops (tests, partial tables); the others get no key.
  """
  from nse_tf import cost as cost_lib  # pylint: disable=g-import-not-at-top
  macro = macro or spaces.DEFAULT_MACRO[space]
  pool = spaces.get_pool(space)
  if ops is not None:
    unknown = [o for o in ops if o not in pool]
    if unknown:
      raise SpaceError(f"ops {unknown} are not in space {space!r}")
  if max_branches < 2:
    raise LatencyError(f"max_branches must be >= 2, got {max_branches}")
  if num_classes < 1:
    raise LatencyError(f"num_classes must be >= 1, got {num_classes}")
  res = _resolution(resolution)
  resolved = spaces.resolve_macro(macro, res, scale)
  entries: Dict[str, EntrySpec] = {}

  def add(spec: EntrySpec):
    if spec.baseline and spec.baseline not in entries:
      n, hwc = int(spec.baseline.split("/")[1]), spec.in_shape
      entries[spec.baseline] = EntrySpec(spec.baseline, "null", hwc, inputs=n)
    entries.setdefault(spec.key, spec)

  h, w = res
  in_null = null_key(1, h, w, 3)
  stem_k = f"stem/{_hwc(h, w, 3)}/{resolved.stem_channels}"
  add(EntrySpec(stem_k, "stem", (h, w, 3), args=(("channels", resolved.stem_channels),),
                baseline=in_null))
  op_keys, avg_keys = [], []
  for layer in resolved.layers:
    row = []
    for name in pool:
      if ops is not None and name not in ops:
        row.append(None)
        continue
      spec = spaces.parse_op(name)
      try:
        cost_lib.check_groups(spec, layer.c_in, layer.c_out)
      except SpaceError:
        row.append(None)     # the op cannot be built here: cost 0, as in cost.CostTable
        continue
      k = op_key(name, layer.h, layer.w, layer.c_in, layer.c_out, layer.stride)
      add(EntrySpec(k, "op", (layer.h, layer.w, layer.c_in),
                    args=(("op", name), ("c_out", layer.c_out), ("stride", layer.stride)),
                    baseline=null_key(1, layer.h, layer.w, layer.c_in)))
      row.append(k)
    op_keys.append(tuple(row))
    oh, ow, c = layer.out_h, layer.out_w, layer.c_out
    arow = []
    for n in range(2, max_branches + 1):
      k = avg_key(n, oh, ow, c)
      add(EntrySpec(k, "avg", (oh, ow, c), inputs=n, baseline=null_key(n, oh, ow, c)))
      arow.append(k)
    avg_keys.append(tuple(arow))
  fh, fw = resolved.final_hw
  lc, hc = resolved.last_channels, resolved.head_channels
  head_k = f"head/{_hwc(fh, fw, lc)}/{hc}"
  add(EntrySpec(head_k, "head", (fh, fw, lc), args=(("channels", hc),),
                baseline=null_key(1, fh, fw, lc)))
  pool_k = f"pool/{_hwc(fh, fw, hc)}"
  add(EntrySpec(pool_k, "pool", (fh, fw, hc), baseline=null_key(1, fh, fw, hc)))
  fc_k = f"fc/{hc}/{num_classes}"
  add(EntrySpec(fc_k, "fc", (hc,), args=(("classes", num_classes),), baseline=f"null/1/{hc}"))
  if in_null not in entries:
    entries[in_null] = EntrySpec(in_null, "null", (h, w, 3))
  # Baselines first: an entry's net value is known as soon as it is measured.
  order = sorted(entries.values(), key=lambda e: (e.kind != "null", 0))
  return Layout(space=space, macro=macro, resolution=res, scale=float(scale),
                num_classes=num_classes, max_branches=max_branches, resolved=resolved,
                fixed=(in_null, stem_k, head_k, pool_k, fc_k), op_keys=tuple(op_keys),
                avg_keys=tuple(avg_keys), entries=tuple(order))


# ---------------------------------------------------------------------------
# The table as the search sees it: the interface of cost.CostTable.


def _quantile(xs: Sequence[float], q: float) -> float:
  """Linear-interpolated quantile of sorted values."""
  pos = q * (len(xs) - 1)
  i = int(math.floor(pos))
  j = min(i + 1, len(xs) - 1)
  return xs[i] + (pos - i) * (xs[j] - xs[i])


def summarize(times_ms: Sequence[float]) -> Dict[str, float]:
  """count, mean, std, min, first quartile (q25) and median of per-call times (ms)."""
  xs = sorted(float(t) for t in times_ms)
  n = len(xs)
  if n == 0:
    raise LatencyError("no timings to summarize")
  mean = sum(xs) / n
  std = math.sqrt(sum((x - mean) ** 2 for x in xs) / n)
  return {"count": n, "mean": mean, "std": std, "min": xs[0], "q25": _quantile(xs, 0.25),
          "median": _quantile(xs, 0.5)}


class LatencyTable:
  """Per-layer, per-op latencies (ms) of a space on a macro, from a measured table.

  The same interface as `cost.CostTable` (`unit`, `fixed`, `layer_costs`,
  `indices_cost`, `arch_cost`), so the supernet regulariser, the sampler and the
  Pareto front use it unchanged. See the module docstring for the arithmetic.

  Args:
    data: the table's JSON content (`load_json`), or use `LatencyTable.load(path, ...)`.
    space, macro, resolution, scale, num_classes: the configuration to predict
      for; every entry it needs must be in the table.
    statistic: 'median', 'min' or 'mean' (default: the table's own).
  """

  unit = "ms"

  def __init__(self, data: Mapping[str, Any], space: str, macro: Optional[str] = None,
               resolution=224, scale: float = 1.0, num_classes: int = 1000,
               statistic: Optional[str] = None, source: str = "<table>",
               ops: Optional[Sequence[str]] = None, calibrated: bool = True):
    self.source = source
    self.device = dict(data["device"])
    self.statistic = statistic or self.device.get("statistic", "median")
    if self.statistic not in STATISTICS:
      raise LatencyError(f"statistic must be one of {STATISTICS}, got {self.statistic!r}")
    max_branches = int(data.get("max_branches", DEFAULT_MAX_BRANCHES))
    # `ops`: read only these pool ops (a partial table); the others cost 0 like an
    # op that cannot be built. Searches always read the whole pool.
    self.layout = layout(space, macro, resolution, scale, num_classes, max_branches, ops)
    self.space, self.macro = self.layout.space, self.layout.macro
    self.pool = spaces.get_pool(space)
    self.kinds = spaces.layer_kinds(self.macro)
    entries = data["entries"]
    needed = [k for k in self._keys_read() if k not in entries]
    if needed:
      built = "; ".join(_describe_built(b) for b in data.get("built_for", [])) or "nothing"
      want = self.layout.describe()
      raise LatencyError(
          f"latency table {source} has no entry for {len(needed)} of the blocks of {space} on "
          f"macro {want['macro']} at {want['resolution'][0]}x{want['resolution'][1]}, scale "
          f"{want['scale']:g}, {num_classes} classes (e.g. {needed[0]}); it was built for "
          f"{built}. Build the missing entries into it (same device, backend and batch): "
          f"python tools/build_latency_lut.py --space={space} --macro={self.macro} "
          f"--resolution={want['resolution'][0]} --scale={want['scale']:g} "
          f"--num_classes={num_classes} --backend={self.device.get('backend')} "
          f"--batch_size={self.device.get('batch_size')} --output={source}")
    value = lambda k: float(entries[k][self.statistic])
    self.raw = {k: value(k) for k in self._keys_read()}
    # End-to-end calibration of this configuration (see build_table): one factor
    # for every block, so the linear form for the regulariser stays linear.
    cal = data.get("calibration", {}).get(config_key(self.layout)) if calibrated else None
    self.calibration = float(cal["factor"][self.statistic]) if cal else 1.0
    f = self.calibration
    self.net = {k: f * self._net(k, entries) for k in self._keys_read()
                if not k.startswith("null/")}
    lay = self.layout
    self.overhead = f * self.raw[lay.fixed[0]]
    self.fixed_exact = self.overhead + sum(self.net[k] for k in lay.fixed[1:])
    # Per layer: op latencies by pool index (0 where the op cannot be built) and
    # avg of n branches, n = 0..max_branches (0 and 1 branch: no averaging).
    self.op_ms: List[List[float]] = [[self.net[k] if k else 0.0 for k in row]
                                     for row in lay.op_keys]
    self.avg_ms: List[List[float]] = [[0.0, 0.0] + [self.net[k] for k in row]
                                      for row in lay.avg_keys]
    self.shares = [a[-1] / (len(a) - 2) for a in self.avg_ms]   # avg(M) / (M − 1)
    self._linear_fixed = self.fixed_exact - sum(
        s for s, kind in zip(self.shares, self.kinds) if kind != "N")
    self._by_name = [dict(zip(self.pool, row)) for row in self.op_ms]

  def _keys_read(self) -> List[str]:
    lay = self.layout
    keys = list(lay.fixed)
    for row in lay.op_keys:
      keys += [k for k in row if k]
    for row in lay.avg_keys:
      keys += list(row)
    spec = self._specs()
    keys += [spec[k].baseline for k in list(keys) if spec[k].baseline]
    return list(dict.fromkeys(keys))

  def _net(self, key: str, entries) -> float:
    spec = self._specs()[key]
    base = float(entries[spec.baseline][self.statistic]) if spec.baseline else 0.0
    return max(0.0, float(entries[key][self.statistic]) - base)

  def _specs(self) -> Dict[str, EntrySpec]:
    if not hasattr(self, "_spec_cache"):
      self._spec_cache = {e.key: e for e in self.layout.entries}
    return self._spec_cache

  @classmethod
  def load(cls, path: str, space: str, macro: Optional[str] = None, resolution=224,
           scale: float = 1.0, num_classes: int = 1000, statistic: Optional[str] = None,
           backend: Optional[str] = None, batch_size: Optional[int] = None,
           ops: Optional[Sequence[str]] = None) -> "LatencyTable":
    """Loads `path` for a configuration; refuses another backend or batch if given."""
    data = load_json(path)
    dev = data["device"]
    if backend is not None and dev.get("backend") != backend:
      raise LatencyError(f"latency table {path} was measured with backend "
                         f"{dev.get('backend')!r}, not {backend!r}")
    if batch_size is not None and dev.get("batch_size") != batch_size:
      raise LatencyError(f"latency table {path} was measured at batch {dev.get('batch_size')}, "
                         f"not {batch_size}")
    return cls(data, space, macro, resolution, scale, num_classes, statistic, source=path,
               ops=ops)

  # -- the interface shared with cost.CostTable (ms) --
  @property
  def fixed(self) -> float:
    """The fixed part of the linear (regulariser) form; see the module docstring."""
    return self._linear_fixed

  def layer_costs(self, layer: int) -> List[float]:
    """Every pool op's latency at `layer` plus its share of the branch averaging."""
    s = self.shares[layer]
    return [c + s if c > 0 else 0.0 for c in self.op_ms[layer]]

  def merge_cost(self, layer: int, num_ops: int) -> float:
    """Averaging cost of a layer holding `num_ops` ops (identity counted in N layers)."""
    n = num_ops + 1 if self.kinds[layer] == "N" and num_ops > 0 else num_ops
    table = self.avg_ms[layer]
    if n < len(table):
      return table[n]
    # More branches than measured: extend the last measured step linearly.
    return table[-1] + (n - len(table) + 1) * (table[-1] - table[-2])

  def indices_cost(self, layers_idx: Sequence[Iterable[int]]) -> float:
    """Exact predicted latency (ms) of an architecture given as pool indices per layer."""
    total = self.fixed_exact
    for l, idx in enumerate(layers_idx):
      row = self.op_ms[l]
      n = 0
      for i in idx:
        total += row[i]
        n += 1
      if n:
        total += self.merge_cost(l, n)
    return total

  def arch_cost(self, arch) -> float:
    """Exact predicted latency (ms) of an `Architecture` (or per-layer op-name lists)."""
    layers = arch.layers if hasattr(arch, "layers") else arch
    if len(layers) != len(self._by_name):
      raise SpaceError(f"architecture has {len(layers)} layers, the table {len(self._by_name)}")
    if hasattr(arch, "macro") and (arch.macro != self.macro or arch.space != self.space):
      raise LatencyError(f"architecture is {arch.space}@{arch.macro}, the table predicts "
                         f"{self.space}@{self.macro}")
    if hasattr(arch, "scale") and abs(arch.scale - self.layout.scale) > 1e-9:
      raise LatencyError(f"architecture has channel scale {arch.scale:g}, the table was read "
                         f"for {self.layout.scale:g}")
    index = spaces.op_index(self.space)
    return self.indices_cost([[index[n] for n in ops] for ops in layers])

  def breakdown(self, arch) -> Dict[str, Any]:
    """Fixed part and per-layer (ops, averaging) latencies of an architecture."""
    index = spaces.op_index(self.space)
    layers = []
    for l, ops in enumerate(arch.layers):
      layers.append({"layer": l, "ops": {n: self.op_ms[l][index[n]] for n in ops},
                     "average": self.merge_cost(l, len(ops)) if ops else 0.0})
    return {"fixed": self.fixed_exact, "overhead": self.overhead, "layers": layers,
            "total": self.arch_cost(arch)}

  def reference_cost(self) -> float:
    """Latency of the network that holds every layer's single slowest op (relative targets)."""
    return self.fixed_exact + sum(max(row) for row in self.op_ms) + sum(
        self.merge_cost(l, 1) for l in range(len(self.op_ms)))


def min_cost(table) -> float:
  """The cheapest architecture: normal layers empty, the fastest op in reduction layers."""
  total = table.fixed_exact
  for row, kind in zip(table.op_ms, table.kinds):
    if kind != "N":
      total += min(c for c in row if c > 0) if any(c > 0 for c in row) else 0.0
  return total


def describe_range(table) -> str:
  """Latency range of a table's space, to choose τ and the interval of a search."""
  lo, ref = min_cost(table), table.reference_cost()
  lines = [f"predicted latency ({table.statistic}, ms) of {table.space}@{table.macro} at "
           f"{table.layout.resolution[0]}x{table.layout.resolution[1]}, scale "
           f"{table.layout.scale:g}:",
           f"  fixed part {table.fixed_exact:.3f} (call overhead {table.overhead:.3f}); "
           f"end-to-end calibration x{table.calibration:.3f}",
           f"  cheapest architecture {lo:.3f}; every layer its slowest op {ref:.3f}"]
  if table.space == "latency19" and table.macro == "latency" and table.layout.scale == 1.0:
    from nse_tf import arch as arch_lib  # pylint: disable=g-import-not-at-top
    lines.append(f"  NSENet-GPU {table.arch_cost(arch_lib.load_released('NSENet-GPU')):.3f}")
  lines.append("  a search for latency tau uses --tau=T --interval=T,1.18T --edge_lo=0.97T "
               "(SPEC §5), or --relative_targets with fractions of the slowest-op network")
  return "\n".join(lines)


def config_key(lay: "Layout") -> str:
  """Names one configuration (space, macro, resolution, scale, classes) of a table."""
  return (f"{lay.space}@{lay.macro}/{lay.resolution[0]}x{lay.resolution[1]}/"
          f"s{lay.scale:g}/c{lay.num_classes}")


def _describe_built(b: Mapping[str, Any]) -> str:
  r = b.get("resolution", ["?", "?"])
  return (f"{b.get('space')} on {b.get('macro')} at {r[0]}x{r[1]}, scale {b.get('scale')}, "
          f"{b.get('num_classes')} classes")


def load_json(path: str) -> Dict[str, Any]:
  """Reads and checks a latency table file (clear errors for a wrong or corrupt file)."""
  if not os.path.exists(path):
    raise LatencyError(f"no latency table at {path}; build one on the target device with "
                       "python tools/build_latency_lut.py --output=" + path)
  data = fileio.load_json(path, LatencyError, "it is not a latency table; rebuild it with "
                          "tools/build_latency_lut.py --overwrite")
  if data.get("format") != "nse_tf.latency_table":
    raise LatencyError(f"{path} is not a latency table (no 'format': 'nse_tf.latency_table')")
  if data.get("version") != TABLE_VERSION:
    raise LatencyError(f"{path}: latency table version {data.get('version')}, this code reads "
                       f"{TABLE_VERSION}; rebuild it with tools/build_latency_lut.py --overwrite")
  if not isinstance(data.get("entries"), dict) or not isinstance(data.get("device"), dict):
    raise LatencyError(f"{path}: latency table without 'device' or 'entries'")
  return data


# ---------------------------------------------------------------------------
# Measuring (TensorFlow imported lazily: the table arithmetic above is pure Python).


def device_description(backend: str, batch_size: int, threads: int, statistic: str,
                       warmup: int, repeats: int, clock: str = "wall") -> Dict[str, Any]:
  """What the numbers were measured on; a resumed or extended build must match it."""
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  cpu = platform.processor() or platform.machine()
  try:
    with open("/proc/cpuinfo", encoding="utf-8") as f:
      for line in f:
        if line.lower().startswith("model name"):
          cpu = line.split(":", 1)[1].strip()
          break
  except OSError:
    pass
  gpus = [d.name for d in tf.config.list_physical_devices("GPU")]
  gpu_names = []
  for d in tf.config.list_physical_devices("GPU"):
    try:
      gpu_names.append(tf.config.experimental.get_device_details(d).get("device_name", d.name))
    except Exception:  # pylint: disable=broad-except
      gpu_names.append(d.name)
  return {
      "cpu": cpu, "machine": platform.machine(), "system": platform.system(),
      "cpu_count": os.cpu_count(), "gpus": gpu_names if gpus and backend == "tf" else [],
      "tensorflow": tf.__version__, "python": platform.python_version(),
      "backend": backend, "batch_size": int(batch_size), "threads": int(threads),
      "statistic": statistic, "warmup": int(warmup), "repeats": int(repeats),
      "clock": clock,
  }


COMPARED = ("cpu", "machine", "cpu_count", "gpus", "tensorflow", "backend", "batch_size",
            "threads", "clock")


def pin_threads(threads: int) -> None:
  """Pins TensorFlow's thread pools; must run before TensorFlow executes anything."""
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  try:
    tf.config.threading.set_intra_op_parallelism_threads(threads)
    tf.config.threading.set_inter_op_parallelism_threads(threads)
  except RuntimeError:
    if (tf.config.threading.get_intra_op_parallelism_threads() != threads):
      raise LatencyError(
          "TensorFlow is already running with other thread settings; measure latency in a "
          "fresh process (tools/build_latency_lut.py, tools/check_latency_lut.py)") from None


def entry_model(spec: EntrySpec, batch_size: int):
  """A small tf_keras model that runs exactly the block of `spec`."""
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  import tf_keras as keras  # pylint: disable=g-import-not-at-top
  from nse_tf import nsenet  # pylint: disable=g-import-not-at-top
  from nse_tf import ops as ops_lib  # pylint: disable=g-import-not-at-top
  inputs = [keras.Input(spec.in_shape, batch_size=batch_size, name=f"x{i}")
            for i in range(spec.inputs)]
  x = inputs[0]
  if spec.kind == "null":
    # The least a call can do: one slice of the first input (an identity graph
    # would be optimised away); every input is still passed in, as in the block.
    first = (lambda t: t[:, :1]) if len(spec.in_shape) == 1 else (lambda t: t[:, :1, :1, :1])
    y = keras.layers.Lambda(lambda ts: first(ts[0]), name="touch")(inputs)
  elif spec.kind == "op":
    h, w, c_in = spec.in_shape
    stride = spec.arg("stride")
    layer = spaces.LayerSpec(0, "N" if stride == 1 else "R", c_in, spec.arg("c_out"), stride,
                             h, w, 0)
    y = ops_lib.build_op(spec.arg("op"), layer)(x)
  elif spec.kind == "avg":
    y = keras.layers.Average(name="avg")(inputs)
  elif spec.kind == "stem":
    y = nsenet.stem(x, channels=spec.arg("channels"))
  elif spec.kind == "head":
    y = nsenet.head_conv(x, spec.arg("channels"))
  elif spec.kind == "pool":
    y = keras.layers.GlobalAveragePooling2D(name="pool")(x)
  elif spec.kind == "fc":
    y = keras.layers.Dense(spec.arg("classes"), name="classifier")(x)
  else:
    raise LatencyError(f"unknown entry kind {spec.kind!r}")
  del tf
  return keras.Model(inputs, y, name="entry")


class Measurer:
  """Times a Keras model's inference with one backend, batch and thread count."""

  def __init__(self, backend: str = "tf", threads: int = 1, warmup: int = 10,
               repeats: int = 50, seed: int = 0, clock: str = "wall"):
    if backend not in BACKENDS:
      raise LatencyError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if clock not in CLOCKS:
      raise LatencyError(f"clock must be one of {CLOCKS}, got {clock!r}")
    # wall: elapsed time, the latency a user sees on an otherwise idle device.
    # cpu: CPU time of this process (all its threads), which other jobs on a shared
    # machine do not inflate; equal to wall time on an idle device with one thread.
    self.clock = time.perf_counter if clock == "wall" else time.process_time
    self.clock_name = clock
    if warmup < 0 or repeats < 1:
      raise LatencyError("warmup must be >= 0 and repeats >= 1")
    self.backend, self.threads = backend, threads
    self.warmup, self.repeats, self.seed = warmup, repeats, seed

  def compile(self, model) -> Callable[[], Any]:
    """A no-argument callable that runs one inference on fixed random inputs."""
    import numpy as np  # pylint: disable=g-import-not-at-top
    import tensorflow as tf  # pylint: disable=g-import-not-at-top
    rng = np.random.default_rng(self.seed)
    shapes = [tuple(int(d) for d in t.shape) for t in model.inputs]
    values = [rng.standard_normal(s).astype(np.float32) for s in shapes]
    specs = [tf.TensorSpec(s, tf.float32) for s in shapes]

    @tf.function(autograph=False)
    def forward(*xs):
      return model(list(xs) if len(xs) > 1 else xs[0], training=False)

    concrete = forward.get_concrete_function(*specs)
    if self.backend == "tf":
      tensors = [tf.constant(v) for v in values]

      def run():
        out = concrete(*tensors)
        return out
      return run
    # Without a trackable object the converter freezes the graph instead of exporting
    # a SavedModel first: the same flatbuffer, about 4x faster for a whole network
    # (19 s against 78 s for a 21-layer one on this CPU).
    from absl import logging as absl_logging  # pylint: disable=g-import-not-at-top
    level = absl_logging.get_verbosity()
    absl_logging.set_verbosity(absl_logging.ERROR)   # "consider providing trackable_obj"
    try:
      content = tf.lite.TFLiteConverter.from_concrete_functions([concrete]).convert()
    finally:
      absl_logging.set_verbosity(level)
    interpreter = tf.lite.Interpreter(model_content=content, num_threads=self.threads)
    interpreter.allocate_tensors()
    details = interpreter.get_input_details()
    by_shape = sorted(details, key=lambda d: d["index"])
    for d, v in zip(by_shape, values):
      interpreter.set_tensor(d["index"], v.reshape(d["shape"]))
    interpreter.invoke()
    return interpreter.invoke

  def time_calls(self, run: Callable[[], Any]) -> List[float]:
    """Per-call wall times (ms) after the warm-up."""
    for _ in range(self.warmup):
      run()
    out = []
    clock = self.clock
    for _ in range(self.repeats):
      t0 = clock()
      run()
      out.append((clock() - t0) * 1e3)
    return out

  def measure(self, model) -> Dict[str, float]:
    return summarize(self.time_calls(self.compile(model)))

  def measure_interleaved(self, runs: Sequence[Callable[[], Any]]) -> List[Dict[str, float]]:
    """Times several compiled callables round-robin: call r of every one, then r + 1.

    On a shared machine another job's burst then hits every callable alike instead
    of a few unlucky ones, and robust statistics see it as a few outliers each.
    """
    for run in runs:
      for _ in range(self.warmup):
        run()
    times: List[List[float]] = [[] for _ in runs]
    clock = self.clock
    for _ in range(self.repeats):
      for i, run in enumerate(runs):
        t0 = clock()
        run()
        times[i].append((clock() - t0) * 1e3)
    return [summarize(t) for t in times]


# ---------------------------------------------------------------------------
# Building (resumable) a table file.


def build_table(path: str, *, space: str, macro: Optional[str] = None, resolution=224,
                scale: float = 1.0, num_classes: int = 1000, batch_size: int = 1,
                backend: str = "tf", threads: int = 1, warmup: int = 10, repeats: int = 50,
                statistic: str = "median", max_branches: int = DEFAULT_MAX_BRANCHES,
                ops: Optional[Sequence[str]] = None, overwrite: bool = False,
                progress: bool = True, chunk: int = 16, clock: str = "wall",
                calibration_archs: int = 5) -> Dict[str, Any]:
  """Measures every entry of the configuration that `path` does not hold yet.

  An existing file is extended (and a killed build resumed) when it was measured
  on the same device, TensorFlow version, backend, batch and threads; otherwise it
  is refused unless `overwrite`. Entries are measured `chunk` at a time,
  interleaved, and the file is rewritten atomically after every chunk, so a killed
  build keeps what it measured.
  Threads must be pinned (`pin_threads`) before TensorFlow starts.
  """
  if statistic not in STATISTICS:
    raise LatencyError(f"statistic must be one of {STATISTICS}, got {statistic!r}")
  if batch_size < 1 or threads < 1:
    raise LatencyError("batch_size and threads must be >= 1")
  lay = layout(space, macro, resolution, scale, num_classes, max_branches, ops)
  device = device_description(backend, batch_size, threads, statistic, warmup, repeats, clock)
  data = None
  if os.path.exists(path) and not overwrite:
    data = load_json(path)
    old = data["device"]
    diff = [k for k in COMPARED if old.get(k) != device.get(k)]
    if diff:
      details = ", ".join(f"{k}: {old.get(k)!r} here {device.get(k)!r}" for k in diff)
      raise LatencyError(f"{path} was measured elsewhere or otherwise ({details}); write to "
                         "another --output or pass --overwrite")
    if int(data.get("max_branches", DEFAULT_MAX_BRANCHES)) != max_branches:
      raise LatencyError(f"{path} holds averages of up to {data.get('max_branches')} "
                         f"branches, not {max_branches}; use the same --max_branches")
  if data is None:
    data = {"format": "nse_tf.latency_table", "version": TABLE_VERSION, "device": device,
            "max_branches": max_branches, "built_for": [], "entries": {}}
  desc = dict(lay.describe(), ops="all" if ops is None else list(ops))
  if desc not in data["built_for"]:
    data["built_for"].append(desc)
  entries = data["entries"]
  todo = [e for e in lay.entries if e.key not in entries]
  measurer = Measurer(backend, threads, warmup, repeats, clock=clock)
  save = lambda: atomic_write_text(path, json.dumps(data, indent=1, sort_keys=True) + "\n")
  bar = None
  if progress and todo:
    import tf_keras as keras  # pylint: disable=g-import-not-at-top
    print(f"measuring {len(todo)} of {len(lay.entries)} entries ({backend}, batch "
          f"{batch_size}, {threads} thread(s)) into {path}", flush=True)
    bar = keras.utils.Progbar(len(todo), stateful_metrics=["ms"])
  save()
  done = 0
  # Entries are measured in chunks, interleaved inside each chunk; the file is
  # rewritten after every chunk, so a killed build loses at most one chunk.
  for start in range(0, len(todo), chunk):
    specs = todo[start:start + chunk]
    runs = [measurer.compile(entry_model(spec, batch_size)) for spec in specs]
    for spec, stats in zip(specs, measurer.measure_interleaved(runs)):
      entries[spec.key] = {k: (round(v, 6) if isinstance(v, float) else v)
                           for k, v in stats.items()}
    del runs
    done += len(specs)
    save()
    if bar is not None:
      bar.update(done, [("ms", entries[specs[-1].key][statistic])])
    import tf_keras as keras  # pylint: disable=g-import-not-at-top
    keras.backend.clear_session()   # keep graph memory flat over long builds
  key = config_key(lay)
  if calibration_archs > 0 and ops is None and key not in data.setdefault("calibration", {}):
    if progress:
      print(f"calibrating on {calibration_archs} random networks measured end to end", flush=True)
    data["calibration"][key] = _calibrate(data, lay, measurer, batch_size, calibration_archs)
    save()
  data["updated"] = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
  save()
  return data


# ---------------------------------------------------------------------------
# End-to-end measurement of standalone networks (the check of a table).


CALIBRATION_SEED = 90210   # not the check's seed: the check stays out of sample


def _calibrate(data, lay: Layout, measurer: Measurer, batch_size: int, n: int) -> Dict[str, Any]:
  """Measured / predicted latency of `n` random networks: one factor per statistic.

  Blocks timed one call at a time, each after another block's call, run with colder
  caches than inside a network, where each layer reads the activations its
  predecessor just wrote (measured on a 2-core CPU, TF: the sum of the blocks is
  ~7 % above the network in one interleaved session). The median ratio over a few
  random networks (seed CALIBRATION_SEED, not the check's) removes that bias.
  """
  from nse_tf import cost as cost_lib  # pylint: disable=g-import-not-at-top
  archs = cost_lib.random_architectures(lay.space, n, seed=CALIBRATION_SEED,
                                        max_ops=max(1, min(3, lay.max_branches - 1)),
                                        macro=lay.macro, scale=lay.scale)
  runs = [measurer.compile(network_model(a, lay.resolution, batch_size, lay.num_classes))
          for a in archs]
  measured = measurer.measure_interleaved(runs)
  factor = {}
  for stat in STATISTICS:
    table = LatencyTable(data, lay.space, lay.macro, lay.resolution, lay.scale,
                         lay.num_classes, statistic=stat, calibrated=False)
    ratios = sorted(m[stat] / table.arch_cost(a) for a, m in zip(archs, measured))
    factor[stat] = round(_quantile(ratios, 0.5), 6)
  return {"archs": n, "seed": CALIBRATION_SEED, "factor": factor}


def network_model(arch, resolution, batch_size: int, num_classes: int):
  """The standalone network of `arch` (`nsenet.build_nsenet`) with a fixed batch."""
  from nse_tf import nsenet  # pylint: disable=g-import-not-at-top
  import tf_keras as keras  # pylint: disable=g-import-not-at-top
  h, w = _resolution(resolution)
  model = nsenet.build_nsenet(arch, num_classes, (h, w, 3))
  inp = keras.Input((h, w, 3), batch_size=batch_size, name="images")
  return keras.Model(inp, model(inp), name="fixed_batch")


def measure_network(arch, measurer: Measurer, resolution, batch_size: int,
                    num_classes: int) -> Dict[str, float]:
  """Times the standalone network of `arch` end to end."""
  return measurer.measure(network_model(arch, resolution, batch_size, num_classes))


def plot_check(path: str, predicted: Sequence[float], measured: Sequence[float],
               title: str) -> None:
  """Scatter of predicted vs measured latency with the y = x line (PNG, atomic)."""
  from matplotlib.backends.backend_agg import FigureCanvasAgg  # pylint: disable=g-import-not-at-top
  from matplotlib.figure import Figure  # pylint: disable=g-import-not-at-top
  fig = Figure(figsize=(5.5, 5), dpi=120)
  FigureCanvasAgg(fig)
  ax = fig.add_subplot(1, 1, 1)
  ax.scatter(measured, predicted, s=18, color="#1f77b4", label="architectures")
  lo, hi = min(min(predicted), min(measured)), max(max(predicted), max(measured))
  pad = 0.05 * (hi - lo or 1.0)
  ax.plot([lo - pad, hi + pad], [lo - pad, hi + pad], "k--", lw=1, label="y = x")
  ax.plot([lo - pad, hi + pad], [1.1 * (lo - pad), 1.1 * (hi + pad)], ":", color="grey", lw=1,
          label="±10 %")
  ax.plot([lo - pad, hi + pad], [0.9 * (lo - pad), 0.9 * (hi + pad)], ":", color="grey", lw=1)
  ax.set_xlabel("measured latency (ms)")
  ax.set_ylabel("predicted latency (ms)")
  ax.set_title(title, fontsize=9)
  ax.legend(loc="upper left", fontsize=8)
  fig.tight_layout()
  fileio.atomic_write(path, lambda f: fig.savefig(f, format="png"), binary=True)


def mape(predicted: Sequence[float], measured: Sequence[float]) -> float:
  """Mean absolute percentage error (%) of predictions against measurements."""
  if len(predicted) != len(measured) or not measured:
    raise ValueError("mape needs two equally long, non-empty sequences")
  return 100.0 * sum(abs(p - m) / m for p, m in zip(predicted, measured)) / len(measured)


def kendall_tau(x: Sequence[float], y: Sequence[float]) -> float:
  """Kendall's τ-b rank correlation (ties handled), O(n²)."""
  n = len(x)
  if n != len(y) or n < 2:
    raise ValueError("kendall_tau needs two equally long sequences of >= 2 values")
  conc = disc = tx = ty = 0
  for i in range(n):
    for j in range(i + 1, n):
      dx, dy = x[i] - x[j], y[i] - y[j]
      if dx == 0 and dy == 0:
        continue
      if dx == 0:
        tx += 1
      elif dy == 0:
        ty += 1
      elif (dx > 0) == (dy > 0):
        conc += 1
      else:
        disc += 1
  denom = math.sqrt((conc + disc + tx) * (conc + disc + ty))
  return (conc - disc) / denom if denom else 0.0


# ---------------------------------------------------------------------------
# Building in a fresh process (threads can only be pinned before TensorFlow starts).


def build_in_subprocess(path: str, **kwargs) -> None:
  """Runs `build_table(path, **kwargs)` in a fresh Python process (progress on stdout)."""
  args = json.dumps(dict(kwargs, path=path))
  env = dict(os.environ)
  env.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
  proc = subprocess.run([sys.executable, "-m", "nse_tf.latency", args], env=env, check=False,
                        stderr=subprocess.PIPE, text=True)
  if proc.returncode != 0:
    lines = [l for l in proc.stderr.strip().splitlines() if l.strip()]
    raise LatencyError("building the latency table failed: " + (lines[-1] if lines else
                                                                 f"exit {proc.returncode}"))


def _subprocess_main(argv: Sequence[str]) -> int:
  kwargs = json.loads(argv[0])
  path = kwargs.pop("path")
  from absl import logging  # pylint: disable=g-import-not-at-top
  logging.set_verbosity(logging.WARNING)
  pin_threads(int(kwargs.get("threads", 1)))
  try:
    build_table(path, **kwargs)
  except (LatencyError, SpaceError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  return 0


if __name__ == "__main__":
  sys.exit(_subprocess_main(sys.argv[1:]))
