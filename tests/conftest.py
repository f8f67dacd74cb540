"""Shared test set-up: quiet TensorFlow, let absl flags coexist with pytest's argv."""

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")

from absl import flags  # noqa: E402

# absl would otherwise try to parse pytest's command line ("Unknown command line flag").
flags.FLAGS(["pytest"], known_only=True)

# Two logical CPUs for the MirroredStrategy tests, set before TensorFlow initialises its
# devices (TensorFlow's own mirrored_strategy_with_two_cpus pattern): they run in this
# process. Everything else runs on the default device, /cpu:0, as before.
import tensorflow as tf  # noqa: E402  pylint: disable=g-import-not-at-top

tf.config.set_logical_device_configuration(
    tf.config.list_physical_devices("CPU")[0], [tf.config.LogicalDeviceConfiguration()] * 2)



import resource  # noqa: E402
import shutil  # noqa: E402
import signal  # noqa: E402
import subprocess  # noqa: E402

import pytest  # noqa: E402


@pytest.fixture(scope="session")
def mirrored_two_cpus():
  """One MirroredStrategy over the two logical CPUs, shared by every test that needs one.

  A second instance in the same process hands out the same collective instance keys as
  the first, and TensorFlow's collective executor refuses a key it has seen with another
  dtype ("Collective instance 100 expected … data_type 1 but got … data_type 2").
  """
  from nse_tf import distribute  # pylint: disable=g-import-not-at-top
  return distribute.get_strategy("mirrored", num_cpu_replicas=2)


@pytest.fixture(autouse=True)
def _global_state_restored():
  """Every test leaves TensorFlow's, Keras', NumPy's and absl's global settings as it found
  them (op determinism, seeds, mixed-precision policy, graph optimiser and its memory
  optimiser, log verbosity), so that no test depends on which ran before it."""
  import random  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  import tf_keras as keras  # pylint: disable=g-import-not-at-top
  from absl import logging  # pylint: disable=g-import-not-at-top
  from tensorflow.python.framework import config as tf_config  # pylint: disable=g-import-not-at-top
  from nse_tf import common_flags  # pylint: disable=g-import-not-at-top
  determinism = tf_config.is_op_determinism_enabled()
  policy = keras.mixed_precision.global_policy().name
  seed, _ = tf.compat.v1.get_seed(None)
  py_state, np_state = random.getstate(), np.random.get_state()
  verbosity, tf_level = logging.get_verbosity(), tf.get_logger().level
  grappler = tf.config.optimizer.get_experimental_options()
  memory_optimizer = common_flags.memory_optimizer_enabled()
  yield
  if common_flags.memory_optimizer_enabled() != memory_optimizer:
    common_flags.set_memory_optimizer(memory_optimizer)
  if tf.config.optimizer.get_experimental_options() != grappler:
    tf.config.optimizer.set_experimental_options(
        {"disable_meta_optimizer": bool(grappler.get("disable_meta_optimizer", False))})
  if tf_config.is_op_determinism_enabled() != determinism:
    (tf_config.enable_op_determinism if determinism else tf_config.disable_op_determinism)()
  keras.mixed_precision.set_global_policy(policy)
  if tf.compat.v1.get_seed(None)[0] != seed:
    tf.random.set_seed(seed)
  random.setstate(py_state)
  np.random.set_state(np_state)
  logging.set_verbosity(verbosity)
  tf.get_logger().setLevel(tf_level)


@pytest.fixture
def grappler_off():
  """TensorFlow's graph optimiser (grappler) off for this test, as `--graph_optimization=off`
  does (the autouse fixture above turns it back on, and the log levels it also sets).

  For tests whose claim does not depend on it: two computations compared with each other
  (a resumed round against an uninterrupted one, two strategies, float32 against a mixed
  policy) run under the same setting either way. Grappler's passes take about half of a
  tiny supernet step's first call (tiny macro, K = 2: 4.3 s against 1.3 s after tracing)
  and change no result beyond float rounding. The benchmark tests and the full-disk
  search pass `--graph_optimization=off` to their processes for the same reason; the
  search's end-to-end tests (`tests/test_search.py`: the smoke search, its SIGKILL resume,
  the evaluation checks) keep the default, which is what a user runs.
  """
  from nse_tf import common_flags  # pylint: disable=g-import-not-at-top
  common_flags.setup_tensorflow(False, "off")    # what --graph_optimization=off does
  yield


