"""Does the search search? Rank fidelity, NSE vs random at equal cost, and rounds.

Given a finished search (`python -m nse_tf.search … --output_dir=DIR`), trains standalone
networks from scratch, every one with the same budget (steps, batch, learning rate,
schedule, data order per seed), evaluates them on the dataset's validation split (never
seen by the search), and prints:

  (a) rank fidelity: Kendall τ-b between the supernet's held-out accuracy (inherited
      weights, BN recalibrated: what the search ranks by) and the standalone validation
      accuracy, over --num_rank architectures of the last round (or --rank_round), its
      candidates drawn one per equal-width cost bin of the interval or (--rank_set=uniform)
      uniform draws of its space; τ between cost alone and standalone accuracy is printed
      beside it, so that a τ that only reflects "more FLOPs, more accuracy" shows as such;
      --aggregate pools several searches' τ over the pairs within a search;
  (b) NSE vs random (the protocol of the paper's Fig. 3): the search's final pick against
      --num_random architectures drawn uniformly from the *full* pool (per layer: an op
      count, then that many distinct ops) with cost inside the same interval, every network
      trained with --seeds seeds; random mean ± 95 % t-interval over the architectures'
      seed means; the between-architecture and between-seed standard deviations;
  (c) rounds: per round, the front's best supernet accuracy at cost ≤ --fixed_cost, and
      that front architecture trained standalone (--seeds seeds): do later rounds find
      better networks at the same cost?
  (e) with --ablation, which part of the method earns the pick's accuracy: the pick of
      round 1's front (same rule: the search without its later rounds) and a candidate drawn
      at random from the last round's θ-sampled candidates (θ's distribution without the
      supernet's ranking) and one drawn uniformly from the last round's surviving ops
      (the evolved space without θ) and, the control, one drawn the same way from round
      1's initial space (the sampling scheme without any search), trained like the pick;
      --aggregate compares each with random search and with the final pick, paired by
      search seed, and the last space's draw with the initial space's.

Every trained network is appended to DIR/search_quality_runs.jsonl (keyed by architecture,
seed and budget), so an interrupted benchmark continues where it stopped; the summary is
written to DIR/search_quality.json. --known_runs names such files trained elsewhere (e.g.
benchmarks/recorded/compass_round1_uniform16.jsonl, the standalone networks of (a)'s draws
on the round-1 spaces of proxy searches with seeds 0-6), so that (a) on another search with
the same round-1 space costs the search alone. CI never runs this (it trains ~40 networks).

  python -m nse_tf.search --flagfile=flags/proxy.cfg --output_dir=runs/proxy
  python benchmarks/search_quality.py --search_dir=runs/proxy --num_rank=0 --ablation
"""

import csv
import json
import math
import os
import time

import numpy as np
from absl import flags

from nse_tf import arch as arch_lib
from nse_tf import cli, cost, fileio, spaces, stats


def define_flags(fv: flags.FlagValues = flags.FLAGS) -> None:
  """The benchmark's flags."""
  flags.DEFINE_string("search_dir", None, "Output dir of a finished search.", flag_values=fv)
  flags.DEFINE_integer("steps", 600, "Training steps per network (the same for all).",
                       flag_values=fv)
  flags.DEFINE_integer("batch", 64, "Batch size.", flag_values=fv)
  flags.DEFINE_float("lr", 0.1, "Peak learning rate (SGD Nesterov 0.9, cosine to 0).",
                     flag_values=fv)
  flags.DEFINE_float("weight_decay", 4e-5, "L2 on conv/fc kernels.", flag_values=fv)
  flags.DEFINE_integer("seeds", 2, "Training seeds per network in (b) and (c).", flag_values=fv)
  flags.DEFINE_integer("rank_seeds", 1, "Training seeds per network in (a).", flag_values=fv)
  flags.DEFINE_integer("num_rank", 12, "Architectures for the rank fidelity (a); 0 skips it.",
                       flag_values=fv)
  flags.DEFINE_enum("rank_set", "candidates", ["candidates", "uniform"],
                    "(a) on the round's candidates (sampled from θ, as the search saw "
                    "them), or on architectures drawn uniformly from the round's space, "
                    "evaluated in its supernet checkpoint (each op on with p = 0.5, as in "
                    "training).", flag_values=fv)
  flags.DEFINE_bool("rank_drop_pruned", False, "(a) with --rank_set=uniform: draw only "
                    "from the ops that survived the round. The ops θ pruned during it stopped "
                    "training there, and the search samples its candidates from the survivors; "
                    "by default the draws use the round's whole space, pruned ops included.",
                    flag_values=fv)
  flags.DEFINE_integer("rank_round", None, "The round whose supernet (a) ranks (default: the "
                       "last). Round 1 of a three-round search is the same as a one-round "
                       "search with the same flags and seed.", lower_bound=1, flag_values=fv)
  flags.DEFINE_integer("num_random", 10, "Random architectures in (b); 0 skips (b) (the "
                       "pick is not trained either).", lower_bound=0, flag_values=fv)
  flags.DEFINE_integer("seed", 0, "Seed of the random architectures and of the (a) draw.",
                       flag_values=fv)
  flags.DEFINE_float("fixed_cost", None, "Cost bound of the per-round comparison (c) "
                     "(default: the interval's upper bound).", flag_values=fv)
  flags.DEFINE_bool("rounds", True, "Train each round's best front architecture (c).",
                    flag_values=fv)
  flags.DEFINE_bool("ablation", False, "(e) Which part of the method earns the pick's "
                    "accuracy: also train the pick of round 1's front by the same rule (the "
                    "search without its later rounds) and one of the last round's θ-sampled "
                    "candidates drawn at random (θ's distribution without the supernet's "
                    "ranking) and one architecture drawn uniformly from the last round's space "
                    "(the ops that survived, each on with p = 0.5: the evolved space without "
                    "θ) and, the control, one drawn the same way from round 1's initial space "
                    "(no search), --seeds seeds each.", flag_values=fv)
  flags.DEFINE_integer("image_size", None, "Train and validate every standalone network at "
                       "this resolution instead of the search's (e.g. does a larger input "
                       "separate the architectures more? with --num_rank=0 --norounds). The "
                       "supernet's scores in (a) stay the search's.", lower_bound=8,
                       flag_values=fv)
  flags.DEFINE_list("known_runs", None, "JSON-lines files of standalone networks trained "
                    "earlier (another search directory's search_quality_runs.jsonl, or a "
                    "recorded set such as benchmarks/recorded/compass_round1_uniform16.jsonl), "
                    "read only: a network found there (same architecture, seed and budget) is "
                    "not trained again but copied into this search's cache, marked with the "
                    "file it came from. The files must hold networks of this search's dataset.",
                    flag_values=fv)
  flags.DEFINE_list("aggregate", None, "Instead of benchmarking one search: the directories "
                    "of several searches of one task (e.g. search seeds), each with a finished "
                    "search_quality.json against the same random architectures and budget; "
                    "prints their picks against random search across seeds (mean ± CI, "
                    "Welch's t-test, Mann-Whitney) and, where every one has (a) measured the "
                    "same way, their rank fidelities pooled over the pairs within a search. "
                    "Trains nothing.", flag_values=fv)



