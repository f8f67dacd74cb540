"""Figures of a search: the end-of-round Pareto plot and the search-space evolution.

`plot_pareto` draws one round's evaluated samples and their front (like Fig. 6 of the
NSE paper); `plot_space_evolution` draws, round by round, which ops every layer held,
lost and passed on (like Fig. 5).

Matplotlib is imported lazily and only through `matplotlib.figure.Figure` with the Agg
canvas: no pyplot, no global figure registry, no GUI backend, so the functions are safe
in headless jobs and threads and never leak open figures. Every PNG is written
atomically: rendered to a temporary file in the destination directory, then moved over
the destination with `os.replace`; on any failure the temporary file is removed and the
destination is left untouched. The destination directory must exist.
"""

from __future__ import annotations

import math
from typing import Dict, List, Optional, Tuple

from nse_tf import fileio

DPI = 120

# Cell states of the space-evolution grid.
_ABSENT, _SURVIVED, _PRUNED, _INHERITED = 0, 1, 2, 3
_STATE_COLOURS = ("#ffffff", "#f2c14e", "#d1495b", "#2e8b57")
_STATE_LABELS = (
    "not in S_l",
    "survived, in no front arch",
    "pruned this round",
    "inherited (in A_l)",
)


def _new_figure(width: float, height: float):
  from matplotlib.backends.backend_agg import FigureCanvasAgg
  from matplotlib.figure import Figure

  fig = Figure(figsize=(width, height), dpi=DPI)
  FigureCanvasAgg(fig)
  return fig


def _save_atomic(fig, path) -> str:
  """Render `fig` as PNG to `path` via a temporary file in the same directory."""
  try:
    return fileio.atomic_write(path, lambda f: fig.savefig(f, format="png", dpi=DPI),
                               binary=True, makedirs=False)
  finally:
    fig.clear()


def _pairs(points, what: str) -> Tuple[List[float], List[float]]:
  xs, ys = [], []
  for k, p in enumerate(points or ()):
    try:
      x, y = p
      x, y = float(x), float(y)
    except (TypeError, ValueError):
      raise ValueError(f"{what}[{k}] is not a (cost, acc) pair: {p!r}") from None
    xs.append(x)
    ys.append(y)
  return xs, ys


def _percent_scale(*acc_lists) -> float:
  """100 when the accuracies are fractions (all within [0, 1]), else 1 (already %)."""
  values = [v for accs in acc_lists for v in accs]
  return 100.0 if values and max(abs(v) for v in values) <= 1.0 else 1.0


