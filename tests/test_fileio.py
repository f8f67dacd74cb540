"""fileio (atomic files and folders, JSON readers), run_dir and the retrain_run contract."""

import json
import os
import stat

import pytest

from nse_tf import errors, fileio, retrain_run, run_dir


def test_atomic_write_replaces_whole_or_not_at_all(tmp_path):
  path = tmp_path / "sub" / "a.txt"
  fileio.atomic_write_text(str(path), "old")            # creates the folder
  assert path.read_text() == "old"
  assert stat.S_IMODE(os.stat(path).st_mode) == 0o666 & ~_umask()

  def fail(f):
    f.write("half")
    raise RuntimeError("disk gone")
  with pytest.raises(RuntimeError, match="disk gone"):
    fileio.atomic_write(str(path), fail)
  assert path.read_text() == "old"                      # untouched
  assert os.listdir(path.parent) == ["a.txt"]           # no temp file left
  fileio.atomic_write_bytes(str(path), b"\x00new")
  assert path.read_bytes() == b"\x00new"
  with pytest.raises(FileNotFoundError):
    fileio.atomic_write(str(tmp_path / "nowhere" / "b"), lambda f: f.write("x"), makedirs=False)
  assert not (tmp_path / "nowhere").exists()


def _umask():
  mask = os.umask(0o022)
  os.umask(mask)
  return mask


def test_atomic_directory(tmp_path):
  final = tmp_path / "out"
  with fileio.atomic_directory(str(final)) as tmp:
    assert not final.exists()
    (open(os.path.join(tmp, "x"), "w")).write("1")
  assert (final / "x").read_text() == "1"
  assert sorted(os.listdir(tmp_path)) == ["out"]
  with pytest.raises(RuntimeError):
    with fileio.atomic_directory(str(final), replace=True) as tmp:
      (open(os.path.join(tmp, "y"), "w")).write("2")
      raise RuntimeError("killed")
  assert os.listdir(final) == ["x"] and sorted(os.listdir(tmp_path)) == ["out"]
  with pytest.raises(OSError):                          # an existing non-empty folder stays
    with fileio.atomic_directory(str(final)) as tmp:
      (open(os.path.join(tmp, "z"), "w")).write("3")
  assert os.listdir(final) == ["x"] and sorted(os.listdir(tmp_path)) == ["out"]
  with fileio.atomic_directory(str(final), replace=True) as tmp:
    (open(os.path.join(tmp, "z"), "w")).write("3")
  assert os.listdir(final) == ["z"]


def test_load_json_and_read_jsonl(tmp_path):
  p = tmp_path / "c.json"
  p.write_text('{"a": 1}')
  assert fileio.load_json(str(p), errors.UsageError, "fix it") == {"a": 1}
  for content, needle in (("{cut", "is corrupt"), ("[1, 2]", "JSON list, not an object")):
    p.write_text(content)
    with pytest.raises(errors.UsageError, match=needle) as e:
      fileio.load_json(str(p), errors.UsageError, "fix it")
    assert str(e.value).startswith(str(p)) and str(e.value).endswith("; fix it")
  p.write_bytes(b"\xff\xfe\x00")
  with pytest.raises(errors.UsageError, match="not a text file"):
    fileio.load_json(str(p), errors.UsageError, "fix it")
  log = tmp_path / "l.jsonl"
  assert fileio.read_jsonl(str(log)) == []
  log.write_text('{"i": 0}\n{"i": 1}\n{"i": 2, "cu')        # the last line cut by a kill
  assert fileio.read_jsonl(str(log)) == [{"i": 0}, {"i": 1}]


def test_append_jsonl_after_a_line_cut_by_a_kill(tmp_path):
  """A record appended after a cut line gets a line of its own and is read back (it used
  to be glued to the fragment and skipped, with every record after it)."""
  log = tmp_path / "l.jsonl"
  fileio.append_jsonl(str(log), {"i": 0})                  # a new file
  assert log.read_text() == '{"i": 0}\n'
  with open(log, "a", encoding="utf-8") as f:
    f.write('{"i": 1, "cu')                                # killed mid-write
  fileio.append_jsonl(str(log), {"i": 2})
  fileio.append_jsonl(str(log), {"i": 3})
  assert log.read_text() == '{"i": 0}\n{"i": 1, "cu\n{"i": 2}\n{"i": 3}\n'
  assert fileio.read_jsonl(str(log)) == [{"i": 0}, {"i": 2}, {"i": 3}]


def test_refuse_changed_config_and_remove_outputs(tmp_path):
  out = str(tmp_path)
  run_dir.refuse_changed_config(out, "config.json", {"lr": 0.1}, (), "search")  # nothing yet
  (tmp_path / "config.json").write_text(json.dumps({"lr": 0.1, "progress": True}))
  run_dir.refuse_changed_config(out, "config.json", {"lr": 0.1, "progress": False},
                                {"progress"}, "search")
  with pytest.raises(errors.UsageError, match=r"holds a search with another configuration "
                     r"\(lr: 0.1 -> 0.2\); use the same flags to resume, or --overwrite"):
    run_dir.refuse_changed_config(out, "config.json", {"lr": 0.2, "progress": True}, (),
                                  "search")
  (tmp_path / "config.json").write_text("{")
  with pytest.raises(errors.UsageError, match="config.json is corrupt"):
    run_dir.refuse_changed_config(out, "config.json", {}, (), "search")
  for name in ("round_01", "tb", "keep"):
    (tmp_path / name).mkdir()
  (tmp_path / "state.json").write_text("{}")
  run_dir.remove_outputs(out, ("state.json", "tb", "config.json"), prefixes=("round_",))
  assert os.listdir(tmp_path) == ["keep"]


def test_retrain_run_contract_errors(tmp_path):
  with pytest.raises(FileNotFoundError, match="is not a directory"):
    retrain_run.read(str(tmp_path / "missing"))
  with pytest.raises(errors.UsageError, match="has no arch.json"):
    retrain_run.read(str(tmp_path), error=errors.UsageError)
  (tmp_path / "model_config.json").write_text(json.dumps({"num_classes": 3}))
  with pytest.raises(FileNotFoundError, match="has no arch.json"):
    retrain_run.read(str(tmp_path))
  with pytest.raises(FileNotFoundError, match="lacks image_size, activation, se"):
    retrain_run.read_model_config(str(tmp_path))
  (tmp_path / "model_config.json").write_text(json.dumps(
      {"format_version": 9, "num_classes": 3, "image_size": 8, "activation": "relu",
       "se": False}))
  with pytest.raises(FileNotFoundError, match="format_version 9, this nse_tf reads 1"):
    retrain_run.read_model_config(str(tmp_path))
