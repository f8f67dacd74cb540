"""Exponential moving average of a model's variables, for the retrain (SPEC §6: EMA 0.9999)."""

from __future__ import annotations


class EMA:
  """Exponential moving average of all model variables (weights and BN statistics).

  decay_t = min(decay, (1 + t) / (10 + t)) as in tf.train.ExponentialMovingAverage
  with num_updates, so short runs are not dominated by the initialisation.
  """

  def __init__(self, model, decay: float):
    import tensorflow as tf  # pylint: disable=g-import-not-at-top
    self.decay = float(decay)
    self.variables = list(model.variables)
    self.module = tf.Module(name="ema")
    self.module.shadow = [
        tf.Variable(v.read_value(), trainable=False, name=f"ema/{v.name.split(':')[0]}",
                    synchronization=tf.VariableSynchronization.ON_WRITE,
                    aggregation=tf.VariableAggregation.ONLY_FIRST_REPLICA)
        for v in self.variables]

  @property
  def shadow(self):
    return self.module.shadow

  def update(self, step):
    """Call in cross-replica context after the optimizer step; `step` counts updates."""
    import tensorflow as tf  # pylint: disable=g-import-not-at-top
    t = tf.cast(step, tf.float32)
    decay = tf.minimum(self.decay, (1.0 + t) / (10.0 + t))
    for s, v in zip(self.shadow, self.variables):
      s.assign(decay * s + (1.0 - decay) * tf.cast(v.read_value(), s.dtype))

  def swap(self):
    """Exchanges model and shadow values (twice = no change)."""
    for s, v in zip(self.shadow, self.variables):
      tmp = v.read_value()
      v.assign(s.read_value())
      s.assign(tmp)
