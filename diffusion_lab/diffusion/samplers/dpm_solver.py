"""DPM-Solver++(2M) (Lu et al. 2022): a second-order multistep solver of the probability-flow ODE in
data-prediction form, exact in the linear part, in half-log-SNR λ = log(α/σ) with α = √ᾱ, σ = √(1−ᾱ).

As in diffusers' defaults (midpoint form, ``lower_order_final``, final σ = 0), the first step is first-order
and the last step lands on the clean sample, i.e. returns x̂₀.
"""

from __future__ import annotations

import math

import torch

from diffusion_lab.diffusion.process import clamp_x0
from diffusion_lab.diffusion.samplers.chain import ModelFn, SamplingChain


def _half_log_snr(alpha_cumprod: float) -> float:
    # ᾱ = 0 (zero terminal SNR) is λ = −∞; the update's limits are then still finite.
    if alpha_cumprod <= 0.0:
        return -math.inf
    return 0.5 * (math.log(alpha_cumprod) - math.log1p(-alpha_cumprod))


def dpm_solver_2m_loop(
    model_fn: ModelFn, chain: SamplingChain, x: torch.Tensor, *, clip_sample: bool | float
) -> torch.Tensor:
    """x_next = (σ_next/σ) x − α_next (e^{−h} − 1) D, with D = x̂₀ (first order) or
    x̂₀ + (x̂₀ − x̂₀_prev)/(2r), r = h_prev/h (second order, midpoint)."""
    diffusion = chain.diffusion
    alphas_cumprod = chain.alphas_cumprod
    previous_x0: torch.Tensor | None = None
    previous_h = 0.0
    for i in reversed(range(len(chain))):
        output, t = chain.evaluate(model_fn, x, i)
        pred_x0 = clamp_x0(diffusion.predict_x0(x, t, output), clip_sample)
        chain.record(i, x, pred_x0)
        if i == 0:
            return pred_x0  # σ_next = 0: the first-order step to the clean sample is exactly x̂₀

        now, nxt = alphas_cumprod[i], alphas_cumprod[i - 1]
        h = _half_log_snr(nxt) - _half_log_snr(now)
        alpha_next, sigma_next, sigma_now = math.sqrt(nxt), math.sqrt(1.0 - nxt), math.sqrt(1.0 - now)
        linear_coef = -alpha_next * math.expm1(-h)  # −α_next (e^{−h} − 1) > 0
        x_next = (sigma_next / sigma_now) * x + linear_coef * pred_x0
        if previous_x0 is not None:
            ratio = previous_h / h
            x_next = x_next + (0.5 * linear_coef / ratio) * (pred_x0 - previous_x0)
        x, previous_x0, previous_h = x_next, pred_x0, h
    return x
