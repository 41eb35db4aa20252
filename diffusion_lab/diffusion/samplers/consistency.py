"""Multistep consistency sampling (Song et al. 2023, Algorithm 1): f maps x_T ~ N(0, I) to a sample in one network
call; each further step noises that sample back to a smaller timestep of the grid and applies f again."""

from __future__ import annotations

import math

import torch

from diffusion_lab.diffusion.consistency import ConsistencyParameterisation
from diffusion_lab.diffusion.process import clamp_x0
from diffusion_lab.diffusion.samplers.chain import Generator, ModelFn, SamplingChain, randn


def consistency_loop(
    model_fn: ModelFn,
    chain: SamplingChain,
    x: torch.Tensor,
    *,
    parameterisation: ConsistencyParameterisation,
    clip_sample: bool | float,
    generator: Generator,
) -> torch.Tensor:
    """x̂ = f(z_t, t) at each grid point from T − 1 down; between points z = √ᾱ x̂ + √(1 − ᾱ) ε (fresh ε)."""
    sample = x
    for i in reversed(range(len(chain))):
        if i < len(chain) - 1:
            alpha_cumprod = chain.alphas_cumprod[i]
            noise = randn(x.shape, generator, x.device, x.dtype)
            x = math.sqrt(alpha_cumprod) * sample + math.sqrt(1.0 - alpha_cumprod) * noise
        output, t = chain.evaluate(model_fn, x, i)
        pred_x0 = chain.diffusion.predict_x0(x, t, output)
        timestep = torch.full_like(t, int(chain.timesteps[i]))
        sample = clamp_x0(parameterisation(x, timestep, pred_x0), clip_sample)
        chain.record(i, x, sample)
    return sample
