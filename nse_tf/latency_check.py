"""How far to trust a latency table: error statistics and the predicted-vs-measured plot.

Used by tools/check_latency_lut.py; Kendall's τ is nse_tf.stats.kendall_tau.
"""

from __future__ import annotations

from typing import Sequence

from nse_tf import fileio


def plot_check(path: str, predicted: Sequence[float], measured: Sequence[float],
               title: str) -> None:
  """Scatter of predicted vs measured latency with the y = x line (PNG, atomic)."""
  from matplotlib.backends.backend_agg import FigureCanvasAgg  # pylint: disable=g-import-not-at-top
  from matplotlib.figure import Figure  # pylint: disable=g-import-not-at-top
  fig = Figure(figsize=(5.5, 5), dpi=120)
  FigureCanvasAgg(fig)
  ax = fig.add_subplot(1, 1, 1)
  ax.scatter(measured, predicted, s=18, color="#1f77b4", label="architectures")
  lo, hi = min(min(predicted), min(measured)), max(max(predicted), max(measured))
  pad = 0.05 * (hi - lo or 1.0)
  ax.plot([lo - pad, hi + pad], [lo - pad, hi + pad], "k--", lw=1, label="y = x")
  ax.plot([lo - pad, hi + pad], [1.1 * (lo - pad), 1.1 * (hi + pad)], ":", color="grey", lw=1,
          label="±10 %")
  ax.plot([lo - pad, hi + pad], [0.9 * (lo - pad), 0.9 * (hi + pad)], ":", color="grey", lw=1)
  ax.set_xlabel("measured latency (ms)")
  ax.set_ylabel("predicted latency (ms)")
  ax.set_title(title, fontsize=9)
  ax.legend(loc="upper left", fontsize=8)
  fig.tight_layout()
  fileio.atomic_write(path, lambda f: fig.savefig(f, format="png"), binary=True)


def mape(predicted: Sequence[float], measured: Sequence[float]) -> float:
  """Mean absolute percentage error (%) of predictions against measurements."""
  if len(predicted) != len(measured) or not measured:
    raise ValueError("mape needs two equally long, non-empty sequences")
  return 100.0 * sum(abs(p - m) / m for p, m in zip(predicted, measured)) / len(measured)
