"""Tests of nse_tf.nsenet: the standalone network built from an Architecture."""

import numpy as np
import pytest
import tf_keras as keras

from nse_tf import arch as arch_lib
from nse_tf import cost
from nse_tf import nsenet
from nse_tf import spaces

RELEASED = ("NSENet-27", "NSENet", "NSENet-GPU")
SIZE = 64


@pytest.fixture(scope="module")
def released_models():
  """The three released networks at 64x64, 10 classes (built once for the module)."""
  return {n: nsenet.build_nsenet(arch_lib.load_released(n), num_classes=10,
                                 input_shape=(SIZE, SIZE, 3)) for n in RELEASED}


def _images(batch, size=SIZE, seed=0):
  return np.random.default_rng(seed).normal(size=(batch, size, size, 3)).astype(np.float32)


@pytest.mark.parametrize("name", RELEASED)
def test_released_logits(released_models, name):
  model = released_models[name]
  a = arch_lib.load_released(name)
  assert model.name == name.lower().replace("-", "_")
  assert model.input_shape == (None, SIZE, SIZE, 3)
  assert model.output_shape == (None, 10)
  y = model(_images(3), training=False).numpy()
  assert y.shape == (3, 10) and np.all(np.isfinite(y))
  y_train = model(_images(2), training=True).numpy()
  assert y_train.shape == (2, 10)
  # One Keras layer per op of every non-empty layer; the analytic params are exact.
  names = {l.name for l in model.layers}
  for i, ops in enumerate(a.layers):
    for op in ops:
      assert f"l{i:02d}_{op}" in names
  assert model.count_params() == cost.arch_cost(a, SIZE, num_classes=10).params


def test_empty_normal_layers_are_dropped(released_models):
  model = released_models["NSENet-27"]
  names = [l.name for l in model.layers]
  a = arch_lib.load_released("NSENet-27")
  empty = [i for i, ops in enumerate(a.layers) if not ops]
  assert empty == [4, 8, 12, 16]
  for i in empty:
    assert not [n for n in names if n.startswith(f"l{i:02d}_")], i
  # A layer with a single R/E op has no Average layer; a normal layer with one op averages
  # with the identity; multi-op layers average.
  assert "l01_avg" not in names and "l00_avg" in names and "l09_avg" in names


def _tiny_arch():
  """flops27, one cheap op per R/E layer, most normal layers empty, a few multi-op layers."""
  kinds = spaces.layer_kinds("flops")
  layers = [["dw_k3_e1"] if k != "N" else [] for k in kinds]
  layers[2] = ["dw_k3_e1", "dw_k5_e3"]                    # N: (x + a + b) / 3
  layers[3] = ["ssc_k5_e1", "dw_k3_e1_d2", "dw_k3_e3"]    # N: (x + a + b + c) / 4
  layers[5] = ["dw_k3_e1", "dw_k5_e1"]                    # R: (a + b) / 2
  layers[13] = ["dw_k3_e1", "dw_k3_e1_d3"]                # E: (a + b) / 2
  return arch_lib.Architecture("flops27", "flops", layers)


def test_multi_op_layers_average_with_identity():
  a = _tiny_arch()
  model = nsenet.build_nsenet(a, num_classes=4, input_shape=(32, 32, 3))
  checks = []
  for index, with_identity in ((2, True), (3, True), (5, False), (13, False)):
    avg = model.get_layer(f"l{index:02d}_avg")
    op_layers = [model.get_layer(f"l{index:02d}_{op}") for op in a.layers[index]]
    x_in = op_layers[0].input
    for l in op_layers:
      assert l.input is x_in          # every branch reads the same layer input
    assert len(avg.input) == len(op_layers) + with_identity
    if with_identity:
      assert avg.input[0] is x_in
    checks.append((x_in, avg.output, op_layers, with_identity))
  probe = keras.Model(model.input, [t for c in checks for t in c[:2]])
  outs = probe(_images(2, 32), training=False)
  for i, (_, _, op_layers, with_identity) in enumerate(checks):
    x, y = outs[2 * i].numpy(), outs[2 * i + 1].numpy()
    branches = [l(x, training=False).numpy() for l in op_layers]
    if with_identity:
      branches.append(x)
    np.testing.assert_allclose(y, sum(branches) / len(branches), rtol=1e-5, atol=1e-5)
  names = [l.name for l in model.layers]
  assert not [n for n in names if n.startswith("l04_")]
  assert model.count_params() == cost.arch_cost(a, 32, num_classes=4).params


