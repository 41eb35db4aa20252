"""Ancestral sampling (Ho et al. 2020, Algorithm 2), over all T steps or a respaced subset."""

from __future__ import annotations

import torch

from diffusion_lab.diffusion.process import clamp_x0, split_learned_variance
from diffusion_lab.diffusion.samplers.chain import Generator, ModelFn, SamplingChain, randn


def ddpm_loop(
    model_fn: ModelFn,
    chain: SamplingChain,
    x: torch.Tensor,
    *,
    variance_type: str,
    clip_sample: bool | float,
    generator: Generator,
) -> torch.Tensor:
    """x_{t-1} = μ_θ(x_t, t) + σ_t z, with z = 0 on the last step; σ_t² = β̃_t, β_t or the learned
    interpolation between them — always of the (respaced) chain's own β and β̃."""
    diffusion = chain.diffusion
    for i in reversed(range(len(chain))):
        output, t = chain.evaluate(model_fn, x, i)
        if chain.trajectory is not None:
            prediction = split_learned_variance(output)[0] if variance_type == "learned_range" else output
            chain.record(i, x, clamp_x0(diffusion.predict_x0(x, t, prediction), clip_sample))
        mean, variance = diffusion.p_mean_variance(x, t, output, variance_type, clip_sample)
        if i > 0:  # the step onto the clean sample adds no noise
            mean = mean + variance.sqrt() * randn(x.shape, generator, x.device, x.dtype)
        x = mean
    return x