def plot_pareto(path, samples, edges, prev_front, front, lo, hi, *, title: str = "",
                cost_unit: str = "MFLOPs", acc_percent: Optional[bool] = None) -> str:
  """Scatter one round's evaluations and draw their Pareto front; writes a PNG at `path`.

  samples, edges, prev_front, front: lists of (cost, accuracy) pairs -- the sampled
  architectures inside (lo, hi), the edge samples in (lo - δ, lo], the re-evaluated
  previous front, and the front itself (drawn as a step line: the best accuracy reachable
  at each cost). lo, hi: the cost interval, drawn as labelled dashed vertical lines.
  Accuracy is shown in %: fractions are multiplied by 100 (`acc_percent=None` guesses from
  the data: all values ≤ 1 means fractions; True/False says the data is already in % or not).
  Returns the path written.
  """
  sx, sy = _pairs(samples, "samples")
  ex, ey = _pairs(edges, "edges")
  px, py = _pairs(prev_front, "prev_front")
  fx, fy = _pairs(front, "front")
  lo, hi = float(lo), float(hi)
  if acc_percent is None:
    scale = _percent_scale(sy, ey, py, fy)
  else:
    scale = 1.0 if acc_percent else 100.0
  sy, ey, py, fy = ([v * scale for v in ys] for ys in (sy, ey, py, fy))
  order = sorted(range(len(fx)), key=lambda i: (fx[i], -fy[i]))
  fx, fy = [fx[i] for i in order], [fy[i] for i in order]

  fig = _new_figure(8.0, 5.6)
  ax = fig.add_subplot(1, 1, 1)
  if sx:
    ax.scatter(sx, sy, s=9, c="#6f8fb3", alpha=0.55, linewidths=0,
               label=f"samples in ({lo:g}, {hi:g}) [{len(sx)}]", zorder=2)
  if ex:
    ax.scatter(ex, ey, s=22, c="#e07b39", marker="^", alpha=0.8, linewidths=0,
               label=f"edge samples (≤ {lo:g}) [{len(ex)}]", zorder=3)
  if px:
    ax.scatter(px, py, s=46, facecolors="none", edgecolors="#7b3fa0", marker="D",
               linewidths=1.2, label=f"previous front, re-evaluated [{len(px)}]", zorder=4)
  if fx:
    ax.plot(fx, fy, drawstyle="steps-post", color="#c0392b", linewidth=1.6, zorder=5)
    ax.scatter(fx, fy, s=58, c="#c0392b", edgecolors="black", linewidths=0.7,
               label=f"Pareto front [{len(fx)}]", zorder=6)

  ax.axvline(lo, color="0.25", linestyle="--", linewidth=1.1, zorder=1)
  ax.axvline(hi, color="0.25", linestyle="--", linewidth=1.1, zorder=1)
  all_x = sx + ex + px + fx + [lo, hi]
  all_y = sy + ey + py + fy
  x_min, x_max = min(all_x), max(all_x)
  pad = 0.04 * (x_max - x_min or 1.0)
  ax.set_xlim(x_min - pad, x_max + pad)
  if all_y:
    y_min, y_max = min(all_y), max(all_y)
    ypad = 0.06 * (y_max - y_min or 1.0)
    ax.set_ylim(y_min - ypad, y_max + 2.5 * ypad)
  trans = ax.get_xaxis_transform()
  for x, name, ha in ((lo, "lo", "left"), (hi, "hi", "right")):  # inside (lo, hi)
    ax.text(x, 0.985, f" {name} = {x:g} ", transform=trans, ha=ha, va="top", fontsize=9,
            color="0.15", bbox=dict(boxstyle="round,pad=0.2", fc="white", ec="0.6", lw=0.6),
            zorder=7)

  ax.set_xlabel(f"cost ({cost_unit})" if cost_unit else "cost", fontsize=11)
  ax.set_ylabel("top-1 accuracy (%)", fontsize=11)
  ax.set_title(title or "Pareto front of the round's evaluations", fontsize=12)
  ax.grid(True, color="0.9", linewidth=0.6, zorder=0)
  ax.set_axisbelow(True)
  if ax.get_legend_handles_labels()[0]:
    ax.legend(loc="lower right", fontsize=9, framealpha=0.92)
  fig.tight_layout()
  return _save_atomic(fig, path)


def _round_grid(rnd: Dict, r: int, pool_index: Dict[str, int], num_layers: int):
  """(grid of cell states, set of (layer, op) cells, counts) for one round."""
  for key in ("working_sets", "pruned", "inherited"):
    if key not in rnd:
      raise ValueError(f"rounds[{r}] lacks {key!r}")
    if len(rnd[key]) != num_layers:
      raise ValueError(f"rounds[{r}][{key!r}] has {len(rnd[key])} layers, "
                       f"expected {num_layers}")

  def cells(key):
    out = set()
    for layer, names in enumerate(rnd[key]):
      for name in names or ():
        if name not in pool_index:
          raise ValueError(f"rounds[{r}][{key!r}][{layer}]: op {name!r} is not in the pool")
        out.add((layer, pool_index[name]))
    return out

  working, pruned, inherited = cells("working_sets"), cells("pruned"), cells("inherited")
  grid = [[_ABSENT] * len(pool_index) for _ in range(num_layers)]
  for layer, j in working:
    grid[layer][j] = _SURVIVED
  for layer, j in pruned:
    grid[layer][j] = _PRUNED
  for layer, j in inherited:
    grid[layer][j] = _INHERITED
  return grid, working, (len(working), len(pruned), len(inherited))


