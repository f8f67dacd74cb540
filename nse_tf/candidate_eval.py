"""Evaluating a round's candidates in its supernet (SPEC §5.3): BN recalibration, then top-1
on the held-out split, and whether the candidates' ranking is above noise.

  CandidateEvaluator       fixed gates, inherited weights, BN statistics reset and
                           re-estimated on training batches, held-out accuracy (and mean
                           cross-entropy, which diagnostics may rank by; the search ranks
                           by accuracy, as the paper does)
  eval_count               how many held-out examples a candidate sees
  split_half_reliability   how well the candidates' accuracies on the even held-out batches
                           predict those on the odd ones
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Dict, Optional, Sequence, Tuple

import numpy as np

if TYPE_CHECKING:
  from nse_tf.evolution import SearchConfig


def eval_count(data, cfg: SearchConfig) -> int:
  """Held-out examples each candidate is evaluated on."""
  n = data.info.num_holdout
  return min(n, cfg.eval_examples) if cfg.eval_examples else n


def split_half_reliability(halves: Sequence[Tuple[float, float]]) -> Dict[str, Any]:
  """Is the candidates' ranking above noise? Their split-half reliability.

  halves: per candidate its accuracy on the even and on the odd held-out batches (two
  independent samples of examples, same weights and BN recalibration). r is the Pearson
  correlation of the two across candidates; `reliability` = 2r / (1 + r) (Spearman-Brown)
  estimates the correlation of the full-set accuracies with those on another held-out set
  of the same size (None where r <= 0). The ranking is called above noise when the 95 %
  lower bound of r (Fisher z) is above 0. Recalibration noise is shared by both halves, so it is not
  counted as noise here.
  """
  out = {"r": None, "r_low95": None, "reliability": None,
         "text": "split-half reliability: not enough candidates or held-out batches"}
  if len(halves) < 5:
    return out
  a = np.asarray([h[0] for h in halves])
  b = np.asarray([h[1] for h in halves])
  if a.std() == 0 or b.std() == 0:
    return out
  r = float(np.corrcoef(a, b)[0, 1])
  z = np.arctanh(np.clip(r, -0.999999, 0.999999))
  low = float(np.tanh(z - 1.96 / np.sqrt(len(halves) - 3)))
  # Spearman-Brown extrapolates a positive correlation; for r <= 0 (halves that agree
  # no better than chance) it would give values below -1, not a reliability.
  rel = 2 * r / (1 + r) if r > 0 else None
  verdict = "ranked above noise" if low > 0 else "ranking not distinguishable from noise"
  out.update(r=r, r_low95=low, reliability=rel,
             text=f"split-half r = {r:.2f} (95 % lower bound {low:.2f}), "
                  + (f"reliability {rel:.2f}" if rel is not None else "no reliability (r <= 0)")
                  + f" over {len(halves)} candidates: {verdict}")
  return out


class CandidateEvaluator:
  """Fixed-gate evaluation through the supernet: no rebuild, no retrace per candidate.

  BN recalibration: every BN's statistics are reset to zero and re-estimated over
  `bn_recal_batches` training batches in training mode; the exponential average is
  bias-corrected by 1/(1 − momentum^n), i.e. a proper (recency-weighted) average
  however few batches are used.
  """

  def __init__(self, trainer, data, cfg: SearchConfig, start_index: int = 0,
               local: bool = False):
    """local: this worker alone, whole batches on each of its replicas, no collectives
    (each worker evaluates its own share of the candidates: `--split_evaluation`);
    otherwise every candidate over all replicas of the strategy, batches split. Under the
    default strategy both compute the same."""
    import tensorflow as tf  # pylint: disable=g-import-not-at-top
    self.tf = tf
    self.model = trainer.model
    self.strategy = trainer.strategy
    self.cfg = cfg
    self.bns = self.model.bn_layers()
    self.n_recal = max(1, cfg.bn_recal_batches)
    gb = trainer.cfg.global_batch
    recal_fn = data.dataset_fn("train", gb, seed=cfg.seed + 17)
    skip = start_index * self.n_recal
    eval_batch = cfg.eval_batch
    n = self.num_eval = eval_count(data, cfg)
    model, strategy = self.model, self.strategy

    def eval_counts(x, y, gates):
      logits = model(x, gates=gates, training=False)
      pred = tf.argmax(logits, -1, output_type=tf.int32)
      labels = tf.cast(y, tf.int32)
      hit = tf.cast(tf.equal(pred, labels), tf.float32)
      nll = tf.nn.sparse_softmax_cross_entropy_with_logits(labels, tf.cast(logits, tf.float32))
      return tf.stack([tf.reduce_sum(hit), tf.cast(tf.size(hit), tf.float32),
                       tf.reduce_sum(nll)])

    # In split mode (`local`) the steps still run inside strategy.run, each local replica
    # given the whole batch: in a replica context the batch norms' statistics (ON_READ
    # variables) are read and written on the replica alone, while in a cross-replica
    # context every read of them would be an all-reduce over the workers, each busy with
    # another candidate.
    if local:
      self.recal_iter = iter(recal_fn(tf.distribute.InputContext()).skip(skip))
      self.eval_ds = (data.holdout(eval_batch, repeat=False, shuffle=False).unbatch().take(n)
                      .batch(eval_batch))
    else:
      self.recal_iter = iter(strategy.distribute_datasets_from_function(
          lambda ctx: recal_fn(ctx).skip(
              skip * ctx.num_replicas_in_sync // ctx.num_input_pipelines)))
      self.eval_ds = strategy.distribute_datasets_from_function(
          lambda ctx: data.holdout(eval_batch, repeat=False, shuffle=False,
                                   input_context=ctx).unbatch().take(n // ctx.num_input_pipelines)
          .batch(ctx.get_per_replica_batch_size(eval_batch)))

    @tf.function(autograph=False)
    def recal_step(iterator, gates):
      images, _ = next(iterator)
      strategy.run(lambda x: model(x, gates=gates, training=True), args=(images,))

    # A held-out set that fits in 1 GiB is decoded once and kept: every candidate
    # is evaluated on the same batches without rebuilding the input pipeline.
    size = self.num_eval * cfg.image_size ** 2 * 3 * 4   # float32 bytes
    self.eval_batches = list(self.eval_ds) if size <= 1 << 30 else None
    # One trace serves every batch, and it can be made ahead, without a batch in hand:
    # where the kept batches all have one shape, the signature is theirs (the graph
    # optimised for that batch size); otherwise (a smaller last batch, where eval_batch
    # does not divide the held-out examples, or a set not kept) the dataset's spec, whose
    # batch size is unknown, rather than a second trace and compile for the last batch
    # while the round waits.
    specs = [tuple(tf.type_spec_from_value(t) for t in b) for b in self.eval_batches or ()]
    batch_spec = (specs[0] if specs and all(sp == specs[0] for sp in specs)
                  else self.eval_ds.element_spec)

    self._gates_spec = tf.TensorSpec([self.model.total_ops], tf.float32)

    @tf.function(autograph=False, input_signature=[*batch_spec, self._gates_spec])
    def eval_step(images, labels, gates):
      counts = strategy.run(eval_counts, args=(images, labels, gates))
      if local:
        return strategy.experimental_local_results(counts)[0]
      return strategy.reduce(tf.distribute.ReduceOp.SUM, counts, axis=None)

    self.recal_step, self.eval_step = recal_step, eval_step
    scale = self._scale_bn_stats
    self.scale_bn = tf.function(
        (lambda f: strategy.run(scale, args=(f,))) if local else scale, autograph=False)

  def trace(self) -> None:
    """Traces the recalibration, BN-scaling and evaluation steps without running them
    (e.g. in a thread while the round trains: `RoundTrainer.train(trace_also=…)`)."""
    tf = self.tf
    self.recal_step.get_concrete_function(self.recal_iter, self._gates_spec)
    self.scale_bn.get_concrete_function(tf.TensorSpec([], tf.float32))
    self.eval_step.get_concrete_function()

  def skip_candidate(self):
    """Passes over one candidate's recalibration batches (another worker evaluates it), so
    that every candidate recalibrates on the same batches however the work is split."""
    for _ in range(self.n_recal):
      next(self.recal_iter)

  def _scale_bn_stats(self, factor: float):
    for bn in self.bns:
      f = self.tf.cast(factor, bn.moving_mean.dtype)   # float64 statistics in tests
      bn.moving_mean.assign(bn.moving_mean * f)
      bn.moving_variance.assign(bn.moving_variance * f)

  def accuracy(self, gates: np.ndarray) -> float:
    tf = self.tf
    g = tf.constant(gates, tf.float32)   # the steps' signature
    self.scale_bn(tf.constant(0.0))           # reset every statistic to zero
    for _ in range(self.n_recal):
      self.recal_step(self.recal_iter, g)
    momentum = self.bns[0].momentum if self.bns else 0.0
    self.scale_bn(tf.constant(1.0 / (1.0 - momentum ** self.n_recal)))  # bias correction
    # Correct/seen counts (and summed cross-entropy) of the even and the odd batches kept
    # apart: the two halves are independent samples of held-out examples, and how well
    # the candidates' accuracies on one half predict those on the other is the ranking's
    # split-half reliability.
    counts = np.zeros((2, COUNTS))
    batches = self.eval_batches if self.eval_batches is not None else self.eval_ds
    for b, (images, labels) in enumerate(batches):
      counts[b % 2] += self.eval_step(images, labels, g).numpy()
    self.last_counts = counts
    acc, self.last_halves, self.last_loss = from_counts(counts, self.num_eval)
    return acc


COUNTS = 3   # per half of the held-out batches: correct, seen, summed cross-entropy


def from_counts(counts, num_eval: int
                ) -> Tuple[float, Optional[Tuple[float, float]], float]:
  """(accuracy, (even-half, odd-half) accuracy or None, mean cross-entropy) from a
  candidate's [[correct, seen, summed cross-entropy] of the even batches, [the same] of
  the odd ones]."""
  counts = np.asarray(counts, np.float64)
  halves = tuple(float(c / n) for c, n, _ in counts) if counts[1, 1] > 0 else None
  n = max(1, num_eval)
  return float(counts[:, 0].sum() / n), halves, float(counts[:, 2].sum() / n)
