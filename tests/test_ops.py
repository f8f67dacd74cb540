"""Tests of nse_tf.ops: every candidate op against a PyTorch-style reference (explicit,
symmetric padding), the strided dilated depthwise conv, grouped 1x1 convs, configs."""

import zlib

import numpy as np
import pytest
import tensorflow as tf
import tf_keras as keras

from nse_tf import cost
from nse_tf import ops
from nse_tf import spaces

ALL_OPS = sorted(set(spaces.POOLS["flops72"]) | set(spaces.POOLS["latency19"]),
                 key=lambda n: (spaces.parse_op(n).kind, n))
C_IN, C_OUT = 8, 16


# ---------------------------------------------------------------- reference (numpy + tf.nn)

def _pad(x, ph, pw):
  return np.pad(x, [(0, 0), (ph, ph), (pw, pw), (0, 0)])


def _conv(x, kernel, stride=(1, 1), pad=(0, 0), bias=None):
  """Dense conv, explicit symmetric zero padding, then VALID (PyTorch semantics)."""
  y = tf.nn.conv2d(_pad(x, *pad), kernel, [1, stride[0], stride[1], 1], "VALID").numpy()
  return y if bias is None else y + bias


def _depthwise(x, kernel, stride, dilation):
  k = kernel.shape[0]
  p = dilation * (k // 2)
  y = tf.nn.depthwise_conv2d(_pad(x, p, p), kernel, [1, 1, 1, 1], "VALID",
                             dilations=[dilation, dilation]).numpy()
  return y[:, ::stride, ::stride, :]


def _grouped_1x1(x, layer):
  """Block-diagonal dense 1x1 conv made of the per-group kernels."""
  kernels = [conv.kernel.numpy() for conv in layer.convs]
  ci, co = kernels[0].shape[2], kernels[0].shape[3]
  full = np.zeros((1, 1, ci * len(kernels), co * len(kernels)), np.float32)
  for g, k in enumerate(kernels):
    full[:, :, g * ci:(g + 1) * ci, g * co:(g + 1) * co] = k
  return _conv(x, full)


def _bn(x, layer):
  gamma, beta, mean, var = (w.numpy() for w in (layer.gamma, layer.beta, layer.moving_mean,
                                                layer.moving_variance))
  return (x - mean) / np.sqrt(var + ops.BN_EPSILON) * gamma + beta


def _relu(x):
  return np.maximum(x, 0)


def reference_op(layer, x):
  """What a PyTorch implementation of SPEC §2.1 computes (inference-mode BN)."""
  spec, s = layer.spec, layer.stride
  k = spec.kernel
  sub = {l.name: l for l in layer.body}
  y = _relu(_bn(_grouped_1x1(x, sub["expand"]), sub["expand_bn"]))
  if spec.kind == "dw":
    y = _relu(_bn(_depthwise(y, sub["dw"].depthwise_kernel.numpy(), s, spec.dilation),
                  sub["dw_bn"]))
  elif spec.kind == "ssc":
    y = _relu(_bn(_conv(y, sub["ssc_1xk"].kernel.numpy(), (1, s), (0, k // 2)),
                  sub["ssc_1xk_bn"]))
    y = _relu(_bn(_conv(y, sub["ssc_kx1"].kernel.numpy(), (s, 1), (k // 2, 0)),
                  sub["ssc_kx1_bn"]))
  elif spec.kind == "conv":
    y = _relu(_bn(_conv(y, sub["conv"].kernel.numpy(), (s, s), (k // 2, k // 2)),
                  sub["conv_bn"]))
  elif spec.kind == "dual":
    y = _relu(_bn(_conv(y, sub["conv1"].kernel.numpy(), (1, 1), (k // 2, k // 2)),
                  sub["conv1_bn"]))
    y = _relu(_bn(_conv(y, sub["conv2"].kernel.numpy(), (s, s), (k // 2, k // 2)),
                  sub["conv2_bn"]))
  if layer.se:
    z = y.mean(axis=(1, 2), keepdims=True)
    z = _relu(_conv(z, layer.se_reduce.kernel.numpy(), bias=layer.se_reduce.bias.numpy()))
    z = _conv(z, layer.se_expand.kernel.numpy(), bias=layer.se_expand.bias.numpy())
    y = y / (1 + np.exp(-z))   # y * sigmoid(z)
  y = _grouped_1x1(y, layer.project)
  return _bn(y, layer.project_bn)


def _randomize_bn(layer, rng):
  """Non-trivial BN statistics so that a wrong order or a missing BN shows."""
  for w in layer.weights:
    name = w.name.split("/")[-1]
    if "gamma" in name:
      w.assign(rng.uniform(0.5, 1.5, w.shape))
    elif "beta" in name:
      w.assign(rng.normal(0, 0.2, w.shape))
    elif "moving_mean" in name:
      w.assign(rng.normal(0, 0.2, w.shape))
    elif "moving_variance" in name:
      w.assign(rng.uniform(0.5, 1.5, w.shape))


# ------------------------------------------------------------------------ every op

@pytest.mark.parametrize("name", ALL_OPS)
def test_op_shapes_params_and_reference(name):
  rng = np.random.default_rng(zlib.crc32(name.encode()))
  spec = spaces.parse_op(name)
  for stride in (1, 2):
    layer = ops.CandidateOp(name, C_IN, C_OUT, stride, name=f"op_s{stride}")
    for hw in ((9, 9), (8, 8), (7, 10)):
      x = rng.normal(size=(2, *hw, C_IN)).astype(np.float32)
      y = layer(x, training=False).numpy()
      expected = (2, spaces.conv_out(hw[0], stride), spaces.conv_out(hw[1], stride), C_OUT)
      assert y.shape == expected, (name, stride, hw)
      assert tuple(layer.compute_output_shape((2, *hw, C_IN)).as_list()) == expected
      if hw == (9, 9):
        _randomize_bn(layer, rng)
        y = layer(x, training=False).numpy()
      np.testing.assert_allclose(y, reference_op(layer, x), rtol=1e-4, atol=1e-4,
                                 err_msg=f"{name} stride {stride} input {hw}")
    # Parameters (BN statistics included) follow the cost model exactly.
    assert layer.count_params() == cost.op_cost_at(spec, C_IN, C_OUT, stride, 9, 9).params
  assert layer.compute_output_shape((None, None, None, C_IN)).as_list() == [
      None, None, None, C_OUT]


@pytest.mark.parametrize("name", ["dw_k3_e3", "ssc_k5_e2", "dual_k3_e1", "dw_k5_e3_g21"])
def test_op_with_se_matches_reference(name):
  rng = np.random.default_rng(0)
  layer = ops.CandidateOp(name, C_IN, C_OUT, 2, se=True)
  x = rng.normal(size=(2, 9, 8, C_IN)).astype(np.float32)
  layer(x)
  _randomize_bn(layer, rng)
  np.testing.assert_allclose(layer(x, training=False).numpy(), reference_op(layer, x),
                             rtol=1e-4, atol=1e-4)
  assert layer.count_params() == cost.op_cost_at(spaces.parse_op(name), C_IN, C_OUT, 2, 9, 8,
                                                 se=True).params


def test_stride2_differs_from_tf_same_padding():
  """Guard that the reference is meaningful: TF 'SAME' at stride 2 on an even input pads
  asymmetrically and gives a different answer."""
  rng = np.random.default_rng(1)
  x = rng.normal(size=(1, 8, 8, 4)).astype(np.float32)
  kernel = rng.normal(size=(3, 3, 4, 1)).astype(np.float32)
  same = tf.nn.depthwise_conv2d(x, kernel, [1, 2, 2, 1], "SAME").numpy()
  sym = _depthwise(x, kernel, 2, 1)
  assert same.shape == sym.shape
  assert not np.allclose(same, sym, atol=1e-3)
  layer = keras.Sequential([keras.layers.ZeroPadding2D(1),
                            keras.layers.DepthwiseConv2D(3, strides=2, use_bias=False)])
  layer.build((None, 8, 8, 4))
  layer.layers[1].set_weights([kernel])
  np.testing.assert_allclose(layer(x).numpy(), sym, atol=1e-5)


def test_stride2_dw_op_is_symmetric_padding():
  """A stride-2 dw op's spatial part: explicit pad k//2 then VALID, on even and odd sizes."""
  rng = np.random.default_rng(2)
  for k in (3, 5, 7, 9, 11):
    layer = ops.CandidateOp(f"dw_k{k}_e1", 4, 4, 2)
    for size in (8, 9, 14):
      x = rng.normal(size=(1, size, size, 4)).astype(np.float32)
      layer(x)
      sub = {l.name: l for l in layer.body}
      h = _relu(_bn(_grouped_1x1(x, sub["expand"]), sub["expand_bn"]))
      got = sub["dw"](sub["dw_pad"](h)).numpy()
      want = _depthwise(h, sub["dw"].depthwise_kernel.numpy(), 2, 1)
      np.testing.assert_allclose(got, want, atol=1e-5)


# ---------------------------------------------------------- strided dilated depthwise conv

@pytest.mark.parametrize("dilation", [2, 3])
@pytest.mark.parametrize("kernel", [3, 5])
def test_strided_dilated_depthwise_equals_reference(dilation, kernel):
  rng = np.random.default_rng(dilation * 10 + kernel)
  layer = ops.StridedDilatedDepthwiseConv2D(kernel, dilation)
  for hw in ((8, 8), (9, 9), (10, 11), (7, 12), (5, 5), (2, 3), (1, 1)):
    x = rng.normal(size=(2, *hw, 5)).astype(np.float32)
    y = layer(x).numpy()
    want = _depthwise(x, layer.depthwise_kernel.numpy(), 2, dilation)
    assert y.shape == want.shape == (2, (hw[0] - 1) // 2 + 1, (hw[1] - 1) // 2 + 1, 5)
    np.testing.assert_allclose(y, want, rtol=1e-5, atol=1e-5, err_msg=str(hw))
    assert tuple(layer.compute_output_shape((2, *hw, 5)).as_list()) == want.shape


def test_strided_dilated_depthwise_in_graph_with_unknown_size():
  layer = ops.StridedDilatedDepthwiseConv2D(3, 2)
  x = np.random.default_rng(3).normal(size=(1, 11, 6, 3)).astype(np.float32)
  fn = tf.function(layer, input_signature=[tf.TensorSpec([None, None, None, 3])])
  np.testing.assert_allclose(fn(x).numpy(),
                             _depthwise(x, layer.depthwise_kernel.numpy(), 2, 2), atol=1e-5)


# ------------------------------------------------------------------------ grouped 1x1

@pytest.mark.parametrize("groups,c_in,filters", [(1, 8, 12), (2, 8, 12), (4, 8, 12),
                                                 (2, 6, 4), (3, 9, 6)])
def test_grouped_conv1x1_is_block_diagonal(groups, c_in, filters):
  rng = np.random.default_rng(groups)
  layer = ops.GroupedConv1x1(filters, groups)
  x = rng.normal(size=(2, 5, 7, c_in)).astype(np.float32)
  y = layer(x).numpy()
  assert y.shape == (2, 5, 7, filters)
  np.testing.assert_allclose(y, _grouped_1x1(x, layer), rtol=1e-5, atol=1e-5)
  # Independently: output group g only depends on input group g.
  if groups > 1:
    x2 = x.copy()
    x2[..., : c_in // groups] += 1.0
    d = np.abs(layer(x2).numpy() - y).max(axis=(0, 1, 2))
    assert np.all(d[filters // groups:] == 0) and np.all(d[: filters // groups] > 0)
  assert layer.count_params() == c_in * filters // groups


# ----------------------------------------------------------------------------- SSC

def test_ssc_impulse_response_is_symmetric():
  """Symmetric kernels + an impulse at the centre give a mirror-symmetric response when
  the 1xk / kx1 convs pad symmetrically (stride 1 and 2, odd sizes)."""
  rng = np.random.default_rng(4)
  for k in (5, 7):
    for stride in (1, 2):
      layer = ops.CandidateOp(f"ssc_k{k}_e1", 4, 4, stride)
      for size in (9, 7, 11):
        x = np.zeros((1, size, size, 4), np.float32)
        x[0, size // 2, size // 2, :] = 1.0
        layer(x)
        sub = {l.name: l for l in layer.body}
        eye = np.eye(4, dtype=np.float32)[None, None]
        sub["expand"].convs[0].kernel.assign(eye)
        layer.project.convs[0].kernel.assign(eye)
        row = rng.uniform(0.1, 1.0, size=(k,)).astype(np.float32)
        row = (row + row[::-1]) / 2       # symmetric taps
        sub["ssc_1xk"].kernel.assign(np.einsum("w,io->wio", row, np.eye(4))[None]
                                     .astype(np.float32))
        sub["ssc_kx1"].kernel.assign(np.einsum("h,io->hio", row, np.eye(4))[:, None]
                                     .astype(np.float32))
        y = layer(x, training=False).numpy()[0, ..., 0]
        assert y.max() > 0
        np.testing.assert_allclose(y, y[::-1, :], atol=1e-6)
        np.testing.assert_allclose(y, y[:, ::-1], atol=1e-6)
        np.testing.assert_allclose(y, y.T, atol=1e-6)


# --------------------------------------------------------------------------- configs

@pytest.mark.parametrize("kwargs", [
    dict(op="dw_k3_e6_d2", c_in=8, c_out=16, stride=2),
    dict(op="dw_k5_e3_g21", c_in=8, c_out=8, stride=1, se=True),
    dict(op="ssc_k7_e2", c_in=8, c_out=16, stride=2, activation="swish"),
    dict(op="dual_k3_e1", c_in=8, c_out=12, stride=1, sync_bn=True),
])
def test_candidate_op_config_round_trip(kwargs):
  layer = ops.CandidateOp(name="my_op", **kwargs)
  x = np.random.default_rng(5).normal(size=(2, 9, 9, kwargs["c_in"])).astype(np.float32)
  y = layer(x, training=False).numpy()
  cfg = layer.get_config()
  for k, v in kwargs.items():
    assert cfg[k] == v
  clone = ops.CandidateOp.from_config(cfg)
  assert clone.get_config() == cfg
  clone(x)
  clone.set_weights(layer.get_weights())
  np.testing.assert_allclose(clone(x, training=False).numpy(), y, atol=1e-6)
  # Through Keras' registry (what model.from_config uses).
  again = keras.layers.deserialize(keras.layers.serialize(layer))
  assert type(again) is ops.CandidateOp and again.get_config() == cfg


def test_helper_layers_config_round_trip():
  for layer in (ops.StridedDilatedDepthwiseConv2D(3, 3, name="sd"),
                ops.GroupedConv1x1(12, 4, name="g")):
    cfg = layer.get_config()
    again = keras.layers.deserialize(keras.layers.serialize(layer))
    assert type(again) is type(layer) and again.get_config() == cfg


def test_build_op_names_and_positions():
  layer_spec = spaces.resolve_macro("flops", 64).layers[5]
  op = ops.build_op("dw_k3_e3", layer_spec)
  assert op.name == "l05_dw_k3_e3"
  assert (op.c_in, op.c_out, op.stride) == (24, 40, 2)
  assert ops.op_layer_name(12, "ssc_k5_e1") == "l12_ssc_k5_e1"


# ---------------------------------------------------------------------------- errors

@pytest.mark.parametrize("op,c_in,c_out", [
    ("dw_k3_e1_g22", 7, 16),    # C_in not divisible by G_in
    ("dw_k3_e1_g21", 9, 16),
    ("dw_k3_e1_g12", 8, 15),    # C_out not divisible by G_out
    ("dw_k5_e3_g22", 8, 9),
])
def test_invalid_channels_for_groups(op, c_in, c_out):
  with pytest.raises(spaces.SpaceError, match="divisible"):
    ops.CandidateOp(op, c_in, c_out)
  with pytest.raises(spaces.SpaceError, match="divisible"):
    cost.op_cost_at(spaces.parse_op(op), c_in, c_out, 1, 8, 8)


def test_grouped_conv_invalid_channels():
  with pytest.raises(ValueError, match="divisible"):
    ops.GroupedConv1x1(7, groups=2)
  layer = ops.GroupedConv1x1(8, groups=2)
  with pytest.raises(ValueError, match="divisible"):
    layer(np.zeros((1, 4, 4, 7), np.float32))


def test_candidate_op_bad_arguments():
  with pytest.raises(ValueError, match="stride"):
    ops.CandidateOp("dw_k3_e1", 8, 8, stride=3)
  with pytest.raises(spaces.SpaceError):
    ops.CandidateOp("dw_k4_e1", 8, 8)
  with pytest.raises(ValueError, match="activation"):
    ops.CandidateOp("dw_k3_e1", 8, 8, activation="gelu")
