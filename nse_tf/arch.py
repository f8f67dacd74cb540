"""`Architecture`: the one hand-off format from search to serving.

An architecture is a space (op pool), a macro-architecture, a channel scale and,
for every searchable layer of the macro, the list of ops it holds ([] is an empty
normal layer, i.e. an identity). Three forms, all lossless:

* JSON (versioned schema, validated on load), what every stage and tool reads:

    {"schema": "nse_tf.architecture", "version": 1, "space": "flops27",
     "macro": "flops", "scale": 1.04, "layers": [["dw_k3_e1"], ...],
     "metadata": {"cost": 312.5, "accuracy": 0.71, "round": 6}}

* A readable text block, one line per layer, that parses back:

    arch flops27@flops scale=1.04
    L00 N  16->16  s1 | dw_k3_e1
    L04 N  24->24  s1 | -
    L09 R  40->80  s2 | dw_k5_e6 + dw_k9_e6

* A compact one-line string of pool indices (used in candidates.csv):

    flops27@flops*1.04:0|6|3|0|-|16|...|11+17|...
"""

from __future__ import annotations

import dataclasses
import importlib.resources
import json
import math
import re
from typing import Any, Dict, Iterable, List, Mapping, Optional, Sequence, Tuple

from nse_tf import errors
from nse_tf import fileio
from nse_tf import spaces
from nse_tf.spaces import SpaceError

SCHEMA = "nse_tf.architecture"
SCHEMA_VERSION = 1
RELEASED_FILE = "released_archs.json"


class ArchitectureError(errors.NSEError):
  """An architecture that does not fit its space or macro; names layer and value."""