def random_in_interval(space, macro, table, lo, hi, max_ops, rng, max_draws=200000):
  """Uniform over the full pool: per layer an op count in [0|1, max_ops], then the ops."""
  pool = len(spaces.get_pool(space))
  kinds = spaces.layer_kinds(macro)
  for _ in range(max_draws):
    layers = []
    for kind in kinds:
      n = rng.integers(0 if kind == "N" else 1, max_ops + 1)
      layers.append(tuple(sorted(rng.choice(pool, n, replace=False).tolist())))
    if lo < table.indices_cost(layers) < hi:
      return arch_lib.Architecture.from_indices(space, layers, macro=macro)
  raise RuntimeError(f"no random architecture with cost in ({lo}, {hi}) after {max_draws} "
                     "draws")


def uniform_in_space(space, macro, scale, table, working_sets, lo, hi, n, rng,
                     max_draws=20000):
  """`n` architectures of `working_sets` with cost in (lo, hi), spread across the interval.

  Drawn as the supernet is trained: every op on independently with p = 0.5 (reduction/E
  layers non-empty). Up to `max_draws` draws (or until every one of n equal-width cost
  bins holds one), then `spread_pick`: one per bin, empty bins topped up from the rest.
  """
  kinds = spaces.layer_kinds(macro)
  edges = np.linspace(lo, hi, n + 1)
  rows, seen, bins = [], set(), set()
  for _ in range(max_draws):
    layers = []
    for kind, ws in zip(kinds, working_sets):
      on = rng.random(len(ws)) < 0.5
      while kind != "N" and not on.any():
        on = rng.random(len(ws)) < 0.5
      layers.append(tuple(sorted(np.asarray(ws)[on].tolist())))
    c = table.indices_cost(layers)
    if lo < c < hi and tuple(layers) not in seen:
      seen.add(tuple(layers))
      a = arch_lib.Architecture.from_indices(space, layers, macro=macro, scale=scale)
      rows.append({"arch": a.to_compact(), "cost": c})
      bins.add(int(np.searchsorted(edges, c, side="right")) - 1)
      if len(bins) == n:
        break
  return [arch_lib.Architecture.from_compact(r["arch"]) for r in spread_pick(rows, lo, hi, n, rng)]


def finished_search(out, cfg, data):
  """The finished search in `out` as an evolution.Search (reads; writes nothing)."""
  from nse_tf import common_flags, distribute, evolution, search  # pylint: disable=g-import-not-at-top
  fv = flags.FlagValues()
  search.define_flags(fv)
  fv(["search_quality"])
  for k, v in cfg.items():
    if k in fv:
      fv[k].value = v
  scfg = search.search_config(fv)
  if cfg.get("relative_targets") or scfg.constraint == "latency":
    raise cli.UsageError("--rank_set=uniform supports FLOPs searches with absolute targets")
  return evolution.Search(scfg, common_flags.train_config(fv), data,
                          distribute.get_strategy("default", None, 0), out, progress=False,
                          state=evolution.SearchState.load(os.path.join(out, "state.json")))


def read_candidates(search_dir, r):
  path = os.path.join(search_dir, f"round_{r:02d}", "candidates.csv")
  with open(path, encoding="utf-8") as f:
    return [dict(row, cost=float(row["cost"]), accuracy=float(row["accuracy"]))
            for row in csv.DictReader(f)]


def spread_pick(rows, lo, hi, n, rng):
  """One row per equal-width cost bin of (lo, hi), drawn at random inside the bin."""
  edges = np.linspace(lo, hi, n + 1)
  picked = []
  for b in range(n):
    inside = [r for r in rows if edges[b] <= r["cost"] < edges[b + 1]]
    if inside:
      picked.append(inside[rng.integers(len(inside))])
  if len(picked) < n:     # empty bins: top up from the rest, cheapest gaps first
    rest = [r for r in rows if r not in picked]
    for i in rng.permutation(len(rest))[:n - len(picked)]:
      picked.append(rest[i])
  return sorted(picked, key=lambda r: r["cost"])


def read_cache(path, dataset, known=False):
  """The trained networks cached in `path` ({key: record}). Records name their dataset
  (older ones do not and are taken as they are); one trained on another dataset means a
  cache copied from another task's search, which would be read as this task's numbers."""
  # A file named by --known_runs is someone else's: the remedy is another file, not removal.
  where, remedy = ((f"--known_runs: {path}", "name another file, or leave the flag out") if known
                   else (path, "remove it and run the benchmark again (its networks are "
                         "trained again)"))
  cache = {}
  for i, rec in enumerate(fileio.read_jsonl(path), 1):
    if not isinstance(rec, dict) or "key" not in rec or "accuracy" not in rec:
      raise cli.UsageError(f"{where}, record {i}: not a trained network's record (an object "
                           f"with 'key' and 'accuracy'); {remedy}")
    if rec.get("dataset", dataset) != dataset:
      raise cli.UsageError(
          f"{where} holds networks trained on {rec['dataset']}, but this search ran on "
          f"{dataset}" + (f"; name a file of networks trained on {dataset}, or leave the "
                          "flag out" if known else
                          f": it was copied from another task's search. Remove it (or copy "
                          f"the file of a search on {dataset}) and run the benchmark again"))
    cache[rec["key"]] = rec
  return cache


