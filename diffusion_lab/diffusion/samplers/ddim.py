"""DDIM (Song et al. 2021): the non-Markovian reverse process with the same marginals, deterministic at
η = 0 and as stochastic as DDPM's posterior at η = 1.

Each step goes to the next timestep of the grid (or the clean sample after the last). diffusers' DDIM steps
to t − ⌊T/N⌋ instead, which differs on ``linspace`` grids (its issue #12633).
"""

from __future__ import annotations

import math

import torch

from diffusion_lab.diffusion.process import clamp_x0
from diffusion_lab.diffusion.samplers.chain import Generator, ModelFn, SamplingChain, randn


def ddim_loop(
    model_fn: ModelFn,
    chain: SamplingChain,
    x: torch.Tensor,
    *,
    eta: float,
    clip_sample: bool | float,
    generator: Generator,
) -> torch.Tensor:
    """x_prev = √ᾱ_prev x̂₀ + √(1 − ᾱ_prev − σ²) ε̂ + σ z, σ = η √((1−ᾱ_prev)/(1−ᾱ) · (1 − ᾱ/ᾱ_prev)).

    Clipping applies to x̂₀ only; ε̂ stays the network's (diffusers' ``use_clipped_model_output=False``).
    """
    diffusion = chain.diffusion
    for i in reversed(range(len(chain))):
        output, t = chain.evaluate(model_fn, x, i)
        pred_x0 = clamp_x0(diffusion.predict_x0(x, t, output), clip_sample)
        pred_eps = diffusion.predict_eps(x, t, output)
        chain.record(i, x, pred_x0)

        alpha_cumprod, alpha_cumprod_prev = chain.alphas_cumprod[i], chain.alpha_cumprod_prev(i)
        variance = (1.0 - alpha_cumprod_prev) / (1.0 - alpha_cumprod) * (1.0 - alpha_cumprod / alpha_cumprod_prev)
        std = eta * math.sqrt(max(variance, 0.0))
        direction = math.sqrt(max(1.0 - alpha_cumprod_prev - std**2, 0.0))
        x = math.sqrt(alpha_cumprod_prev) * pred_x0 + direction * pred_eps
        if std > 0:
            x = x + std * randn(x.shape, generator, x.device, x.dtype)
    return x
