"""Flow matching on the linear (rectified-flow / optimal-transport) path (Lipman et al. 2023; Liu et al. 2023).

x_t = (1 − t) x₀ + t ε for t ∈ [0, 1]: t = 0 is the data, t = 1 pure noise (α = 1 − t, s = t). The network
predicts the velocity v = dx_t/dt = ε − x₀ and is trained by the plain MSE ‖v̂ − v‖² with t drawn uniformly or
from a logit-normal distribution, logit(t) ~ N(m, s²) (Esser et al. 2024, "SD3", found m = 0, s = 1 best), which
spends more of training at intermediate t. Sampling integrates dx_t/dt = v̂ from t = 1 (x = ε) down to 0; the
natural grid is uniform in t, optionally shifted towards the noise end: t ↦ shift·t/(1 + (shift − 1)t).

The conversions between what a network may predict on this path, for a state x_t at time t:
x̂₀ = x_t − t v̂,  ε̂ = x_t + (1 − t) v̂,  v̂ = ε̂ − x̂₀.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from diffusion_lab.diffusion.continuous import (
    NOISE_INPUT_SCALE,
    ContinuousObjective,
    as_column,
    standard_normal_cdf,
)

TIME_SAMPLINGS = ("uniform", "logit_normal")


def x0_from_velocity(x_t: torch.Tensor, t: torch.Tensor, velocity: torch.Tensor) -> torch.Tensor:
    return x_t - as_column(t, x_t) * velocity


def eps_from_velocity(x_t: torch.Tensor, t: torch.Tensor, velocity: torch.Tensor) -> torch.Tensor:
    return x_t + as_column(1.0 - t.double(), x_t) * velocity


def velocity_from(x0: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
    return eps - x0


def shifted(t: torch.Tensor | float, shift: float) -> torch.Tensor | float:
    """SD3's time shift: shift > 1 spends more of a uniform grid near the noise end (1 leaves t as it is)."""
    return shift * t / (1.0 + (shift - 1.0) * t)


@dataclass(frozen=True)
class FlowMatching(ContinuousObjective):
    """The linear path and its velocity objective; ``time_sampling`` ∈ {uniform, logit_normal}."""

    time_sampling: str = "logit_normal"
    logit_mean: float = 0.0
    logit_std: float = 1.0
    name = "flow_matching"
    tau_max = 1.0

    def __post_init__(self) -> None:
        if self.time_sampling not in TIME_SAMPLINGS:
            raise ValueError(
                f"time_sampling={self.time_sampling!r} is not one of {', '.join(TIME_SAMPLINGS)} (flow matching)."
            )
        if not self.logit_std > 0:
            raise ValueError(f"logit_std={self.logit_std} must be > 0 (SD3 uses 1.0).")

    def alpha(self, tau: torch.Tensor) -> torch.Tensor:
        return 1.0 - tau.double()

    def noise_std(self, tau: torch.Tensor) -> torch.Tensor:
        return tau.double()

    def sample_tau(self, count: int, device: torch.device, generator: torch.Generator | None = None) -> torch.Tensor:
        if self.time_sampling == "uniform":
            return torch.rand(count, device=device, generator=generator)
        normal = torch.randn(count, device=device, generator=generator)
        return torch.sigmoid(self.logit_mean + self.logit_std * normal)

    def tau_quantile(self, tau: torch.Tensor) -> torch.Tensor:
        tau = tau.double()
        if self.time_sampling == "uniform":
            return tau
        return standard_normal_cdf((torch.logit(tau.clamp(1e-12, 1 - 1e-12)) - self.logit_mean) / self.logit_std)

    def network_input(self, x: torch.Tensor, tau: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return x, (NOISE_INPUT_SCALE * tau.double()).float()

    def per_sample_loss(
        self, output: torch.Tensor, x0: torch.Tensor, x: torch.Tensor, noise: torch.Tensor, tau: torch.Tensor
    ) -> torch.Tensor:
        return (output - velocity_from(x0, noise)).square().flatten(1).mean(dim=1)

    def denoised(self, output: torch.Tensor, x: torch.Tensor, tau: torch.Tensor) -> torch.Tensor:
        return x0_from_velocity(x, tau, output)

    def uniform_times(self, num_steps: int, shift: float = 1.0) -> list[float]:
        """t_i = 1 − i/N (shifted), i = 0 … N: from pure noise to the data."""
        return [float(shifted(1.0 - i / num_steps, shift)) for i in range(num_steps)] + [0.0]