class Runner:
  """Trains standalone networks with one budget; results cached in a JSON-lines file."""

  def __init__(self, cfg, cache_path, budget, image_size=None, known_runs=()):
    self.cfg = cfg
    self.budget = budget   # the flags: steps, batch, lr, weight_decay
    # Standalone networks train at the search's resolution unless told otherwise; results
    # at another one are cached under their own keys.
    self.size = image_size or cfg["image_size"]
    self._size_key = f"|size={self.size}" if self.size != cfg["image_size"] else ""
    self.data = self._data(self.size)
    self.cache_path = cache_path
    self.cache = read_cache(cache_path, cfg["dataset"])
    # Networks trained elsewhere (read only): the first file that has a key wins.
    self.known = {}
    for path in known_runs or ():
      if not os.path.isfile(path):
        raise cli.UsageError(f"--known_runs: {path} is not a file (a search directory's "
                             "search_quality_runs.jsonl, or one under benchmarks/recorded/)")
      for k, rec in read_cache(path, cfg["dataset"], known=True).items():
        self.known.setdefault(k, dict(rec, known_from=os.path.basename(path)))
    self.trained = 0
    self.from_known = 0
    self.seconds = 0.0
    self.used = set()      # keys of the networks this run asked for (trained or cached)

  def _data(self, size):
    from nse_tf import data  # pylint: disable=g-import-not-at-top
    return data.get_data(self.cfg["dataset"], data_dir=self.cfg.get("data_dir"),
                         image_size=size, holdout_examples=self.cfg.get("holdout_examples"))

  def search_data(self):
    """The dataset at the search's resolution (what its supernet is evaluated on)."""
    return self.data if not self._size_key else self._data(self.cfg["image_size"])

  def key(self, a, seed):
    b = self.budget
    return (f"{a.to_compact()}|seed={seed}|steps={b.steps}|batch={b.batch}|"
            f"lr={b.lr}|wd={b.weight_decay}{self._size_key}")

  def accuracy(self, a, seed):
    k = self.key(a, seed)
    self.used.add(k)
    if k not in self.cache and k in self.known:
      fileio.append_jsonl(self.cache_path, self.known[k])
      self.cache[k] = self.known[k]
      self.from_known += 1
    if k not in self.cache:
      t0 = time.time()
      acc = self._train(a, seed)
      rec = {"key": k, "accuracy": acc, "seconds": round(time.time() - t0, 1),
             "dataset": self.cfg["dataset"]}
      fileio.append_jsonl(self.cache_path, rec)
      self.cache[k] = rec
      self.trained += 1
      self.seconds += rec["seconds"]
    return self.cache[k]["accuracy"]

  def _train(self, a, seed):
    import tf_keras as keras  # pylint: disable=g-import-not-at-top
    from nse_tf import nsenet  # pylint: disable=g-import-not-at-top
    size, b = self.size, self.budget
    keras.backend.clear_session()
    keras.utils.set_random_seed(seed)
    model = nsenet.build_nsenet(a, self.data.info.num_classes, (size, size, 3))
    if b.weight_decay:      # L2 on conv/fc kernels only (SPEC §4), not BN or biases
      model.add_loss(lambda: b.weight_decay * sum(
          keras.backend.sum(keras.backend.square(w)) for w in model.trainable_weights
          if "kernel" in w.name and len(w.shape) > 1))
    sched = keras.optimizers.schedules.CosineDecay(b.lr, b.steps)
    # Every variable exists before the first step (the optimizer's slots, the metric's
    # counters): a tf.function that creates variables is traced twice, ~2 s a network here.
    model.compile(keras.optimizers.SGD(sched, momentum=0.9, nesterov=True),
                  keras.losses.SparseCategoricalCrossentropy(from_logits=True),
                  metrics=[keras.metrics.SparseCategoricalAccuracy(name="accuracy")])
    model.optimizer.build(model.trainable_variables)
    model.fit(self.data.train(b.batch, seed=seed), epochs=1, steps_per_epoch=b.steps,
              verbose=0)
    return float(model.evaluate(self.data.validation(500), verbose=0)[1])

  def mean(self, a, seeds):
    accs = [self.accuracy(a, s) for s in range(seeds)]
    return float(np.mean(accs)), accs


def _read_json(out, name, fix=None):
  """DIR/name as JSON; a missing or unreadable file is one UsageError that says what to do
  (`fix`, default: point --search_dir at a finished search / re-run it)."""
  path = os.path.join(out, name)
  try:
    with open(path, encoding="utf-8") as f:
      return json.load(f)
  except FileNotFoundError:
    if fix:
      raise cli.UsageError(f"{path} does not exist; {fix}") from None
    raise cli.UsageError(f"--search_dir={out}: no {name}; point it at the --output_dir of "
                         "a finished python -m nse_tf.search run") from None
  except (OSError, json.JSONDecodeError) as e:
    raise cli.UsageError(f"{path} is unreadable ({e}); " + (
        fix or "re-run the search with --overwrite or point --search_dir at another run")
                         ) from None


