"""Which --intra_op_threads is faster for a command on this machine, measured side by side.

Runs the same command (a search or one round, from a flagfile) once per setting, the
settings alternating (A B, B A, A B, …: the machine's speed drifts over minutes), each in
a process of its own, as a user would run it; prints per run the wall time and the CPU
time (user + system, the process and its children), then per setting the medians and
their ratios to the first setting, and whether the repeats of one setting wrote the same
bytes (`final_arch.json` of a search, `round.json`'s trained values of a round).
`--jobs=2` runs two copies side by side in each run, as when several seeds share the
machine (they must write the same bytes too). Settings agree to float rounding, not bit
for bit. CI never runs this.

  python benchmarks/intra_op_threads.py --extra="--rounds=1"     # the demo's round 1: ~10 min
  python benchmarks/intra_op_threads.py --run_flagfile=flags/proxy.cfg --jobs=2 \
      --extra="--rounds=1 --epochs=4 --num_samples=40 --num_edge=5"    # ~15 min
  python benchmarks/intra_op_threads.py --module=train_round --run_flagfile=flags/demo_round.cfg
"""

import hashlib
import json
import os
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

from absl import flags

from nse_tf import cli, machine

MODULES = {"search": "nse_tf.search", "train_round": "nse_tf.train_round"}
# What a run wrote that should repeat bit for bit under one setting.
_RESULT = {"search": "final_arch.json", "train_round": "round.json"}


def define_flags(fv: flags.FlagValues = flags.FLAGS) -> None:
  """The tool's flags (defined by cli.run, not at import)."""
  flags.DEFINE_enum("module", "search", list(MODULES), "The command to time.", flag_values=fv)
  flags.DEFINE_string("run_flagfile", "flags/demo.cfg", "Its flagfile.", flag_values=fv)
  flags.DEFINE_string("extra", "", "More flags for the command, as on a command line "
                      "(e.g. \"--rounds=1 --epochs=2\").", flag_values=fv)
  flags.DEFINE_list("settings", ["0", "1"], "--intra_op_threads values to compare (0: "
                    "TensorFlow's default, one thread per core).", flag_values=fv)
  flags.DEFINE_integer("repeats", 2, "Runs per setting.", lower_bound=1, flag_values=fv)
  flags.DEFINE_integer("jobs", 1, "Copies of the command side by side in each run (as when "
                       "several search seeds or benchmarks share the machine); the run's "
                       "wall time is until the last one ends.", lower_bound=1,
                       flag_values=fv)
  flags.DEFINE_string("work_dir", None, "Where the runs write (default: a temporary "
                      "directory, deleted at the end).", flag_values=fv)
  flags.DEFINE_string("json_out", None, "Also write the runs and the summary here.",
                      flag_values=fv)


def order(settings, repeats):
  """The runs' order: the settings, then reversed, and so on (each pair balanced)."""
  runs = []
  for r in range(repeats):
    runs += [(s, r) for s in (settings if r % 2 == 0 else settings[::-1])]
  return runs


def run_once(cmds, logs):
  """Starts the commands side by side, each writing its standard error to its file in
  `logs` (a pipe left unread could stall a copy), and waits for all: (wall seconds, exit
  statuses). Their CPU time lands in this process's RUSAGE_CHILDREN once they are reaped
  (`_child_cpu`)."""
  start = time.perf_counter()
  procs = []
  for c, log in zip(cmds, logs):
    with open(log, "w", encoding="utf-8") as err:
      procs.append(subprocess.Popen(c, stdout=subprocess.DEVNULL, stderr=err))
  codes = [p.wait() for p in procs]
  return time.perf_counter() - start, codes


def _last_line(path):
  try:
    with open(path, encoding="utf-8", errors="replace") as f:
      lines = [l.strip() for l in f if l.strip()]
  except OSError:
    return "(no output)"
  return lines[-1] if lines else "(no output)"


def _child_cpu():
  import resource  # pylint: disable=g-import-not-at-top
  ru = resource.getrusage(resource.RUSAGE_CHILDREN)
  return ru.ru_utime + ru.ru_stime


def result_digest(module, out):
  """A digest of what a run's repeat must reproduce, or None where the run wrote none."""
  path = os.path.join(out, _RESULT[module])
  if not os.path.exists(path):
    return None
  with open(path, "rb") as f:
    data = f.read()
  if module == "train_round":   # its wall time and machine are not results
    rec = json.loads(data)
    for k in ("seconds", "machine"):
      rec.pop(k, None)
    data = json.dumps(rec, sort_keys=True).encode()
  return hashlib.sha256(data).hexdigest()[:16]


