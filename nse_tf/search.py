"""CLI: the whole NSE search (SPEC §4–§6), resumable.

  python -m nse_tf.search --flagfile=flags/demo.cfg --output_dir=runs/demo
  python -m nse_tf.search --flagfile=flags/flops.cfg --data_dir=DIR --output_dir=runs/flops

Outputs under --output_dir (names are fixed, other tools rely on them):
  config.json                every resolved flag (a resume with other values is refused)
  state.json                 queues, working sets, inherited sets, front, round, phase
  round_NN/candidates.csv    arch_id,kind,cost,accuracy,is_pareto,arch (kind: sample|edge|prev_front)
  round_NN/front.json        the round's front as Architecture JSONs with cost and accuracy
  round_NN/space.json        per layer: working set, ops pruned (step, θ), A_l, ops added next
  round_NN/pareto.png        samples, edge samples, previous front, front, interval bounds
  round_NN/ckpt/             the round's supernet checkpoint
  space_evolution.png        which ops were in each layer's space in each round
  final_arch.json            the selected, scaled architecture (Architecture schema)
  tb/                        TensorBoard logs
The same command on an existing output directory continues where it stopped.
"""

from __future__ import annotations

import json
import os

from absl import flags

from nse_tf import cli
from nse_tf import common_flags
from nse_tf import fileio
from nse_tf import run_dir
from nse_tf import run_lock


def define_flags(fv: flags.FlagValues = flags.FLAGS) -> None:
  """The search's flags: a round's (common_flags) and the rounds, sampling, selection."""
  common_flags.define_round_flags(fv)
  flags.DEFINE_integer("rounds", None, "Rounds (default ⌊(N − 1)/(K − 1)⌋; 3 with --init_from).",
                       flag_values=fv)
  flags.DEFINE_integer("num_samples", 2000, "D: unique architectures sampled per round in the "
                       "cost interval.", flag_values=fv)
  flags.DEFINE_integer("num_edge", 100, "D_e: unique edge architectures just below the interval.",
                       flag_values=fv)
  flags.DEFINE_list("interval", ["300", "350"], "Cost interval lo,hi of the sampled candidates "
                    "(MFLOPs at --cost_resolution).", flag_values=fv)
  flags.DEFINE_float("edge_lo", 290.0, "Edge band (edge_lo, lo].", flag_values=fv)
  flags.DEFINE_integer("max_draws", 200000, "Give up sampling the interval after this many draws.",
                       flag_values=fv)
  flags.DEFINE_integer("bn_recal_batches", 50, "Training batches for BN recalibration of each "
                       "candidate.", flag_values=fv)
  flags.DEFINE_integer("eval_examples", None, "Evaluate candidates on at most this many held-out "
                       "examples (default: the whole held-out split).", flag_values=fv)
  flags.DEFINE_integer("eval_batch", 256, "Batch of candidate evaluation.", flag_values=fv)
  flags.DEFINE_bool("split_evaluation", False, "With --strategy=multi_worker: each worker "
                    "evaluates its own share of the candidates (whole batches, no collectives; "
                    "results exchanged every few candidates; one device per worker) instead "
                    "of every worker taking part in every candidate. A candidate's result is "
                    "then the same however many workers run it (with one process it equals "
                    "the default).", flag_values=fv)
  flags.DEFINE_string("select", "knee", "Final pick from the last front: knee | max_acc | "
                      "min_cost | closest:COST.", flag_values=fv)
  flags.DEFINE_float("final_target", None, "Solve the channel scale of the final network for "
                     "this many MFLOPs at --cost_resolution.", flag_values=fv)
  flags.DEFINE_float("final_scale", None, "Channel scale of the final network (default: the "
                     "search's).", flag_values=fv)
  flags.DEFINE_string("init_from", None, "Output dir of a finished flops27 search: continue it in "
                      "the flops72 space (second space).", flag_values=fv)
  flags.DEFINE_bool("overwrite", False, "Delete this search's outputs in --output_dir and start "
                    "over.", flag_values=fv)
  flags.DEFINE_bool("progress", True, "Progress bars.", flag_values=fv)
  flags.DEFINE_enum("constraint", "flops", ["flops", "latency"], "What --tau, --interval and "
                    "--edge_lo constrain: MFLOPs (analytic) or latency in ms from --latency_lut.",
                    flag_values=fv)
  flags.DEFINE_string("latency_lut", None, "Latency table JSON (tools/build_latency_lut.py, "
                      "measured on the target device). Default with --constraint=latency: "
                      "OUTPUT_DIR/latency_lut.json, built on the spot on this machine when missing "
                      "(with the --lut_* settings) and reused on resume.", flag_values=fv)
  flags.DEFINE_bool("relative_targets", False, "Read --tau, --interval and --edge_lo as fractions "
                    "of the cost of the network that holds every layer's most expensive single op "
                    "on the chosen table, so one flagfile fits any device's table.", flag_values=fv)
  flags.DEFINE_enum("lut_backend", "tf", ["tf", "tflite"], "Backend of a table built on the spot.",
                    flag_values=fv)
  flags.DEFINE_integer("lut_batch_size", 1, "Batch of a table built on the spot.", flag_values=fv)
  flags.DEFINE_integer("lut_threads", 1, "Threads of a table built on the spot.", flag_values=fv)
  flags.DEFINE_enum("lut_clock", "wall", ["wall", "cpu"], "Clock of a table built on the spot "
                    "(cpu: CPU time, robust on a shared machine).", flag_values=fv)
  flags.DEFINE_integer("lut_repeats", 30, "Timed calls per entry of a table built on the spot.",
                       flag_values=fv)