def rank_fidelity(fv, out, cfg, runner, table, macro, lo, hi, rounds, seed_sd=None):
  """(a): Kendall τ between supernet and standalone accuracy on --num_rank architectures
  of the last round or --rank_round (its candidates, or uniform draws of its space); the
  summary entry.

  Also the τ that a perfect ranker would reach against the same standalone numbers, which
  carry training noise (`stats.tau_ceiling`): with one seed per network the seed noise is
  `seed_sd`, measured in (b) with the same budget."""
  rr = fv.rank_round or rounds
  if fv.rank_set == "candidates":
    rows = [x for x in read_candidates(out, rr) if x["kind"] == "sample"]
    picked = spread_pick(rows, lo, hi, fv.num_rank, np.random.default_rng(fv.seed + 1))
    from nse_tf import evolution  # pylint: disable=g-import-not-at-top
    # The search's own evaluation log holds each candidate's held-out loss (searches run
    # before losses were logged: none, and no τ by loss).
    losses = {rec.get("key"): rec.get("loss") for rec in fileio.read_jsonl(
        os.path.join(out, f"round_{rr:02d}", "evaluated.jsonl"))}
    for row in picked:
      row["loss"] = losses.get(evolution.Search.candidate_key(
          arch_lib.Architecture.from_compact(row["arch"]).indices()))
    what = f"round-{rr} candidates"
  else:
    space = read_space(out, rr, fv.rank_drop_pruned)
    kinds = spaces.layer_kinds(macro)
    for l, (kind, ws) in enumerate(zip(kinds, space)):
      if kind != "N" and not ws:
        raise cli.UsageError(f"--rank_drop_pruned: layer {l} of round {rr} has no op that "
                             "survived the round; draw from the whole space without it")
    drawn = uniform_in_space(cfg["space"], macro, cfg["scale"], table, space, lo, hi,
                             fv.num_rank, np.random.default_rng(fv.seed + 2))
    which = "surviving ops of the " if fv.rank_drop_pruned else ""
    print(f"(a) evaluating {len(drawn)} uniform draws of the {which}round-{rr} space in its "
          "supernet", flush=True)
    log = "search_quality_uniform_eval" + ("" if rr == rounds else f"_round{rr:02d}") + \
        ("_survivors" if fv.rank_drop_pruned else "") + ".jsonl"
    srch = finished_search(out, cfg, runner.search_data())
    accs, losses = srch.evaluate_in_round(drawn, os.path.join(out, log), rr, with_loss=True)
    picked = [{"arch": a.to_compact(), "cost": table.indices_cost(a.indices()), "accuracy": acc,
               "loss": loss} for a, acc, loss in zip(drawn, accs, losses)]
    what = f"uniform draws of the {which}round-{rr} space"
  sup, alone, costs, groups = [], [], [], []
  print(f"(a) rank fidelity: {len(picked)} {what} across the interval, "
        f"{fv.rank_seeds} seed(s) each")
  archs = [arch_lib.Architecture.from_compact(r["arch"]) for r in picked]
  for r, a in zip(picked, archs):
    m, accs = runner.mean(a, fv.rank_seeds)
    groups.append(accs)
    sup.append(r["accuracy"])
    alone.append(m)
    costs.append(r["cost"])
    print(f"  {r['cost']:6.1f}  supernet {100 * r['accuracy']:6.2f} %  standalone "
          f"{100 * m:6.2f} %  {r['arch']}", flush=True)
  tau = stats.kendall_tau(sup, alone)
  tau_cost = stats.kendall_tau(costs, alone)
  # The supernet's held-out cross-entropy as the score instead: a continuous measure, not
  # the count of a few hundred errors whose binomial noise is close to the candidates'
  # whole spread. Lower loss ranks higher.
  sup_loss = [r.get("loss") for r in picked]
  tau_loss = (stats.kendall_tau([-x for x in sup_loss], alone)
              if all(x is not None for x in sup_loss) else None)
  # Weight-sharing bias: does the supernet favour paths with more ops than training alone does?
  num_ops = [sum(len(l) for l in a.layers) for a in archs]
  tau_ops_sup, tau_ops_alone = stats.kendall_tau(num_ops, sup), stats.kendall_tau(num_ops, alone)
  print(f"  Kendall τ(supernet, standalone) = {tau:.3f}; τ(cost, standalone) = {tau_cost:.3f}"
        f"; τ(supernet, cost) = {stats.kendall_tau(sup, costs):.3f}")
  if tau_loss is None:
    print("  τ(supernet loss, standalone): no held-out losses in the evaluation log")
  else:
    print(f"  Kendall τ(−supernet held-out loss, standalone) = {tau_loss:.3f} (ranking by "
          "the supernet's cross-entropy instead of its accuracy)")
  print(f"  τ(number of ops, supernet) = {tau_ops_sup:.3f}; τ(number of ops, standalone) = "
        f"{tau_ops_alone:.3f}; supernet spread {100 * stats.stdev(sup):.2f} points, "
        f"standalone {100 * stats.stdev(alone):.2f} (std across architectures)")
  # Ops that θ pruned during the round stopped training there: the supernet scores an
  # architecture that uses one with that op's weights from the step it was pruned at.
  pruned = read_pruned(out, rr)
  with_pruned = sum(any(op in p for ops, p in zip(a.layers, pruned) for op in ops)
                    for a in archs)
  print(f"  {with_pruned} of the {len(archs)} use an op that θ pruned during round {rr} "
        f"({sum(map(len, pruned))} pruned)")
  ceiling = stats.tau_ceiling(groups, seed_sd if fv.rank_seeds < 2 else None)
  if math.isnan(ceiling["tau_max"]):
    print("  a perfect ranker's τ against these standalone numbers: not estimated (one seed "
          "per network and no seed noise from (b))\n")
  else:
    print(f"  a perfect ranker's τ against these standalone numbers ≈ {ceiling['tau_max']:.2f}"
          f" (simulated on these architectures: {ceiling['tau_max_sim']:.2f}; "
          f"the {ceiling['seeds']}-seed means' reliability {ceiling['reliability']:.2f}: "
          f"seed noise {100 * ceiling['seed_sd']:.2f} points"
          f"{' from (b)' if fv.rank_seeds < 2 else ''}, architectures "
          f"{100 * ceiling['between_sd']:.2f} beyond it)\n")
  return {"rank_set": fv.rank_set, "round": rr, "rank_seeds": fv.rank_seeds,
          "drop_pruned": bool(fv.rank_drop_pruned and fv.rank_set == "uniform"),
          "with_pruned_ops": with_pruned,
          "kendall_tau": tau,
          "kendall_tau_cost": tau_cost,
          "kendall_tau_loss": tau_loss,
          "tau_ceiling": ceiling,
          "kendall_tau_num_ops_supernet": tau_ops_sup,
          "kendall_tau_num_ops_standalone": tau_ops_alone,
          "points": [{"arch": r["arch"], "cost": c, "supernet": s, "supernet_loss": x,
                      "standalone": s2}
                     for r, c, s, x, s2 in zip(picked, costs, sup, sup_loss, alone)]}


def read_pruned(out, r):
  """Per layer, the names of the ops that θ pruned during round r (round_NN/space.json)."""
  return [{e["op"] for e in l["pruned"]}
          for l in _read_json(out, f"round_{r:02d}/space.json")["layers"]]


def read_space(out, r, drop_pruned):
  """Round r's working sets (pool indices) from round_NN/space.json: as the round started
  them, or, with `drop_pruned`, without the ops that θ pruned during the round."""
  pool = spaces.get_pool(_read_json(out, "config.json")["space"])
  layers = _read_json(out, f"round_{r:02d}/space.json")["layers"]
  pruned = read_pruned(out, r) if drop_pruned else [set()] * len(layers)
  return [[pool.index(op) for op in l["working_set"] if op not in p]
          for l, p in zip(layers, pruned)]


