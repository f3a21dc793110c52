from .build import (StepSchedule, build_lr_scheduler, build_momentum_scheduler, build_optimizer, scaled_lr,
                    split_norm_and_bias, warmup_cosine)
from .lars import LARS

__all__ = ["LARS", "StepSchedule", "build_lr_scheduler", "build_momentum_scheduler", "build_optimizer",
           "scaled_lr", "split_norm_and_bias", "warmup_cosine"]
