"""The commands' flags: each lists what it reads and nothing else; defaults match the configs."""

import dataclasses
import os
import re
import subprocess
import sys

import pytest

from nse_tf import cli, common_flags, evolution, export, retrain, retrainer, search, train_round
from nse_tf import trainer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
COMMANDS = {"search": search, "train_round": train_round, "retrain": retrain, "export": export}


def _names(module):
  return set(cli.flag_names(module.define_flags))


def _listed(text):
  return set(re.findall(r"^  --(?:\[no\])?(\w+):", text, re.M))


@pytest.mark.parametrize("name", sorted(COMMANDS))
def test_help_lists_the_commands_flags_and_helpfull_no_other_commands(name):
  own = _names(COMMANDS[name])
  others = set().union(*(_names(m) for n, m in COMMANDS.items() if n != name)) - own
  env = dict(os.environ, PYTHONPATH=ROOT)
  run = dict(cwd=ROOT, env=env, capture_output=True, text=True, timeout=60)
  # (absl's help exits with status 1.)
  short = subprocess.run([sys.executable, "-m", f"nse_tf.{name}", "--help"], **run)
  assert "Traceback" not in short.stderr and _listed(short.stdout) == own, short.stderr
  full = subprocess.run([sys.executable, "-m", f"nse_tf.{name}", "--helpfull"], **run)
  assert "Traceback" not in full.stderr, full.stderr
  assert own <= _listed(full.stdout) and not _listed(full.stdout) & others
  # A bad flag from the shell: one 'error:' line and status 1, as `cli.invoke` gives.
  for bad in (["--no_such_flag=1"], ["--flagfile=no_such.cfg"]):
    proc = subprocess.run([sys.executable, "-m", f"nse_tf.{name}", *bad], **run)
    assert proc.returncode == 1, proc.stderr
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr
    assert "ERROR::" not in lines[0] and "FATAL" not in lines[0]


def test_retrain_and_export_define_nothing_of_the_search():
  assert not {"tau", "alpha", "theta_lr", "output_dir", "max_ops", "space"} & _names(retrain)
  assert _names(export) == {"model_dir", "export_dir", "data_dir", "version", "top_k",
                            "max_pixels", "tflite", "calibration_examples", "verify_examples"}


def test_several_commands_parse_side_by_side_in_one_process():
  s = cli.parse(search.define_flags, ["--eval_batch=7"])
  r = cli.parse(retrain.define_flags, ["--eval_batch=9"])
  assert (s.eval_batch, r.eval_batch) == (7, 9)
  with pytest.raises(Exception, match="tau"):
    cli.parse(retrain.define_flags, ["--tau=3"])


def _check_defaults(flag_values, config_cls, exempt=()):
  checked = 0
  for f in dataclasses.fields(config_cls):
    if f.name in flag_values and f.name not in exempt:
      assert flag_values[f.name].default == f.default, (config_cls.__name__, f.name)
      checked += 1
  return checked


def test_flag_defaults_are_the_config_dataclasses_defaults():
  fv = cli.parse(search.define_flags, [])
  assert _check_defaults(fv, trainer.TrainConfig) >= 15
  assert common_flags.ROUND_TRAINING_DEFAULTS == {
      k: getattr(trainer.TrainConfig, k) for k in common_flags.ROUND_TRAINING_DEFAULTS}
  # image_size: the CLI's default is the demo's 32x32, the library's the paper's 224;
  # interval: a list flag "lo,hi" for a (lo, hi) tuple, compared below.
  assert _check_defaults(fv, evolution.SearchConfig, exempt=("image_size", "interval")) >= 15
  assert tuple(map(float, fv["interval"].default)) == evolution.SearchConfig.interval
  fr = cli.parse(retrain.define_flags, [])
  # The recipe's flags default to None: "the recipe's value" (test_retrain checks those).
  recipe = set(retrain.RECIPES["paper"])
  assert _check_defaults(fr, retrainer.RetrainConfig, exempt=recipe) >= 15
  cfg = retrain.retrain_config(fr)
  assert cfg == retrainer.RetrainConfig()        # nothing given: exactly the dataclass


