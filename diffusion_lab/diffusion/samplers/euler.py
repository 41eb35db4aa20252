"""Euler, Heun (Karras et al. 2022, "EDM", Algorithms 1–2) and Euler-ancestral samplers for a model trained
on discrete DDPM timesteps.

They integrate the probability-flow ODE dx/dσ = (x − D(x; σ))/σ in the variance-exploding form
x = x_t/√ᾱ = x₀ + σ ε, where D(x; σ) = x̂₀ is the network's denoised estimate. The network sees what it was
trained on: x_t = x/√(1+σ²) at the (fractional, see ``sigmas``) timestep t(σ). Every grid ends at σ = 0,
where x is the clean sample; the step onto σ = 0 is always a first-order Euler step (it returns D), so Heun
costs two network calls per step except the last: 2N − 1 for N steps.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from diffusion_lab.diffusion.process import check_prediction_type, clamp_x0
from diffusion_lab.diffusion.samplers.chain import Generator, ModelFn, TrajectoryStep, randn
from diffusion_lab.diffusion.samplers.sigmas import timestep_of_sigma, trained_sigmas
from diffusion_lab.diffusion.schedules import NoiseSchedule


@dataclass(frozen=True)
class Churn:
    """EDM's stochastic churn: at σ_i ∈ [s_tmin, s_tmax] noise is added to raise σ_i to σ̂ = σ_i (1 + γ),
    γ = min(s_churn/N, √2 − 1), with s_noise scaling the added noise. s_churn = 0 is the deterministic ODE."""

    s_churn: float = 0.0
    s_tmin: float = 0.0
    s_tmax: float = math.inf
    s_noise: float = 1.0

    def gamma(self, sigma: float, num_steps: int) -> float:
        if self.s_churn == 0.0 or not self.s_tmin <= sigma <= self.s_tmax:
            return 0.0
        return min(self.s_churn / num_steps, math.sqrt(2.0) - 1.0)


@dataclass
class SigmaChain:
    """The decreasing σ grid a sampler walks (ending at 0) and the denoiser D(x; σ) built from the network."""

    schedule: NoiseSchedule
    sigmas: list[float]
    prediction_type: str
    clip_sample: bool | float
    trajectory: list[TrajectoryStep] | None = None
    log_sigmas: torch.Tensor = field(init=False)  # of the trained timesteps, for t(σ)

    def __post_init__(self) -> None:
        check_prediction_type(self.prediction_type)
        if self.sigmas[-1] != 0.0 or any(a <= b for a, b in zip(self.sigmas, self.sigmas[1:], strict=False)):
            raise ValueError(f"a σ grid must decrease strictly and end at 0, got {self.sigmas}.")
        self.log_sigmas = trained_sigmas(self.schedule).log()

    @property
    def num_steps(self) -> int:
        return len(self.sigmas) - 1

    def start(self, noise: torch.Tensor) -> torch.Tensor:
        """x at σ_max from pure-noise x_T: x = x_T/√ᾱ = x_T √(1 + σ_max²)."""
        return noise * math.sqrt(1.0 + self.sigmas[0] ** 2)

    def denoise(self, model_fn: ModelFn, x: torch.Tensor, sigma: float, record: bool = True) -> torch.Tensor:
        """D(x; σ) = x̂₀ from one network call at x_t = x/√(1+σ²), t = t(σ)."""
        scale = 1.0 / math.sqrt(1.0 + sigma**2)  # √ᾱ at this σ
        x_t = x * scale
        t = float(timestep_of_sigma(torch.tensor(sigma).double(), self.log_sigmas))
        output = model_fn(x_t, torch.full((x.shape[0],), t, device=x.device, dtype=torch.float32)).to(x.dtype)
        if self.prediction_type == "epsilon":
            denoised = x - sigma * output
        elif self.prediction_type == "sample":
            denoised = output
        else:  # v = √ᾱ ε − √(1−ᾱ) x₀  ⇒  x̂₀ = √ᾱ x_t − √(1−ᾱ) v̂
            denoised = scale * x_t - sigma * scale * output
        denoised = clamp_x0(denoised, self.clip_sample)
        if record and self.trajectory is not None:
            self.trajectory.append(TrajectoryStep(round(t), x_t.detach().cpu(), denoised.detach().cpu()))
        return denoised


def euler_loop(
    model_fn: ModelFn, chain: SigmaChain, x: torch.Tensor, *, second_order: bool, churn: Churn, generator: Generator
) -> torch.Tensor:
    """x_{i+1} = x̂ + (σ_{i+1} − σ̂) d_i with d_i = (x̂ − D(x̂; σ̂))/σ̂ (Euler), corrected by Heun with the slope
    at the Euler point: x_{i+1} = x̂ + (σ_{i+1} − σ̂)(d_i + d'_i)/2, d'_i = (x' − D(x'; σ_{i+1}))/σ_{i+1}."""
    sigmas = chain.sigmas
    for i in range(chain.num_steps):
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        gamma = churn.gamma(sigma, chain.num_steps)
        sigma_hat = sigma * (1.0 + gamma)
        if gamma > 0:
            noise = randn(x.shape, generator, x.device, x.dtype)
            x = x + churn.s_noise * math.sqrt(sigma_hat**2 - sigma**2) * noise
        slope = (x - chain.denoise(model_fn, x, sigma_hat)) / sigma_hat
        step = sigma_next - sigma_hat
        x_euler = x + step * slope
        if not second_order or sigma_next == 0.0:
            x = x_euler
            continue
        slope_next = (x_euler - chain.denoise(model_fn, x_euler, sigma_next, record=False)) / sigma_next
        x = x + step * 0.5 * (slope + slope_next)
    return x


def euler_ancestral_loop(
    model_fn: ModelFn, chain: SigmaChain, x: torch.Tensor, *, generator: Generator
) -> torch.Tensor:
    """Each step goes down deterministically to σ_down and adds fresh noise σ_up, with σ_down² + σ_up² = σ_{i+1}²
    and σ_up² = σ_{i+1}² (σ_i² − σ_{i+1}²)/σ_i²: the ancestral (DDPM-like) sampler in σ form."""
    sigmas = chain.sigmas
    for i in range(chain.num_steps):
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        sigma_up = min(sigma_next, math.sqrt(sigma_next**2 * (sigma**2 - sigma_next**2) / sigma**2))
        sigma_down = math.sqrt(sigma_next**2 - sigma_up**2)
        slope = (x - chain.denoise(model_fn, x, sigma)) / sigma
        x = x + (sigma_down - sigma) * slope
        if sigma_next > 0:
            x = x + sigma_up * randn(x.shape, generator, x.device, x.dtype)
    return x
