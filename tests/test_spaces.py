"""Tests of nse_tf.spaces: op pools (SPEC §2.2), op names, macros (§2.3), space size (§2.4)."""

import math

import pytest

from nse_tf import spaces
from nse_tf.spaces import SpaceError

FLOPS27 = spaces.POOLS["flops27"]
FLOPS72 = spaces.POOLS["flops72"]
LATENCY19 = spaces.POOLS["latency19"]


# ------------------------------------------------------------------------------- pools

def test_pool_sizes():
  assert len(FLOPS27) == 27
  assert len(FLOPS72) == 72
  assert len(LATENCY19) == 19
  for name, pool in spaces.POOLS.items():
    assert len(set(pool)) == len(pool), f"{name} has duplicate ops"
    assert spaces.get_pool(name) is pool


def test_flops27_order():
  assert FLOPS27[:9] == (
      "dw_k3_e1", "dw_k3_e1_d2", "dw_k3_e1_d3",
      "dw_k3_e3", "dw_k3_e3_d2", "dw_k3_e3_d3",
      "dw_k3_e6", "dw_k3_e6_d2", "dw_k3_e6_d3")
  assert FLOPS27[9] == "dw_k5_e1"
  assert FLOPS27[9:21] == (
      "dw_k5_e1", "dw_k5_e3", "dw_k5_e6", "dw_k7_e1", "dw_k7_e3", "dw_k7_e6",
      "dw_k9_e1", "dw_k9_e3", "dw_k9_e6", "dw_k11_e1", "dw_k11_e3", "dw_k11_e6")
  assert FLOPS27[20] == "dw_k11_e6"
  assert FLOPS27[21] == "ssc_k5_e1"
  assert FLOPS27[21:] == (
      "ssc_k5_e1", "ssc_k5_e2", "ssc_k5_e4", "ssc_k7_e1", "ssc_k7_e2", "ssc_k7_e4")
  assert FLOPS27[26] == "ssc_k7_e4"


def test_flops72_order():
  assert FLOPS72[:27] == FLOPS27
  assert FLOPS72[27] == "dw_k3_e1_g12"
  assert FLOPS72[28] == "dw_k3_e1_g21"
  assert FLOPS72[29] == "dw_k3_e1_g22"
  assert FLOPS72[71] == "dw_k11_e6_g22"
  for k_idx, k in enumerate((3, 5, 7, 9, 11)):
    for t_idx, t in enumerate((1, 3, 6)):
      for g_idx, g in enumerate(("12", "21", "22")):
        i = 27 + 3 * (3 * k_idx + t_idx) + g_idx
        assert FLOPS72[i] == f"dw_k{k}_e{t}_g{g}", i
  assert spaces.op_index("flops72")["dw_k7_e3_g21"] == 27 + 3 * (3 * 2 + 1) + 1


def test_latency19_order():
  assert LATENCY19 == (
      "dw_k3_e1", "dw_k3_e3", "dw_k3_e6", "dw_k5_e1", "dw_k5_e3", "dw_k5_e6",
      "dw_k7_e1", "dw_k7_e3", "dw_k7_e6",
      "conv_k3_e1", "conv_k3_e2", "dual_k3_e1", "dual_k3_e2",
      "ssc_k5_e1", "ssc_k5_e2", "ssc_k5_e4", "ssc_k7_e1", "ssc_k7_e2", "ssc_k7_e4")


def test_op_index_matches_pool():
  for space, pool in spaces.POOLS.items():
    index = spaces.op_index(space)
    assert [index[n] for n in pool] == list(range(len(pool)))


def test_unknown_space():
  with pytest.raises(SpaceError, match="flops99"):
    spaces.get_pool("flops99")
  with pytest.raises(SpaceError, match="nope"):
    spaces.get_macro("nope")


# ------------------------------------------------------------------------------ op names

@pytest.mark.parametrize("space", sorted(spaces.POOLS))
def test_parse_format_round_trip(space):
  for name in spaces.POOLS[space]:
    spec = spaces.parse_op(name)
    assert spec.name == name
    assert str(spec) == name
    assert spaces.parse_op(spec.name) == spec
    # Rebuilding the spec from its fields gives the same op.
    assert spaces.OpSpec(spec.kind, spec.kernel, spec.expand, spec.dilation, spec.groups_in,
                         spec.groups_out) == spec


