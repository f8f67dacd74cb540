"""Measuring a latency table on this device (TensorFlow or the TFLite interpreter).

The table itself, its keys and the prediction the search uses are in nse_tf/latency.py
(pure Python); this module times the blocks (`Measurer`), builds and resumes a table
file (`build_table`, also in a fresh process: `build_in_subprocess`, because threads can
only be pinned before TensorFlow starts), calibrates it end to end, and times whole
standalone networks for the check (tools/check_latency_lut.py).
"""

from __future__ import annotations

import datetime
import json
import os
import platform
import subprocess
import sys
import time
from typing import Any, Callable, Dict, List, Optional, Sequence

from nse_tf.fileio import atomic_write_text
from nse_tf.latency import (DEFAULT_MAX_BRANCHES, STATISTICS, TABLE_VERSION, BACKENDS, CLOCKS,
                            EntrySpec, LatencyError, LatencyTable, Layout,
                            resolution_hw, config_key, layout, load_json, summarize)
from nse_tf import machine as machine_lib
from nse_tf import spaces
from nse_tf import stats
from nse_tf.spaces import SpaceError


# ---------------------------------------------------------------------------
# Measuring (TensorFlow imported lazily: the table arithmetic above is pure Python).


def device_description(backend: str, batch_size: int, threads: int, statistic: str,
                       warmup: int, repeats: int, clock: str = "wall") -> Dict[str, Any]:
  """What the numbers were measured on; a resumed or extended build must match it."""
  here = machine_lib.describe()
  return {
      "cpu": here["cpu"], "machine": platform.machine(), "system": platform.system(),
      "cpu_count": os.cpu_count(), "gpus": here["gpus"] if backend == "tf" else [],
      "tensorflow": here["tensorflow"], "python": here["python"],
      "backend": backend, "batch_size": int(batch_size), "threads": int(threads),
      "statistic": statistic, "warmup": int(warmup), "repeats": int(repeats),
      "clock": clock,
  }


COMPARED = ("cpu", "machine", "cpu_count", "gpus", "tensorflow", "backend", "batch_size",
            "threads", "clock")


def pin_threads(threads: int) -> None:
  """Pins TensorFlow's thread pools; must run before TensorFlow executes anything."""
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  try:
    tf.config.threading.set_intra_op_parallelism_threads(threads)
    tf.config.threading.set_inter_op_parallelism_threads(threads)
  except RuntimeError:
    if (tf.config.threading.get_intra_op_parallelism_threads() != threads):
      raise LatencyError(
          "TensorFlow is already running with other thread settings; measure latency in a "
          "fresh process (tools/build_latency_lut.py, tools/check_latency_lut.py)") from None


def entry_model(spec: EntrySpec, batch_size: int):
  """A small tf_keras model that runs exactly the block of `spec`."""
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  import tf_keras as keras  # pylint: disable=g-import-not-at-top
  from nse_tf import nsenet  # pylint: disable=g-import-not-at-top
  from nse_tf import ops as ops_lib  # pylint: disable=g-import-not-at-top
  inputs = [keras.Input(spec.in_shape, batch_size=batch_size, name=f"x{i}")
            for i in range(spec.inputs)]
  x = inputs[0]
  if spec.kind == "null":
    # The least a call can do: one slice of the first input (an identity graph
    # would be optimised away); every input is still passed in, as in the block.
    first = (lambda t: t[:, :1]) if len(spec.in_shape) == 1 else (lambda t: t[:, :1, :1, :1])
    y = keras.layers.Lambda(lambda ts: first(ts[0]), name="touch")(inputs)
  elif spec.kind == "op":
    h, w, c_in = spec.in_shape
    stride = spec.arg("stride")
    layer = spaces.LayerSpec(0, "N" if stride == 1 else "R", c_in, spec.arg("c_out"), stride,
                             h, w, 0)
    y = ops_lib.build_op(spec.arg("op"), layer)(x)
  elif spec.kind == "avg":
    y = keras.layers.Average(name="avg")(inputs)
  elif spec.kind == "stem":
    y = nsenet.stem(x, channels=spec.arg("channels"))
  elif spec.kind == "head":
    y = nsenet.head_conv(x, spec.arg("channels"))
  elif spec.kind == "pool":
    y = keras.layers.GlobalAveragePooling2D(name="pool")(x)
  elif spec.kind == "fc":
    y = keras.layers.Dense(spec.arg("classes"), name="classifier")(x)
  else:
    raise LatencyError(f"unknown entry kind {spec.kind!r}")
  del tf
  return keras.Model(inputs, y, name="entry")


