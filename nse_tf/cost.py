"""The cost model: multiply-accumulates (MACs, "FLOPs") and parameters.

Counting convention (SPEC §4), used everywhere in the project:
  * Only convolutions and fully-connected layers count, as multiply-accumulates:
    H_out · W_out · C_out · (C_in / groups) · k_h · k_w for a conv, C_in · C_out
    for a dense layer.
  * Batch norm, activations, element-wise adds/averages and max-pooling are free.
  * Average pooling counts its output elements (a global average pool counts its
    channel count).
  * The fixed part of a network is the stem, the 1x1 head conv, the pool and the fc.
Parameters follow `keras.Model.count_params()`: every weight, the batch-norm
moving statistics included.

The analytic part is pure Python and precomputes per-layer tables (`CostTable`) so
that the search can cost tens of thousands of sampled architectures per second.
`count_graph` counts any built Keras model (keras.applications, detectors) with the
same convention by walking its TensorFlow graph, and `profiler_macs` asks
TensorFlow's own profiler, which the tests use to prove the analytic numbers right.
"""

from __future__ import annotations

import dataclasses
from typing import Dict, Iterable, List, Mapping, Sequence, Tuple

from nse_tf import spaces
from nse_tf.spaces import LayerSpec, OpSpec, SpaceError

SE_REDUCTION = 4


def hidden_channels(op: OpSpec, c_in: int) -> int:
  """Hidden width e = C_in · T."""
  return c_in * op.expand


def check_groups(op: OpSpec, c_in: int, c_out: int) -> None:
  e = hidden_channels(op, c_in)
  if c_in % op.groups_in or e % op.groups_in or e % op.groups_out or c_out % op.groups_out:
    raise SpaceError(
        f"op {op.name} needs channel counts divisible by its groups "
        f"(C_in={c_in}, e={e}, C_out={c_out})")


