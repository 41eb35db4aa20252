"""Learning-rate warm-up with optional decay, as a LambdaLR factor."""

from __future__ import annotations

import logging
import math

import torch
from lightning.pytorch.utilities import rank_zero_only
from torch.optim.lr_scheduler import LambdaLR

from diffusion_lab.errors import ConfigError

log = logging.getLogger(__name__)
DECAYS = ("none", "cosine", "linear")


class WarmupDecay:
    """Factor on the base learning rate: linear warm-up from 0 over ``warmup_steps`` (Ho et al. warm up over
    5,000 steps), then constant, or a cosine / linear decay to ``min_ratio`` at ``total_steps``.

    A class rather than a closure so that LambdaLR checkpoints its (plain-number) state.
    """

    def __init__(
        self, warmup_steps: int = 0, decay: str = "none", total_steps: int | None = None, min_ratio: float = 0.0
    ):
        if warmup_steps < 0:
            raise ConfigError(f"lr_scheduler.warmup_steps={warmup_steps} must be >= 0.")
        if decay not in DECAYS:
            raise ConfigError(f"Unknown lr_scheduler.decay {decay!r}; valid choices: {', '.join(DECAYS)}.")
        if decay != "none" and (total_steps is None or total_steps < 1):
            raise ConfigError(
                f"lr_scheduler.decay={decay!r} needs total_steps >= 1, got {total_steps}; "
                "set trainer.max_steps (or lr_scheduler.total_steps)."
            )
        if decay != "none" and total_steps <= warmup_steps:
            # A shortened run (trainer.max_steps=20 to try an option) keeps one step of decay after its warm-up.
            if rank_zero_only.rank == 0:
                log.info(
                    f"lr_scheduler: warm-up capped at {total_steps - 1} steps (configured {warmup_steps}) so that "
                    f"{decay} decay fits the run's {total_steps} steps."
                )
            warmup_steps = total_steps - 1
        self.warmup_steps, self.decay = warmup_steps, decay
        self.total_steps, self.min_ratio = total_steps, min_ratio

    def __call__(self, step: int) -> float:
        if step < self.warmup_steps:
            return (step + 1) / self.warmup_steps
        if self.decay == "none":
            return 1.0
        progress = min(1.0, (step - self.warmup_steps) / (self.total_steps - self.warmup_steps))
        shape = 0.5 * (1 + math.cos(math.pi * progress)) if self.decay == "cosine" else 1.0 - progress
        return self.min_ratio + (1.0 - self.min_ratio) * shape


def warmup_schedule(
    optimizer: torch.optim.Optimizer,
    warmup_steps: int = 0,
    decay: str = "none",
    total_steps: int | None = None,
    min_ratio: float = 0.0,
) -> LambdaLR:
    """The scheduler the training config instantiates (``_partial_: true``, stepped every optimiser step)."""
    if total_steps is not None and total_steps < 0:  # trainer.max_steps = -1 means "no step limit"
        total_steps = None
    return LambdaLR(optimizer, WarmupDecay(warmup_steps, decay, total_steps, min_ratio))
