"""The NSE round loop (SPEC §5–§6): train, sample, evaluate, Pareto, aggregate, refill.

`SearchState` is everything that carries from one round to the next (per-layer
queues and their read positions, working sets S_l, inherited sets A_l, the previous
front, the round and its phase). It is written atomically to `state.json` after every
phase, so a search killed at any moment continues where it stopped:
  * during training, from the round's trainer checkpoint (same trajectory);
  * during evaluation, keeping the candidates already evaluated
    (`round_NN/evaluated.jsonl`, one line per candidate, flushed and fsynced);
candidates are sampled with a per-round seed, so a resumed round draws the same ones.
"""

from __future__ import annotations

import csv
import dataclasses
import io
import json
import math
import os
import time
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np
from absl import logging

from nse_tf import cost as cost_lib
from nse_tf import pareto
from nse_tf import spaces
from nse_tf import stats
from nse_tf.arch import Architecture
from nse_tf import fileio
from nse_tf import machine
from nse_tf.fileio import atomic_write_text, read_jsonl
from nse_tf import errors
from nse_tf.candidate_eval import (COUNTS, CandidateEvaluator, eval_count, from_counts,
                                   split_half_reliability)

STATE_VERSION = 1
KIND_PRIORITY = {"sample": 0, "edge": 0, "prev_front": 1}   # ties go to new samples
EVAL_BLOCK = 4      # --split_evaluation: candidates per worker between two exchanges


class SearchError(errors.NSEError):
  """A search that cannot go on as configured (unreachable interval, bad state, ...)."""


@dataclasses.dataclass
class SearchConfig:
  """Everything a search needs besides the data and the strategy."""
  space: str = "flops27"
  macro: Optional[str] = None
  max_ops: int = 5
  rounds: Optional[int] = None
  scale: float = 1.0
  image_size: int = 224
  cost_resolution: int = 224
  num_samples: int = 2000
  num_edge: int = 100
  interval: Tuple[float, float] = (300.0, 350.0)
  edge_lo: float = 290.0
  max_draws: int = 200_000
  bn_recal_batches: int = 50
  eval_examples: Optional[int] = None
  eval_batch: int = 256
  split_evaluation: bool = False       # each worker evaluates a share of the candidates
  select: str = "knee"
  final_target: Optional[float] = None
  final_scale: Optional[float] = None
  init_from: Optional[str] = None
  seed: int = 0
  constraint: str = "flops"            # flops: cost.CostTable (MFLOPs); latency: a measured table (ms)
  latency_lut: Optional[str] = None    # the latency table JSON (constraint == 'latency')

  def resolved_macro(self) -> str:
    return self.macro or spaces.DEFAULT_MACRO[self.space]

  def num_rounds(self) -> int:
    if self.rounds is not None:
      return self.rounds
    if self.init_from:
      return 3
    return spaces.default_rounds(len(spaces.get_pool(self.space)), self.max_ops)

  def validate(self):
    lo, hi = self.interval
    if not lo < hi:
      raise SearchError(f"interval lower bound {lo} must be below its upper bound {hi}")
    if self.edge_lo > lo:
      raise SearchError(f"edge band lower bound {self.edge_lo} must be <= the interval's {lo}")
    if self.max_ops < 2:
      raise SearchError(f"max_ops (K) must be >= 2, got {self.max_ops}")
    if self.num_samples < 1:
      raise SearchError("num_samples must be >= 1")
    if self.num_rounds() < 1:
      raise SearchError("the search needs at least one round")
    try:
      pareto.parse_rule(self.select)
    except ValueError as e:
      raise SearchError(f"--select: {e}") from None
    if self.final_target is not None and self.final_scale is not None:
      raise SearchError("give --final_target or --final_scale, not both")
    if self.constraint not in ("flops", "latency"):
      raise SearchError(f"--constraint must be 'flops' or 'latency', got {self.constraint!r}")
    if self.constraint == "latency" and not self.latency_lut:
      raise SearchError("--constraint=latency needs a latency table (--latency_lut=PATH, built "
                        "with tools/build_latency_lut.py on the target device)")


