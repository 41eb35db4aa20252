"""Shared test helpers: exact denoisers for Gaussian data, to check samplers against known answers."""

from __future__ import annotations

import torch

from diffusion_lab.diffusion.schedules import NoiseSchedule


class GaussianDataDenoiser:
    """The Bayes-optimal network output for data x₀ ~ N(mean, std²) per pixel.

    With x_t = √ᾱ x₀ + √(1−ᾱ) ε, the posterior means are E[ε | x_t] = √(1−ᾱ)(x_t − √ᾱ μ)/(ᾱ s² + 1 − ᾱ)
    and E[x₀ | x_t] = μ + √ᾱ s² (x_t − √ᾱ μ)/(ᾱ s² + 1 − ᾱ); a perfect sampler driven by it returns
    samples distributed as N(μ, s²).
    """

    def __init__(self, schedule: NoiseSchedule, prediction_type: str, mean: float = 0.3, std: float = 0.5):
        self.alphas_cumprod = schedule.alphas_cumprod
        self.prediction_type = prediction_type
        self.mean, self.std = mean, std

    def __call__(self, x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        ab = self.alphas_cumprod[t.cpu()].to(x_t).reshape(-1, *([1] * (x_t.ndim - 1)))
        centred = x_t - ab.sqrt() * self.mean
        denominator = ab * self.std**2 + 1.0 - ab
        eps = (1.0 - ab).sqrt() * centred / denominator
        x0 = self.mean + ab.sqrt() * self.std**2 * centred / denominator
        if self.prediction_type == "epsilon":
            return eps
        if self.prediction_type == "sample":
            return x0
        return ab.sqrt() * eps - (1.0 - ab).sqrt() * x0
