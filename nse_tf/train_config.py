"""The hyper-parameters of one round of supernet training (SPEC §4), without TensorFlow.

`TrainConfig` is what `nse_tf.trainer.RoundTrainer` runs; the commands build it from their
flags (common_flags.train_config) and check it before TensorFlow starts.
"""

from __future__ import annotations

import dataclasses
from typing import Optional, Tuple

from nse_tf import errors


# Weight-step gate sampling (--gate_sampling): p = 0.5 per op (SPEC §4, the default);
# θ-based; the number of active ops uniform; p = 0.5 paths redrawn until their cost lies
# in the search's interval.
GATE_SAMPLING = ("uniform", "theta", "count", "interval")


class ConfigError(errors.NSEError):
  """A training configuration that cannot run; reported as one line by the CLIs."""


@dataclasses.dataclass
class LoopConfig:
  """What the training-loop core (nse_tf/loop.py) reads: schedule, SGD, precision,
  checkpoints. Shared by the round (TrainConfig, SPEC §4 defaults) and the retrain
  (retrainer.RetrainConfig, SPEC §6 defaults); each redeclares the defaults it differs in.
  """
  global_batch: int = 1024
  epochs: float = 100.0
  steps_per_epoch: Optional[int] = None   # default: num_train // global_batch
  lr: float = 0.4
  warmup_epochs: float = 2.0
  warmup_start_lr: float = 0.1
  momentum: float = 0.9
  nesterov: bool = True
  weight_decay: float = 4e-5
  mixed_precision: Optional[str] = None    # None, 'bfloat16' or 'float16'
  sync_bn: bool = False
  checkpoint_every: int = 200
  log_every: int = 20
  seed: int = 0
  progress: bool = True

  def validate_loop(self, error=ConfigError) -> None:
    """Raises `error` naming the flag of the first loop setting that cannot run."""
    if self.global_batch < 1 or self.epochs <= 0:
      raise error(f"--global_batch and --epochs must be positive (got {self.global_batch}, "
                  f"{self.epochs})")
    if self.steps_per_epoch is not None and self.steps_per_epoch < 1:
      raise error(f"--steps_per_epoch must be >= 1, got {self.steps_per_epoch}")
    if self.lr <= 0 or self.weight_decay < 0:
      raise error("--lr must be > 0 and --weight_decay >= 0")
    if self.mixed_precision not in (None, "", "bfloat16", "float16"):
      raise error(f"--mixed_precision must be bfloat16 or float16, got {self.mixed_precision!r}")
    if self.checkpoint_every < 1 or self.log_every < 1:
      raise error("--checkpoint_every and --log_every must be >= 1")


@dataclasses.dataclass
class TrainConfig(LoopConfig):
  """Hyper-parameters of one round; SPEC §4 values as defaults (LoopConfig's)."""
  skip_off_ops: bool = False               # off ops get no momentum/decay update
  gate_sampling: str = "uniform"           # 'uniform' (p = 0.5), 'theta', 'count', 'interval'
  # 'interval': the search's cost interval (lo, hi), in the cost table's unit; the
  # search sets it for every round.
  gate_interval: Optional[Tuple[float, float]] = None
  theta_every: int = 2
  theta_lr: float = 0.005
  theta_beta1: float = 0.0
  theta_beta2: float = 0.999
  alpha: float = 1e-5
  beta: float = 2.0
  tau: float = 300.0
  prune_threshold: float = -2.0

  def validate(self):
    self.validate_loop(ConfigError)
    if self.gate_sampling not in GATE_SAMPLING:
      raise ConfigError(f"gate_sampling must be one of {', '.join(GATE_SAMPLING)}; got "
                        f"{self.gate_sampling!r}")
    if self.theta_every < 1:
      raise ConfigError(f"theta_every must be >= 1, got {self.theta_every}")
    if self.beta <= 0:
      raise ConfigError(f"beta must be > 0, got {self.beta}")
