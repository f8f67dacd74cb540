"""Op pools, canonical op names, macro-architectures and space-size arithmetic.

Pure Python (no TensorFlow import) so that architecture handling, cost tables and
sampling stay fast and testable without building graphs.

The index order of every pool follows SPEC §2.2 exactly: an architecture is stored
compactly as pool indices, so reordering a pool would silently change every stored
architecture.
"""

from __future__ import annotations

import dataclasses
import math
import re
from typing import Dict, List, Sequence, Tuple

from nse_tf import errors

OP_KINDS = ("dw", "ssc", "conv", "dual")
LAYER_KINDS = ("N", "R", "E")


class SpaceError(errors.NSEError):
  """An unknown op name, pool or macro, or an impossible layout."""


@dataclasses.dataclass(frozen=True)
class OpSpec:
  """One candidate op (SPEC §2.1): an inverted bottleneck with a spatial part.

  Attributes:
    kind: 'dw' (depthwise, optionally dilated or with grouped 1x1 convs),
      'ssc' (spatially separable 1xk then kx1 dense convs), 'conv' (dense 3x3)
      or 'dual' (two dense 3x3 convs).
    kernel: spatial kernel size k.
    expand: expansion ratio T (hidden width e = C_in * T).
    dilation: depthwise dilation D (only for 'dw' with k = 3).
    groups_in: groups of the expanding 1x1 conv (only 'dw').
    groups_out: groups of the projecting 1x1 conv (only 'dw').
  """
  kind: str
  kernel: int
  expand: int
  dilation: int = 1
  groups_in: int = 1
  groups_out: int = 1

  def __post_init__(self):
    if self.kind not in OP_KINDS:
      raise SpaceError(f"unknown op kind {self.kind!r}; expected one of {OP_KINDS}")
    if self.kernel < 1 or self.kernel % 2 == 0:
      raise SpaceError(f"op kernel must be a positive odd number, got {self.kernel}")
    if self.expand < 1:
      raise SpaceError(f"op expand ratio must be >= 1, got {self.expand}")
    if self.dilation < 1 or self.groups_in < 1 or self.groups_out < 1:
      raise SpaceError("dilation and groups must be >= 1")
    if self.dilation > 1 and (self.kind != "dw" or self.kernel != 3):
      raise SpaceError("dilation is only defined for 3x3 depthwise ops (dw_k3_e{T}_d{D})")
    if (self.groups_in > 1 or self.groups_out > 1) and self.kind != "dw":
      raise SpaceError("grouped 1x1 convs are only defined for depthwise ops")
    if self.dilation > 1 and (self.groups_in > 1 or self.groups_out > 1):
      raise SpaceError("an op cannot be both dilated and grouped")
    if self.kind in ("conv", "dual") and self.kernel != 3:
      raise SpaceError(f"{self.kind} ops are 3x3 only, got k={self.kernel}")

  @property
  def name(self) -> str:
    """The canonical name of SPEC §2.1."""
    base = f"{self.kind}_k{self.kernel}_e{self.expand}"
    if self.dilation > 1:
      return f"{base}_d{self.dilation}"
    if self.groups_in > 1 or self.groups_out > 1:
      return f"{base}_g{self.groups_in}{self.groups_out}"
    return base

  def __str__(self) -> str:
    return self.name


_NAME_RE = re.compile(
    r"^(?P<kind>dw|ssc|conv|dual)_k(?P<k>\d+)_e(?P<e>\d+)"
    r"(?:_d(?P<d>\d+)|_g(?P<gi>\d)(?P<go>\d))?$")


def parse_op(name: str) -> OpSpec:
  """Parses a canonical op name such as 'dw_k3_e6_d2' or 'dw_k5_e3_g21'."""
  if not isinstance(name, str):
    raise SpaceError(f"op name must be a string, got {type(name).__name__} {name!r}")
  m = _NAME_RE.match(name)
  if not m:
    raise SpaceError(
        f"unknown op name {name!r}; expected e.g. 'dw_k3_e6', 'dw_k3_e1_d2', "
        "'dw_k5_e3_g21', 'ssc_k5_e2', 'conv_k3_e1' or 'dual_k3_e2'")
  try:
    spec = OpSpec(
        kind=m["kind"], kernel=int(m["k"]), expand=int(m["e"]),
        dilation=int(m["d"]) if m["d"] else 1,
        groups_in=int(m["gi"]) if m["gi"] else 1,
        groups_out=int(m["go"]) if m["go"] else 1)
  except SpaceError as e:  # e.g. 'dw_k4_e1': say which name was wrong
    raise SpaceError(f"unknown op name {name!r}: {e}") from None
  if spec.name != name:  # e.g. 'dw_k3_e1_d1' or leading zeros: not canonical
    raise SpaceError(f"op name {name!r} is not canonical; did you mean {spec.name!r}?")
  return spec