def summarise(runs, settings):
  """Per setting: median wall and CPU seconds, ratios to the first setting, and whether
  its repeats wrote the same result (None with one repeat)."""
  rows = {}
  for s in settings:
    mine = [r for r in runs if r["setting"] == s]
    results = {d for r in mine for d in r["results"]}
    copies = sum(len(r["results"]) for r in mine)
    rows[s] = {"wall_s": statistics.median(r["wall_s"] for r in mine),
               "cpu_s": statistics.median(r["cpu_s"] for r in mine),
               "runs": len(mine),
               "repeats_identical": (len(results) == 1 and None not in results
                                     if copies > 1 else None)}
  base = rows[settings[0]]
  for row in rows.values():
    for k in ("wall", "cpu"):
      row[f"{k}_ratio"] = row[f"{k}_s"] / base[f"{k}_s"] if base[f"{k}_s"] > 0 else None
  return rows


def main(argv, fv: flags.FlagValues = flags.FLAGS):
  del argv
  try:
    settings = [int(s) for s in fv.settings]
  except ValueError:
    raise cli.UsageError(f"--settings must be whole numbers (0: TensorFlow's default), got "
                         f"{','.join(fv.settings)}") from None
  if not settings or min(settings) < 0 or len(set(settings)) != len(settings):
    raise cli.UsageError(f"--settings needs distinct values >= 0, got {','.join(fv.settings)}")
  if not os.path.isfile(fv.run_flagfile):
    raise cli.UsageError(f"--run_flagfile={fv.run_flagfile}: no such file (run from the "
                         "repository root, or give its path)")
  extra = shlex.split(fv.extra)
  bad = [a for a in extra if a.split("=")[0] in ("--output_dir", "--intra_op_threads",
                                                 "--overwrite")]
  if bad:
    raise cli.UsageError(f"--extra sets {', '.join(bad)}: the benchmark sets those itself")
  print(machine.one_line(machine.describe()))
  side = f", {fv.jobs} copies side by side in each" if fv.jobs > 1 else ""
  print(f"python -m {MODULES[fv.module]} --flagfile={fv.run_flagfile} {fv.extra}".rstrip()
        + f"  ({fv.repeats} run(s) per --intra_op_threads setting, alternating{side})",
        flush=True)
  runs = []
  work = None
  keep = bool(fv.work_dir)
  try:
    work = fv.work_dir or tempfile.mkdtemp(prefix="intra_op_threads_")
    os.makedirs(work, exist_ok=True)
    for s, r in order(settings, fv.repeats):
      outs = [os.path.join(work, f"threads{s}_run{r}_job{j}") for j in range(fv.jobs)]
      for out in outs:
        shutil.rmtree(out, ignore_errors=True)
      logs = [out + ".stderr.txt" for out in outs]
      cmds = [[sys.executable, "-m", MODULES[fv.module], f"--flagfile={fv.run_flagfile}",
               *extra, f"--output_dir={out}", f"--intra_op_threads={s}"] for out in outs]
      cpu0 = _child_cpu()
      wall, codes = run_once(cmds, logs)
      cpu = _child_cpu() - cpu0
      for cmd, log, rc in zip(cmds, logs, codes):
        if rc != 0:
          keep = True     # its outputs and standard error stay for a look
          raise cli.UsageError(
              f"the run with --intra_op_threads={s} failed (exit {rc}): {_last_line(log)}; "
              f"its standard error is {log}, the command: {shlex.join(cmd)}")
      runs.append({"setting": s, "repeat": r, "wall_s": round(wall, 2), "cpu_s": round(cpu, 2),
                   "results": [result_digest(fv.module, out) for out in outs]})
      print(f"  --intra_op_threads={s}  run {r + 1}: wall {wall:7.1f} s  CPU {cpu:7.1f} s",
            flush=True)
  finally:
    if work and not keep:
      shutil.rmtree(work, ignore_errors=True)
  rows = summarise(runs, settings)
  print(f"\n{'setting':>8} {'wall (median)':>14} {'CPU (median)':>13} {'wall ratio':>11} "
        f"{'CPU ratio':>10}  repeats identical")
  for s, row in rows.items():
    same = {None: "-", True: "yes", False: "NO"}[row["repeats_identical"]]
    ratios = [f"{r:.2f}" if r is not None else "-" for r in (row["wall_ratio"], row["cpu_ratio"])]
    print(f"{s:>8} {row['wall_s']:12.1f} s {row['cpu_s']:11.1f} s {ratios[0]:>11} "
          f"{ratios[1]:>10}  {same}")
  print(f"(ratios to --intra_op_threads={settings[0]}; 0 is TensorFlow's default"
        + ("; CPU is the sum over the copies)" if fv.jobs > 1 else ")"))
  if fv.json_out:
    from nse_tf import fileio  # pylint: disable=g-import-not-at-top
    fileio.atomic_write_text(fv.json_out, json.dumps(
        {"machine": machine.describe(), "module": fv.module, "flagfile": fv.run_flagfile,
         "extra": extra, "runs": runs, "summary": {str(k): v for k, v in rows.items()}},
        indent=1))


if __name__ == "__main__":
  cli.run(main, define_flags)
