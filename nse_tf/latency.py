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
import math
import os
from typing import Any, Dict, Iterable, List, Mapping, Optional, Sequence, Tuple

from nse_tf import spaces
from nse_tf import stats
from nse_tf import fileio
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


def resolution_hw(resolution) -> Tuple[int, int]:
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
  res = resolution_hw(resolution)
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


def summarize(times_ms: Sequence[float]) -> Dict[str, float]:
  """count, mean, std, min, first quartile (q25) and median of per-call times (ms)."""
  xs = sorted(float(t) for t in times_ms)
  n = len(xs)
  if n == 0:
    raise LatencyError("no timings to summarize")
  mean = sum(xs) / n
  std = math.sqrt(sum((x - mean) ** 2 for x in xs) / n)
  return {"count": n, "mean": mean, "std": std, "min": xs[0], "q25": stats.quantile(xs, 0.25),
          "median": stats.quantile(xs, 0.5)}


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
