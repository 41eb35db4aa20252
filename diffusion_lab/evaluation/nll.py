"""Negative log-likelihood bound in bits per dimension (Ho et al. 2020 §3.3; Nichol & Dhariwal 2021).

For 8-bit images scaled to [−1, 1] the variational bound is

    −log p(x₀) ≤ KL(q(x_{T−1} | x₀) ‖ N(0, I))                      (prior)
               + Σ_{t=1}^{T−1} KL(q(x_{t−1} | x_t, x₀) ‖ p_θ(x_{t−1} | x_t))   (denoising terms, x_t ~ q)
               − log p_θ(x₀ | x_{(0)})                             (decoder)

with 0-indexed timesteps and a decoder that integrates the Gaussian p_θ over each pixel's 1/127.5-wide bin
(edge bins extend to ±∞). Dividing the nats by D·ln 2 gives bits/dim.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

from diffusion_lab.diffusion import GaussianDiffusion

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


@torch.no_grad()
def nll_bits_per_dim(
    model_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    diffusion: GaussianDiffusion,
    x0: torch.Tensor,
    *,
    variance_type: str = "fixed_small",
    generator: torch.Generator | None = None,
) -> dict[str, torch.Tensor]:
    """Per-image bits/dim of the bound and its parts (``total``, ``prior``, ``denoising``, ``decoder``).

    ``x0`` must lie on the 8-bit grid of [−1, 1] (uint8 data through ``to_model_range``). One network call per
    timestep: T calls for the exact bound.
    """
    batch = x0.shape[0]
    dims = tuple(range(1, x0.ndim))
    nats_to_bits_per_dim = 1.0 / (math.log(2.0) * x0[0].numel())
    T = diffusion.num_train_timesteps
    last = torch.full((batch,), T - 1, dtype=torch.long, device=x0.device)
    prior_mean, prior_var = diffusion.q_mean_variance(x0, last)
    prior = normal_kl(prior_mean, prior_var.log(), torch.zeros_like(x0), torch.zeros_like(x0)).sum(dims)

    denoising = torch.zeros(batch, dtype=torch.float64, device=x0.device)
    decoder = torch.zeros_like(denoising)
    for step in reversed(range(T)):
        t = torch.full((batch,), step, dtype=torch.long, device=x0.device)
        noise = torch.randn(x0.shape, generator=generator, device=generator.device if generator else x0.device).to(x0)
        x_t = diffusion.q_sample(x0, t, noise)
        output = model_fn(x_t, t).to(x0.dtype)
        model_mean, _ = diffusion.p_mean_variance(x_t, t, output, variance_type)
        model_log_var = diffusion.p_log_variance(t, x0, variance_type)
        if step == 0:
            log_likelihood = discretized_gaussian_log_likelihood(x0, model_mean, 0.5 * model_log_var)
            decoder = -log_likelihood.sum(dims).double()
        else:
            true_mean, _ = diffusion.q_posterior(x0, x_t, t)
            true_log_var = diffusion.coefficient("posterior_log_variance_clipped", t, x0)
            denoising += normal_kl(true_mean, true_log_var, model_mean, model_log_var).sum(dims).double()
    parts = {"prior": prior.double(), "denoising": denoising, "decoder": decoder}
    parts["total"] = parts["prior"] + parts["denoising"] + parts["decoder"]
    return {name: value * nats_to_bits_per_dim for name, value in parts.items()}