def test_parse_fields():
  assert spaces.parse_op("dw_k3_e6_d2") == spaces.OpSpec("dw", 3, 6, dilation=2)
  assert spaces.parse_op("dw_k5_e3_g21") == spaces.OpSpec("dw", 5, 3, groups_in=2, groups_out=1)
  assert spaces.parse_op("ssc_k7_e4") == spaces.OpSpec("ssc", 7, 4)
  assert spaces.parse_op("conv_k3_e2") == spaces.OpSpec("conv", 3, 2)
  assert spaces.parse_op("dual_k3_e1") == spaces.OpSpec("dual", 3, 1)
  assert [o.name for o in spaces.ops_of("flops27", ["dw_k3_e1", "ssc_k5_e2"])] == [
      "dw_k3_e1", "ssc_k5_e2"]


@pytest.mark.parametrize("name", [
    "dw_k3_e1_d1",     # dilation 1 is written without _d
    "dw_k3_e1_g11",    # groups 1/1 is written without _g
    "dw_k4_e1",        # even kernel
    "conv_k5_e1",      # dense convs are 3x3 only
    "dual_k5_e1",
    "foo",
    "",
    "dw_k03_e1",       # leading zero
    "dw_k3_e01",
    "dw_k3_e0",        # expand ratio < 1
    "dw_k3_e1_d0",
    "dw_k5_e1_d2",     # dilation only for 3x3
    "ssc_k5_e1_d2",
    "ssc_k5_e1_g22",   # groups only for depthwise ops
    "dw_k3_e1_g20",
    "DW_k3_e1",
    " dw_k3_e1",
    "dw_k3_e1\n",
    "dw_k3_e1_d2_g22",
    "sep_k3_e1",
])
def test_non_canonical_names_rejected(name):
  with pytest.raises(SpaceError):
    spaces.parse_op(name)


def test_non_canonical_name_suggests_canonical():
  with pytest.raises(SpaceError, match="dw_k3_e1'"):
    spaces.parse_op("dw_k3_e1_d1")


def test_parse_non_string():
  with pytest.raises(SpaceError, match="string"):
    spaces.parse_op(3)
  with pytest.raises(SpaceError):
    spaces.parse_op(None)


# ------------------------------------------------------------------------------ macros

FLOPS_KINDS = "N" + "RNNN" * 3 + "ENNN" + "RNNN" + "E"
LATENCY_KINDS = "N" + "RNNN" * 2 + "RNNNNNNN" + "RNNN"


def test_layer_kinds_and_counts():
  assert "".join(spaces.layer_kinds("flops")) == FLOPS_KINDS
  assert "".join(spaces.layer_kinds("latency")) == LATENCY_KINDS
  assert spaces.num_layers("flops") == 22
  assert spaces.num_layers("latency") == 21
  assert FLOPS_KINDS.count("N") == 16 and len(FLOPS_KINDS) - 16 == 6


def _expected_layers(kinds, channels_per_layer, stem_hw):
  h, c = stem_hw, 16
  out = []
  for kind, c_out in zip(kinds, channels_per_layer):
    s = 2 if kind == "R" else 1
    out.append((kind, c, c_out, s, h))
    h = (h - 1) // s + 1
    c = c_out
  return out, h


def _stage_channels(macro):
  return [ch for kinds, ch in spaces.get_macro(macro).stages for _ in kinds]


@pytest.mark.parametrize("macro,kinds,stage_channels,final_channels", [
    ("flops", FLOPS_KINDS, (16, 24, 40, 80, 96, 192, 320), 320),
    ("latency", LATENCY_KINDS, (16, 32, 64, 128, 256), 256),
])
def test_resolve_macro_224(macro, kinds, stage_channels, final_channels):
  r = spaces.resolve_macro(macro, 224)
  assert r.resolution == (224, 224)
  assert r.stem_channels == 16
  assert r.stem_out_hw == (112, 112)
  assert r.head_channels == 1024
  assert r.last_channels == final_channels
  assert r.final_hw == (7, 7)
  assert len(r.layers) == len(kinds)
  assert tuple(ch for _, ch in spaces.get_macro(macro).stages) == stage_channels
  expected, _ = _expected_layers(kinds, _stage_channels(macro), 112)
  for layer, (kind, c_in, c_out, stride, h) in zip(r.layers, expected):
    assert (layer.kind, layer.c_in, layer.c_out, layer.stride, layer.h, layer.w) == (
        kind, c_in, c_out, stride, h, h), layer
    assert layer.can_be_empty == (kind == "N")
    if kind == "N":
      assert layer.c_in == layer.c_out and layer.stride == 1
    if kind == "E":
      assert layer.stride == 1 and layer.c_in != layer.c_out
  assert [l.index for l in r.layers] == list(range(len(kinds)))


