"""tf_keras layers for every candidate op of SPEC §2.1.

Numerics follow a PyTorch-style reference: every strided conv pads explicitly and
symmetrically (k//2, or D·(k//2) when dilated) and runs 'valid'; TF's 'same' is only
used at stride 1, where it is symmetric for odd kernels. TF rejects a depthwise conv
with both dilation and stride 2; `StridedDilatedDepthwiseConv2D` computes exactly the
reference result (dilated conv at full resolution, then [::2, ::2]) with a polyphase
decomposition, so it costs what the cost model says instead of 4×.

Grouped 1x1 convs are split/concat of plain 1x1 convs (`GroupedConv1x1`): tf_keras
runs `Conv2D(groups=…)` through an XLA-compiled function, which hides the conv from
TensorFlow's profiler and is slow on CPU.

All layers are registered Keras serializables, so models built from them round-trip
through `get_config()` once `nse_tf` is imported.
"""

from __future__ import annotations

from typing import List, Optional, Sequence

import tensorflow as tf
import tf_keras as keras

from nse_tf import cost as cost_lib
from nse_tf import spaces
from nse_tf import sync_bn

BN_MOMENTUM = 0.9    # PyTorch momentum 0.1
BN_EPSILON = 1e-5
PACKAGE = "nse_tf"


def batch_norm(name: str, sync: bool = False, gamma_zero: bool = False):
  # sync: moments of the global batch; works inside the supernet's tf.cond (sync_bn.py).
  cls = sync_bn.SyncBatchNorm if sync else keras.layers.BatchNormalization
  return cls(momentum=BN_MOMENTUM, epsilon=BN_EPSILON, name=name,
             gamma_initializer="zeros" if gamma_zero else "ones")


def activation_layer(activation: str, name: str):
  if activation not in ("relu", "swish"):
    raise ValueError(f"activation must be 'relu' or 'swish', got {activation!r}")
  return keras.layers.Activation(tf.nn.relu if activation == "relu" else tf.nn.swish, name=name)


def conv_init():
  return keras.initializers.VarianceScaling(2.0, mode="fan_out", distribution="untruncated_normal")