@pytest.mark.parametrize("name,channels,size", [("NSENet-27", (24, 40, 96, 336), 64),
                                                ("NSENet-GPU", (32, 64, 128, 256), 65)])
def test_backbone_levels(name, channels, size):
  model = nsenet.build_nsenet(name, input_shape=(size, size, 3), backbone=True)
  out = model(_images(1, size), training=False)
  assert sorted(out) == ["2", "3", "4", "5"]
  hw = size
  sizes = []
  for _ in range(5):
    hw = spaces.conv_out(hw, 2)
    sizes.append(hw)
  for level, c in zip(("2", "3", "4", "5"), channels):
    stride_index = int(level) - 1     # stride 2**level
    assert tuple(out[level].shape) == (1, sizes[stride_index], sizes[stride_index], c), level
  if size == 64:
    assert [out[l].shape[1] for l in "2345"] == [64 // 4, 64 // 8, 64 // 16, 64 // 32]
  assert "classifier" not in [l.name for l in model.layers]


def test_config_round_trip():
  a = arch_lib.load_released("NSENet")  # grouped, dilated and multi-op layers
  model = nsenet.build_nsenet(a, num_classes=7, input_shape=(32, 32, 3), dropout=0.2)
  clone = keras.Model.from_config(model.get_config())
  assert [l.name for l in clone.layers] == [l.name for l in model.layers]
  clone.set_weights(model.get_weights())
  x = _images(2, 32, seed=1)
  np.testing.assert_allclose(clone(x, training=False).numpy(),
                             model(x, training=False).numpy(), rtol=1e-5, atol=1e-5)
  assert clone.count_params() == model.count_params()


def test_deterministic_layer_names(released_models):
  first = released_models["NSENet"]
  again = nsenet.build_nsenet("NSENet", num_classes=10, input_shape=(SIZE, SIZE, 3))
  assert [l.name for l in again.layers] == [l.name for l in first.layers]
  assert [w.name for w in again.weights] == [w.name for w in first.weights]
  assert again.name == first.name


def test_options():
  a = _tiny_arch()
  model = nsenet.build_nsenet(a, num_classes=3, input_shape=(32, 32, 3), se=True,
                              activation="swish", dropout=0.5, name="custom")
  assert model.name == "custom"
  assert "dropout" in [l.name for l in model.layers]
  assert model.count_params() == cost.arch_cost(a, 32, num_classes=3, se=True).params
  assert model(_images(1, 32), training=False).shape == (1, 3)
  with pytest.raises(ValueError, match="input_shape"):
    nsenet.build_nsenet(a, input_shape=(32, 32, 1))
  with pytest.raises(ValueError, match="input_shape"):
    nsenet.build_nsenet(a, input_shape=(32, 32))
  with pytest.raises(arch_lib.ArchitectureError):
    nsenet.build_nsenet("NSENet-99")


def test_drop_path_only_on_normal_layer_branches_and_only_in_training():
  a = arch_lib.Architecture.from_compact("flops27@tiny*0.25:0|3|-|6|0+9|9+21")
  plain = nsenet.build_nsenet(a, num_classes=4, input_shape=(32, 32, 3))
  dropped = nsenet.build_nsenet(a, num_classes=4, input_shape=(32, 32, 3), drop_path=0.5)
  drops = [l for l in dropped.layers if l.name.endswith("_drop")]
  # Normal layers 0 and 4 (one and two ops); R layers 1, 3 and the E layer 5 have no identity.
  assert sorted(l.name for l in drops) == ["l00_dw_k3_e1_drop", "l04_dw_k3_e1_drop",
                                           "l04_dw_k5_e1_drop"]
  rates = {l.name: l.get_config()["stochastic_depth_drop_rate"] for l in drops}
  assert rates["l00_dw_k3_e1_drop"] == pytest.approx(0.5 * 1 / 6)
  assert rates["l04_dw_k5_e1_drop"] == pytest.approx(0.5 * 5 / 6)
  assert plain.count_params() == dropped.count_params()
  dropped.set_weights(plain.get_weights())
  x = _images(8, size=32)
  np.testing.assert_allclose(dropped(x, training=False), plain(x, training=False), atol=1e-6)
  assert np.abs(dropped(x, training=True) - plain(x, training=True)).max() > 1e-4
  with pytest.raises(ValueError, match="drop_path"):
    nsenet.build_nsenet(a, num_classes=4, input_shape=(32, 32, 3), drop_path=1.0)
