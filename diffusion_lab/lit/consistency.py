"""ConsistencyDistillation: a student (the teacher's network, predicting v) tuned into a consistency model that
samples in one or two network calls (the maths in ``diffusion_lab.diffusion.consistency``).

``pairs=teacher`` is consistency distillation (Song et al. 2023): the adjacent point is the frozen teacher's DDIM
step between neighbouring points of an N-interval grid, so the student learns the teacher's ODE. ``pairs=data``
is consistency tuning in the manner of ECT (Geng et al. 2024): the adjacent point shares the x₀ and ε, no teacher
call. Either way the target side is the student itself without gradient (iCT), the student starts from the
teacher's weights, and everything else is the training loop's: EMA, checkpoints, sample grids, DDP/bf16, resuming.
Its checkpoints record sampler=consistency with ``num_steps`` calls, so ``sample`` and ``evaluate`` draw with it.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from diffusion_lab.diffusion.consistency import (
    ConsistencyParameterisation,
    consistency_grid,
    consistency_loss,
    pseudo_huber_constant,
)
from diffusion_lab.diffusion.distillation import teacher_walk
from diffusion_lab.lit.distillation import TeacherStudent

PAIRS = ("teacher", "data")


class ConsistencyDistillation(TeacherStudent):
    def __init__(
        self, *, num_intervals: int, pairs: str, num_steps: int, huber_c: float | None = None, **module_args: Any
    ) -> None:
        if pairs not in PAIRS:
            raise ValueError(
                f"pairs={pairs!r}: use 'teacher' (consistency distillation: the teacher's DDIM step gives the "
                "adjacent point) or 'data' (consistency tuning: the same x₀ and noise at the adjacent timestep)."
            )
        if num_steps < 1:
            raise ValueError(f"num_steps={num_steps} must be >= 1 (the consistency sampler's network calls).")
        super().__init__(**module_args)
        if self.diffusion is None:
            raise ValueError(
                f"distillation=consistency walks a β schedule's DDIM chain; this teacher trained objective="
                f"{self.continuous.name}: distil it with distillation=progressive (Euler steps on its path)."
            )
        self.grid = consistency_grid(self.diffusion.num_train_timesteps, num_intervals)
        self.pairs, self.huber_c = pairs, huber_c
        self.parameterisation = ConsistencyParameterisation(self.diffusion.schedule.alphas_cumprod)
        self.set_student_sampler({"sampler": "consistency", "num_steps": num_steps}, method="consistency", pairs=pairs)

    def consistency_fn(self, net: nn.Module, z: torch.Tensor, t: torch.Tensor, labels: torch.Tensor | None):
        """f(z, t) from the network's v-prediction (float32 arithmetic outside autocast)."""
        output = net(z, t, labels) if labels is not None else net(z, t)
        with torch.autocast(device_type=z.device.type, enabled=False):
            x0 = self.diffusion.predict_x0(z.float(), t, output.float())
            return self.parameterisation(z.float(), t, x0)

    def distillation_loss(
        self, net: nn.Module, x0: torch.Tensor, labels: torch.Tensor | None, generator: torch.Generator | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-sample pseudo-Huber distance between f at t_{n+1} and (without gradient) at the adjacent t_n, for an
        interval n drawn uniformly; and the timesteps t_{n+1}."""
        grid = self.grid.to(x0.device)
        index = torch.randint(0, len(grid) - 1, (x0.shape[0],), device=x0.device, generator=generator)
        t_next, t_adjacent = grid[index], grid[index + 1]
        noise = torch.randn(x0.shape, device=x0.device, generator=generator)
        z_next = self.diffusion.q_sample(x0, t_next, noise)
        with torch.no_grad():
            if self.pairs == "data":
                z_adjacent = self.diffusion.q_sample(x0, t_adjacent, noise)
            else:
                z_adjacent = self.teacher_step(z_next, t_next, t_adjacent, labels)
            f_adjacent = self.consistency_fn(net, z_adjacent, t_adjacent, labels)
        f_next = self.consistency_fn(net, z_next, t_next, labels)
        huber_c = self.huber_c if self.huber_c is not None else pseudo_huber_constant(x0.shape[1:])
        sigma_next = self.parameterisation.sigma(t_next, f_next)
        sigma_adjacent = self.parameterisation.sigma(t_adjacent, f_next)
        return consistency_loss(f_next, f_adjacent, sigma_next, sigma_adjacent, huber_c), t_next

    def teacher_step(
        self, z: torch.Tensor, t: torch.Tensor, s: torch.Tensor, labels: torch.Tensor | None
    ) -> torch.Tensor:
        """The teacher's deterministic DDIM step t → s (x̂₀ clamped as its sampler does)."""
        clip = self.sampler_settings.get("clip_sample", True)
        return teacher_walk(self.teacher_fn(labels), self.teacher_path, z, [t, s], clip)
