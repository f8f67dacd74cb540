"""Tests of nse_tf.arch: the Architecture format (JSON, text, compact), validation, files."""

import json
import os

import pytest

from nse_tf import arch as arch_lib
from nse_tf import cost
from nse_tf import fileio
from nse_tf import spaces
from nse_tf.arch import Architecture, ArchitectureError

RELEASED = ("NSENet-27", "NSENet", "NSENet-GPU")


def _random(space, n=20, seed=0, **kw):
  return cost.random_architectures(space, n, seed=seed, **kw)


def _all_archs():
  out = [arch_lib.load_released(n) for n in RELEASED]
  for space in sorted(spaces.POOLS):
    out += _random(space, 15, seed=1, max_ops=5)
    out += _random(space, 5, seed=2, max_ops=2, scale=1.0437291234567)
  return out


def _flops27_layers():
  return [["dw_k3_e1"] for _ in range(22)]


# ----------------------------------------------------------------------------- released

def test_released_names():
  assert set(arch_lib.released_names()) == set(RELEASED)


@pytest.mark.parametrize("name,space,macro,scale", [
    ("NSENet-27", "flops27", "flops", 1.04),
    ("NSENet", "flops72", "flops", 1.045),
    ("NSENet-GPU", "latency19", "latency", 1.0)])
def test_load_released(name, space, macro, scale):
  a = arch_lib.load_released(name)
  assert (a.space, a.macro, a.scale) == (space, macro, scale)
  assert a.num_layers == spaces.num_layers(macro)
  assert a.metadata["name"] == name
  assert arch_lib.resolve(arch=name) == a


def test_nsenet27_layers():
  a = arch_lib.load_released("NSENet-27")
  assert [i for i, ops in enumerate(a.layers) if not ops] == [4, 8, 12, 16]
  assert a.layers[9] == ("dw_k5_e6", "dw_k9_e6")
  assert a.layers[21] == ("dw_k11_e3", "dw_k3_e3", "dw_k7_e6")


def test_load_released_unknown():
  with pytest.raises(ArchitectureError, match="NSENet-99"):
    arch_lib.load_released("NSENet-99")


# --------------------------------------------------------------------------- round trips

def test_json_round_trip():
  for a in _all_archs():
    b = Architecture.from_json(a.to_json())
    assert b == a
    assert b.layers == a.layers and b.scale == a.scale
    assert b.metadata == a.metadata
    assert Architecture.from_dict(json.loads(a.to_json(indent=None))) == a


def test_text_round_trip():
  for a in _all_archs():
    text = a.to_text()
    b = Architecture.from_text(text)
    assert b == a, text
    assert b.scale == a.scale


def test_text_format():
  a = arch_lib.load_released("NSENet-27")
  lines = a.to_text().splitlines()
  assert lines[0] == "arch flops27@flops scale=1.04"
  assert len(lines) == 23
  assert lines[5].startswith("L04 N") and lines[5].endswith("| -")
  assert lines[10].startswith("L09 R") and "s2" in lines[10]
  assert lines[10].endswith("| dw_k5_e6 + dw_k9_e6")
  assert "40->80" in lines[10]


def test_compact_round_trip():
  for a in _all_archs():
    c = a.to_compact()
    assert "\n" not in c
    b = Architecture.from_compact(c)
    assert b == a, c
    assert b.scale == a.scale
    assert str(a) == c
    assert arch_lib.resolve(arch=c) == a


def test_compact_format():
  a = arch_lib.load_released("NSENet-27")
  c = a.to_compact()
  assert c.startswith("flops27@flops*1.04:0|6|3|0|-|16|")
  assert "|11+17|" in c    # layer 9: dw_k5_e6 + dw_k9_e6
  g = arch_lib.load_released("NSENet-GPU").to_compact()
  assert g.startswith("latency19@latency:")   # scale 1 is omitted