def test_train_round_cli_in_process_refuses_bad_input(tmp_path, capsys):
  code = cli.invoke(train_round.define_flags, train_round.main,
                    [f"--output_dir={tmp_path}", "--max_ops=0"])
  assert code == 2 and "--max_ops must be >= 1" in capsys.readouterr().err
  code = cli.invoke(train_round.define_flags, train_round.main,
                    [f"--output_dir={tmp_path}", "--gate_sampling=interval"])
  assert code == 2 and "run python -m nse_tf.search" in capsys.readouterr().err
  code = cli.invoke(train_round.define_flags, train_round.main, ["--bogus=1"])
  assert code == 1 and "bogus" in capsys.readouterr().err


def test_disk_error_keeps_the_reason_when_the_path_is_long():
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  path = "/tmp/" + "deep/" * 80 + "ckpt-20_temp/part-00000-of-00001.data-00000-of-00001"
  e = tf.errors.ResourceExhaustedError(
      None, None, "{{function_node __wrapped__SaveV2_dtypes_335_device_/job:localhost/"
      f"replica:0/task:0/device:CPU:0}}}} {path}; No space left on device [Op:SaveV2]")
  line = cli.disk_error(e)
  assert line.startswith("No space left on device: /tmp/deep/") and "function_node" not in line
  assert "run the same command again" in line and len(line) < 500
  short = tf.errors.ResourceExhaustedError(None, None, "/x/ckpt; No space left on device")
  assert cli.disk_error(short).startswith("/x/ckpt; No space left on device; free some space")


def test_every_user_facing_error_is_one_type_the_commands_catch():
  import importlib  # pylint: disable=g-import-not-at-top
  from nse_tf import errors  # pylint: disable=g-import-not-at-top
  found = []
  for name in ("arch", "spaces", "data", "trainer", "evolution", "distribute", "latency",
               "run_lock", "cli"):
    module = importlib.import_module(f"nse_tf.{name}")
    found += [obj for attr, obj in vars(module).items()
              if attr.endswith("Error") and isinstance(obj, type)
              and issubclass(obj, Exception) and obj.__module__.startswith("nse_tf")]
  assert len(found) >= 10
  for cls in found:
    assert issubclass(cls, errors.NSEError), cls
    assert issubclass(cls, cli.user_errors()), cls


def test_lost_worker_is_one_line_naming_it(capsys):
  """A multi-worker peer that went away: the survivors' collectives raise UnavailableError;
  the command ends with one line that names the lost task and says how to resume."""
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  msg = ("Graph execution error:\nCollective ops is aborted by: recvmsg:Connection reset by "
         "peer\nAdditional GRPC error information from remote target "
         "/job:worker/replica:0/task:0 while calling /tensorflow.WorkerService/CompleteInstance")

  def main(argv):
    raise tf.errors.UnavailableError(None, None, msg)
  assert cli.call(main, ["x"]) == 2
  err = capsys.readouterr().err.strip()
  assert len(err.splitlines()) == 1 and err.startswith("error: lost contact with worker 0")
  assert "Re-run the same command on every worker" in err
  assert cli.lost_worker_error(tf.errors.UnavailableError(None, None, "dataset busy")) is None
  assert cli.lost_worker_error(ValueError("Connection reset by peer")) is None


def _optimised_ops(fn, *args):
  """The op types of the graph that a tf.function call runs after grappler."""
  from tensorflow.python.eager import context  # pylint: disable=g-import-not-at-top
  context.enable_run_metadata()
  try:
    fn(*args)
    metadata = context.export_run_metadata()
  finally:
    context.disable_run_metadata()
  return {n.op for f in metadata.function_graphs for g in f.partition_graphs for n in g.node}