@dataclasses.dataclass
class SearchState:
  """What carries between rounds; JSON-serialisable."""
  space: str
  round: int = 1                   # the round being run (1-based)
  phase: str = "train"             # train | evaluate | done
  queues: List[List[int]] = dataclasses.field(default_factory=list)
  queue_pos: List[int] = dataclasses.field(default_factory=list)
  working_sets: List[List[int]] = dataclasses.field(default_factory=list)
  inherited: List[List[int]] = dataclasses.field(default_factory=list)
  front: List[Dict[str, Any]] = dataclasses.field(default_factory=list)
  history: List[Dict[str, Any]] = dataclasses.field(default_factory=list)
  # The machines that ran this search (machine.describe()), each with "from": where it
  # took over; a new entry only when the machine (or its kernel settings) differs from
  # the last one, or once where the last one lacks a field recorded since (the same
  # machine described anew).
  machines: List[Dict[str, Any]] = dataclasses.field(default_factory=list)

  def to_json(self) -> str:
    d = dataclasses.asdict(self)
    d["version"] = STATE_VERSION
    return json.dumps(d, indent=1)

  @classmethod
  def load(cls, path: str) -> "SearchState":
    d = fileio.load_json(path, SearchError,
                         "restore it from a backup or start over with --overwrite")
    if d.get("version") != STATE_VERSION:
      raise SearchError(f"{path}: not a search state of version {STATE_VERSION}; start over "
                        "with --overwrite")
    d.pop("version")
    try:
      state = cls(**d)
    except TypeError as e:
      raise SearchError(f"{path}: unexpected content ({e}); start over with --overwrite") from None
    if state.phase not in ("train", "evaluate", "done"):
      raise SearchError(f"{path}: unknown phase {state.phase!r}")
    if not (isinstance(state.machines, list) and all(isinstance(m, dict)
                                                    for m in state.machines)):
      raise SearchError(f"{path}: 'machines' must be a list of machine records, got "
                        f"{state.machines!r:.60}; restore the file or delete that entry")
    return state

  def save(self, path: str):
    atomic_write_text(path, self.to_json() + "\n")


def new_state(cfg: SearchConfig) -> SearchState:
  """Round 1: per-layer seeded permutations of the pool; S_l = first K of each."""
  macro = cfg.resolved_macro()
  n_layers = spaces.num_layers(macro)
  pool = spaces.get_pool(cfg.space)
  rng = np.random.default_rng(cfg.seed)
  queues = [rng.permutation(len(pool)).tolist() for _ in range(n_layers)]
  state = SearchState(space=cfg.space, queues=queues, queue_pos=[0] * n_layers,
                      working_sets=[[] for _ in range(n_layers)],
                      inherited=[[] for _ in range(n_layers)])
  refill(state, cfg.max_ops)
  return state


def state_from_previous(cfg: SearchConfig, prev_dir: str) -> SearchState:
  """Second space (SPEC §5): continue a finished flops27 search with flops72.

  A_l and the front carry over (flops27 indices are flops72 indices); each layer's
  queue is a seeded permutation of the 45 grouped ops.
  """
  path = os.path.join(prev_dir, "state.json")
  if not os.path.exists(path):
    raise SearchError(f"--init_from={prev_dir}: no state.json there (not a search output dir)")
  prev = SearchState.load(path)
  if prev.phase != "done":
    raise SearchError(f"--init_from={prev_dir}: that search has not finished "
                      f"(round {prev.round}, phase {prev.phase})")
  if prev.space != "flops27" or cfg.space != "flops72":
    raise SearchError("--init_from continues a flops27 search in the flops72 space "
                      f"(got {prev.space} -> {cfg.space}); set --space=flops72")
  rng = np.random.default_rng(cfg.seed)
  new_ops = list(range(len(spaces.POOLS["flops27"]), len(spaces.POOLS["flops72"])))
  n = len(prev.inherited)
  state = SearchState(space=cfg.space, queues=[rng.permutation(new_ops).tolist() for _ in range(n)],
                      queue_pos=[0] * n, working_sets=[[] for _ in range(n)],
                      inherited=[list(a) for a in prev.inherited],
                      front=[dict(f, arch=f["arch"].replace("flops27@", "flops72@", 1))
                             for f in prev.front])
  refill(state, cfg.max_ops)
  return state


def initial_state(cfg: SearchConfig, output_dir: str, fresh: bool = False) -> SearchState:
  """The state a run in `output_dir` starts from, written nowhere (validation first).

  `state.json` when there is one (unless `fresh`, i.e. --overwrite), else round 1 of
  a new search or of the second space (--init_from).
  """
  path = os.path.join(output_dir, "state.json")
  if os.path.exists(path) and not fresh:
    state = SearchState.load(path)
    if state.space != cfg.space:
      raise SearchError(f"{path} is a {state.space} search, not {cfg.space}")
    return state
  return state_from_previous(cfg, cfg.init_from) if cfg.init_from else new_state(cfg)


def refill(state: SearchState, max_ops: int) -> List[List[int]]:
  """S_l = A_l + the next max(0, K − |A_l|) untried ops of layer l's queue."""
  added = []
  for l, a in enumerate(state.inherited):
    ws = list(a)
    new = []
    while len(ws) < max_ops and state.queue_pos[l] < len(state.queues[l]):
      op = state.queues[l][state.queue_pos[l]]
      state.queue_pos[l] += 1
      if op not in ws:
        ws.append(op)
        new.append(op)
    state.working_sets[l] = sorted(ws)
    added.append(new)
  return added


