"""Tests of nse_tf.retrain: the CLI's outputs (the contract export.py and detection/ rely on),
resume of an interrupted retrain, recipes and bad input."""

import json
import os

import numpy as np
import pytest
import tensorflow as tf

from nse_tf import arch as arch_lib
from nse_tf import cli
from nse_tf import data as data_lib
from nse_tf import retrain
from nse_tf import retrainer

TINY = "flops27@tiny*0.25:0|3|-|6|0|9+21"
ARGS = ["--dataset=demo_digits", "--image_size=32", "--global_batch=32", "--steps_per_epoch=4",
        "--epochs=2", "--lr=0.1", "--warmup_epochs=0.5", "--ema_decay=0.9", "--eval_every=1",
        "--eval_batch=120", "--noprogress"]


def _main(*args):
  return retrain.main([], cli.parse(retrain.define_flags, args))


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
  model_dir = str(tmp_path_factory.mktemp("retrain"))
  assert _main(f"--arch={TINY}", f"--model_dir={model_dir}", *ARGS) == 0
  return model_dir


def test_cli_writes_the_contract(finished):
  names = set(os.listdir(finished))
  assert {"arch.json", "model_config.json", "retrain_config.json", "metrics.json", "ckpt",
          "final", "tb"} <= names
  assert arch_lib.Architecture.load(os.path.join(finished, "arch.json")).to_compact() == TINY
  with open(os.path.join(finished, "model_config.json")) as f:
    config = json.load(f)
  assert {"num_classes": 10, "image_size": 32, "activation": "relu", "se": False,
          "dropout": 0.0}.items() <= config.items()
  with open(os.path.join(finished, "metrics.json")) as f:
    metrics = json.load(f)
  assert metrics["validation_examples"] == 359 and metrics["weights"] == "ema"
  assert metrics["steps"] == 8 and metrics["params"] > 0 and metrics["mflops"] > 0
  assert 0.0 <= metrics["top1"] <= metrics["top5"] <= 1.0
  assert tf.train.latest_checkpoint(os.path.join(finished, "final")) is not None
  # The deployable model rebuilt from the directory scores what metrics.json says (the EMA
  # weights, not the raw ones that the training checkpoint holds).
  model = retrainer.load_trained_model(finished)
  d = data_lib.get_data("demo_digits", image_size=32, holdout_examples=0)
  correct = sum(int(np.sum(model(x, training=False).numpy().argmax(-1) == y.numpy()))
                for x, y in d.validation(120))
  assert correct / 359 == pytest.approx(metrics["top1"], abs=1e-6)
  # Re-running the finished run changes nothing.
  before = {n: os.path.getmtime(os.path.join(finished, n)) for n in ("metrics.json", "final")}
  assert _main(f"--arch={TINY}", f"--model_dir={finished}", *ARGS) == 0
  assert before == {n: os.path.getmtime(os.path.join(finished, n)) for n in before}


def test_resume_refuses_other_settings_and_bad_input(finished, tmp_path):
  with pytest.raises(ValueError, match=r"another configuration \(lr: 0.1 -> 0.2"):
    _main(f"--arch={TINY}", f"--model_dir={finished}", *ARGS, "--lr=0.2")
  with pytest.raises(ValueError, match="another architecture"):
    _main("--arch=flops27@tiny*0.25:0|3|-|6|0|9", f"--model_dir={finished}", *ARGS)
  with pytest.raises(ValueError, match="--model_dir is required"):
    _main(f"--arch={TINY}", *ARGS)
  with pytest.raises(ValueError, match="exactly one of --arch"):
    _main(f"--arch={TINY}", "--arch_json=x.json", f"--model_dir={tmp_path}", *ARGS)
  with pytest.raises(ValueError, match="--ema_decay must be in"):
    _main(f"--arch={TINY}", f"--model_dir={tmp_path}", *ARGS, "--ema_decay=1.5")
  with pytest.raises(FileNotFoundError, match="no arch.json"):
    retrainer.load_trained_model(str(tmp_path))
  (tmp_path / "arch.json").write_text((open(os.path.join(finished, "arch.json")).read()))
  (tmp_path / "model_config.json").write_text("{}")
  with pytest.raises(FileNotFoundError, match="has not finished; re-run"):
    retrainer.load_trained_model(str(tmp_path))


