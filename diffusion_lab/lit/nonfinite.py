"""Skip the updates of steps whose loss or gradients are NaN/Inf, and stop a run that keeps producing them.

One bad batch (an overflow in bf16, a corrupt image) should cost one step, not the run: its update is
dropped so the weights, the optimiser's moments and the EMA stay as they were (the step counter and the LR
schedule still advance, as with a mixed-precision grad scaler). A run that diverges for good produces
nothing but skipped steps; after ``patience`` of them in a row it stops with a message naming the step, and
the checkpoints it already wrote hold the last good weights.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch

from diffusion_lab.errors import NonFiniteLossError


def all_finite(loss_is_finite: torch.Tensor, parameters: Iterable[torch.nn.Parameter]) -> torch.Tensor:
    """A 0-d bool tensor: the loss and every gradient are finite (one fused norm, no host sync)."""
    grads = [p.grad for p in parameters if p.grad is not None]
    if not grads:
        return loss_is_finite
    return loss_is_finite & torch.nn.utils.get_total_norm(grads).isfinite()


class NonFiniteGuard:
    """Counts skipped steps; ``patience`` in a row raise :class:`NonFiniteLossError`."""

    def __init__(self, patience: int = 10) -> None:
        if patience < 1:
            raise ValueError(
                f"max_nonfinite_steps={patience} must be >= 1 (how many NaN/Inf steps in a row a run may skip)."
            )
        self.patience = patience
        self.total_skipped = 0
        self.in_a_row = 0
        self.first_of_streak: int | None = None

    def record(self, step: int, finite: bool, last_checkpoint: str | None = None) -> bool:
        """Note step ``step`` (0-based optimiser step); returns whether its update must be skipped."""
        if finite:
            self.in_a_row, self.first_of_streak = 0, None
            return False
        self.total_skipped += 1
        self.in_a_row += 1
        if self.first_of_streak is None:
            self.first_of_streak = step
        if self.in_a_row >= self.patience:
            kept = f"The last checkpoint, {last_checkpoint}, holds good weights. " if last_checkpoint else ""
            raise NonFiniteLossError(
                f"training stopped at step {step}: the loss or its gradients were NaN/Inf for {self.in_a_row} "
                f"steps in a row (since step {self.first_of_streak}; those updates were skipped). {kept}"
                "Lower optimizer.lr, keep trainer.gradient_clip_val on, try trainer.precision=32-true, or check "
                f"the data; max_nonfinite_steps={self.patience} is how many such steps in a row are tolerated."
            )
        return True

    def state_dict(self) -> dict[str, Any]:
        return {"total_skipped": self.total_skipped, "in_a_row": self.in_a_row, "first_of_streak": self.first_of_streak}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.total_skipped = int(state["total_skipped"])
        self.in_a_row = int(state["in_a_row"])
        self.first_of_streak = state["first_of_streak"]