def aggregate(front_archs: Sequence[Architecture], num_layers: int) -> List[List[int]]:
  """A_l = union over the front's architectures of their ops in layer l."""
  union = [set() for _ in range(num_layers)]
  for a in front_archs:
    for l, idx in enumerate(a.indices()):
      union[l].update(idx)
  return [sorted(u) for u in union]


# ---------------------------------------------------------------------------
# Cost tables: FLOPs (analytic) or latency (measured); the same interface.


def make_cost_table(cfg: SearchConfig, num_classes: int):
  """The table the regulariser, the sampler and the front use, by `cfg.constraint`.

  Both kinds expose `unit`, `fixed`, `layer_costs`, `indices_cost` and `arch_cost`
  (see cost.CostTable); nothing downstream knows which one it got.
  """
  macro = cfg.resolved_macro()
  if cfg.constraint == "latency":
    from nse_tf import latency  # pylint: disable=g-import-not-at-top
    try:
      return latency.LatencyTable.load(cfg.latency_lut, cfg.space, macro, cfg.cost_resolution,
                                       cfg.scale, num_classes)
    except latency.LatencyError as e:
      raise SearchError(str(e)) from None
  return cost_lib.CostTable(cfg.space, macro, cfg.cost_resolution, cfg.scale,
                            num_classes=num_classes)


def reference_cost(table) -> float:
  """Cost of the network holding every layer's single most expensive op.

  The unit of --relative_targets: τ, the interval and the edge band given as
  fractions of it mean the same thing on any device's table.
  """
  return float(table.reference_cost())


def cost_range(table, working_sets: Sequence[Sequence[int]], kinds: Sequence[str]
               ) -> Tuple[float, float]:
  """Cheapest and dearest architecture that `working_sets` can form on `table`.

  Known before any training: the θ distribution can only move candidates inside this
  range, so an interval outside it is a configuration error, not a training result.
  Per layer the cheapest choice is no op (normal layers) or the cheapest single op
  (reduction layers keep one), the dearest every op at once; costs are additive over
  layers on both kinds of table.
  """
  empty = [()] * len(working_sets)
  base = table.indices_cost(empty)
  lo = hi = base
  for l, (ws, kind) in enumerate(zip(working_sets, kinds)):
    if not ws:
      continue
    def layer_cost(ops, l=l):
      return table.indices_cost([tuple(ops) if i == l else () for i in range(len(empty))]) - base
    singles = [layer_cost([op]) for op in ws]
    lo += 0.0 if kind == "N" else min(singles)
    hi += max(layer_cost(ws), max(singles))
  return lo, hi


def check_reachable(cfg: SearchConfig, table, working_sets, kinds, r: int) -> None:
  """Raises SearchError when no architecture of the working sets lies in the interval."""
  lo, hi = cfg.interval
  cmin, cmax = cost_range(table, working_sets, kinds)
  if hi <= cmin or lo >= cmax:
    raise SearchError(
        f"--interval ({lo:g}, {hi:g}) cannot be reached in round {r}: the architectures its "
        f"working sets can form cost {cmin:.4g}..{cmax:.4g} {table.unit}; move --interval "
        "(and --tau, --edge_lo with it) into that range")


# ---------------------------------------------------------------------------
# Sampling candidates from the θ distribution.


def sample_candidates(cfg: SearchConfig, table, working_sets, alive, thetas, kinds, seed: int
                      ) -> Tuple[List[Tuple[Tuple[int, ...], ...]], List[Tuple[Tuple[int, ...], ...]]]:
  """D unique architectures with cost in (lo, hi) and D_e unique edge ones in (edge_lo, lo].

  Architectures are per-layer tuples of pool indices. Raises SearchError when the
  interval cannot be filled within `max_draws` draws.
  """
  from nse_tf.supernet import keep_prob  # pylint: disable=g-import-not-at-top
  rng = np.random.default_rng(seed)
  lo, hi = cfg.interval
  probs = [keep_prob(np.asarray(t, np.float64)) for t in thetas]
  samples: Dict[Tuple, float] = {}
  edges: Dict[Tuple, float] = {}
  seen_costs = []
  draws = 0
  while (len(samples) < cfg.num_samples or len(edges) < cfg.num_edge) and draws < cfg.max_draws:
    draws += 1
    layers = []
    for l, (ws, a, p) in enumerate(zip(working_sets, alive, probs)):
      while True:
        on = (rng.random(len(ws)) < p) & a
        if kinds[l] == "N" or on.any() or not a.any():
          break
      layers.append(tuple(int(ws[i]) for i in np.flatnonzero(on)))
    key = tuple(layers)
    c = table.indices_cost(key)
    if len(seen_costs) < 10000:
      seen_costs.append(c)
    if lo < c < hi and len(samples) < cfg.num_samples:
      samples.setdefault(key, c)
    elif cfg.edge_lo < c <= lo and len(edges) < cfg.num_edge:
      edges.setdefault(key, c)
  if len(samples) < cfg.num_samples:
    q = np.percentile(seen_costs, [0, 50, 100])
    raise SearchError(
        f"only {len(samples)} of {cfg.num_samples} unique architectures with cost in "
        f"({lo:g}, {hi:g}) after {draws} draws; the supernet's θ distribution gives costs "
        f"{q[0]:.1f}..{q[2]:.1f} (median {q[1]:.1f}) {table.unit}. Move --interval into that "
        "range, change --tau so θ moves there, or lower --num_samples")
  if len(edges) < cfg.num_edge:
    logging.warning("only %d of %d edge architectures in (%g, %g]", len(edges), cfg.num_edge,
                    cfg.edge_lo, lo)
  return list(samples), list(edges)


