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
import time
from collections.abc import Callable

import torch
from omegaconf import DictConfig

from diffusion_lab.data.base import to_model_range
from diffusion_lab.diffusion import GaussianDiffusion
from diffusion_lab.diffusion.likelihood import discretized_gaussian_log_likelihood, normal_kl, vlb_term
from diffusion_lab.diffusion.process import split_learned_variance
from diffusion_lab.diffusion.samplers import resolve_variance_type
from diffusion_lab.errors import ConfigError

__all__ = ["discretized_gaussian_log_likelihood", "held_out_nll", "nll_bits_per_dim", "normal_kl"]


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
    timestep: T calls for the exact bound. ``variance_type='learned_range'`` reads σ² from the model's output.
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
        term = vlb_term(diffusion, x0, x_t, t, model_fn(x_t, t).to(x0.dtype), variance_type).double()
        if step == 0:
            decoder = term
        else:
            denoising += term
    parts = {"prior": prior.double() * nats_to_bits_per_dim, "denoising": denoising, "decoder": decoder}
    parts["total"] = parts["prior"] + parts["denoising"] + parts["decoder"]
    return parts


def check_nll_applies(objective: str) -> None:
    """The bound is DDPM's: a sum over its T discrete steps. The continuous objectives have no such chain."""
    if objective != "ddpm":
        raise ConfigError(
            f"metrics=[nll] is DDPM's variational bound over its T discrete steps; objective={objective} has no such "
            "chain here. Drop nll from metrics for this run."
        )


def held_out_nll(module, reference: torch.Tensor, cfg: DictConfig, device, protocol: dict) -> dict[str, float]:
    """Mean bits/dim of the variational bound over the first num_batches × batch_size held-out images."""
    count = min(len(reference), cfg.nll.num_batches * cfg.nll.batch_size)
    net = module.net

    def model_fn(x_t, t):
        if module.num_classes:  # the unconditional model that label dropout trained
            return net(x_t, t, torch.full((x_t.shape[0],), module.null_label, device=x_t.device))
        return net(x_t, t)

    variance_type = resolve_variance_type(
        {"sampler": "ddpm", "variance_type": cfg.nll.variance_type}, module.learned_variance
    )["variance_type"]
    if module.learned_variance and variance_type != "learned_range":  # the bound with a fixed σ²: the mean only
        full_model_fn = model_fn
        model_fn = lambda x_t, t: split_learned_variance(full_model_fn(x_t, t))[0]  # noqa: E731
    generator = torch.Generator().manual_seed(cfg.seed)
    totals = []
    start = time.perf_counter()
    for begin in range(0, count, cfg.nll.batch_size):
        x0 = to_model_range(reference[begin : min(begin + cfg.nll.batch_size, count)].to(device))
        bits = nll_bits_per_dim(model_fn, module.diffusion, x0, variance_type=variance_type, generator=generator)
        totals.append(bits["total"].cpu())
    values = torch.cat(totals)
    protocol.update(
        nll_images=count, nll_variance_type=variance_type, nll_seconds=round(time.perf_counter() - start, 1)
    )
    return {"nll_bpd": float(values.mean()), "nll_bpd_stderr": float(values.std() / max(len(values), 1) ** 0.5)}