def test_resolve_flops_224_explicit():
  r = spaces.resolve_macro("flops", 224)
  table = [(l.kind, l.c_in, l.c_out, l.stride, l.h) for l in r.layers]
  assert table == [
      ("N", 16, 16, 1, 112),
      ("R", 16, 24, 2, 112), ("N", 24, 24, 1, 56), ("N", 24, 24, 1, 56), ("N", 24, 24, 1, 56),
      ("R", 24, 40, 2, 56), ("N", 40, 40, 1, 28), ("N", 40, 40, 1, 28), ("N", 40, 40, 1, 28),
      ("R", 40, 80, 2, 28), ("N", 80, 80, 1, 14), ("N", 80, 80, 1, 14), ("N", 80, 80, 1, 14),
      ("E", 80, 96, 1, 14), ("N", 96, 96, 1, 14), ("N", 96, 96, 1, 14), ("N", 96, 96, 1, 14),
      ("R", 96, 192, 2, 14), ("N", 192, 192, 1, 7), ("N", 192, 192, 1, 7),
      ("N", 192, 192, 1, 7),
      ("E", 192, 320, 1, 7)]
  assert [(l.out_h, l.out_w) for l in r.layers][1] == (56, 56)


def test_resolve_latency_224_strides():
  r = spaces.resolve_macro("latency", 224)
  reductions = [(l.index, l.c_in, l.c_out, l.h) for l in r.layers if l.kind == "R"]
  assert reductions == [(1, 16, 32, 112), (5, 32, 64, 56), (9, 64, 128, 28), (17, 128, 256, 14)]
  assert all(l.kind != "E" for l in r.layers)


@pytest.mark.parametrize("macro", ["flops", "latency"])
def test_resolve_odd_resolution(macro):
  r = spaces.resolve_macro(macro, 33)
  assert r.stem_out_hw == (17, 17)   # (33 - 1) // 2 + 1
  sizes = [l.h for l in r.layers if l.kind == "R"]
  assert sizes == [17, 9, 5, 3]
  assert r.final_hw == (2, 2)
  for layer in r.layers:
    assert layer.out_h == (layer.h - 1) // layer.stride + 1


def test_resolve_rectangular():
  r = spaces.resolve_macro("flops", (65, 224))
  assert r.resolution == (65, 224)
  assert r.stem_out_hw == (33, 112)
  assert r.final_hw == (3, 7)


@pytest.mark.parametrize("size,expected", [(1, 1), (2, 1), (3, 2), (4, 2), (7, 4), (8, 4),
                                           (9, 5), (224, 112), (225, 113)])
def test_conv_out(size, expected):
  assert spaces.conv_out(size, 2) == expected
  assert spaces.conv_out(size, 1) == size


def test_resolve_bad_arguments():
  with pytest.raises(SpaceError):
    spaces.resolve_macro("flops", 0)
  with pytest.raises(SpaceError):
    spaces.resolve_macro("flops", 224, scale=0.0)
  with pytest.raises(SpaceError):
    spaces.resolve_macro("flops", 224, scale=float("nan"))
  with pytest.raises(SpaceError):
    spaces.resolve_macro("nope", 224)


@pytest.mark.parametrize("value,divisor,expected", [
    (16, 8, 16), (24, 8, 24), (36, 8, 40), (24.96, 8, 24), (199.68, 8, 200), (332.8, 8, 336),
    (10, 8, 16),     # 8 would be below 90 % of 10
    (3, 8, 8),       # never below the divisor
    (7.9, 8, 8), (12, 8, 16), (11.9, 8, 16), (100, 8, 104), (99.84, 8, 96), (83.2, 8, 80),
    (30, 16, 32),
])
def test_make_divisible(value, divisor, expected):
  out = spaces.make_divisible(value, divisor)
  assert out == expected
  assert isinstance(out, int)
  assert out % divisor == 0 and out >= 0.9 * value