def se_channels(e: int) -> int:
  return max(1, e // SE_REDUCTION)


@dataclasses.dataclass(frozen=True)
class Cost:
  macs: int
  params: int

  def __add__(self, other: "Cost") -> "Cost":
    return Cost(self.macs + other.macs, self.params + other.params)


def _conv(h_out: int, w_out: int, c_in: int, c_out: int, kh: int, kw: int, groups: int = 1,
          bias: bool = False, bn: bool = True) -> Cost:
  macs = h_out * w_out * c_out * (c_in // groups) * kh * kw
  params = c_out * (c_in // groups) * kh * kw + (c_out if bias else 0) + (4 * c_out if bn else 0)
  return Cost(macs, params)


def op_cost(op: OpSpec, layer: LayerSpec, se: bool = False) -> Cost:
  """MACs and params of one candidate op at a layer position (SPEC §2.1)."""
  return op_cost_at(op, layer.c_in, layer.c_out, layer.stride, layer.h, layer.w, se)


def op_cost_at(op: OpSpec, c_in: int, c_out: int, stride: int, h: int, w: int,
               se: bool = False) -> Cost:
  check_groups(op, c_in, c_out)
  e = hidden_channels(op, c_in)
  ho, wo = spaces.conv_out(h, stride), spaces.conv_out(w, stride)
  k = op.kernel
  total = _conv(h, w, c_in, e, 1, 1, groups=op.groups_in)  # expand (also for T = 1)
  if op.kind == "dw":
    total += Cost(ho * wo * e * k * k, e * k * k + 4 * e)
  elif op.kind == "ssc":
    total += _conv(h, wo, e, e, 1, k)     # 1×k, stride (1, s)
    total += _conv(ho, wo, e, e, k, 1)    # k×1, stride (s, 1)
  elif op.kind == "conv":
    total += _conv(ho, wo, e, e, k, k)
  elif op.kind == "dual":
    total += _conv(h, w, e, e, k, k)      # stride 1
    total += _conv(ho, wo, e, e, k, k)    # stride s
  if se:
    r = se_channels(e)
    # global pool (its channel count) + reduce and expand 1x1 convs with bias.
    total += Cost(e, 0) + _conv(1, 1, e, r, 1, 1, bias=True, bn=False)
    total += _conv(1, 1, r, e, 1, 1, bias=True, bn=False)
  total += _conv(ho, wo, e, c_out, 1, 1, groups=op.groups_out)  # project
  return total


def fixed_cost(resolved: spaces.ResolvedMacro, num_classes: int = 1000,
               include_head: bool = True) -> Cost:
  """Stem conv (+ 1x1 head conv with bias, global pool and fc when `include_head`)."""
  sh, sw = resolved.stem_out_hw
  total = _conv(sh, sw, 3, resolved.stem_channels, 3, 3)
  if include_head:
    fh, fw = resolved.final_hw
    hc = resolved.head_channels
    total += _conv(fh, fw, resolved.last_channels, hc, 1, 1, bias=True, bn=False)
    total += Cost(hc, 0)  # global average pool
    total += Cost(hc * num_classes, hc * num_classes + num_classes)
  return total


class CostTable:
  """Per-layer, per-op costs of a space on a macro at one resolution and scale.

  `macs[l][i]` is the MACs of pool op i in layer l (0 where the op cannot be
  built there); `fixed_macs` is the stem/head part. These tables are what the
  sampler and the supernet regulariser use; a latency table exposes the same
  interface (`layer_costs`, `fixed`, `indices_cost`, `arch_cost`, `reference_cost`) so
  that it plugs in unchanged.
  """

  unit = "MFLOPs"  # multiply-accumulates, the NAS convention

  def __init__(self, space: str, macro: str | None = None, resolution=224,
               scale: float = 1.0, num_classes: int = 1000, se: bool = False):
    self.space = space
    self.macro = macro or spaces.DEFAULT_MACRO[space]
    self.pool = spaces.get_pool(space)
    self.resolved = spaces.resolve_macro(self.macro, resolution, scale)
    self.num_classes = num_classes
    self.se = se
    ops = [spaces.parse_op(n) for n in self.pool]
    self.macs: List[List[int]] = []
    self.params: List[List[int]] = []
    for layer in self.resolved.layers:
      row_m, row_p = [], []
      for op in ops:
        c = op_cost(op, layer, se)
        row_m.append(c.macs)
        row_p.append(c.params)
      self.macs.append(row_m)
      self.params.append(row_p)
    fixed = fixed_cost(self.resolved, num_classes)
    self.fixed_macs = fixed.macs
    self.fixed_params = fixed.params
    self._by_name = [dict(zip(self.pool, row)) for row in self.macs]

  # -- the interface shared with latency tables (costs in the table's unit) --
  @property
  def fixed(self) -> float:
    return self.fixed_macs / 1e6

  def layer_costs(self, layer: int) -> List[float]:
    """Cost of every pool op at `layer`, in MMACs (the search's unit)."""
    return [m / 1e6 for m in self.macs[layer]]

  def reference_cost(self) -> float:
    """Cost of the network holding every layer's single most expensive op (the unit of
    relative targets), in MMACs."""
    return (self.fixed_macs + sum(max(row) for row in self.macs)) / 1e6

  def indices_cost(self, layers_idx: Sequence[Iterable[int]]) -> float:
    """Cost in MMACs of an architecture given as pool indices per layer."""
    total = self.fixed_macs
    macs = self.macs
    for l, idx in enumerate(layers_idx):
      row = macs[l]
      for i in idx:
        total += row[i]
    return total / 1e6

  def arch_cost(self, arch) -> float:
    """Cost in MMACs of an `Architecture` (or per-layer op-name lists)."""
    layers = arch.layers if hasattr(arch, "layers") else arch
    if len(layers) != len(self._by_name):
      raise SpaceError(f"architecture has {len(layers)} layers, the table {len(self._by_name)}")
    total = self.fixed_macs
    for row, ops in zip(self._by_name, layers):
      for name in ops:
        total += row[name]
    return total / 1e6


def arch_cost(arch, resolution=224, num_classes: int = 1000, se: bool = False,
              include_head: bool = True) -> Cost:
  """Exact MACs and params of an `Architecture`'s standalone network.

  Counts what `nsenet.build_nsenet` builds: empty normal layers are identities,
  the channel scale of the architecture is applied.
  """
  resolved = spaces.resolve_macro(arch.macro, resolution, arch.scale)
  total = fixed_cost(resolved, num_classes, include_head)
  for layer, names in zip(resolved.layers, arch.layers):
    for name in names:
      total += op_cost(spaces.parse_op(name), layer, se)
  return total


# ---------------------------------------------------------------------------
# Counting any built Keras model on its TensorFlow graph.

COUNTED_OPS = ("Conv2D", "DepthwiseConv2dNative", "MatMul", "BatchMatMulV2")
POOL_OPS = ("Mean", "AvgPool")


def _concrete_graph(model, input_shape):
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  specs = tf.TensorSpec([1, *input_shape], tf.float32)

  @tf.function
  def forward(x):
    return model(x, training=False)

  return forward.get_concrete_function(specs).graph


def count_graph(model, input_shape: Sequence[int]) -> Dict[str, int]:
  """MACs per op type of a built Keras model on a batch-1 graph.

  Works for any model (keras.applications, tf-models detectors, NSENet) since it
  walks the traced graph instead of Keras layers: grouped and dilated convs,
  separable convs (a depthwise then a 1x1 Conv2D) and dense layers all appear as
  the ops below. Returns a dict op_type -> MACs plus 'total'.
  """
  graph = _concrete_graph(model, input_shape)
  counts: Dict[str, int] = {}

  def add(kind, n):
    counts[kind] = counts.get(kind, 0) + int(n)

  for op in graph.get_operations():
    t = op.type
    if t not in COUNTED_OPS and t not in POOL_OPS:
      continue
    out = op.outputs[0].shape
    if not out.is_fully_defined():
      raise ValueError(f"cannot count {op.name}: output shape {out} is not fully defined")
    out_elems = out.num_elements()
    if t in ("Conv2D", "DepthwiseConv2dNative"):
      kshape = op.inputs[1].shape.as_list()  # [kh, kw, cin/groups, cout] or [kh, kw, cin, mult]
      add(t, out_elems * kshape[0] * kshape[1] * (kshape[2] if t == "Conv2D" else 1))
    elif t in ("MatMul", "BatchMatMulV2"):
      a = op.inputs[0].shape.as_list()
      transpose_a = op.get_attr("transpose_a") if t == "MatMul" else op.get_attr("adj_x")
      inner = a[-2] if transpose_a else a[-1]
      add(t, out_elems * inner)
    elif t == "Mean":
      in_shape = op.inputs[0].shape.as_list()
      if len(in_shape) == 4:  # global average pooling over H, W
        add("AvgPool", out_elems)
    else:  # AvgPool
      add("AvgPool", out_elems)
  counts["total"] = sum(v for k, v in counts.items())
  return counts


def profiler_macs(model, input_shape: Sequence[int],
                  op_types: Sequence[str] = COUNTED_OPS) -> int:
  """TensorFlow's own profiler: float operations of `op_types` / 2 (batch-1 graph)."""
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  graph = _concrete_graph(model, input_shape)
  opts = (tf.compat.v1.profiler.ProfileOptionBuilder(
      tf.compat.v1.profiler.ProfileOptionBuilder.float_operation())
          .with_empty_output().build())
  from tensorflow.python.util import deprecation  # pylint: disable=g-import-not-at-top
  with deprecation.silence():
    result = tf.compat.v1.profiler.profile(graph, cmd="op", options=opts)
  # The 'op' view nests op types as a chain: each node's own count is float_ops.
  flops, stack = 0, list(result.children)
  while stack:
    node = stack.pop()
    if node.name in op_types:
      flops += node.float_ops
    stack.extend(node.children)
  return flops // 2


def format_count(n: float) -> str:
  return f"{n / 1e6:.2f}"


def summarize(costs: Mapping[str, int]) -> str:
  return ", ".join(f"{k}={v / 1e6:.2f}M" for k, v in sorted(costs.items()))


def random_architectures(space: str, count: int, seed: int = 0, max_ops: int = 3,
                         macro: str | None = None, scale: float = 1.0):
  """Uniformly random architectures (≤ max_ops per layer), for tests and baselines."""
  import random  # pylint: disable=g-import-not-at-top
  from nse_tf import arch as arch_lib  # pylint: disable=g-import-not-at-top
  macro = macro or spaces.DEFAULT_MACRO[space]
  rng = random.Random(seed)
  pool = spaces.get_pool(space)
  out = []
  for _ in range(count):
    layers = []
    for kind in spaces.layer_kinds(macro):
      n = rng.randint(0 if kind == "N" else 1, max_ops)
      layers.append(tuple(sorted(rng.sample(range(len(pool)), n))))
    out.append(arch_lib.Architecture.from_indices(space, layers, macro=macro, scale=scale))
  return out


def per_layer_macs(arch, resolution=224) -> List[Tuple[int, int]]:
  """(layer index, MACs) of every layer, for reports."""
  resolved = spaces.resolve_macro(arch.macro, resolution, arch.scale)
  return [(layer.index, sum(op_cost(spaces.parse_op(n), layer).macs for n in names))
          for layer, names in zip(resolved.layers, arch.layers)]