class Measurer:
  """Times a Keras model's inference with one backend, batch and thread count."""

  def __init__(self, backend: str = "tf", threads: int = 1, warmup: int = 10,
               repeats: int = 50, seed: int = 0, clock: str = "wall"):
    if backend not in BACKENDS:
      raise LatencyError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if clock not in CLOCKS:
      raise LatencyError(f"clock must be one of {CLOCKS}, got {clock!r}")
    # wall: elapsed time, the latency a user sees on an otherwise idle device.
    # cpu: CPU time of this process (all its threads), which other jobs on a shared
    # machine do not inflate; equal to wall time on an idle device with one thread.
    self.clock = time.perf_counter if clock == "wall" else time.process_time
    self.clock_name = clock
    if warmup < 0 or repeats < 1:
      raise LatencyError("warmup must be >= 0 and repeats >= 1")
    self.backend, self.threads = backend, threads
    self.warmup, self.repeats, self.seed = warmup, repeats, seed

  def compile(self, model) -> Callable[[], Any]:
    """A no-argument callable that runs one inference on fixed random inputs."""
    import numpy as np  # pylint: disable=g-import-not-at-top
    import tensorflow as tf  # pylint: disable=g-import-not-at-top
    rng = np.random.default_rng(self.seed)
    shapes = [tuple(int(d) for d in t.shape) for t in model.inputs]
    values = [rng.standard_normal(s).astype(np.float32) for s in shapes]
    specs = [tf.TensorSpec(s, tf.float32) for s in shapes]

    @tf.function(autograph=False)
    def forward(*xs):
      return model(list(xs) if len(xs) > 1 else xs[0], training=False)

    concrete = forward.get_concrete_function(*specs)
    if self.backend == "tf":
      tensors = [tf.constant(v) for v in values]

      def run():
        out = concrete(*tensors)
        return out
      return run
    # Without a trackable object the converter freezes the graph instead of exporting
    # a SavedModel first: the same flatbuffer, about 4x faster for a whole network
    # (19 s against 78 s for a 21-layer one on this CPU).
    from absl import logging as absl_logging  # pylint: disable=g-import-not-at-top
    level = absl_logging.get_verbosity()
    absl_logging.set_verbosity(absl_logging.ERROR)   # "consider providing trackable_obj"
    try:
      content = tf.lite.TFLiteConverter.from_concrete_functions([concrete]).convert()
    finally:
      absl_logging.set_verbosity(level)
    interpreter = tf.lite.Interpreter(model_content=content, num_threads=self.threads)
    interpreter.allocate_tensors()
    details = interpreter.get_input_details()
    by_shape = sorted(details, key=lambda d: d["index"])
    for d, v in zip(by_shape, values):
      interpreter.set_tensor(d["index"], v.reshape(d["shape"]))
    interpreter.invoke()
    return interpreter.invoke

  def time_calls(self, run: Callable[[], Any]) -> List[float]:
    """Per-call wall times (ms) after the warm-up."""
    for _ in range(self.warmup):
      run()
    out = []
    clock = self.clock
    for _ in range(self.repeats):
      t0 = clock()
      run()
      out.append((clock() - t0) * 1e3)
    return out

  def measure(self, model) -> Dict[str, float]:
    return summarize(self.time_calls(self.compile(model)))

  def measure_interleaved(self, runs: Sequence[Callable[[], Any]]) -> List[Dict[str, float]]:
    """Times several compiled callables round-robin: call r of every one, then r + 1.

    On a shared machine another job's burst then hits every callable alike instead
    of a few unlucky ones, and robust statistics see it as a few outliers each.
    """
    for run in runs:
      for _ in range(self.warmup):
        run()
    times: List[List[float]] = [[] for _ in runs]
    clock = self.clock
    for _ in range(self.repeats):
      for i, run in enumerate(runs):
        t0 = clock()
        run()
        times[i].append((clock() - t0) * 1e3)
    return [summarize(t) for t in times]