def plot_space_evolution(path, rounds, pool, num_layers, *, title: str = "") -> str:
  """Draw the working sets of every layer round by round; writes a PNG at `path`.

  rounds: one dict per round with, per layer (lists of length `num_layers`),
    "working_sets": the op names in S_l at the START of the round,
    "pruned":       the op names pruned during the round,
    "inherited":    the op names in A_l at the end of the round.
  pool: the op names in pool order (x axis). One panel per round, stacked vertically with
  a shared x axis: rows are layers (L00 at the top, numbered as the search log and
  `Architecture.to_text` number them), columns pool ops; a cell is white
  (not in S_l), green (inherited into A_l), red (pruned) or yellow (survived but in no
  front architecture). From round 2 on a black dot marks the ops new to S_l that round
  (the refill from the layer's queue). Raises ValueError for no rounds or inconsistent
  data. Returns the path written.
  """
  rounds = list(rounds or ())
  if not rounds:
    raise ValueError("plot_space_evolution needs at least one round (rounds is empty)")
  pool = [str(p) for p in pool]
  if not pool:
    raise ValueError("the op pool is empty")
  if len(set(pool)) != len(pool):
    raise ValueError("the op pool holds duplicate names")
  num_layers = int(num_layers)
  if num_layers <= 0:
    raise ValueError(f"num_layers must be positive, got {num_layers}")
  pool_index = {name: j for j, name in enumerate(pool)}
  grids, workings, counts = [], [], []
  for r, rnd in enumerate(rounds):
    grid, working, count = _round_grid(rnd, r, pool_index, num_layers)
    grids.append(grid)
    workings.append(working)
    counts.append(count)

  from matplotlib.colors import BoundaryNorm, ListedColormap
  from matplotlib.patches import Patch

  n_ops, n_rounds = len(pool), len(rounds)
  cell_w, cell_h = 0.2, 0.16                 # inches per op column / layer row
  axis_h = max(1.6, cell_h * num_layers)
  gap = 0.42                                 # room for each panel's title
  panel_h = axis_h + gap
  label_h = 0.05 * max(len(p) for p in pool) + 0.5
  width = max(8.0, cell_w * n_ops + 1.6)
  n_handles = 5 if n_rounds > 1 else 4
  legend_cols = n_handles if width >= 11 else 3
  legend_rows = -(-n_handles // legend_cols)
  header_h = 0.85 + 0.2 * legend_rows
  height = header_h + n_rounds * panel_h - gap + label_h
  fig = _new_figure(width, height)
  # No sharex: shared locators would build every op's tick on every panel (slow); the
  # panels still line up column for column (same width, same x limits).
  axes = fig.subplots(n_rounds, 1, squeeze=False)[:, 0]
  fig.subplots_adjust(left=1.1 / width, right=1 - 0.35 / width,
                      top=1 - header_h / height, bottom=label_h / height,
                      hspace=gap / axis_h)

  cmap = ListedColormap(_STATE_COLOURS)
  norm = BoundaryNorm([-0.5, 0.5, 1.5, 2.5, 3.5], cmap.N)
  layer_ticks = list(range(num_layers))
  label_every = 1 if num_layers <= 30 else int(math.ceil(num_layers / 30))
  for r, ax in enumerate(axes):
    ax.imshow(grids[r], cmap=cmap, norm=norm, aspect="auto", interpolation="nearest",
              origin="upper", extent=(-0.5, n_ops - 0.5, num_layers - 0.5, -0.5))
    # Cell borders as two line collections (cheaper than minor-tick grids).
    ax.vlines([j - 0.5 for j in range(n_ops + 1)], -0.5, num_layers - 0.5,
              colors="0.82", linewidths=0.4, zorder=2)
    ax.hlines([i - 0.5 for i in range(num_layers + 1)], -0.5, n_ops - 0.5,
              colors="0.82", linewidths=0.4, zorder=2)
    ax.set_xlim(-0.5, n_ops - 0.5)
    ax.set_ylim(num_layers - 0.5, -0.5)
    ax.set_xticks([])
    ax.set_yticks(layer_ticks[::label_every])
    ax.set_yticklabels([f"L{i:02d}" for i in layer_ticks[::label_every]], fontsize=6)
    ax.set_ylabel("layer", fontsize=8)
    if r > 0:
      new = sorted(workings[r] - workings[r - 1])
      if new:
        ax.scatter([j for _, j in new], [layer for layer, _ in new], s=5, c="black",
                   marker="o", linewidths=0, zorder=3)
    s, p, a = counts[r]
    new_txt = f", {len(workings[r] - workings[r - 1])} new" if r > 0 else ""
    ax.set_title(f"Round {r + 1}: {s} ops in working sets{new_txt}, {p} pruned, "
                 f"{a} inherited", fontsize=9, loc="left")
  bottom = axes[-1]
  bottom.set_xticks(range(n_ops))
  bottom.set_xticklabels(pool, rotation=90, fontsize=6.5, family="monospace")
  bottom.set_xlabel("op (pool order)", fontsize=8)

  handles = [Patch(facecolor=c, edgecolor="0.5", linewidth=0.5, label=l)
             for c, l in zip(_STATE_COLOURS, _STATE_LABELS)]
  if n_rounds > 1:
    from matplotlib.lines import Line2D
    handles.append(Line2D([], [], marker="o", color="black", linestyle="none",
                          markersize=3, label="new in S_l this round (refill)"))
  fig.suptitle(title or "Search-space evolution", fontsize=12,
               y=1 - 0.12 / height, va="top")
  fig.legend(handles=handles, loc="upper center", ncol=legend_cols,
             fontsize=7.5, frameon=False, bbox_to_anchor=(0.5, 1 - 0.42 / height))
  return _save_atomic(fig, path)