def test_indices_and_canonical():
  a = arch_lib.load_released("NSENet-27")
  idx = a.indices()
  assert idx[9] == (11, 17)
  assert idx[21] == (19, 3, 14)
  c = a.canonical()
  assert c.layers[21] == ("dw_k3_e3", "dw_k7_e6", "dw_k11_e3")
  assert c != a and c.key() == a.key()
  assert Architecture.from_indices("flops27", idx, scale=1.04) == a


def test_key_ignores_order_and_metadata():
  a = arch_lib.load_released("NSENet")
  b = a.canonical().with_metadata(cost=1.0)
  assert a.key() == b.key()
  assert b.metadata["cost"] == 1.0 and b.metadata["name"] == "NSENet"
  assert a.with_scale(1.0).key() != a.key()


def test_metadata_not_in_equality_and_jsonable():
  import numpy as np
  a = arch_lib.load_released("NSENet-27").with_metadata(
      cost=np.float32(312.5), round=np.int64(6), pair=(1, 2))
  assert a == arch_lib.load_released("NSENet-27")
  d = json.loads(a.to_json())
  assert d["metadata"]["cost"] == 312.5 and d["metadata"]["round"] == 6
  assert d["metadata"]["pair"] == [1, 2]
  assert d["schema"] == "nse_tf.architecture" and d["version"] == 1


def test_from_indices_out_of_range():
  layers = [[0]] * 22
  layers[3] = [27]
  with pytest.raises(ArchitectureError, match=r"layer 3: op index 27"):
    Architecture.from_indices("flops27", layers)


# --------------------------------------------------------------------------- validation

def test_unknown_op():
  layers = _flops27_layers()
  layers[7] = ["dw_k3_e1", "dw_k4_e1"]
  with pytest.raises(ArchitectureError, match=r"layer 7: .*'dw_k4_e1'"):
    Architecture("flops27", "flops", layers)


def test_op_not_in_space():
  layers = _flops27_layers()
  layers[5] = ["dw_k3_e1_g12"]
  with pytest.raises(ArchitectureError, match=r"layer 5: op 'dw_k3_e1_g12' is not in space "
                                              r"'flops27'"):
    Architecture("flops27", "flops", layers)
  layers = [["dw_k3_e1"]] * 21
  layers[2] = ["dw_k3_e1_d2"]   # dilated ops are not in latency19
  with pytest.raises(ArchitectureError, match=r"layer 2: .*'dw_k3_e1_d2'.*latency19"):
    Architecture("latency19", "latency", layers)


@pytest.mark.parametrize("index", [1, 5, 13, 21])
def test_empty_reduction_layer(index):
  layers = _flops27_layers()
  layers[index] = []
  with pytest.raises(ArchitectureError, match=rf"layer {index}: .*at least one op"):
    Architecture("flops27", "flops", layers)


def test_empty_normal_layer_allowed():
  layers = _flops27_layers()
  layers[0] = []
  layers[20] = []
  a = Architecture("flops27", "flops", layers)
  assert a.layers[0] == () and a.layers[20] == ()


@pytest.mark.parametrize("n", [0, 21, 23])
def test_wrong_layer_count(n):
  with pytest.raises(ArchitectureError, match=rf"22 .*{n}"):
    Architecture("flops27", "flops", [["dw_k3_e1"]] * n)


@pytest.mark.parametrize("scale", [0.0, -1.0, float("nan"), float("inf")])
def test_bad_scale(scale):
  with pytest.raises(ArchitectureError, match="scale"):
    Architecture("flops27", "flops", _flops27_layers(), scale)
  d = Architecture("flops27", "flops", _flops27_layers()).to_dict()
  d["scale"] = scale
  with pytest.raises(ArchitectureError, match="scale"):
    Architecture.from_json(json.dumps(d))