# ---------------------------------------------------------------------------
# Building (resumable) a table file.


def build_table(path: str, *, space: str, macro: Optional[str] = None, resolution=224,
                scale: float = 1.0, num_classes: int = 1000, batch_size: int = 1,
                backend: str = "tf", threads: int = 1, warmup: int = 10, repeats: int = 50,
                statistic: str = "median", max_branches: int = DEFAULT_MAX_BRANCHES,
                ops: Optional[Sequence[str]] = None, overwrite: bool = False,
                progress: bool = True, chunk: int = 16, clock: str = "wall",
                calibration_archs: int = 5) -> Dict[str, Any]:
  """Measures every entry of the configuration that `path` does not hold yet.

  An existing file is extended (and a killed build resumed) when it was measured
  on the same device, TensorFlow version, backend, batch and threads; otherwise it
  is refused unless `overwrite`. Entries are measured `chunk` at a time,
  interleaved, and the file is rewritten atomically after every chunk, so a killed
  build keeps what it measured.
  Threads must be pinned (`pin_threads`) before TensorFlow starts.
  """
  if statistic not in STATISTICS:
    raise LatencyError(f"statistic must be one of {STATISTICS}, got {statistic!r}")
  if batch_size < 1 or threads < 1:
    raise LatencyError("batch_size and threads must be >= 1")
  lay = layout(space, macro, resolution, scale, num_classes, max_branches, ops)
  device = device_description(backend, batch_size, threads, statistic, warmup, repeats, clock)
  data = None
  if os.path.exists(path) and not overwrite:
    data = load_json(path)
    old = data["device"]
    diff = [k for k in COMPARED if old.get(k) != device.get(k)]
    if diff:
      details = ", ".join(f"{k}: {old.get(k)!r} here {device.get(k)!r}" for k in diff)
      raise LatencyError(f"{path} was measured elsewhere or otherwise ({details}); write to "
                         "another --output or pass --overwrite")
    if int(data.get("max_branches", DEFAULT_MAX_BRANCHES)) != max_branches:
      raise LatencyError(f"{path} holds averages of up to {data.get('max_branches')} "
                         f"branches, not {max_branches}; use the same --max_branches")
  if data is None:
    data = {"format": "nse_tf.latency_table", "version": TABLE_VERSION, "device": device,
            "max_branches": max_branches, "built_for": [], "entries": {}}
  desc = dict(lay.describe(), ops="all" if ops is None else list(ops))
  if desc not in data["built_for"]:
    data["built_for"].append(desc)
  entries = data["entries"]
  todo = [e for e in lay.entries if e.key not in entries]
  measurer = Measurer(backend, threads, warmup, repeats, clock=clock)
  save = lambda: atomic_write_text(path, json.dumps(data, indent=1, sort_keys=True) + "\n")
  import tf_keras as keras  # pylint: disable=g-import-not-at-top
  bar = None
  if progress and todo:
    print(f"measuring {len(todo)} of {len(lay.entries)} entries ({backend}, batch "
          f"{batch_size}, {threads} thread(s)) into {path}", flush=True)
    bar = keras.utils.Progbar(len(todo), stateful_metrics=["ms"])
  save()
  done = 0
  # Entries are measured in chunks, interleaved inside each chunk; the file is
  # rewritten after every chunk, so a killed build loses at most one chunk.
  for start in range(0, len(todo), chunk):
    specs = todo[start:start + chunk]
    runs = [measurer.compile(entry_model(spec, batch_size)) for spec in specs]
    for spec, timed in zip(specs, measurer.measure_interleaved(runs)):
      entries[spec.key] = {k: (round(v, 6) if isinstance(v, float) else v)
                           for k, v in timed.items()}
    del runs
    done += len(specs)
    save()
    if bar is not None:
      bar.update(done, [("ms", entries[specs[-1].key][statistic])])
    keras.backend.clear_session()   # keep graph memory flat over long builds
  key = config_key(lay)
  if calibration_archs > 0 and ops is None and key not in data.setdefault("calibration", {}):
    if progress:
      print(f"calibrating on {calibration_archs} random networks measured end to end", flush=True)
    data["calibration"][key] = _calibrate(data, lay, measurer, batch_size, calibration_archs)
    save()
  data["updated"] = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
  save()
  return data