def space_draw(cfg, table, working_sets, seed):
  """One architecture of `working_sets` in the search's interval, every op on with p = 0.5."""
  lo, hi = (float(v) for v in cfg["interval"])
  return uniform_in_space(cfg["space"], cfg["macro"] or spaces.DEFAULT_MACRO[cfg["space"]],
                          cfg["scale"], table, working_sets, lo, hi, 1,
                          np.random.default_rng(seed))[0]


def ablation(fv, out, cfg, runner, table, rounds):
  """(e): round 1's pick (no later rounds), a random last-round θ sample (no ranking), a
  uniform draw of the last round's surviving ops (no θ) and, the control, a uniform draw
  of round 1's initial space (no search at all), trained like the pick; the entry."""
  from nse_tf import pareto  # pylint: disable=g-import-not-at-top
  front1 = [arch_lib.Architecture.from_dict(d) for d in _read_json(out, "round_01/front.json")]
  if not front1:
    raise cli.UsageError(f"{out}/round_01/front.json is empty; re-run the search")
  i = pareto.select([a.metadata["cost"] for a in front1],
                    [a.metadata["accuracy"] for a in front1], list(range(len(front1))),
                    cfg["select"])
  samples = [r for r in read_candidates(out, rounds) if r["kind"] == "sample"]
  drawn = samples[np.random.default_rng(fv.seed + 3).integers(len(samples))]
  # The last round's space as θ left it (pruned ops out), and the control: round 1's
  # space as the search started it (no pruning, no inheritance, no refill); in each, every
  # op on with p = 0.5, as the supernet is trained.
  variants = [("round1_pick", f"round 1's {cfg['select']} pick", front1[i],
               front1[i].metadata["accuracy"]),
              ("theta_sample", f"a random round-{rounds} θ sample",
               arch_lib.Architecture.from_compact(drawn["arch"]), drawn["accuracy"]),
              ("space_sample", f"uniform in the round-{rounds} space",
               space_draw(cfg, table, read_space(out, rounds, drop_pruned=True), fv.seed + 4),
               None),
              ("initial_space_sample", "uniform in round 1's initial space",
               space_draw(cfg, table, read_space(out, 1, drop_pruned=False), fv.seed + 5),
               None)]
  print(f"(e) ablation, {fv.seeds} seeds per network")
  entry = {}
  for key, what, a, sup in variants:
    a = a.with_scale(cfg["scale"])
    m, accs = runner.mean(a, fv.seeds)
    c = table.arch_cost(a)
    entry[key] = {"arch": a.to_compact(), "cost": c, "supernet": sup, "accuracies": accs,
                  "mean": m}
    sup_text = "     -  " if sup is None else f"{100 * sup:6.2f} %"
    print(f"  {what:32s} {c:6.1f}  supernet {sup_text}  standalone {100 * m:6.2f} % "
          f"({', '.join(f'{100 * x:.2f}' for x in accs)})  {a.to_compact()}", flush=True)
  print()
  return entry


def aggregate(dirs):
  """Several searches of one task (search seeds), each benchmarked: (b) their picks against
  one random set, the across-seeds verdict (b) asks for, where every directory has (b);
  (a) their rank fidelities pooled, where every directory has (a). Returns the summary
  dict ((b)'s entries at its top level, (a)'s under "rank_fidelity"); raises UsageError
  on mismatched inputs."""
  runs = []
  for d in dirs:
    summary = _read_json(d, "search_quality.json", fix=(
        f"--aggregate needs it: run `python benchmarks/search_quality.py --search_dir={d}` "
        "(again)"))
    runs.append((d, summary))
  if len(runs) < 2:
    raise cli.UsageError("--aggregate needs at least 2 search directories")
  seen = {}
  for d, _ in runs:
    key = os.path.realpath(d)
    if key in seen:
      raise cli.UsageError(f"--aggregate: {seen[key]} and {d} are the same directory; name "
                           "each search once")
    seen[key] = d
  has_b = all("nse_vs_random" in s for _, s in runs)
  has_a = all("rank_fidelity" in s for _, s in runs)
  if not (has_a or has_b):
    no_b = next(d for d, s in runs if "nse_vs_random" not in s)
    no_a = next(d for d, s in runs if "rank_fidelity" not in s)
    raise cli.UsageError(
        f"--aggregate: nothing to combine: {no_b}/search_quality.json has no NSE-vs-random "
        f"result (b) (benchmarked with --num_random=0?) and {no_a}/search_quality.json no "
        "rank fidelity (a) (--num_rank=0?); every directory needs the same part: run the "
        "benchmark on them without that flag")
  out = {"dirs": [os.path.abspath(d) for d, _ in runs]}
  if has_b:
    out.update(_aggregate_picks(runs))
  else:
    print("(b) across searches: not every directory has an NSE-vs-random result "
          "(benchmarked with --num_random=0?)\n")
  out["rank_fidelity"] = _aggregate_rank_fidelity(runs) if has_a else None
  return out