@dataclasses.dataclass(frozen=True)
class Architecture:
  """Per-layer op sets over a space and macro, with a channel scale.

  Attributes:
    space: op pool name ('flops27', 'flops72', 'latency19').
    macro: macro-architecture name ('flops', 'latency').
    layers: one tuple of canonical op names per searchable layer of the macro.
    scale: channel scale factor (SPEC §6).
    metadata: free information (cost, accuracy, round, selection rule, ...);
      not part of equality.
  """
  space: str
  macro: str
  layers: Tuple[Tuple[str, ...], ...]
  scale: float = 1.0
  metadata: Dict[str, Any] = dataclasses.field(default_factory=dict, compare=False,
                                               hash=False)

  def __post_init__(self):
    object.__setattr__(self, "layers", tuple(tuple(ops) for ops in self.layers))
    object.__setattr__(self, "scale", float(self.scale))
    object.__setattr__(self, "metadata", dict(self.metadata or {}))
    self.validate()

  # ---------------------------------------------------------------- validation
  def validate(self) -> None:
    """Raises `ArchitectureError` naming the layer and offending value."""
    if self.space not in spaces.POOLS:
      raise ArchitectureError(
          f"unknown space {self.space!r}; expected one of {sorted(spaces.POOLS)}")
    if self.macro not in spaces.MACROS:
      raise ArchitectureError(
          f"unknown macro {self.macro!r}; expected one of {sorted(spaces.MACROS)}")
    if not (isinstance(self.scale, float) and math.isfinite(self.scale) and self.scale > 0):
      raise ArchitectureError(f"scale must be a positive number, got {self.scale!r}")
    kinds = spaces.layer_kinds(self.macro)
    if len(self.layers) != len(kinds):
      raise ArchitectureError(
          f"macro {self.macro!r} has {len(kinds)} searchable layers, "
          f"the architecture lists {len(self.layers)}")
    index = spaces.op_index(self.space)
    for l, (ops, kind) in enumerate(zip(self.layers, kinds)):
      for name in ops:
        if not isinstance(name, str):
          raise ArchitectureError(f"layer {l}: op must be a name string, got {name!r}")
        if name not in index:
          try:
            spaces.parse_op(name)
          except SpaceError as e:
            raise ArchitectureError(f"layer {l}: {e}") from None
          raise ArchitectureError(
              f"layer {l}: op {name!r} is not in space {self.space!r}")
      if len(set(ops)) != len(ops):
        dup = sorted({n for n in ops if ops.count(n) > 1})
        raise ArchitectureError(f"layer {l}: op {dup[0]!r} listed twice")
      if not ops and kind != "N":
        raise ArchitectureError(
            f"layer {l}: a {kind} (reduction/expansion) layer must keep at least one op")

  # ------------------------------------------------------------------ helpers
  @property
  def num_layers(self) -> int:
    return len(self.layers)

  def indices(self) -> Tuple[Tuple[int, ...], ...]:
    """Pool indices per layer, in the layer's stored order."""
    index = spaces.op_index(self.space)
    return tuple(tuple(index[n] for n in ops) for ops in self.layers)

  def canonical(self) -> "Architecture":
    """Same architecture with each layer's ops sorted by pool index."""
    index = spaces.op_index(self.space)
    layers = tuple(tuple(sorted(ops, key=index.__getitem__)) for ops in self.layers)
    return dataclasses.replace(self, layers=layers)

  def key(self) -> Tuple:
    """Hashable identity ignoring op order within a layer (for uniqueness)."""
    return (self.space, self.macro, round(self.scale, 6),
            tuple(tuple(sorted(i)) for i in self.indices()))

  def with_metadata(self, **kw) -> "Architecture":
    md = dict(self.metadata)
    md.update(kw)
    return dataclasses.replace(self, metadata=md)

  def with_scale(self, scale: float) -> "Architecture":
    return dataclasses.replace(self, scale=scale)

  @classmethod
  def from_indices(cls, space: str, layers_idx: Sequence[Iterable[int]],
                   macro: Optional[str] = None, scale: float = 1.0,
                   metadata: Optional[Mapping[str, Any]] = None) -> "Architecture":
    pool = spaces.get_pool(space)
    layers = []
    for l, idx in enumerate(layers_idx):
      names = []
      for i in idx:
        if not 0 <= int(i) < len(pool):
          raise ArchitectureError(
              f"layer {l}: op index {i} out of range for {space} (0..{len(pool) - 1})")
        names.append(pool[int(i)])
      layers.append(tuple(names))
    return cls(space, macro or spaces.DEFAULT_MACRO[space], tuple(layers), scale,
               dict(metadata or {}))

  # --------------------------------------------------------------------- JSON
  def to_dict(self) -> Dict[str, Any]:
    return {
        "schema": SCHEMA,
        "version": SCHEMA_VERSION,
        "space": self.space,
        "macro": self.macro,
        "scale": self.scale,
        "layers": [list(ops) for ops in self.layers],
        "metadata": _jsonable(self.metadata),
    }

  def to_json(self, indent: Optional[int] = 1) -> str:
    return json.dumps(self.to_dict(), indent=indent)

  @classmethod
  def from_dict(cls, d: Mapping[str, Any]) -> "Architecture":
    if not isinstance(d, Mapping):
      raise ArchitectureError(f"architecture JSON must be an object, got {type(d).__name__}")
    schema = d.get("schema", SCHEMA)
    if schema != SCHEMA:
      raise ArchitectureError(f"not an architecture file: schema {schema!r} != {SCHEMA!r}")
    version = d.get("version", SCHEMA_VERSION)
    if version != SCHEMA_VERSION:
      raise ArchitectureError(
          f"unknown architecture schema version {version!r}; this nse_tf reads version "
          f"{SCHEMA_VERSION} (upgrade nse_tf to read newer files)")
    unknown = set(d) - {"schema", "version", "space", "macro", "scale", "layers", "metadata"}
    if unknown:
      raise ArchitectureError(f"unknown architecture field(s): {sorted(unknown)}")
    for field in ("space", "layers"):
      if field not in d:
        raise ArchitectureError(f"architecture JSON is missing the {field!r} field")
    space = d["space"]
    if space not in spaces.POOLS:
      raise ArchitectureError(
          f"unknown space {space!r}; expected one of {sorted(spaces.POOLS)}")
    layers = d["layers"]
    if not isinstance(layers, list) or not all(isinstance(x, list) for x in layers):
      raise ArchitectureError("'layers' must be a list with one list of op names per layer")
    scale = d.get("scale", 1.0)
    if isinstance(scale, bool) or not isinstance(scale, (int, float)):
      raise ArchitectureError(f"scale must be a positive number, got {scale!r}")
    metadata = d.get("metadata") or {}
    if not isinstance(metadata, Mapping):
      raise ArchitectureError("'metadata' must be an object")
    return cls(space, d.get("macro") or spaces.DEFAULT_MACRO[space],
               tuple(tuple(x) for x in layers), scale, dict(metadata))

  @classmethod
  def from_json(cls, text: str) -> "Architecture":
    try:
      d = json.loads(text)
    except json.JSONDecodeError as e:
      raise ArchitectureError(f"bad JSON: {e}") from None
    return cls.from_dict(d)

  def save(self, path: str) -> None:
    fileio.atomic_write_text(path, self.to_json() + "\n")

  @classmethod
  def load(cls, path: str) -> "Architecture":
    try:
      with open(path, encoding="utf-8") as f:
        text = f.read()
    except OSError as e:
      raise ArchitectureError(f"cannot read architecture file {path!r}: {e.strerror}") from None
    try:
      return cls.from_json(text)
    except ArchitectureError as e:
      raise ArchitectureError(f"{path}: {e}") from None

  # --------------------------------------------------------------------- text
  def to_text(self, resolution=224) -> str:
    """One readable line per layer (kind, channels, stride, ops); parses back."""
    resolved = spaces.resolve_macro(self.macro, resolution, self.scale)
    lines = [f"arch {self.space}@{self.macro} scale={_fmt_scale(self.scale)}"]
    for layer, ops in zip(resolved.layers, self.layers):
      lines.append(f"L{layer.index:02d} {layer.kind}  {layer.c_in:>3d}->{layer.c_out:<3d} "
                   f"s{layer.stride} | {' + '.join(ops) if ops else '-'}")
    return "\n".join(lines)

  @classmethod
  def from_text(cls, text: str) -> "Architecture":
    lines = [ln.strip() for ln in text.strip().splitlines() if ln.strip()]
    if not lines:
      raise ArchitectureError("empty architecture text")
    m = re.match(r"^arch\s+(\w+)@(\w+)\s+scale=([0-9.eE+-]+)$", lines[0])
    if not m:
      raise ArchitectureError(
          f"first line must read 'arch SPACE@MACRO scale=S', got {lines[0]!r}")
    layers = []
    for ln in lines[1:]:
      if "|" not in ln:
        raise ArchitectureError(f"layer line {len(layers)} has no '|': {ln!r}")
      ops = ln.split("|", 1)[1].strip()
      layers.append(tuple() if ops == "-" else tuple(o.strip() for o in ops.split("+")))
    return cls(m[1], m[2], tuple(layers), _parse_scale(m[3]))

  # ------------------------------------------------------------------ compact
  def to_compact(self) -> str:
    """One line of pool indices: 'flops27@flops*1.04:0|6|-|11+17|...'."""
    head = f"{self.space}@{self.macro}"
    if self.scale != 1.0:
      head += f"*{_fmt_scale(self.scale)}"
    body = "|".join("+".join(str(i) for i in idx) if idx else "-" for idx in self.indices())
    return f"{head}:{body}"

  @classmethod
  def from_compact(cls, text: str) -> "Architecture":
    m = re.match(r"^(\w+)@(\w+)(?:\*([0-9.eE+-]+))?:(.*)$", text.strip())
    if not m:
      raise ArchitectureError(
          f"compact architecture must read 'SPACE@MACRO[*SCALE]:i+j|-|...', got {text!r}")
    layers = []
    for l, part in enumerate(m[4].split("|")):
      if part == "-":
        layers.append(())
        continue
      try:
        layers.append(tuple(int(i) for i in part.split("+")))
      except ValueError:
        raise ArchitectureError(f"layer {l}: bad op indices {part!r}") from None
    return cls.from_indices(m[1], layers, macro=m[2], scale=_parse_scale(m[3] or "1.0"))

  def __str__(self) -> str:
    return self.to_compact()