def test_deterministic_turns_grapplers_memory_optimiser_off():
  """--deterministic turns off grappler's memory optimiser, whose AddN-to-accumulation
  rewrite sums in the order the executor happens to run (issue 14: three processes of the
  flops supernet, three expected costs after one θ step); --nodeterministic leaves
  TensorFlow's default (the autouse fixture restores it).

  The rewrite happens when grappler's static estimate of a function's peak memory passes
  80 % of the CPU device's nominal 256 MiB: here four 64 MiB products summed by one AddN.
  """
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  from tensorflow.core.protobuf import config_pb2  # pylint: disable=g-import-not-at-top
  from tensorflow.python.eager import context  # pylint: disable=g-import-not-at-top

  def sum_of_products(x):
    return tf.add_n([x * 2.0, x * 3.0, x * 4.0, x * 5.0])

  x = tf.ones([2 ** 24])
  common_flags.set_memory_optimizer(True)
  common_flags.setup_tensorflow(False, "on")
  assert common_flags.memory_optimizer_enabled()
  rewritten = _optimised_ops(tf.function(sum_of_products), x)
  assert {"TemporaryVariable", "AssignAdd"} <= rewritten and "AddN" not in rewritten
  common_flags.setup_tensorflow(True, "on")
  assert not common_flags.memory_optimizer_enabled()
  kept = _optimised_ops(tf.function(sum_of_products), x)
  assert "AddN" in kept and not {"TemporaryVariable", "AssignAdd"} & kept
  common_flags.setup_tensorflow(False, "off")   # --graph_optimization leaves it as it is
  assert not common_flags.memory_optimizer_enabled()

  def call_config():   # what a tf.function call hands grappler
    config = config_pb2.ConfigProto.FromString(
        context.context().function_call_options.config_proto_serialized)
    config.graph_options.rewrite_options.ClearField("memory_optimization")
    return config

  before = call_config()
  common_flags.set_memory_optimizer(True)
  assert common_flags.memory_optimizer_enabled()
  assert call_config() == before     # nothing else in the config changed


def test_graph_optimization_setting():
  """--graph_optimization (search, train_round) turns grappler on or off; the autouse
  fixture restores TensorFlow's setting after the test."""
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  for setting, off in (("off", True), ("on", False)):
    common_flags.setup_tensorflow(False, setting)
    assert tf.config.optimizer.get_experimental_options()["disable_meta_optimizer"] is off
  with pytest.raises(ValueError, match="graph_optimization"):
    common_flags.setup_tensorflow(False, "fast")
  assert cli.parse(search.define_flags, ["--graph_optimization=off"]).graph_optimization == "off"
  assert cli.parse(train_round.define_flags, []).graph_optimization == "on"


def test_intra_op_threads_setting(caplog):
  """--intra_op_threads (search, train_round, retrain): 0 leaves TensorFlow's default;
  a count is set before TensorFlow starts (a process of its own here: this one has
  started), and where it has started already the command warns instead of failing."""
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  for module in (search, train_round, retrain):
    assert cli.parse(module.define_flags, []).intra_op_threads == 0
    assert cli.parse(module.define_flags, ["--intra_op_threads=1"]).intra_op_threads == 1
    with pytest.raises(Exception, match="intra_op_threads"):
      cli.parse(module.define_flags, ["--intra_op_threads=-1"])
  with pytest.raises(ValueError, match="intra_op_threads must be >= 0"):
    common_flags.setup_tensorflow(False, None, -1)
  tf.constant(1.0) + 1.0    # TensorFlow has started in this process
  before = tf.config.threading.get_intra_op_parallelism_threads()
  common_flags.setup_tensorflow(False, None, before + 1)
  assert tf.config.threading.get_intra_op_parallelism_threads() == before
  assert any("TensorFlow started before" in r.getMessage() for r in caplog.records)
  code = ("from nse_tf import common_flags\n"
          "common_flags.setup_tensorflow(True, 'on', {n})\n"
          "import tensorflow as tf\n"
          "tf.constant(1.0) + 1.0\n"
          "print(tf.config.threading.get_intra_op_parallelism_threads())\n")
  env = dict(os.environ, PYTHONPATH=ROOT, TF_CPP_MIN_LOG_LEVEL="3", CUDA_VISIBLE_DEVICES="")
  env.pop("TF_NUM_INTRAOP_THREADS", None)
  out = subprocess.run([sys.executable, "-c", code.format(n=1)], capture_output=True,
                       text=True, env=env, timeout=300, check=True).stdout
  assert out.split()[-1] == "1", out
