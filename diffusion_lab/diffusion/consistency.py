"""Consistency models (Song et al. 2023; Song & Dhariwal 2023, "iCT"; Geng et al. 2024, "ECT") on a DDPM model's
β schedule: the maths of the consistency function, its grid and its loss.

A consistency function f maps every point of a probability-flow ODE trajectory to the trajectory's point at the
boundary t_min (here training timestep 0), so one network call turns noise into a sample. In the variance-exploding
coordinates x̃ = z/α, σ = √(1 − ᾱ)/√ᾱ of a VP point z (EDM's view, where the boundary is σ_min = σ(0)):

    f(z, t) = c_skip(σ) x̃ + (1 − c_skip(σ)) x̂₀(z, t),     c_skip(σ) = σ_d² / ((σ − σ_min)² + σ_d²)

so f(z, t_min) = x̃ exactly whatever the network says (the boundary condition by parameterisation), and far from
it f is the network's own x̂₀ — a diffusion model's denoiser is the natural starting point (ECT). x̂₀ comes from
the network's prediction (v for the students here) as in DDPM sampling.

Training enforces f(z_{t_{n+1}}) = f(ẑ_{t_n}) for adjacent points of a grid t_N > … > t_0 = 0, where ẑ_{t_n} is the
teacher's DDIM step from z_{t_{n+1}} (consistency distillation) or the same x₀ and ε at t_n (consistency training /
tuning, no teacher). The target side is the same network without gradient (iCT: no EMA teacher), and the distance is
iCT's pseudo-Huber √(‖a − b‖² + c²) − c weighted by 1/(σ_{n+1} − σ_n).
"""

from __future__ import annotations

import math

import torch

from diffusion_lab.diffusion.continuous import TimestepTables

SIGMA_DATA = 0.5  # the standard deviation of data scaled to [−1, 1] that c_skip assumes (EDM's default)


class ConsistencyParameterisation:
    """f(z, t) = c_skip x̃ + (1 − c_skip) x̂₀ on a β schedule's training timesteps (``alphas_cumprod``: ᾱ per t)."""

    def __init__(self, alphas_cumprod: torch.Tensor, sigma_data: float = SIGMA_DATA) -> None:
        alphas_cumprod = alphas_cumprod.to(torch.float64)
        self.alpha = alphas_cumprod.sqrt()
        self.sigmas = ((1.0 - alphas_cumprod) / alphas_cumprod).sqrt()
        self.sigma_min = float(self.sigmas[0])
        self.sigma_data = sigma_data
        self.c_skips = sigma_data**2 / ((self.sigmas - self.sigma_min).square() + sigma_data**2)
        self._tables = TimestepTables(sigmas=self.sigmas, c_skips=self.c_skips, alpha=self.alpha)

    def _per_sample(self, name: str, t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        return self._tables.column(name, t, like)

    def sigma(self, t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        """The VE noise level σ(t) = √(1 − ᾱ_t)/√ᾱ_t, shaped to broadcast against ``like``."""
        return self._per_sample("sigmas", t, like)

    def c_skip(self, t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        return self._per_sample("c_skips", t, like)

    def __call__(self, z: torch.Tensor, t: torch.Tensor, x0: torch.Tensor) -> torch.Tensor:
        """f(z, t) in x̃ coordinates, given the network's x̂₀ at (z, t); exactly z/α at t = 0."""
        c_skip = self.c_skip(t, z)
        return c_skip * (z / self._per_sample("alpha", t, z)) + (1.0 - c_skip) * x0


def consistency_grid(num_train_timesteps: int, num_intervals: int) -> torch.Tensor:
    """The N + 1 descending training timesteps t_N = T − 1 > … > t_0 = 0 the consistency is enforced between."""
    if not 1 <= num_intervals < num_train_timesteps:
        raise ValueError(
            f"num_intervals={num_intervals} must lie between 1 and num_train_timesteps − 1 = {num_train_timesteps - 1}."
        )
    grid = torch.linspace(num_train_timesteps - 1, 0, num_intervals + 1, dtype=torch.float64).round().long()
    return grid


def sampling_grid(num_train_timesteps: int, num_steps: int) -> torch.Tensor:
    """The timesteps a k-step consistency sampler evaluates f at, evenly spaced from T − 1: 1 step [T − 1], 2 steps
    [T − 1, T/2], 4 steps [T − 1, 3T/4, T/2, T/4] (for T = 1000: 999, 750, 500, 250)."""
    return torch.tensor(
        [round((num_train_timesteps - 1) * (1.0 - k / num_steps)) for k in range(num_steps)], dtype=torch.long
    )


def pseudo_huber_constant(sample_shape: torch.Size | tuple[int, ...]) -> float:
    """iCT's c = 0.00054 √d for d = the number of values in one sample."""
    return 0.00054 * math.sqrt(math.prod(sample_shape))


def consistency_loss(
    f_next: torch.Tensor,
    f_adjacent: torch.Tensor,
    sigma_next: torch.Tensor,
    sigma_adjacent: torch.Tensor,
    huber_c: float,
) -> torch.Tensor:
    """Per sample: (√(‖f_next − f_adjacent‖² + c²) − c) / (σ_{n+1} − σ_n); c = 0 gives the weighted L2 distance."""
    distance = (f_next - f_adjacent).square().flatten(1).sum(dim=1)
    distance = (distance + huber_c**2).sqrt() - huber_c
    return distance / (sigma_next - sigma_adjacent).flatten()