# Flags that do not change the result: a resume may change them. (--graph_optimization
# and --intra_op_threads change it only in the float rounding, as another machine would,
# and --split_evaluation where the work is done, as --strategy does; older runs lack them.)
_RESUME_FREE = {"output_dir", "overwrite", "progress", "checkpoint_every", "data_dir",
                "strategy", "tpu", "cpu_replicas", "graph_optimization", "split_evaluation",
                "intra_op_threads"}
_OUTPUTS = ("config.json", "state.json", "final_arch.json", "space_evolution.png", "tb")


def resolved_flags(fv: flags.FlagValues):
  """Every flag of the search and its value (config.json)."""
  return {n: fv[n].value for n in cli.flag_names(define_flags)}


def _refuse_other_search(out: str, config: dict, overwrite: bool):
  """Refuses a directory that holds another search (read-only; --overwrite skips it)."""
  if overwrite:
    return
  from nse_tf import evolution  # pylint: disable=g-import-not-at-top
  if os.path.exists(os.path.join(out, "state.json")):
    evolution.SearchState.load(os.path.join(out, "state.json"))  # corrupt: say so first
  if os.path.exists(os.path.join(out, "config.json")):
    run_dir.refuse_changed_config(out, "config.json", config, _RESUME_FREE, "search")
  elif os.path.exists(os.path.join(out, "state.json")):
    raise cli.UsageError(f"{out} has a state.json but no config.json; use --overwrite")


# What the second space (--init_from) must share with the search it continues: the same
# task and network, else its inherited ops and front were found for something else.
_SAME_TASK = ("dataset", "image_size", "holdout_examples", "macro", "scale",
              "cost_resolution", "constraint")


def _refuse_other_task(init_from: str, config: dict):
  """Refuses an --init_from search whose task-defining flags differ from this one's."""
  path = os.path.join(init_from, "config.json")
  if not os.path.exists(path):
    return    # state_from_previous says what is missing
  old = fileio.load_json(path, cli.UsageError, "is --init_from a search output dir?")
  diff = [k for k in _SAME_TASK if k in old and old[k] != config.get(k)]
  if diff:
    raise cli.UsageError(
        f"--init_from={init_from} searched another task (" +
        ", ".join(f"{k}: {old[k]!r} there, {config.get(k)!r} here" for k in diff) +
        "); the second space continues the same task: " +
        ", ".join(_flag_fix(k, old[k]) for k in diff))