def _flops27() -> List[str]:
  names = []
  for k in (3, 5, 7, 9, 11):
    for t in (1, 3, 6):
      for d in ((1, 2, 3) if k == 3 else (1,)):
        names.append(OpSpec("dw", k, t, dilation=d).name)
  for k in (5, 7):
    for t in (1, 2, 4):
      names.append(OpSpec("ssc", k, t).name)
  return names


def _flops72() -> List[str]:
  names = _flops27()
  for k in (3, 5, 7, 9, 11):
    for t in (1, 3, 6):
      for gi, go in ((1, 2), (2, 1), (2, 2)):
        names.append(OpSpec("dw", k, t, groups_in=gi, groups_out=go).name)
  return names


def _latency19() -> List[str]:
  names = [OpSpec("dw", k, t).name for k in (3, 5, 7) for t in (1, 3, 6)]
  names += [OpSpec("conv", 3, t).name for t in (1, 2)]
  names += [OpSpec("dual", 3, t).name for t in (1, 2)]
  names += [OpSpec("ssc", k, t).name for k in (5, 7) for t in (1, 2, 4)]
  return names


POOLS: Dict[str, Tuple[str, ...]] = {
    "flops27": tuple(_flops27()),
    "flops72": tuple(_flops72()),
    "latency19": tuple(_latency19()),
}

# The macro-architecture each pool was designed for (used when a JSON omits it).
DEFAULT_MACRO = {"flops27": "flops", "flops72": "flops", "latency19": "latency"}


def get_pool(space: str) -> Tuple[str, ...]:
  try:
    return POOLS[space]
  except KeyError:
    raise SpaceError(f"unknown space {space!r}; expected one of {sorted(POOLS)}") from None


def op_index(space: str) -> Dict[str, int]:
  """Maps op name -> index in the pool (cached)."""
  idx = _OP_INDEX.get(space)
  if idx is None:
    idx = {n: i for i, n in enumerate(get_pool(space))}
    _OP_INDEX[space] = idx
  return idx


_OP_INDEX: Dict[str, Dict[str, int]] = {}


# ---------------------------------------------------------------------------
# Macro-architectures (SPEC §2.3)


@dataclasses.dataclass(frozen=True)
class MacroSpec:
  """A macro-architecture: stem, stages of multi-branch layers, head.

  `stages` is a sequence of (layer kinds, output channels); the first layer of a
  stage carries the stage's stride/channel change ('R' or 'E'), the first stage
  may be a single normal layer on the stem's channels.
  """
  name: str
  stages: Tuple[Tuple[str, int], ...]
  stem_channels: int = 16
  head_channels: int = 1024
  default_resolution: int = 224


MACROS: Dict[str, MacroSpec] = {
    "flops": MacroSpec("flops", (
        ("N", 16), ("RNNN", 24), ("RNNN", 40), ("RNNN", 80), ("ENNN", 96),
        ("RNNN", 192), ("E", 320))),
    "latency": MacroSpec("latency", (
        ("N", 16), ("RNNN", 32), ("RNNN", 64), ("RNNNNNNN", 128), ("RNNN", 256))),
    # Not from the paper: 6 layers with every layer kind, so that unit tests and
    # smoke runs compile in seconds on a CPU. Searches for real use the two above.
    "tiny": MacroSpec("tiny", (("N", 16), ("RN", 24), ("RN", 32), ("E", 48)),
                      head_channels=128, default_resolution=32),
}


def get_macro(macro: str) -> MacroSpec:
  try:
    return MACROS[macro]
  except KeyError:
    raise SpaceError(f"unknown macro {macro!r}; expected one of {sorted(MACROS)}") from None


@dataclasses.dataclass(frozen=True)
class LayerSpec:
  """One multi-branch layer resolved for a resolution and channel scale."""
  index: int
  kind: str          # 'N', 'R' or 'E'
  c_in: int
  c_out: int
  stride: int
  h: int             # input height
  w: int             # input width
  stage: int

  @property
  def out_h(self) -> int:
    return conv_out(self.h, self.stride)

  @property
  def out_w(self) -> int:
    return conv_out(self.w, self.stride)

  @property
  def can_be_empty(self) -> bool:
    return self.kind == "N"


@dataclasses.dataclass(frozen=True)
class ResolvedMacro:
  """Every layer position of a macro plus the fixed stem/head dimensions."""
  macro: str
  resolution: Tuple[int, int]
  scale: float
  stem_channels: int
  stem_out_hw: Tuple[int, int]
  layers: Tuple[LayerSpec, ...]
  last_channels: int     # channels entering the 1x1 head conv
  head_channels: int
  final_hw: Tuple[int, int]


def conv_out(size: int, stride: int) -> int:
  """Output size of an odd-kernel conv with symmetric padding k//2 (or D*(k//2))."""
  return (size - 1) // stride + 1