@pytest.mark.parametrize("scale", ["1.0", True, None, [1]])
def test_bad_scale_type_in_json(scale):
  d = Architecture("flops27", "flops", _flops27_layers()).to_dict()
  d["scale"] = scale
  with pytest.raises(ArchitectureError, match="scale"):
    Architecture.from_dict(d)


def test_duplicate_op():
  layers = _flops27_layers()
  layers[11] = ["dw_k5_e1", "dw_k3_e1", "dw_k5_e1"]
  with pytest.raises(ArchitectureError, match=r"layer 11: op 'dw_k5_e1' listed twice"):
    Architecture("flops27", "flops", layers)


def test_unknown_space_and_macro():
  with pytest.raises(ArchitectureError, match="flops99"):
    Architecture("flops99", "flops", _flops27_layers())
  with pytest.raises(ArchitectureError, match="nope"):
    Architecture("flops27", "nope", _flops27_layers())


def test_non_string_op():
  layers = _flops27_layers()
  layers[2] = [3]
  with pytest.raises(ArchitectureError, match="layer 2"):
    Architecture("flops27", "flops", layers)


@pytest.mark.parametrize("text", ["{bad", "", "[1, 2", "not json"])
def test_bad_json(text):
  with pytest.raises(ArchitectureError, match="bad JSON"):
    Architecture.from_json(text)


def test_json_structure_errors():
  good = Architecture("flops27", "flops", _flops27_layers()).to_dict()
  with pytest.raises(ArchitectureError, match="object"):
    Architecture.from_json("[1, 2]")
  for field in ("space", "layers"):
    d = dict(good)
    del d[field]
    with pytest.raises(ArchitectureError, match=field):
      Architecture.from_dict(d)
  with pytest.raises(ArchitectureError, match="schema"):
    Architecture.from_dict(dict(good, schema="something.else"))
  with pytest.raises(ArchitectureError, match="bogus"):
    Architecture.from_dict(dict(good, bogus=1))
  with pytest.raises(ArchitectureError, match="layers"):
    Architecture.from_dict(dict(good, layers="dw_k3_e1"))
  with pytest.raises(ArchitectureError, match="layers"):
    Architecture.from_dict(dict(good, layers=[["dw_k3_e1"]] * 21 + ["dw_k3_e1"]))
  with pytest.raises(ArchitectureError, match="metadata"):
    Architecture.from_dict(dict(good, metadata=[1]))
  with pytest.raises(ArchitectureError, match="flops99"):
    Architecture.from_dict(dict(good, space="flops99"))
  # Omitted macro, scale, version and schema take their defaults.
  d = {"space": "flops27", "layers": good["layers"]}
  assert Architecture.from_dict(d) == Architecture("flops27", "flops", _flops27_layers())


@pytest.mark.parametrize("version", [2, 0, "1"])
def test_unknown_schema_version(version):
  d = Architecture("flops27", "flops", _flops27_layers()).to_dict()
  d["version"] = version
  with pytest.raises(ArchitectureError, match=r"schema version"):
    Architecture.from_json(json.dumps(d))


def test_text_errors():
  with pytest.raises(ArchitectureError):
    Architecture.from_text("")
  with pytest.raises(ArchitectureError, match="first line"):
    Architecture.from_text("hello\nL00 N | -")
  text = arch_lib.load_released("NSENet-27").to_text()
  with pytest.raises(ArchitectureError, match="'\\|'"):
    Architecture.from_text(text + "\nL22 N oops")
  with pytest.raises(ArchitectureError, match="layer 3"):
    Architecture.from_text(text.replace("L03 N   24->24  s1 | dw_k3_e1",
                                        "L03 N   24->24  s1 | dw_k3_e1 + bogus"))
  with pytest.raises(ArchitectureError):
    Architecture.from_text(text.replace("scale=1.04", "scale=1.0.4"))