def _fmt_scale(s: float) -> str:
  return repr(float(s))  # shortest text that reads back as the same float (lossless)


def _parse_scale(text: str) -> float:
  try:
    return float(text)
  except ValueError:
    raise ArchitectureError(f"scale must be a number, got {text!r}") from None


def _jsonable(obj):
  """Metadata as plain JSON types (numpy scalars, tuples)."""
  if isinstance(obj, Mapping):
    return {str(k): _jsonable(v) for k, v in obj.items()}
  if isinstance(obj, (list, tuple)):
    return [_jsonable(v) for v in obj]
  if hasattr(obj, "item") and callable(obj.item):
    return obj.item()
  return obj


# ------------------------------------------------------------------ released
def released_names() -> List[str]:
  return sorted(_released()["architectures"])


def _released() -> Dict[str, Any]:
  text = importlib.resources.files("nse_tf").joinpath(RELEASED_FILE).read_text("utf-8")
  return json.loads(text)


def load_released(name: str) -> Architecture:
  """The networks released with the paper: 'NSENet-27', 'NSENet', 'NSENet-GPU'."""
  archs = _released()["architectures"]
  if name not in archs:
    raise ArchitectureError(f"unknown released network {name!r}; expected one of {sorted(archs)}")
  d = dict(archs[name])
  d.setdefault("metadata", {})["name"] = name
  return Architecture.from_dict(d)


def resolve(arch: Optional[str] = None, arch_json: Optional[str] = None) -> Architecture:
  """An architecture from a released name, a compact string or a JSON file path."""
  if bool(arch) == bool(arch_json):
    raise ArchitectureError("give exactly one of --arch (released name) or --arch_json (file)")
  if arch_json:
    return Architecture.load(arch_json)
  if ":" in arch and "@" in arch:
    return Architecture.from_compact(arch)
  return load_released(arch)