# ---------------------------------------------------------------------------
# Final architecture.


def solve_scale(a: Architecture, target: float, resolution: int, num_classes: int,
                lo: float = 0.2, hi: float = 4.0) -> float:
  """The largest channel scale whose MFLOPs stay <= target (bisection; cost grows with s)."""
  f = lambda s: cost_lib.arch_cost(a.with_scale(s), resolution, num_classes).macs / 1e6
  if f(lo) > target:
    raise SearchError(f"even scale {lo} costs {f(lo):.1f} MFLOPs > --final_target {target}")
  if f(hi) <= target:
    return hi
  for _ in range(40):
    mid = (lo + hi) / 2
    lo, hi = (mid, hi) if f(mid) <= target else (lo, mid)
  return math.floor(lo * 1e4) / 1e4   # never round up past a channel-rounding step


def final_architecture(cfg: SearchConfig, state: SearchState, num_classes: int,
                       table=None) -> Architecture:
  if not state.front:
    raise SearchError("the search has no front to select from")
  costs = [f["cost"] for f in state.front]
  accs = [f["accuracy"] for f in state.front]
  idx = pareto.select(costs, accs, list(range(len(costs))), cfg.select)
  chosen = state.front[idx]
  a = Architecture.from_compact(chosen["arch"])
  scale = cfg.final_scale
  if cfg.final_target is not None:
    scale = solve_scale(a, cfg.final_target, cfg.cost_resolution, num_classes)
  a = a.with_scale(scale if scale is not None else a.scale)
  final_cost = cost_lib.arch_cost(a, cfg.cost_resolution, num_classes)
  extra = {}
  if cfg.constraint == "latency":
    extra = dict(constraint="latency", interval=list(cfg.interval), num_classes=num_classes,
                 latency_lut=os.path.abspath(cfg.latency_lut))
    if table is not None and abs(a.scale - cfg.scale) < 1e-9:
      extra["latency_ms"] = round(table.arch_cost(a), 4)   # predicted on the search's table
  return a.with_metadata(
      search_cost=chosen["cost"], accuracy=chosen["accuracy"], round=state.round,
      selection=cfg.select, cost_mflops=round(final_cost.macs / 1e6, 3),
      params_m=round(final_cost.params / 1e6, 4), cost_resolution=cfg.cost_resolution,
      empty_layers_dropped=[l for l, ops in enumerate(a.layers) if not ops], **extra)


# ---------------------------------------------------------------------------
# The search driver.