def test_make_divisible_min_value():
  assert spaces.make_divisible(3, 8, min_value=16) == 16


@pytest.mark.parametrize("macro", ["flops", "latency"])
@pytest.mark.parametrize("scale", [1.04, 1.045, 1.5, 0.5])
def test_scale(macro, scale):
  base = spaces.resolve_macro(macro, 224)
  r = spaces.resolve_macro(macro, 224, scale)
  assert r.scale == scale
  assert r.stem_channels == 16 and r.head_channels == 1024
  for b, l in zip(base.layers, r.layers):
    if l.stage == 0:   # first stage (and the stem) keep 16 channels
      assert (l.c_in, l.c_out) == (16, 16)
    else:
      assert l.c_out == spaces.make_divisible(b.c_out * scale, 8)
    assert (l.kind, l.stride, l.h, l.w) == (b.kind, b.stride, b.h, b.w)
  for prev, l in zip(r.layers, r.layers[1:]):
    assert l.c_in == prev.c_out
  assert r.last_channels == r.layers[-1].c_out


def test_scale_values_nsenet27():
  r = spaces.resolve_macro("flops", 224, 1.04)
  assert sorted({l.c_out for l in r.layers}) == [16, 24, 40, 80, 96, 200, 336]
  r = spaces.resolve_macro("flops", 224, 1.5)
  assert [l.c_out for l in r.layers if l.kind in "RE"] == [40, 64, 120, 144, 288, 480]
  assert r.layers[1].c_in == 16


# -------------------------------------------------------------------------- space size

def test_layer_choices_flops27_k5():
  assert spaces.layer_choices(27, 5, "N") == 101_584
  assert spaces.layer_choices(27, 5, "R") == 101_583
  assert spaces.layer_choices(27, 5, "E") == 101_583
  assert spaces.layer_choices(27, 5, "N") == sum(math.comb(27, k) for k in range(6))


def test_layer_choices_edges():
  assert spaces.layer_choices(3, 10, "N") == 8    # K > N: every subset
  assert spaces.layer_choices(3, 10, "R") == 7
  assert spaces.layer_choices(5, 1, "N") == 6
  with pytest.raises(SpaceError):
    spaces.layer_choices(5, 0, "N")
  with pytest.raises(SpaceError):
    spaces.layer_choices(5, 2, "X")


def test_space_size_flops27():
  per_layer, total = spaces.space_size("flops27", 5)
  assert len(per_layer) == 22
  assert per_layer == [101_584 if k == "N" else 101_583 for k in FLOPS_KINDS]
  assert total == 101_584 ** 16 * 101_583 ** 6
  assert spaces.format_sci(total) == "1.4e+110"


def test_space_size_latency_default_macro():
  per_layer, total = spaces.space_size("latency19", 6)
  assert len(per_layer) == 21
  assert total == math.prod(per_layer)


@pytest.mark.parametrize("value,text", [
    (0, "0"), (1, "1.0e+00"), (95, "9.5e+01"), (999, "1.0e+03"), (123456, "1.2e+05"),
    (10 ** 400 * 96, "9.6e+401"), (10 ** 400 * 999, "1.0e+403")])
def test_format_sci(value, text):
  assert spaces.format_sci(value) == text


def test_default_rounds():
  assert spaces.default_rounds(27, 5) == 6
  assert spaces.default_rounds(19, 6) == 3
  assert spaces.default_rounds(72, 5) == 17
  with pytest.raises(SpaceError):
    spaces.default_rounds(27, 1)


# ---------------------------------------------------------------------------- OpSpec

def test_opspec_validation():
  with pytest.raises(SpaceError):
    spaces.OpSpec("sep", 3, 1)
  with pytest.raises(SpaceError):
    spaces.OpSpec("dw", 5, 1, dilation=2)
  with pytest.raises(SpaceError):
    spaces.OpSpec("dw", 3, 1, dilation=2, groups_in=2)
  with pytest.raises(SpaceError):
    spaces.OpSpec("conv", 3, 1, groups_out=2)
  with pytest.raises(SpaceError):
    spaces.OpSpec("dw", 3, 0)