def make_divisible(value: float, divisor: int = 8, min_value: int | None = None) -> int:
  """Nearest multiple of `divisor`, never below 90 % of `value` (MobileNet rule)."""
  if min_value is None:
    min_value = divisor
  new_value = max(min_value, int(value + divisor / 2) // divisor * divisor)
  if new_value < 0.9 * value:
    new_value += divisor
  return int(new_value)


def scaled_channels(channels: int, scale: float, stage: int) -> int:
  """Stage channels after the channel scale (the 16-channel first stage is fixed)."""
  if stage == 0 or scale == 1.0:
    return channels
  return make_divisible(channels * scale, 8)


def resolve_macro(macro: str, resolution=224, scale: float = 1.0) -> ResolvedMacro:
  """Resolves every layer of `macro` into (kind, C_in, C_out, stride, input H×W).

  Args:
    macro: 'flops' or 'latency'.
    resolution: input size, an int or (height, width).
    scale: channel scale factor of SPEC §6 (stem, first stage and the 1024 head
      are not scaled).
  """
  spec = get_macro(macro)
  if isinstance(resolution, int):
    resolution = (resolution, resolution)
  h, w = (int(r) for r in resolution)
  if h < 1 or w < 1:
    raise SpaceError(f"resolution must be positive, got {resolution}")
  if not scale > 0:
    raise SpaceError(f"channel scale must be > 0, got {scale}")
  h, w = conv_out(h, 2), conv_out(w, 2)
  stem_hw = (h, w)
  c = spec.stem_channels
  layers = []
  for stage, (kinds, channels) in enumerate(spec.stages):
    c_stage = scaled_channels(channels, scale, stage)
    for kind in kinds:
      stride = 2 if kind == "R" else 1
      c_out = c_stage if kind in "RE" else c
      if kind == "N" and c_out != c:
        raise SpaceError(f"macro {macro}: normal layer {len(layers)} changes channels")
      layers.append(LayerSpec(len(layers), kind, c, c_out, stride, h, w, stage))
      c = c_out
      h, w = conv_out(h, stride), conv_out(w, stride)
  return ResolvedMacro(
      macro=macro, resolution=tuple(int(r) for r in resolution), scale=float(scale),
      stem_channels=spec.stem_channels, stem_out_hw=stem_hw, layers=tuple(layers),
      last_channels=c, head_channels=spec.head_channels, final_hw=(h, w))


def num_layers(macro: str) -> int:
  return sum(len(kinds) for kinds, _ in get_macro(macro).stages)


def layer_kinds(macro: str) -> Tuple[str, ...]:
  return tuple(k for kinds, _ in get_macro(macro).stages for k in kinds)


# ---------------------------------------------------------------------------
# Space size (SPEC §2.4)


def layer_choices(pool_size: int, max_ops: int, kind: str) -> int:
  """Number of op subsets a layer may hold: Σ C(N, k) for k from 0 (N) or 1 (R/E) to K."""
  if kind not in LAYER_KINDS:
    raise SpaceError(f"unknown layer kind {kind!r}")
  if max_ops < 1:
    raise SpaceError(f"max_ops (K) must be >= 1, got {max_ops}")
  lo = 0 if kind == "N" else 1
  return sum(math.comb(pool_size, k) for k in range(lo, min(max_ops, pool_size) + 1))


def space_size(space: str, max_ops: int, macro: str | None = None) -> Tuple[List[int], int]:
  """Per-layer subset counts and their product (an exact Python int)."""
  macro = macro or DEFAULT_MACRO[space]
  n = len(get_pool(space))
  per_layer = [layer_choices(n, max_ops, k) for k in layer_kinds(macro)]
  return per_layer, math.prod(per_layer)


def format_sci(value: int, digits: int = 1) -> str:
  """Scientific notation for arbitrarily large ints (floats overflow past 1e308)."""
  if value == 0:
    return "0"
  exp = len(str(abs(value))) - 1
  mantissa = value / 10 ** exp if exp < 300 else int(str(value)[:digits + 2]) / 10 ** (digits + 1)
  text = f"{mantissa:.{digits}f}"
  if float(text) >= 10:
    mantissa, exp = mantissa / 10, exp + 1
    text = f"{mantissa:.{digits}f}"
  return f"{text}e+{exp:02d}"


def default_rounds(pool_size: int, max_ops: int) -> int:
  """⌊(N − 1)/(K − 1)⌋ rounds (SPEC §5)."""
  if max_ops < 2:
    raise SpaceError("max_ops (K) must be >= 2 to evolve the space")
  return (pool_size - 1) // (max_ops - 1)


def ops_of(space: str, names: Sequence[str]) -> List[OpSpec]:
  return [parse_op(n) for n in names]