@keras.utils.register_keras_serializable(package=PACKAGE)
class StridedDilatedDepthwiseConv2D(keras.layers.Layer):
  """Depthwise k×k conv, dilation D, symmetric padding D·(k//2), stride 2.

  Equal to the full-resolution dilated conv subsampled [::2, ::2]. Output row i
  reads padded rows 2i + D·a (a = 0..k−1); grouping the taps by the parity of D·a
  turns the conv into at most four stride-1 convs on the polyphase components of
  the padded input, with k² MACs per output element in total.
  """

  def __init__(self, kernel_size: int = 3, dilation_rate: int = 2, **kwargs):
    super().__init__(**kwargs)
    self.kernel_size = int(kernel_size)
    self.dilation_rate = int(dilation_rate)

  def build(self, input_shape):
    c = int(input_shape[-1])
    k = self.kernel_size
    self.depthwise_kernel = self.add_weight(
        "depthwise_kernel", shape=(k, k, c, 1), initializer=conv_init(), trainable=True)
    d = self.dilation_rate
    # For each parity r: the taps a with D·a ≡ r (mod 2), their first offset in
    # the phase grid and the stride between them there.
    self._phases = []
    for r in (0, 1):
      taps = [a for a in range(k) if (d * a) % 2 == r]
      if taps:
        offsets = [(d * a - r) // 2 for a in taps]
        step = offsets[1] - offsets[0] if len(offsets) > 1 else 1
        self._phases.append((r, taps, offsets[0], step))
    super().build(input_shape)

  def call(self, x):
    k, d = self.kernel_size, self.dilation_rate
    p = d * (k // 2)
    h, w = tf.shape(x)[1], tf.shape(x)[2]
    ho, wo = (h - 1) // 2 + 1, (w - 1) // 2 + 1
    xp = tf.pad(x, [[0, 0], [p, p], [p, p], [0, 0]])
    out = None
    for r, rtaps, r0, rstep in self._phases:
      for c, ctaps, c0, cstep in self._phases:
        kern = tf.gather(tf.gather(self.depthwise_kernel, rtaps, axis=0), ctaps, axis=1)
        phase = xp[:, r + 2 * r0::2, c + 2 * c0::2, :]
        # Exactly the rows/cols the ho×wo outputs read: no wasted MACs.
        phase = phase[:, :ho + rstep * (len(rtaps) - 1), :wo + cstep * (len(ctaps) - 1), :]
        y = tf.nn.depthwise_conv2d(phase, kern, [1, 1, 1, 1], "VALID",
                                   dilations=[rstep, cstep])
        y = y[:, :ho, :wo, :]
        out = y if out is None else out + y
    return out

  def compute_output_shape(self, input_shape):
    s = tf.TensorShape(input_shape).as_list()
    f = lambda v: None if v is None else (v - 1) // 2 + 1
    return tf.TensorShape([s[0], f(s[1]), f(s[2]), s[3]])

  def get_config(self):
    cfg = super().get_config()
    cfg.update(kernel_size=self.kernel_size, dilation_rate=self.dilation_rate)
    return cfg


@keras.utils.register_keras_serializable(package=PACKAGE)
class GroupedConv1x1(keras.layers.Layer):
  """1x1 conv with `groups` groups as split → per-group 1x1 conv → concat (no bias)."""

  def __init__(self, filters: int, groups: int = 1, **kwargs):
    super().__init__(**kwargs)
    self.filters = int(filters)
    self.groups = int(groups)
    if self.filters % self.groups:
      raise ValueError(f"{self.name}: filters {filters} not divisible by groups {groups}")
    self.convs = [keras.layers.Conv2D(self.filters // self.groups, 1, use_bias=False,
                                      kernel_initializer=conv_init(), name=f"g{i}")
                  for i in range(self.groups)]

  def build(self, input_shape):
    c = int(input_shape[-1])
    if c % self.groups:
      raise ValueError(f"{self.name}: input channels {c} not divisible by groups {self.groups}")
    part = tf.TensorShape(input_shape).as_list()
    part[-1] = c // self.groups
    for conv in self.convs:
      conv.build(part)
    super().build(input_shape)

  def call(self, x):
    if self.groups == 1:
      return self.convs[0](x)
    parts = tf.split(x, self.groups, axis=-1)
    return tf.concat([conv(p) for conv, p in zip(self.convs, parts)], axis=-1)

  def get_config(self):
    cfg = super().get_config()
    cfg.update(filters=self.filters, groups=self.groups)
    return cfg


def _pad(ph: int, pw: int, name: str):
  return keras.layers.ZeroPadding2D(((ph, ph), (pw, pw)), name=name)


@keras.utils.register_keras_serializable(package=PACKAGE)
class CandidateOp(keras.layers.Layer):
  """One candidate op: expand 1x1 → BN → act → spatial part → [SE] → project 1x1 → BN.

  Args:
    op: canonical op name (e.g. 'dw_k3_e6_d2').
    c_in, c_out: channels. stride: 1 or 2.
    se: squeeze-and-excitation on the hidden width (reduction 4), retraining only.
    activation: 'relu' (search) or 'swish'.
    sync_bn: SyncBatchNormalization for multi-replica training.
  """

  def __init__(self, op: str, c_in: int, c_out: int, stride: int = 1, se: bool = False,
               activation: str = "relu", sync_bn: bool = False, **kwargs):
    super().__init__(**kwargs)
    self.op = op
    self.spec = spaces.parse_op(op)
    self.c_in, self.c_out, self.stride = int(c_in), int(c_out), int(stride)
    if self.stride not in (1, 2):
      raise ValueError(f"{self.name}: stride must be 1 or 2, got {stride}")
    cost_lib.check_groups(self.spec, self.c_in, self.c_out)
    self.se = bool(se)
    self.activation = activation
    self.sync_bn = bool(sync_bn)
    spec, s = self.spec, self.stride
    e = cost_lib.hidden_channels(spec, self.c_in)
    k = spec.kernel
    bn = lambda n: batch_norm(n, sync=self.sync_bn)
    act = lambda n: activation_layer(activation, n)

    def conv(filters, kernel, strides, n, padding="valid"):
      return keras.layers.Conv2D(filters, kernel, strides=strides, padding=padding,
                                 use_bias=False, kernel_initializer=conv_init(), name=n)

    seq: List[keras.layers.Layer] = [
        GroupedConv1x1(e, spec.groups_in, name="expand"), bn("expand_bn"), act("expand_act")]
    if spec.kind == "dw":
      if s == 1:
        seq.append(keras.layers.DepthwiseConv2D(
            k, padding="same", dilation_rate=spec.dilation, use_bias=False,
            depthwise_initializer=conv_init(), name="dw"))
      elif spec.dilation > 1:
        seq.append(StridedDilatedDepthwiseConv2D(k, spec.dilation, name="dw"))
      else:
        seq += [_pad(k // 2, k // 2, "dw_pad"),
                keras.layers.DepthwiseConv2D(k, strides=s, padding="valid", use_bias=False,
                                             depthwise_initializer=conv_init(), name="dw")]
      seq += [bn("dw_bn"), act("dw_act")]
    elif spec.kind == "ssc":
      if s == 1:
        seq += [conv(e, (1, k), 1, "ssc_1xk", "same")]
      else:
        seq += [_pad(0, k // 2, "ssc_1xk_pad"), conv(e, (1, k), (1, s), "ssc_1xk")]
      seq += [bn("ssc_1xk_bn"), act("ssc_1xk_act")]
      if s == 1:
        seq += [conv(e, (k, 1), 1, "ssc_kx1", "same")]
      else:
        seq += [_pad(k // 2, 0, "ssc_kx1_pad"), conv(e, (k, 1), (s, 1), "ssc_kx1")]
      seq += [bn("ssc_kx1_bn"), act("ssc_kx1_act")]
    elif spec.kind == "conv":
      seq += ([conv(e, k, 1, "conv", "same")] if s == 1 else
              [_pad(k // 2, k // 2, "conv_pad"), conv(e, k, s, "conv")])
      seq += [bn("conv_bn"), act("conv_act")]
    elif spec.kind == "dual":
      seq += [conv(e, k, 1, "conv1", "same"), bn("conv1_bn"), act("conv1_act")]
      seq += ([conv(e, k, 1, "conv2", "same")] if s == 1 else
              [_pad(k // 2, k // 2, "conv2_pad"), conv(e, k, s, "conv2")])
      seq += [bn("conv2_bn"), act("conv2_act")]
    self.body = seq
    if self.se:
      r = cost_lib.se_channels(e)
      self.se_reduce = keras.layers.Conv2D(r, 1, kernel_initializer=conv_init(), name="se_reduce")
      self.se_act = act("se_act")
      self.se_expand = keras.layers.Conv2D(e, 1, kernel_initializer=conv_init(), name="se_expand")
    self.project = GroupedConv1x1(self.c_out, spec.groups_out, name="project")
    self.project_bn = bn("project_bn")

  @tf.autograph.experimental.do_not_convert
  def call(self, x, training=None):
    for layer in self.body:
      x = layer(x, training=training)  # Keras drops `training` for layers without it
    if self.se:
      s = tf.reduce_mean(x, axis=[1, 2], keepdims=True)
      s = self.se_expand(self.se_act(self.se_reduce(s)))
      x = x * tf.sigmoid(s)
    x = self.project(x)
    return self.project_bn(x, training=training)

  def compute_output_shape(self, input_shape):
    s = tf.TensorShape(input_shape).as_list()
    f = lambda v: None if v is None else spaces.conv_out(v, self.stride)
    return tf.TensorShape([s[0], f(s[1]), f(s[2]), self.c_out])

  def get_config(self):
    cfg = super().get_config()
    cfg.update(op=self.op, c_in=self.c_in, c_out=self.c_out, stride=self.stride, se=self.se,
               activation=self.activation, sync_bn=self.sync_bn)
    return cfg


def op_layer_name(layer_index: int, op: str) -> str:
  return f"l{layer_index:02d}_{op}"


def build_op(op: str, layer: spaces.LayerSpec, se: bool = False, activation: str = "relu",
             sync_bn: bool = False, name: Optional[str] = None) -> CandidateOp:
  """The `CandidateOp` of `op` at a resolved layer position, deterministically named."""
  return CandidateOp(op, layer.c_in, layer.c_out, layer.stride, se=se, activation=activation,
                     sync_bn=sync_bn, name=name or op_layer_name(layer.index, op))