def test_recipes_and_defaults():
  cfg = retrain.retrain_config(cli.parse(retrain.define_flags,
                                         ["--recipe=efficientnet", "--dropout=0.3"]))
  assert (cfg.activation, cfg.se, cfg.dropout, cfg.drop_path, cfg.augment,
          cfg.label_smoothing) == ("swish", True, 0.3, 0.2, "autoaugment", 0.1)
  cfg = retrain.retrain_config(cli.parse(retrain.define_flags, []))
  # SPEC §6 when nothing is given, although the search's shared flags default otherwise.
  assert (cfg.global_batch, cfg.epochs, cfg.lr, cfg.weight_decay, cfg.ema_decay,
          cfg.activation, cfg.se) == (2048, 350.0, 0.8, 4e-5, 0.9999, "relu", False)


def _retrainer(model_dir):
  """The configuration of ARGS, as a library call (so it follows the CLI run's trajectory)."""
  d = data_lib.get_data("demo_digits", image_size=32, holdout_examples=0)
  cfg = retrainer.RetrainConfig(global_batch=32, epochs=2, steps_per_epoch=4, lr=0.1,
                              warmup_epochs=0.5, warmup_start_lr=0.0, ema_decay=0.9,
                              eval_every=0, checkpoint_every=100, progress=False)
  return retrainer.Retrainer(arch_lib.Architecture.from_compact(TINY), cfg,
                           tf.distribute.get_strategy(), d, model_dir)


def _checkpoint_values(model_dir):
  path = tf.train.latest_checkpoint(os.path.join(model_dir, "ckpt"))
  reader = tf.train.load_checkpoint(path)
  return {name: reader.get_tensor(name) for name, _ in tf.train.list_variables(path)
          if "train_iter" not in name and "save_counter" not in name and "best" not in name}


@pytest.mark.slow
def test_interrupted_retrain_resumes_on_the_same_trajectory(finished, tmp_path):
  """Stopped at step 3 (checkpointed as a kill would find it) and resumed, a retrain ends
  with exactly the weights, optimizer state and EMA of the uninterrupted CLI run."""
  part = _retrainer(str(tmp_path))
  part.train(stop_at=3)
  del part
  resumed = _retrainer(str(tmp_path))
  assert resumed.restored and int(resumed.step.numpy()) == 3
  resumed.train()
  full, mine = _checkpoint_values(finished), _checkpoint_values(str(tmp_path))
  assert full.keys() == mine.keys() and any("ema" in k for k in full)
  for name in full:
    np.testing.assert_array_equal(full[name], mine[name], err_msg=name)
  # The EMA weights are what gets evaluated and deployed, and they differ from the raw.
  assert any(np.abs(s.numpy() - v.numpy()).max() > 0
             for s, v in zip(resumed.ema.shadow, resumed.model.variables))
  # Evaluation (359 images in batches of 256 and 103), with and without the EMA weights:
  # one trace of the step serves both batch sizes and both calls.
  ema, raw = resumed.evaluate(), resumed.evaluate(use_ema=False)
  assert ema["examples"] == raw["examples"] == 359
  assert resumed._eval_step.experimental_get_tracing_count() == 1


@pytest.mark.slow
def test_full_disk_and_unwritable_model_dir_are_one_error_line(small_disk, tmp_path,
                                                               one_error_line):
  """A retrain whose checkpoint does not fit ends with one line and no ckpt-N_temp."""
  base, preexec = small_disk(400)          # the probe (256 KiB) fits, a full-width checkpoint not
  wide = TINY.replace("*0.25", "")
  (tmp_path / "a_file").write_text("x")
  for model_dir, fn, needles in [
      (os.path.join(base, "run"), preexec, ("No space left on device", "File too large")),
      (str(tmp_path / "a_file" / "run"), None, ("Not a directory",))]:
    one_error_line("retrain", [f"--arch={wide}", f"--model_dir={model_dir}", *ARGS,
                               "--checkpoint_every=2"], needles, preexec_fn=fn)
    if os.path.isdir(model_dir):
      litter = [n for d, dirs, files in os.walk(model_dir) for n in dirs + files
                if "_temp" in n or ".tmp" in n or n.startswith(".write_test")]
      assert not litter, litter
