"""EDM (Karras et al. 2022, "Elucidating the Design Space of Diffusion-Based Generative Models"), Table 1.

The path is x = x₀ + σε (α = 1, s = σ). The network F is wrapped in the preconditioned denoiser

    D(x; σ) = c_skip(σ) x + c_out(σ) F(c_in(σ) x; c_noise(σ)),
    c_skip = σ_d²/(σ² + σ_d²),  c_out = σ σ_d/√(σ² + σ_d²),  c_in = 1/√(σ² + σ_d²),  c_noise = ln(σ)/4,

so that F's input and its training target both have unit variance at every σ. Training draws ln σ ~ N(P_mean,
P_std²) and weights the squared error by λ(σ) = (σ² + σ_d²)/(σ σ_d)² = 1/c_out², which makes the loss the plain
MSE of F against its effective target (x₀ − c_skip x)/c_out. Sampling (Algorithm 1) runs Heun's method over
σ_i = (σ_max^{1/ρ} + i/(N−1)(σ_min^{1/ρ} − σ_max^{1/ρ}))^ρ with σ_min = 0.002, σ_max = 80, ρ = 7.

c_noise is given to our U-Net × 1000 (``NOISE_INPUT_SCALE``): its sinusoidal embedding expects DDPM's 0…999.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from diffusion_lab.diffusion.continuous import (
    NOISE_INPUT_SCALE,
    ContinuousObjective,
    as_column,
    standard_normal_cdf,
)


@dataclass(frozen=True)
class EDM(ContinuousObjective):
    """EDM's preconditioning, noise distribution and loss weighting (defaults: the paper's)."""

    sigma_data: float = 0.5
    p_mean: float = -1.2
    p_std: float = 1.2
    sigma_min: float = 0.002
    sigma_max: float = 80.0
    name = "edm"

    def __post_init__(self) -> None:
        if not (self.sigma_data > 0 and self.p_std > 0 and 0 < self.sigma_min < self.sigma_max):
            raise ValueError(
                f"EDM needs sigma_data > 0, p_std > 0 and 0 < sigma_min < sigma_max; got sigma_data={self.sigma_data}, "
                f"p_std={self.p_std}, sigma_min={self.sigma_min}, sigma_max={self.sigma_max}."
            )

    @property
    def tau_max(self) -> float:
        return self.sigma_max

    # -- Table 1's coefficients (float64) -----------------------------------------------------------------

    def c_skip(self, sigma: torch.Tensor) -> torch.Tensor:
        sigma = sigma.double()
        return self.sigma_data**2 / (sigma**2 + self.sigma_data**2)

    def c_out(self, sigma: torch.Tensor) -> torch.Tensor:
        sigma = sigma.double()
        return sigma * self.sigma_data / (sigma**2 + self.sigma_data**2).sqrt()

    def c_in(self, sigma: torch.Tensor) -> torch.Tensor:
        sigma = sigma.double()
        return 1.0 / (sigma**2 + self.sigma_data**2).sqrt()

    def c_noise(self, sigma: torch.Tensor) -> torch.Tensor:
        return sigma.double().log() / 4.0

    def loss_weight(self, sigma: torch.Tensor) -> torch.Tensor:
        """λ(σ) = (σ² + σ_d²)/(σ σ_d)²."""
        sigma = sigma.double()
        return (sigma**2 + self.sigma_data**2) / (sigma * self.sigma_data) ** 2

    # -- the path --------------------------------------------------------------------------------------------

    def alpha(self, tau: torch.Tensor) -> torch.Tensor:
        return torch.ones_like(tau, dtype=torch.float64)

    def noise_std(self, tau: torch.Tensor) -> torch.Tensor:
        return tau.double()

    # -- training --------------------------------------------------------------------------------------------

    def sample_tau(self, count: int, device: torch.device, generator: torch.Generator | None = None) -> torch.Tensor:
        normal = torch.randn(count, device=device, generator=generator)
        return (self.p_mean + self.p_std * normal).exp()

    def tau_quantile(self, tau: torch.Tensor) -> torch.Tensor:
        return standard_normal_cdf((tau.double().log() - self.p_mean) / self.p_std)

    def network_input(self, x: torch.Tensor, tau: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return as_column(self.c_in(tau), x) * x, (NOISE_INPUT_SCALE * self.c_noise(tau)).float()

    def per_sample_loss(
        self, output: torch.Tensor, x0: torch.Tensor, x: torch.Tensor, noise: torch.Tensor, tau: torch.Tensor
    ) -> torch.Tensor:
        """λ(σ)‖D − x₀‖², computed as ‖F − (x₀ − c_skip x)/c_out‖² (the same number: λ c_out² = 1)."""
        target = (x0 - as_column(self.c_skip(tau), x0) * x) / as_column(self.c_out(tau), x0)
        return (output - target).square().flatten(1).mean(dim=1)

    def denoised(self, output: torch.Tensor, x: torch.Tensor, tau: torch.Tensor) -> torch.Tensor:
        return as_column(self.c_skip(tau), x) * x + as_column(self.c_out(tau), x) * output

    def karras_sigmas(self, num_steps: int, rho: float = 7.0, sigma_max: float | None = None) -> list[float]:
        """Algorithm 1's grid σ_0 > … > σ_{N−1} = σ_min, then 0."""
        top = self.sigma_max if sigma_max is None else float(sigma_max)
        if num_steps == 1:
            return [top, 0.0]
        inv_max, inv_min = top ** (1.0 / rho), self.sigma_min ** (1.0 / rho)
        return [(inv_max + i / (num_steps - 1) * (inv_min - inv_max)) ** rho for i in range(num_steps)] + [0.0]

    def log_sigmas(self, num_steps: int, sigma_max: float | None = None) -> list[float]:
        """σ uniform in log σ (log-SNR) from σ_max to σ_min, then 0."""
        top = self.sigma_max if sigma_max is None else float(sigma_max)
        if num_steps == 1:
            return [top, 0.0]
        ratio = math.log(self.sigma_min / top) / (num_steps - 1)
        return [top * math.exp(i * ratio) for i in range(num_steps)] + [0.0]