def _aggregate_rank_fidelity(runs):
  """(a) across searches: each search's τ over its own draws, pooled over the pairs within
  a search (architectures of different searches were scored by different supernets, so
  they are never compared), with the null standard error and the spread across searches."""
  d0, s0 = runs[0]
  a0 = s0["rank_fidelity"]

  def protocol(s):
    a = s["rank_fidelity"]
    seeds = a.get("rank_seeds", a.get("tau_ceiling", {}).get("seeds"))
    return {"budget": {k: v for k, v in s["budget"].items() if k != "seeds"},
            "rank_set": a["rank_set"], "round": a["round"],
            "drop_pruned": a.get("drop_pruned", False), "standalone seeds": seeds}

  p0 = protocol(s0)
  measured = {json.dumps(a0["points"], sort_keys=True): d0}
  for d, s in runs[1:]:
    p = protocol(s)
    diff = [k for k in p0 if p[k] != p0[k]]
    if diff:
      k = diff[0]
      raise cli.UsageError(f"--aggregate: {d}'s rank fidelity (a) was measured with another "
                           f"{k} than {d0}'s ({p[k]} vs {p0[k]}); pool equal protocols only")
    points = json.dumps(s["rank_fidelity"]["points"], sort_keys=True)
    if points in measured:
      raise cli.UsageError(f"--aggregate: {d} and {measured[points]} hold the same (a) "
                           "measurements (a copied search?); name each search once")
    measured[points] = d
  taus = [s["rank_fidelity"]["kendall_tau"] for _, s in runs]
  sizes = [len(s["rank_fidelity"]["points"]) for _, s in runs]
  tau, se = stats.pooled_kendall_tau(taus, sizes)
  mean, half = stats.mean_ci(taus)
  pairs = sum(n * (n - 1) // 2 for n in sizes)
  entry = {"taus": taus, "sizes": sizes, "pairs": pairs, "tau": tau, "null_se": se,
           "between_searches_ci95": half,
           "tau_max": [s["rank_fidelity"].get("tau_ceiling", {}).get("tau_max")
                       for _, s in runs],
           # Absent from runs made before the simulated estimate existed.
           "tau_max_sim": [s["rank_fidelity"].get("tau_ceiling", {}).get("tau_max_sim")
                           for _, s in runs]}
  for key, name in (("kendall_tau_cost", "cost"), ("kendall_tau_loss", "loss")):
    vals = [s["rank_fidelity"].get(key) for _, s in runs]
    entry[f"tau_{name}"] = (stats.pooled_kendall_tau(vals, sizes)[0]
                            if all(v is not None for v in vals) else None)
  survivors = "surviving ops of the " if p0["drop_pruned"] else ""
  what = (f"uniform draws of the {survivors}round-{p0['round']} space"
          if p0["rank_set"] == "uniform" else f"round-{p0['round']} candidates")
  print(f"(a) rank fidelity across {len(runs)} searches: {what}, "
        f"{p0['standalone seeds']} standalone seed(s) each")
  for (d, s), t, n, ceil, sim in zip(runs, taus, sizes, entry["tau_max"],
                                     entry["tau_max_sim"]):
    ceil_text = "" if ceil is None or math.isnan(ceil) else f"; a perfect ranker ≈ {ceil:.2f}"
    if ceil_text and sim is not None and not math.isnan(sim):
      ceil_text += f" (simulated {sim:.2f})"
    print(f"  τ(supernet, standalone) {t:6.3f} on {n} architectures; τ(cost, standalone) "
          f"{s['rank_fidelity']['kendall_tau_cost']:6.3f}{ceil_text}  {d}")
  print(f"  pooled over the {pairs} pairs within a search: τ = {tau:.3f} (null standard error "
        f"{se:.3f}); across searches {mean:.3f} ± {half:.3f} (mean ± 95 % CI, n={len(runs)})")
  extra = [f"τ(cost, standalone) {entry['tau_cost']:.3f}"]
  if entry["tau_loss"] is not None:
    extra.insert(0, f"τ(−supernet loss, standalone) {entry['tau_loss']:.3f}")
  print(f"  pooled the same way: {'; '.join(extra)}\n")
  return entry


def _aggregate_picks(runs):
  """(b) across searches: the picks against the one random set they share."""
  d0, s0 = runs[0]
  rand0 = [r["mean"] for r in s0["nse_vs_random"]["random"]]
  for d, s in runs[1:]:
    if s["budget"] != s0["budget"]:
      raise cli.UsageError(f"--aggregate: {d} was benchmarked with another budget than {d0} "
                           f"({s['budget']} vs {s0['budget']}); compare equal budgets only")
    rand = [r["mean"] for r in s["nse_vs_random"]["random"]]
    if rand != rand0:
      raise cli.UsageError(f"--aggregate: {d} compares against other random architectures "
                           f"than {d0} (another --seed or --num_random?); benchmark both "
                           "against one random set")
  rm, rh = stats.mean_ci(rand0)
  picks = [s["nse_vs_random"]["nse"]["mean"] for _, s in runs]
  b0 = s0["budget"]
  print(f"NSE's pick across {len(runs)} searches against the same {len(rand0)} random "
        f"architectures; every network {b0['steps']} steps of {b0['batch']}, lr {b0['lr']}, "
        f"weight decay {b0['weight_decay']}, {b0['seeds']} seed(s)")
  resid = [s["nse_vs_random"]["cost_matched_residual"] for _, s in runs]
  is_above = [x >= rm + rh for x in picks]
  for (d, s), above_ci, r in zip(runs, is_above, resid):
    nse = s["nse_vs_random"]["nse"]
    accs = ", ".join(f"{100 * x:.2f}" for x in nse["accuracies"])
    print(f"  {nse['cost']:6.1f}  {100 * nse['mean']:6.2f} % ({accs})  "
          f"{'above' if above_ci else 'not above'} the random CI; cost-matched "
          f"{100 * r:+.2f}  {d}")
  pm, ph = stats.mean_ci(picks)
  t, p_t = stats.welch_t_test(picks, rand0)
  _, p_one = stats.welch_t_test(picks, rand0, alternative="greater")
  _, lo, hi = stats.welch_difference_ci(picks, rand0)
  u, p_u = stats.mann_whitney_greater(picks, rand0)
  above = sum(is_above)
  resid_mean = float(np.mean(resid))
  print(f"  NSE picks: {100 * pm:.2f} ± {100 * ph:.2f} % (mean ± 95 % CI, n={len(picks)}; std "
        f"{100 * stats.stdev(picks):.2f}); random: {100 * rm:.2f} ± {100 * rh:.2f} % (n="
        f"{len(rand0)}; std {100 * stats.stdev(rand0):.2f})")
  print(f"  mean pick − random mean {100 * (pm - rm):+.2f} points (cost-matched "
        f"{100 * resid_mean:+.2f}); {above} of {len(picks)} picks above the random "
        f"mean + CI half-width ({100 * (rm + rh):.2f} %); mean pick "
        f"{'above' if pm >= rm + rh else 'NOT above'} it")
  print(f"  difference 95 % CI (Welch) {100 * lo:+.2f} to {100 * hi:+.2f} points")
  print(f"  Welch's t = {t:.2f}, two-sided p = {p_t:.3f} (one-sided, picks > random: "
        f"{p_one:.3f}); Mann-Whitney U = {u:g}, one-sided p (picks > random) = {p_u:.3f}: "
        f"the difference is {'' if p_t < 0.05 else 'NOT '}significant at 5 % (Welch, "
        "two-sided)")
  ablation_out = _aggregate_ablation(runs, picks, rand0) if all(
      "ablation" in s for _, s in runs) else None
  return {"picks": picks, "pick_mean": pm,
          "pick_ci95": ph, "random_mean": rm, "random_ci95": rh, "above_ci": above,
          "welch_t": t, "welch_p": p_t, "welch_p_greater": p_one,
          "difference_ci95": [lo, hi], "mann_whitney_u": u, "mann_whitney_p": p_u,
          "cost_matched_mean": resid_mean, "ablation": ablation_out}


def _aggregate_ablation(runs, picks, rand):
  """(e) across searches: each variant against random search, and the final pick against
  each variant paired by search (the same search seed)."""
  rm = float(np.mean(rand))
  print(f"  (e) ablation over the {len(runs)} searches (final pick − variant: paired by "
        "search, mean ± 95 % CI, paired t-test)")
  out = {}
  for key, what in (("round1_pick", "round 1's pick (no later rounds)"),
                    ("theta_sample", "a last-round θ sample (no ranking)"),
                    ("space_sample", "uniform in the last space (no θ, no ranking)"),
                    ("initial_space_sample", "uniform in round 1's initial space (no search)")):
    if not all(key in s["ablation"] for _, s in runs):
      continue
    vals = [s["ablation"][key]["mean"] for _, s in runs]
    vm, vh = stats.mean_ci(vals)
    diffs = [p - v for p, v in zip(picks, vals)]
    dm, dh = stats.mean_ci(diffs)
    t, p_pair = stats.paired_t_test(picks, vals)
    _, p_rand = stats.welch_t_test(vals, rand, alternative="greater")
    print(f"    {what}: {100 * vm:.2f} ± {100 * vh:.2f} %, {100 * (vm - rm):+.2f} points over "
          f"random (Welch one-sided p {p_rand:.3f}); final pick − it {100 * dm:+.2f} ± "
          f"{100 * dh:.2f} points (paired t = {t:.2f}, two-sided p = {p_pair:.3f}); the final "
          f"pick is higher in {sum(d > 0 for d in diffs)} of {len(diffs)} searches")
    out[key] = {"values": vals, "mean": vm, "ci95": vh, "minus_random": vm - rm,
                "welch_p_greater_than_random": p_rand, "pick_minus_variant": dm,
                "pick_minus_variant_ci95": dh, "paired_t": t, "paired_p": p_pair}
  if "space_sample" in out and "initial_space_sample" in out:
    # Does the evolved space itself help? The same draw in the last space and in round 1's.
    last, first = out["space_sample"]["values"], out["initial_space_sample"]["values"]
    diffs = [a - b for a, b in zip(last, first)]
    dm, dh = stats.mean_ci(diffs)
    t, p_pair = stats.paired_t_test(last, first)
    print(f"    uniform in the last space − uniform in round 1's: {100 * dm:+.2f} ± "
          f"{100 * dh:.2f} points (paired t = {t:.2f}, two-sided p = {p_pair:.3f}); higher "
          f"in {sum(d > 0 for d in diffs)} of {len(diffs)} searches")
    out["last_minus_initial_space"] = {"mean": dm, "ci95": dh, "paired_t": t,
                                       "paired_p": p_pair}
  return out


def nse_vs_random(fv, cfg, runner, table, macro, lo, hi, final):
  """(b): the final pick against --num_random random architectures of the full pool in the
  interval, --seeds seeds each; the summary entry (its seed noise feeds (a)'s ceiling)."""
  nse = final.with_scale(cfg["scale"])
  nse_mean, nse_accs = runner.mean(nse, fv.seeds)
  print(f"(b) NSE vs random at equal cost, {fv.seeds} seeds per network")
  print(f"  NSE   {table.arch_cost(nse):6.1f}  {100 * nse_mean:6.2f} %  "
        f"({', '.join(f'{100 * x:.2f}' for x in nse_accs)})  {nse.to_compact()}")
  rng = np.random.default_rng(fv.seed)
  rand_means, rand_groups, rand_keys = [], [], []
  for _ in range(fv.num_random):
    a = random_in_interval(cfg["space"], macro, table, lo, hi, cfg["max_ops"], rng)
    rand_keys.append(a.to_compact())
    m, accs = runner.mean(a, fv.seeds)
    rand_means.append(m)
    rand_groups.append(accs)
    print(f"  rand  {table.arch_cost(a):6.1f}  {100 * m:6.2f} %  "
          f"({', '.join(f'{100 * x:.2f}' for x in accs)})  {a.to_compact()}", flush=True)
  rm, rh = stats.mean_ci(rand_means)
  between = stats.stdev(rand_means)
  within = stats.pooled_seed_stdev(rand_groups + [nse_accs])
  beats = nse_mean >= rm + rh
  print(f"  random: {100 * rm:.2f} ± {100 * rh:.2f} % (mean ± 95 % CI, n={len(rand_means)}); "
        f"NSE {100 * nse_mean:.2f} %: {'above' if beats else 'NOT above'} the CI "
        f"(NSE − random mean = {100 * (nse_mean - rm):+.2f} points); "
        f"NSE beats {sum(nse_mean > m for m in rand_means)}/{len(rand_means)}")
  if math.isnan(within):    # one seed per network: no seed noise measured
    print(f"  std across random architectures {100 * between:.2f} points; across training "
          "seeds: not measured (--seeds=1)")
  else:
    print(f"  std across random architectures {100 * between:.2f} points, across training "
          f"seeds {100 * within:.2f} points (ratio {between / within:.1f})")
  # Cost-matched view: inside the interval accuracy still grows with cost, so compare NSE
  # with the random architectures' least-squares line accuracy ~ cost at NSE's cost.
  rand_costs = [table.arch_cost(arch_lib.Architecture.from_compact(k)) for k in rand_keys]
  slope, icpt = np.polyfit(rand_costs, rand_means, 1)
  resid = np.asarray(rand_means) - (icpt + slope * np.asarray(rand_costs))
  nse_cost = table.arch_cost(nse)
  nse_resid = nse_mean - (icpt + slope * nse_cost)
  resid_sd = stats.stdev(resid.tolist()) * np.sqrt((len(resid) - 1) / max(1, len(resid) - 2))
  print(f"  cost-matched: random line {100 * slope * 10:+.2f} points per 10 {table.unit}; "
        f"at NSE's cost ({nse_cost:.1f}, random mean cost {np.mean(rand_costs):.1f}) it "
        f"predicts {100 * (icpt + slope * nse_cost):.2f} %, NSE is {100 * nse_resid:+.2f} "
        f"points off it (random residual std {100 * resid_sd:.2f})\n")
  return {
      "nse": {"arch": nse.to_compact(), "cost": table.arch_cost(nse), "accuracies": nse_accs,
              "mean": nse_mean},
      "random": [{"arch": k, "accuracies": g, "mean": m}
                 for k, g, m in zip(rand_keys, rand_groups, rand_means)],
      "random_mean": rm, "random_ci95": rh, "nse_above_ci": bool(beats),
      "random_costs": rand_costs, "cost_matched_residual": float(nse_resid),
      "random_residual_std": float(resid_sd),
      "std_between_architectures": between, "std_between_seeds": within}


def _nan_to_null(x):
  """`x` with every NaN or infinity (e.g. seed noise with one seed per network) as None:
  strict JSON (json.dumps writes NaN and Infinity, which jq and most parsers other than
  Python's reject)."""
  if isinstance(x, float) and not math.isfinite(x):
    return None
  if isinstance(x, dict):
    return {k: _nan_to_null(v) for k, v in x.items()}
  if isinstance(x, (list, tuple)):
    return [_nan_to_null(v) for v in x]
  return x


def main(argv, fv: flags.FlagValues = flags.FLAGS):
  del argv
  if fv.aggregate:
    aggregate(fv.aggregate)
    return
  if not fv.search_dir:
    raise cli.UsageError("--search_dir is required (the --output_dir of a finished search), "
                         "or --aggregate=DIR,DIR,…")
  out = fv.search_dir
  cfg = _read_json(out, "config.json")
  state = _read_json(out, "state.json")
  if state.get("phase") != "done":
    raise cli.UsageError(f"{out} is not a finished search (phase {state.get('phase')!r}); "
                         "run the same search command again to finish it")
  macro = cfg["macro"] or spaces.DEFAULT_MACRO[cfg["space"]]
  lo, hi = (float(v) for v in cfg["interval"])
  final = arch_lib.Architecture.load(os.path.join(out, "final_arch.json"))
  runner = Runner(cfg, os.path.join(out, "search_quality_runs.jsonl"), fv, fv.image_size,
                  fv.known_runs)
  table = cost.CostTable(cfg["space"], macro, cfg["cost_resolution"], cfg["scale"],
                         num_classes=runner.data.info.num_classes)
  rounds = len(state["history"])
  if fv.num_rank > 0 and (fv.rank_round or 1) > rounds:
    raise cli.UsageError(f"--rank_round={fv.rank_round}: the search in {out} ran {rounds} "
                         f"round(s); pick one of 1 to {rounds}")
  fixed = fv.fixed_cost if fv.fixed_cost is not None else hi
  t_start = time.time()
  print(f"search {out}: {cfg['dataset']} at {cfg['image_size']}px, {cfg['space']}@{macro}, "
        f"K={cfg['max_ops']}, {rounds} rounds, interval ({lo:g}, {hi:g}) {table.unit}")
  print(f"every network at {runner.size}px: {fv.steps} steps of {fv.batch}, SGD Nesterov "
        f"lr {fv.lr} cosine, weight decay {fv.weight_decay}; top-1 on the "
        f"{runner.data.info.num_validation} validation images (never used by the search)\n")
  summary = {"search_dir": os.path.abspath(out), "budget": {
      "steps": fv.steps, "batch": fv.batch, "lr": fv.lr,
      "weight_decay": fv.weight_decay, "seeds": fv.seeds, "image_size": runner.size}}

  # (b) NSE vs random; --num_random=0 skips it (e.g. (a) alone on another search).
  within = None
  if fv.num_random < 1:
    print("(b) NSE vs random: skipped (--num_random=0)\n")
  else:
    summary["nse_vs_random"] = nse_vs_random(fv, cfg, runner, table, macro, lo, hi, final)
    within = summary["nse_vs_random"]["std_between_seeds"]

  # (a) Rank fidelity on a round's candidates, or on uniform draws of its space.
  if fv.num_rank < 1:
    print("(a) rank fidelity: skipped (--num_rank=0)\n")
  else:
    summary["rank_fidelity"] = rank_fidelity(fv, out, cfg, runner, table, macro, lo, hi,
                                             rounds, seed_sd=within)

  if fv.ablation:
    summary["ablation"] = ablation(fv, out, cfg, runner, table, rounds)

  # (c) Rounds.
  per_round = []
  print(f"(c) rounds: the front's best architecture at cost <= {fixed:g}")
  for r in range(1, rounds + 1):
    front = [x for x in read_candidates(out, r) if x["is_pareto"] == "1" and x["cost"] <= fixed]
    if not front:
      print(f"  round {r}: no front architecture at cost <= {fixed:g}")
      continue
    best = max(front, key=lambda x: x["accuracy"])
    entry = {"round": r, "arch": best["arch"], "cost": best["cost"],
             "supernet": best["accuracy"]}
    line = (f"  round {r}: {best['cost']:6.1f}  supernet {100 * best['accuracy']:6.2f} %")
    if fv.rounds:
      m, accs = runner.mean(arch_lib.Architecture.from_compact(best["arch"]), fv.seeds)
      entry.update(standalone=accs, standalone_mean=m)
      line += f"  standalone {100 * m:6.2f} % ({', '.join(f'{100 * x:.2f}' for x in accs)})"
    print(line + f"  {best['arch']}", flush=True)
    per_round.append(entry)
  summary["rounds"] = per_round
  summary["networks_trained"] = runner.trained
  summary["networks_from_cache"] = len(runner.used) - runner.trained
  summary["seconds"] = round(time.time() - t_start, 1)
  # A part skipped in this run keeps what an earlier run with the same budget measured
  # (e.g. (b), then (a) alone: --aggregate still finds (b)).
  path = os.path.join(out, "search_quality.json")
  try:
    with open(path, encoding="utf-8") as f:
      before = json.load(f)
  except (OSError, ValueError):
    before = {}
  if isinstance(before, dict) and before.get("budget") == summary["budget"]:
    kept = [k for k in ("nse_vs_random", "rank_fidelity", "ablation")
            if k in before and k not in summary]
    for k in kept:
      summary[k] = before[k]
    if kept:
      print(f"kept in {path} from an earlier run with the same budget: {', '.join(kept)}")
  fileio.atomic_write_text(path, json.dumps(_nan_to_null(summary), indent=1, allow_nan=False))
  known = f", {runner.from_known} of them from --known_runs" if runner.from_known else ""
  print(f"\n{runner.trained} networks trained in {runner.seconds / 60:.1f} min "
        f"({len(runner.used) - runner.trained} more read from the cache{known}); wall "
        f"{(time.time() - t_start) / 60:.1f} min; wrote {out}/search_quality.json")


if __name__ == "__main__":
  cli.run(main, define_flags)