def _flag_fix(name: str, value) -> str:
  if value is None:
    return f"leave --{name} out"
  return f"add --{name}=" + (",".join(map(str, value)) if isinstance(value, list) else str(value))


def _prepare_output_dir(out: str, config: dict, overwrite: bool):
  """--overwrite's deletions, then config.json: the first writes, after every check."""
  if overwrite:
    run_dir.remove_outputs(out, _OUTPUTS, prefixes=("round_",))
  fileio.atomic_write_text(os.path.join(out, "config.json"),
                    json.dumps(config, indent=1, sort_keys=True) + "\n")


def search_config(fv: flags.FlagValues):
  from nse_tf import evolution  # pylint: disable=g-import-not-at-top
  try:
    lo, hi = (float(v) for v in fv.interval)
  except ValueError:
    raise cli.UsageError(f"--interval must be two numbers lo,hi; got {','.join(fv.interval)}")
  cfg = evolution.SearchConfig(
      space=fv.space, macro=fv.macro, max_ops=fv.max_ops, rounds=fv.rounds,
      scale=fv.scale, image_size=fv.image_size, cost_resolution=fv.cost_resolution,
      num_samples=fv.num_samples, num_edge=fv.num_edge, interval=(lo, hi),
      edge_lo=fv.edge_lo, max_draws=fv.max_draws,
      bn_recal_batches=fv.bn_recal_batches, eval_examples=fv.eval_examples,
      eval_batch=fv.eval_batch, split_evaluation=fv.split_evaluation, select=fv.select,
      final_target=fv.final_target,
      final_scale=fv.final_scale, init_from=fv.init_from, seed=fv.seed,
      constraint=fv.constraint, latency_lut=latency_lut_path(fv))
  cfg.validate()
  return cfg


def latency_lut_path(fv: flags.FlagValues):
  if fv.constraint != "latency":
    return fv.latency_lut
  if fv.latency_lut and not os.path.isfile(fv.latency_lut):
    raise cli.UsageError(
        f"--latency_lut={fv.latency_lut}: no such file; measure one on the target device "
        f"with python tools/build_latency_lut.py --output={fv.latency_lut} (or leave "
        "--latency_lut out to build OUTPUT_DIR/latency_lut.json on this machine)")
  return fv.latency_lut or os.path.join(fv.output_dir, "latency_lut.json")


def ensure_latency_table(cfg, num_classes: int, fv: flags.FlagValues):
  """Builds (or completes) the default table on the spot; an explicit one must exist."""
  from nse_tf import evolution, latency, latency_measure  # pylint: disable=g-import-not-at-top
  try:
    evolution.make_cost_table(cfg, num_classes)
    return
  except evolution.SearchError as e:
    if fv.latency_lut:    # the user's own table: never measured over here
      raise cli.UsageError(str(e)) from None
  print(f"building the latency table {cfg.latency_lut} on this machine "
        f"({fv.lut_backend}, batch {fv.lut_batch_size}, {fv.lut_threads} thread(s))",
        flush=True)
  try:
    latency_measure.build_in_subprocess(
        cfg.latency_lut, space=cfg.space, macro=cfg.resolved_macro(),
        resolution=cfg.cost_resolution, scale=cfg.scale, num_classes=num_classes,
        batch_size=fv.lut_batch_size, backend=fv.lut_backend, threads=fv.lut_threads,
        repeats=fv.lut_repeats, max_branches=max(cfg.max_ops + 1, 2), clock=fv.lut_clock,
        progress=fv.progress)
  except latency.LatencyError as e:
    raise cli.UsageError(str(e)) from None


