"""The terms of the variational bound (Ho et al. 2020 §3.3; Nichol & Dhariwal 2021 §2–3), shared by the
hybrid training objective and the NLL evaluation.

With 0-indexed timesteps, the term at t > 0 is KL(q(x_{t−1} | x_t, x₀) ‖ p_θ(x_{t−1} | x_t)); at t = 0 it is
the decoder's −log p_θ(x₀ | x_{(0)}), a Gaussian integrated over each pixel's 8-bit bin of [−1, 1] (the edge
bins extend to ±∞). Both are returned per image in bits per dimension.
"""

from __future__ import annotations

import math

import torch

from diffusion_lab.diffusion.process import GaussianDiffusion

BIN_HALF_WIDTH = 1.0 / 255.0  # half of one 8-bit level in [−1, 1]


def normal_kl(mean1: torch.Tensor, log_var1: torch.Tensor, mean2: torch.Tensor, log_var2: torch.Tensor) -> torch.Tensor:
    """KL(N(mean1, e^{log_var1}) ‖ N(mean2, e^{log_var2})), elementwise, in nats."""
    return 0.5 * (
        log_var2 - log_var1 + torch.exp(log_var1 - log_var2) + (mean1 - mean2).square() * torch.exp(-log_var2) - 1.0
    )


def discretized_gaussian_log_likelihood(x: torch.Tensor, mean: torch.Tensor, log_scale: torch.Tensor) -> torch.Tensor:
    """log P(pixel bin of x) under N(mean, e^{2·log_scale}), elementwise; x on the 256-level grid of [−1, 1]."""
    inverse_scale = torch.exp(-log_scale)
    upper = (x - mean + BIN_HALF_WIDTH) * inverse_scale
    lower = (x - mean - BIN_HALF_WIDTH) * inverse_scale
    log_below_upper = torch.special.log_ndtr(upper)  # bin 0: everything below its upper edge
    log_above_lower = torch.special.log_ndtr(-lower)  # bin 255: everything above its lower edge
    middle = torch.log((torch.special.ndtr(upper) - torch.special.ndtr(lower)).clamp(min=1e-12))
    return torch.where(x < -0.999, log_below_upper, torch.where(x > 0.999, log_above_lower, middle))


def vlb_term(
    diffusion: GaussianDiffusion,
    x0: torch.Tensor,
    x_t: torch.Tensor,
    t: torch.Tensor,
    model_output: torch.Tensor,
    variance_type: str = "fixed_small",
) -> torch.Tensor:
    """The bound's term at each sample's t, in bits/dim: the denoising KL for t > 0, the decoder NLL at t = 0."""
    model_mean, _ = diffusion.p_mean_variance(x_t, t, model_output, variance_type)
    model_log_var = diffusion.p_log_variance(t, x0, variance_type, model_output)
    true_mean, _ = diffusion.q_posterior(x0, x_t, t)
    true_log_var = diffusion.coefficient("posterior_log_variance_clipped", t, x0)
    dims = tuple(range(1, x0.ndim))
    kl = normal_kl(true_mean, true_log_var, model_mean, model_log_var).mean(dims)
    decoder = -discretized_gaussian_log_likelihood(x0, model_mean, 0.5 * model_log_var).mean(dims)
    return torch.where(t == 0, decoder, kl) / math.log(2.0)