@pytest.fixture
def small_disk(tmp_path):
  """make(size_kib) -> (directory, preexec_fn): a child process runs out of space there.

  A real full filesystem where the test may mount one (a tmpfs of that size; root on
  Linux), else a simulated one: preexec_fn sets the child's file-size limit
  (RLIMIT_FSIZE, SIGXFSZ ignored), so every write past the size fails with EFBIG,
  "File too large", which the CLIs report like a full disk. Pass preexec_fn to
  subprocess.
  """
  mounts = []

  def make(size_kib: int):
    path = str(tmp_path / f"small_disk_{len(mounts)}")
    os.makedirs(path)
    mounted = False
    if shutil.which("mount") and os.geteuid() == 0:
      mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size_kib}k", "tmpfs",
                                path], capture_output=True, timeout=30).returncode == 0
    limit = size_kib * 1024

    def preexec():
      signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
      resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    if mounted:
      mounts.append(path)
    return path, (None if mounted else preexec)

  yield make
  for path in mounts:
    subprocess.run(["umount", "-l", path], capture_output=True, timeout=30)


@pytest.fixture
def one_error_line(capsys):
  """check(module, argv, needles, preexec_fn=None) -> the last line of stderr.

  Runs `python -m nse_tf.<module> ARGV` and asserts what a user must see when it fails:
  exit status 2, a last line 'error: …' that contains one of `needles`, no traceback. In
  this process (`cli.invoke` on the command's own flags), or in a child process where
  `preexec_fn` is given (a simulated full disk: the child's own file-size limit).
  """
  import importlib  # pylint: disable=g-import-not-at-top
  import sys  # pylint: disable=g-import-not-at-top

  def check(module, argv, needles, preexec_fn=None):
    if preexec_fn is None:
      from nse_tf import cli  # pylint: disable=g-import-not-at-top
      command = importlib.import_module(f"nse_tf.{module}")
      code = cli.invoke(command.define_flags, command.main, argv)
      err = capsys.readouterr().err
    else:
      root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
      env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2", CUDA_VISIBLE_DEVICES="")
      proc = subprocess.run([sys.executable, "-m", f"nse_tf.{module}", *argv], cwd=root,
                            env=env, capture_output=True, text=True, timeout=600,
                            preexec_fn=preexec_fn)
      code, err = proc.returncode, proc.stderr
    assert code == 2, err[-3000:]
    last = err.strip().splitlines()[-1]
    assert last.startswith("error: ") and "Traceback" not in err, err[-3000:]
    assert any(n in last for n in needles), last
    return last

  return check


# Seconds each file took in the suite on this 2-core machine (2026-12-02, `--durations=0`,
# summed per file), heaviest first. Two workers take whole files (`--dist loadfile`) in
# collection order, so starting the long files first lets both finish together: in
# xdist's default order (most tests first) the four heaviest files came last and one
# worker ran alone for 122 s at the end (13 s in this order).
# Only the order changes; a file not listed runs after these, in its usual order.
_FILE_SECONDS = {
    "test_search.py": 286, "test_multi_worker.py": 254, "test_trainer.py": 134,
    "test_benchmarks.py": 79, "test_cost.py": 47, "test_detection.py": 44,
    "test_tools.py": 34, "test_export.py": 34,
}


def pytest_collection_modifyitems(session, config, items):  # pylint: disable=unused-argument
  items.sort(key=lambda item: -_FILE_SECONDS.get(item.path.name, 0))