# ---------------------------------------------------------------------------
# End-to-end measurement of standalone networks (the check of a table).


CALIBRATION_SEED = 90210   # not the check's seed: the check stays out of sample


def _calibrate(data, lay: Layout, measurer: Measurer, batch_size: int, n: int) -> Dict[str, Any]:
  """Measured / predicted latency of `n` random networks: one factor per statistic.

  Blocks timed one call at a time, each after another block's call, run with colder
  caches than inside a network, where each layer reads the activations its
  predecessor just wrote (measured on a 2-core CPU, TF: the sum of the blocks is
  ~7 % above the network in one interleaved session). The median ratio over a few
  random networks (seed CALIBRATION_SEED, not the check's) removes that bias.
  """
  from nse_tf import cost as cost_lib  # pylint: disable=g-import-not-at-top
  archs = cost_lib.random_architectures(lay.space, n, seed=CALIBRATION_SEED,
                                        max_ops=max(1, min(3, lay.max_branches - 1)),
                                        macro=lay.macro, scale=lay.scale)
  runs = [measurer.compile(network_model(a, lay.resolution, batch_size, lay.num_classes))
          for a in archs]
  measured = measurer.measure_interleaved(runs)
  factor = {}
  for stat in STATISTICS:
    table = LatencyTable(data, lay.space, lay.macro, lay.resolution, lay.scale,
                         lay.num_classes, statistic=stat, calibrated=False)
    ratios = sorted(m[stat] / table.arch_cost(a) for a, m in zip(archs, measured))
    factor[stat] = round(stats.quantile(ratios, 0.5), 6)
  return {"archs": n, "seed": CALIBRATION_SEED, "factor": factor}


def network_model(arch, resolution, batch_size: int, num_classes: int):
  """The standalone network of `arch` (`nsenet.build_nsenet`) with a fixed batch."""
  from nse_tf import nsenet  # pylint: disable=g-import-not-at-top
  import tf_keras as keras  # pylint: disable=g-import-not-at-top
  h, w = resolution_hw(resolution)
  model = nsenet.build_nsenet(arch, num_classes, (h, w, 3))
  inp = keras.Input((h, w, 3), batch_size=batch_size, name="images")
  return keras.Model(inp, model(inp), name="fixed_batch")


def measure_network(arch, measurer: Measurer, resolution, batch_size: int,
                    num_classes: int) -> Dict[str, float]:
  """Times the standalone network of `arch` end to end."""
  return measurer.measure(network_model(arch, resolution, batch_size, num_classes))


# ---------------------------------------------------------------------------
# Building in a fresh process (threads can only be pinned before TensorFlow starts).


def build_in_subprocess(path: str, **kwargs) -> None:
  """Runs `build_table(path, **kwargs)` in a fresh Python process (progress on stdout)."""
  args = json.dumps(dict(kwargs, path=path))
  env = dict(os.environ)
  env.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
  proc = subprocess.run([sys.executable, "-m", "nse_tf.latency_measure", args], env=env,
                        check=False, stderr=subprocess.PIPE, text=True)
  if proc.returncode != 0:
    lines = [l for l in proc.stderr.strip().splitlines() if l.strip()]
    raise LatencyError("building the latency table failed: " + (lines[-1] if lines else
                                                                 f"exit {proc.returncode}"))


def _subprocess_main(argv: Sequence[str]) -> int:
  kwargs = json.loads(argv[0])
  path = kwargs.pop("path")
  from absl import logging  # pylint: disable=g-import-not-at-top
  logging.set_verbosity(logging.WARNING)
  pin_threads(int(kwargs.get("threads", 1)))
  try:
    build_table(path, **kwargs)
  except (LatencyError, SpaceError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  return 0


if __name__ == "__main__":
  sys.exit(_subprocess_main(sys.argv[1:]))