def resolve_targets(cfg, train_cfg, num_classes: int, relative: bool):
  """--relative_targets: τ, interval and edge band in the table's own unit."""
  import dataclasses  # pylint: disable=g-import-not-at-top
  from nse_tf import evolution  # pylint: disable=g-import-not-at-top
  table = evolution.make_cost_table(cfg, num_classes)
  ref = evolution.reference_cost(table)
  if relative:
    lo, hi = cfg.interval
    cfg = dataclasses.replace(cfg, interval=(lo * ref, hi * ref), edge_lo=cfg.edge_lo * ref)
    train_cfg = dataclasses.replace(train_cfg, tau=train_cfg.tau * ref)
  print(f"{cfg.constraint} targets: tau {train_cfg.tau:.4g}, interval ({cfg.interval[0]:.4g}, "
        f"{cfg.interval[1]:.4g}), edge band ({cfg.edge_lo:.4g}, {cfg.interval[0]:.4g}] "
        f"{table.unit} (the slowest single-op network: {ref:.4g} {table.unit})", flush=True)
  return cfg, train_cfg


def main(argv, fv: flags.FlagValues = flags.FLAGS):
  """Every check that needs no training runs before the first write (config.json).

  A start that fails on a bad flag, an unprepared dataset, a missing latency table or
  an unreachable interval then leaves the directory as it was, and the corrected
  command starts (or resumes) without being refused as "another configuration".
  """
  common_flags.check_output_dir(fv.output_dir)
  # Several workers: the chief writes --output_dir, the others a directory of their own.
  out = run_dir.worker_output_dir(fv.strategy, fv.output_dir)
  run_lock.acquire(out, "search")
  cfg = search_config(fv)
  train_cfg = common_flags.train_config(fv)
  config = resolved_flags(fv)
  _refuse_other_search(out, config, fv.overwrite)
  if fv.init_from:
    _refuse_other_task(fv.init_from, config)
  from nse_tf import data, distribute, evolution, spaces  # pylint: disable=g-import-not-at-top
  from nse_tf import trainer  # pylint: disable=g-import-not-at-top
  trainer.check_strategy_name(train_cfg, fv.strategy)
  if fv.split_evaluation and fv.strategy not in ("default", "multi_worker"):
    raise cli.UsageError(
        f"--split_evaluation splits the candidates across the workers of "
        f"--strategy=multi_worker; under --strategy={fv.strategy} (one process) every "
        "candidate already runs on all devices: leave --split_evaluation out")
  common_flags.setup_tensorflow(fv.deterministic, fv.graph_optimization,
                               fv.intra_op_threads)
  strategy = distribute.get_strategy(fv.strategy, fv.tpu, fv.cpu_replicas)
  trainer.check_strategy(train_cfg, strategy)
  d = data.get_data(fv.dataset, data_dir=fv.data_dir, image_size=fv.image_size,
                    holdout_examples=fv.holdout_examples)
  if cfg.constraint == "latency":
    ensure_latency_table(cfg, d.info.num_classes, fv)
  if cfg.constraint == "latency" or fv.relative_targets:
    cfg, train_cfg = resolve_targets(cfg, train_cfg, d.info.num_classes, fv.relative_targets)
  state = evolution.initial_state(cfg, out, fresh=fv.overwrite)
  if state.phase == "train":
    table = evolution.make_cost_table(cfg, d.info.num_classes)
    evolution.check_reachable(cfg, table, state.working_sets,
                              spaces.layer_kinds(cfg.resolved_macro()), state.round)
  _prepare_output_dir(out, config, fv.overwrite)
  search = evolution.Search(cfg, train_cfg, d, strategy, out,
                            progress=fv.progress, state=state,
                            report=lambda line: print(line, flush=True))
  final = search.run()
  if "latency_ms" in final.metadata:
    print(f"\npredicted latency of the final architecture: {final.metadata['latency_ms']} ms "
          f"(interval {cfg.interval[0]:.4g}-{cfg.interval[1]:.4g}); measure it with "
          f"python tools/check_latency_lut.py --search_dir={out}")
  print(f"\nfinal architecture ({cfg.select}): {final.metadata.get('cost_mflops')} MFLOPs, "
        f"held-out accuracy {100 * final.metadata.get('accuracy', 0):.2f} % in the supernet")
  print(final.to_text())
  print(f"wrote {os.path.join(out, 'final_arch.json')}")
  distribute.finish_workers(strategy, fv.output_dir, out)
  return 0


def run():
  cli.run(main, define_flags)


if __name__ == "__main__":
  run()