def test_compact_errors():
  with pytest.raises(ArchitectureError):
    Architecture.from_compact("flops27:0|1")
  with pytest.raises(ArchitectureError, match="layer 2"):
    Architecture.from_compact("flops27@flops:0|0|x|" + "|".join(["0"] * 19))
  with pytest.raises(ArchitectureError, match="22"):
    Architecture.from_compact("flops27@flops:0|0")
  with pytest.raises(ArchitectureError, match="1.2.3"):
    Architecture.from_compact("flops27@flops*1.2.3:" + "|".join(["0"] * 22))
  with pytest.raises(spaces.SpaceError):
    Architecture.from_compact("flops99@flops:" + "|".join(["0"] * 22))


def test_resolve_arguments():
  with pytest.raises(ArchitectureError, match="exactly one"):
    arch_lib.resolve()
  with pytest.raises(ArchitectureError, match="exactly one"):
    arch_lib.resolve("NSENet", "x.json")


# -------------------------------------------------------------------------------- files

def test_save_load(tmp_path):
  a = arch_lib.load_released("NSENet").with_metadata(cost=330.95, round=3)
  path = tmp_path / "sub" / "arch.json"
  a.save(str(path))
  assert sorted(os.listdir(path.parent)) == ["arch.json"]
  b = Architecture.load(str(path))
  assert b == a and b.metadata == a.metadata
  assert path.read_text().endswith("\n")
  assert arch_lib.resolve(arch_json=str(path)) == a


def test_load_missing_file(tmp_path):
  path = tmp_path / "missing.json"
  with pytest.raises(ArchitectureError, match=r"cannot read .*missing\.json"):
    Architecture.load(str(path))


def test_load_bad_file_names_path(tmp_path):
  path = tmp_path / "bad.json"
  path.write_text('{"space": "flops27", "layers": [["dw_k3_e1"]]}')
  with pytest.raises(ArchitectureError, match=r"bad\.json: .*22"):
    Architecture.load(str(path))


def test_save_overwrites(tmp_path):
  path = tmp_path / "arch.json"
  arch_lib.load_released("NSENet").save(str(path))
  arch_lib.load_released("NSENet-GPU").save(str(path))
  assert Architecture.load(str(path)) == arch_lib.load_released("NSENet-GPU")
  assert os.listdir(tmp_path) == ["arch.json"]


def test_save_unserialisable_metadata_keeps_old_file(tmp_path):
  path = tmp_path / "arch.json"
  old = arch_lib.load_released("NSENet-27")
  old.save(str(path))
  before = path.read_bytes()
  bad = arch_lib.load_released("NSENet").with_metadata(obj={1, 2}, fn=object())
  with pytest.raises((TypeError, ValueError)):
    bad.save(str(path))
  assert path.read_bytes() == before
  assert os.listdir(tmp_path) == ["arch.json"]   # no temp file left behind


def test_save_failure_while_writing_keeps_old_file(tmp_path, monkeypatch):
  path = tmp_path / "arch.json"
  arch_lib.load_released("NSENet-27").save(str(path))
  before = path.read_bytes()

  def broken_fsync(fd):
    raise OSError(28, "No space left on device")

  monkeypatch.setattr(fileio.os, "fsync", broken_fsync)
  with pytest.raises(OSError):
    arch_lib.load_released("NSENet").save(str(path))
  assert path.read_bytes() == before
  assert os.listdir(tmp_path) == ["arch.json"]   # the temp file is cleaned up


def test_random_architectures_valid():
  for space in sorted(spaces.POOLS):
    archs = _random(space, 30, seed=3, max_ops=3)
    assert len({a.key() for a in archs}) == 30
    for a in archs:
      assert all(len(ops) <= 3 for ops in a.layers)
      kinds = spaces.layer_kinds(a.macro)
      assert all(ops or k == "N" for ops, k in zip(a.layers, kinds))
    # Seeded: the same seed gives the same architectures.
    assert [a.key() for a in _random(space, 30, seed=3, max_ops=3)] == [a.key() for a in archs]