class Search:
  """Runs the rounds of a search in `output_dir` (resumable).

  Args:
    cfg: SearchConfig. train_cfg: trainer.TrainConfig for every round.
    data: nse_tf.data.ImageData. strategy: a tf.distribute strategy.
    output_dir: where every output goes (see search.py).
    report: called with each line of the round reports (default: absl INFO log; the
      command passes `print`).
  """

  def __init__(self, cfg: SearchConfig, train_cfg, data, strategy, output_dir: str,
               progress: bool = True, state: Optional[SearchState] = None,
               report: Optional[Callable[[str], None]] = None):
    cfg.validate()
    self.report = report or (lambda line: logging.info("%s", line))
    self.cfg, self.train_cfg, self.data, self.strategy = cfg, train_cfg, data, strategy
    self.out = output_dir
    self.progress = progress
    self.macro = cfg.resolved_macro()
    self.kinds = spaces.layer_kinds(self.macro)
    self.pool = spaces.get_pool(cfg.space)
    self.num_classes = data.info.num_classes
    self.table = make_cost_table(cfg, self.num_classes)
    self.state_path = os.path.join(output_dir, "state.json")
    if state is None:
      state = initial_state(cfg, output_dir)
    self.state = state
    if not os.path.exists(self.state_path):
      self.state.save(self.state_path)
    self._traced_evaluator = None   # built and traced while a round trains

  def round_dir(self, r: int) -> str:
    d = os.path.join(self.out, f"round_{r:02d}")
    os.makedirs(d, exist_ok=True)
    return d

  # ----------------------------------------------------------------- rounds
  def note_machine(self, current: Optional[Dict[str, Any]] = None):
    """Records the machine this run is on in `state.json` (from where in the search it
    ran), and says so when it is not the one that ran the search so far: the results then
    differ from an uninterrupted run's on either machine (another CPU's kernels round
    differently)."""
    if self.state.phase == "done":
      return
    current = dict(current or machine.describe())
    before = self.state.machines[-1] if self.state.machines else None
    changed = machine.differences(before, current)
    if before is not None and not changed and set(current) <= set(before):
      return    # (a record that lacks a field added since is written anew, silently)
    where = f"round {self.state.round} ({self.state.phase})"
    if changed:
      self.report(f"note: this search ran from {before['from']} on {machine.one_line(before)}; "
                  f"from {where} it runs on {machine.one_line(current)} (other "
                  f"{', '.join(changed)}), so its results will not be bit-identical to an "
                  "uninterrupted run on either machine")
    self.state.machines.append({**current, "from": where})
    self.state.save(self.state_path)

  def run(self) -> Architecture:
    from nse_tf import loop  # pylint: disable=g-import-not-at-top
    total = self.cfg.num_rounds()
    self.note_machine()
    while self.state.phase != "done":
      r = self.state.round
      self.report(f"\n=== round {r}/{total}: "
                  f"{sum(len(w) for w in self.state.working_sets)} ops in the space ===")
      with loop.fewer_gc_passes():   # and the round's graphs are freed on the way out
        self.run_round(r)
      if r >= total:
        self.state.phase = "done"
      else:
        self.state.round, self.state.phase = r + 1, "train"
      self.state.save(self.state_path)
    from nse_tf import plots  # pylint: disable=g-import-not-at-top
    plots.plot_space_evolution(os.path.join(self.out, "space_evolution.png"),
                               [h["space"] for h in self.state.history], list(self.pool),
                               len(self.kinds), title=f"NSE search space per round ({self.cfg.space})")
    final = final_architecture(self.cfg, self.state, self.num_classes, self.table)
    final.save(os.path.join(self.out, "final_arch.json"))
    return final

  def _trainer(self, r: int, tensorboard: bool = True, state: Optional["SearchState"] = None):
    """Round r's trainer, built on `state`'s working sets (default: the current state)."""
    from nse_tf import trainer as trainer_lib  # pylint: disable=g-import-not-at-top
    state = state or self.state
    protected = [[op in set(a) for op in ws]
                 for ws, a in zip(state.working_sets, state.inherited)]
    import dataclasses as dc  # pylint: disable=g-import-not-at-top
    tcfg = dc.replace(self.train_cfg, seed=self.train_cfg.seed + 1000 * r,
                      progress=self.progress, gate_interval=tuple(self.cfg.interval))
    return trainer_lib.RoundTrainer(
        tcfg, self.strategy, self.data, self.table, space=self.cfg.space, macro=self.macro,
        working_sets=state.working_sets, protected=protected,
        num_classes=self.num_classes, resolution=self.cfg.image_size, scale=self.cfg.scale,
        model_dir=os.path.join(self.round_dir(r), "ckpt"),
        tb_dir=os.path.join(self.out, "tb", f"round_{r:02d}") if tensorboard else None)

  def run_round(self, r: int):
    if self.state.phase == "train":
      check_reachable(self.cfg, self.table, self.state.working_sets, self.kinds, r)
    rdir = self.round_dir(r)
    t0 = time.time()
    trainer = self._trainer(r)
    self._traced_evaluator = None
    if self.state.phase == "train":
      trainer.train(trace_also=lambda: self._trace_evaluator(trainer))
      self.state.phase = "evaluate"
      self.state.save(self.state_path)
    elif trainer.step.numpy() < trainer.total_steps:
      trainer.train()
    train_s = time.time() - t0
    alive = trainer.alive_masks()
    thetas = trainer.model.thetas_numpy()
    # Candidates: same per-round seed, so a resumed round draws the same ones.
    samples, edges = sample_candidates(self.cfg, self.table, self.state.working_sets, alive,
                                       thetas, self.kinds, seed=self.cfg.seed * 7919 + r)
    prev = [tuple(tuple(sorted(x)) for x in Architecture.from_compact(f["arch"]).indices())
            for f in self.state.front] if r > 1 or self.cfg.init_from else []
    cands = ([("sample", s) for s in samples] + [("edge", e) for e in edges]
             + [("prev_front", p) for p in prev])
    evaluated = self._evaluate(trainer, cands, os.path.join(rdir, "evaluated.jsonl"))
    costs = [self.table.indices_cost(c) for _, c in cands]
    accs = [evaluated[i] for i in range(len(cands))]
    kinds = [k for k, _ in cands]
    front_idx = pareto.pareto_front(costs, accs, prefer=[KIND_PRIORITY[k] for k in kinds])
    front_idx = [i for i in front_idx if kinds[i] != "edge"]   # edges only knock out optima
    if not front_idx:
      # Every in-interval candidate is dominated by a cheaper edge sample: keep the
      # front of the candidates inside the interval rather than none.
      logging.warning("round %d: edge samples dominate the whole interval; using the front "
                      "of the in-interval candidates", r)
      inside = [i for i in range(len(cands)) if kinds[i] != "edge"]
      front_idx = [inside[j] for j in pareto.pareto_front(
          [costs[i] for i in inside], [accs[i] for i in inside],
          prefer=[KIND_PRIORITY[kinds[i]] for i in inside])]
    archs = [Architecture.from_indices(self.cfg.space, c, macro=self.macro, scale=self.cfg.scale)
             for _, c in cands]
    front_archs = [archs[i] for i in front_idx]
    if not front_archs:
      raise SearchError(f"round {r}: the front is empty after dropping edge samples")
    start_sets = [list(w) for w in self.state.working_sets]
    self.state.inherited = aggregate(front_archs, len(self.kinds))
    self.state.front = [{"arch": archs[i].to_compact(), "cost": costs[i], "accuracy": accs[i],
                         "kind": kinds[i]} for i in front_idx]
    added = refill(self.state, self.cfg.max_ops) if r < self.cfg.num_rounds() else \
        [[] for _ in self.kinds]
    pruned = trainer.pruned
    space = {
        "working_sets": [[self.pool[i] for i in w] for w in start_sets],
        "pruned": [[e["op"] for e in pruned if e["layer"] == l] for l in range(len(self.kinds))],
        "inherited": [[self.pool[i] for i in a] for a in self.state.inherited],
    }
    self._write_round(r, rdir, cands, archs, costs, accs, kinds, set(front_idx), front_archs,
                      start_sets, pruned, added)
    best = max(self.state.front, key=lambda f: f["accuracy"])
    # Is the ranking above noise? The candidates' spread, one candidate's binomial
    # standard error, and the split-half reliability of their ranking.
    sample_accs = np.asarray([a for a, k in zip(accs, kinds) if k == "sample"])
    num_eval = eval_count(self.data, self.cfg)
    spread = float(sample_accs.std(ddof=1)) if len(sample_accs) > 1 else 0.0
    mean_acc = float(sample_accs.mean()) if len(sample_accs) else 0.0
    se = stats.binomial_se(mean_acc, max(1, num_eval))
    halves = [self.halves[i] for i, k in enumerate(kinds) if k == "sample" and i in self.halves]
    reliability = split_half_reliability(halves)
    n_inherited = sum(len(a) for a in self.state.inherited)
    n_added = sum(len(a) for a in added)
    self.state.history.append({
        "round": r, "train_seconds": round(train_s, 1),
        "seconds": round(time.time() - t0, 1), "candidates": len(cands),
        "front_size": len(front_idx), "best_accuracy": best["accuracy"],
        "best_cost": best["cost"], "accuracy_mean": mean_acc, "accuracy_std": spread,
        "accuracy_se": se, "split_half_r": reliability["r"],
        "split_half_r_low95": reliability["r_low95"],
        "reliability": reliability["reliability"], "pruned": len(pruned),
        "inherited": n_inherited,
        "added": n_added, "space": space})
    self.report(f"round {r}: {len(cands)} candidates, front of {len(front_idx)}, best "
                f"accuracy {100 * best['accuracy']:.2f} % at {best['cost']:.1f} "
                f"{self.table.unit}, {time.time() - t0:.0f} s")
    self.report(f"  candidates' held-out accuracy {100 * mean_acc:.1f} % ± {100 * spread:.1f} "
                f"(std across candidates), standard error {100 * se:.1f} points per "
                f"candidate ({num_eval} examples); {reliability['text']}")
    pruned_names = ", ".join(f"L{e['layer']:02d} {e['op']}" for e in pruned)
    self.report(f"  space: {sum(len(w) for w in start_sets)} ops trained, {len(pruned)} pruned"
                + (f" ({pruned_names})" if pruned else "")
                + f", {n_inherited} inherited by the front, {n_added} new ops for the next "
                "round")

  # ------------------------------------------------------------- evaluation
  def _trace_evaluator(self, trainer) -> None:
    """Builds the round's evaluator and traces its steps while the round trains (in the
    trainer's trace-ahead thread); `_evaluate` uses it when it starts at candidate 0."""
    evaluator = CandidateEvaluator(trainer, self.data, self.cfg,
                                   local=self.cfg.split_evaluation)
    evaluator.trace()
    self._traced_evaluator = evaluator

  def _evaluate(self, trainer, cands, log_path: str) -> Dict[int, float]:
    """Accuracy of every candidate on the held-out split (BN recalibrated first).

    Every worker logs every result (the chief in the run directory). With
    `split_evaluation` each worker evaluates candidates j ≡ its index (mod workers) of
    every block of EVAL_BLOCK per worker, and the block's results are exchanged before
    they are logged.
    """
    from nse_tf import distribute  # pylint: disable=g-import-not-at-top
    done: Dict[int, float] = {}
    self.halves: Dict[int, Tuple[float, float]] = {}
    self.losses: Dict[int, float] = {}    # held-out mean cross-entropy (diagnostics)
    keys = [self.candidate_key(c) for _, c in cands]
    for rec in read_jsonl(log_path):      # a line cut by a kill: evaluated again
      if rec.get("i") is not None and rec["i"] < len(keys) and rec.get("key") == keys[rec["i"]]:
        done[rec["i"]] = rec["accuracy"]
        if rec.get("halves"):
          self.halves[rec["i"]] = tuple(rec["halves"])
        if rec.get("loss") is not None:
          self.losses[rec["i"]] = rec["loss"]
    rank = distribute.worker_rank(self.strategy)
    if rank is not None:
      # A worker killed while logging may hold fewer results than the others: all go on
      # from the shortest log, so that every worker evaluates the same candidates.
      prefix = next(i for i in range(len(cands) + 1) if i not in done)
      agreed = min(int(v[0]) for v in distribute.gather_from_workers(
          self.strategy, np.array([prefix], np.int64)).values())
      done = {i: a for i, a in done.items() if i < agreed}
      self.halves = {i: h for i, h in self.halves.items() if i < agreed}
      self.losses = {i: v for i, v in self.losses.items() if i < agreed}
    todo = [i for i in range(len(cands)) if i not in done]
    if not todo:
      return done
    # Candidate i recalibrates on training batches [i·n, (i+1)·n) of one fixed
    # stream, so a resumed evaluation sees the batches an uninterrupted one would.
    split = self.cfg.split_evaluation
    evaluator, self._traced_evaluator = self._traced_evaluator, None
    if evaluator is None or todo[0] != 0 or evaluator.model is not trainer.model:
      evaluator = CandidateEvaluator(trainer, self.data, self.cfg, start_index=todo[0],
                                     local=split)
    me, workers = rank if (split and rank is not None) else (0, 1)
    local_replicas = self.strategy.num_replicas_in_sync // workers
    if split and local_replicas > 1:
      logging.warning("--split_evaluation with %d devices per worker: each of them evaluates "
                      "this worker's candidate on the whole batch, so the extra devices do not "
                      "help; it pays with one device per worker", local_replicas)
    bar = None
    if self.progress:
      import tf_keras as keras  # pylint: disable=g-import-not-at-top
      bar = keras.utils.Progbar(len(cands), stateful_metrics=["acc"])
      bar.update(len(done))
    def record(i):
      return json.dumps({"i": i, "key": keys[i], "accuracy": done[i],
                         "halves": self.halves.get(i), "loss": self.losses.get(i)}) + "\n"

    # Rewrite the log without a possibly cut last line, then append.
    atomic_write_text(log_path, "".join(record(i) for i in sorted(done)))
    block = EVAL_BLOCK * workers if split else 1
    with open(log_path, "a", encoding="utf-8") as log:
      for start in range(0, len(todo), block):
        chunk = todo[start:start + block]
        if split:
          # Rows [candidate, the counts of the even batches, of the odd ones]; -1: none.
          rows = np.full((EVAL_BLOCK, 1 + 2 * COUNTS), -1.0)
          mine = 0
          for j, i in enumerate(chunk):
            if j % workers != me:
              evaluator.skip_candidate()
              continue
            evaluator.accuracy(self._gates(trainer, cands[i][1]))
            rows[mine] = [i, *evaluator.last_counts.ravel()]
            mine += 1
          results = {int(r[0]): from_counts(r[1:].reshape(2, COUNTS), evaluator.num_eval)
                     for block_rows in distribute.gather_from_workers(
                         self.strategy, rows).values() for r in block_rows if r[0] >= 0}
        else:
          i = chunk[0]
          acc = evaluator.accuracy(self._gates(trainer, cands[i][1]))
          results = {i: (acc, evaluator.last_halves, evaluator.last_loss)}
        for i in chunk:
          acc, halves, self.losses[i] = results[i]
          done[i] = acc
          if halves is not None:
            self.halves[i] = halves
          log.write(record(i))
        log.flush()
        os.fsync(log.fileno())
        if bar is not None:
          bar.update(len(done), [("acc", acc)])
    return done

  def round_state(self, r: Optional[int] = None) -> "SearchState":
    """The state round `r` (default: the last) of this finished search trained with: its
    working sets as the round started them and the ops it inherited, from the history."""
    if self.state.phase != "done":
      raise SearchError(f"{self.out}: the search has not finished; run it to the end first")
    last = self.state.round
    if r is None or r == last:
      return self.state
    if not 1 <= r < last:
      raise SearchError(f"round {r}: this search ran rounds 1 to {last}; pick one of them")
    hist = {h["round"]: h for h in self.state.history}
    index = {op: i for i, op in enumerate(self.pool)}
    try:
      ws = [[index[op] for op in w] for w in hist[r]["space"]["working_sets"]]
      inherited = ([[index[op] for op in a] for a in hist[r - 1]["space"]["inherited"]]
                   if r > 1 else [[] for _ in ws])
    except KeyError as e:
      raise SearchError(f"{self.out}/state.json has no record of round {r}'s space ({e}); "
                        "only its last round can be evaluated") from None
    return dataclasses.replace(self.state, round=r, working_sets=ws, inherited=inherited)

  def evaluate_in_round(self, archs: Sequence[Architecture], log_path: str,
                        r: Optional[int] = None, with_loss: bool = False):
    """Held-out accuracy of any `archs` of round `r`'s space (default: the last round's)
    in that round's trained supernet; with `with_loss`, (accuracies, mean cross-entropies).

    For a finished search: the round's checkpoint is restored (nothing is trained and
    nothing in the search directory changes) and every architecture is evaluated as the
    round's candidates were (BN recalibration, then the held-out split). Results are
    logged to `log_path` (resumable). Diagnostics such as rank fidelity on architectures
    the search did not sample use it.
    """
    state = self.round_state(r)
    r = state.round
    cands = []
    for a in archs:
      idx = tuple(tuple(sorted(x)) for x in a.indices())
      for l, (ops, ws) in enumerate(zip(idx, state.working_sets)):
        if not set(ops) <= set(ws):
          raise SearchError(f"{a.to_compact()}: layer {l} uses ops outside round {r}'s "
                            f"working set ({[self.pool[i] for i in ws]})")
      cands.append(("sample", idx))
    trainer = self._trainer(r, tensorboard=False, state=state)
    if int(trainer.step.numpy()) < trainer.total_steps:
      raise SearchError(f"round {r}'s checkpoint in {self.round_dir(r)}/ckpt is not the "
                        "finished round's")
    done = self._evaluate(trainer, cands, log_path)
    accs = [done[i] for i in range(len(cands))]
    if not with_loss:
      return accs
    if any(i not in self.losses for i in range(len(cands))):
      raise SearchError(f"{log_path} holds accuracies without held-out losses (written "
                        "before losses were logged); delete it and evaluate again")
    return accs, [self.losses[i] for i in range(len(cands))]

  @staticmethod
  def candidate_key(c) -> str:
    """A candidate's key in the evaluation logs, from its pool indices per layer."""
    return "|".join("+".join(map(str, l)) for l in c)

  def _gates(self, trainer, c) -> np.ndarray:
    g = np.zeros(trainer.model.total_ops, np.float32)
    for l, idx in enumerate(c):
      ws = trainer.working_sets[l]     # the gate layout of the trainer's supernet
      for i in idx:
        g[trainer.model.offsets[l] + ws.index(i)] = 1.0
    return g

  # ---------------------------------------------------------------- outputs
  def _write_round(self, r, rdir, cands, archs, costs, accs, kinds, front_set, front_archs,
                   start_sets, pruned, added):
    from nse_tf import plots  # pylint: disable=g-import-not-at-top
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(["arch_id", "kind", "cost", "accuracy", "is_pareto", "arch"])
    for i, (k, a) in enumerate(zip(kinds, archs)):
      w.writerow([i, k, f"{costs[i]:.4f}", f"{accs[i]:.6f}", int(i in front_set), a.to_compact()])
    atomic_write_text(os.path.join(rdir, "candidates.csv"), buf.getvalue())
    front_json = [a.with_metadata(cost=costs[i], accuracy=accs[i], round=r, kind=kinds[i]).to_dict()
                  for i, a in zip(sorted(front_set, key=lambda i: costs[i]),
                                  [archs[i] for i in sorted(front_set, key=lambda i: costs[i])])]
    atomic_write_text(os.path.join(rdir, "front.json"), json.dumps(front_json, indent=1))
    space = {"round": r, "layers": [
        {"layer": l, "kind": self.kinds[l],
         "working_set": [self.pool[i] for i in start_sets[l]],
         "pruned": [{"op": e["op"], "step": e["step"], "theta": e["theta"]}
                    for e in pruned if e["layer"] == l],
         "inherited": [self.pool[i] for i in self.state.inherited[l]],
         "added_next": [self.pool[i] for i in added[l]]}
        for l in range(len(self.kinds))]}
    atomic_write_text(os.path.join(rdir, "space.json"), json.dumps(space, indent=1))
    pick = lambda kind: [(costs[i], accs[i]) for i in range(len(kinds)) if kinds[i] == kind]
    lo, hi = self.cfg.interval
    plots.plot_pareto(os.path.join(rdir, "pareto.png"), pick("sample"), pick("edge"),
                      pick("prev_front"), sorted((costs[i], accs[i]) for i in front_set), lo, hi,
                      title=f"round {r}: {len(kinds)} candidates, front of {len(front_set)}",
                      cost_unit=self.table.unit)
