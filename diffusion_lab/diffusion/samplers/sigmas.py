"""Noise levels σ = √((1 − ᾱ)/ᾱ) of a DDPM schedule, the σ grids of Karras et al. 2022 (EDM), and the map
from a σ back to the network's training timestep.

A model trained on discrete timesteps only knows the T noise levels σ(0) < … < σ(T−1). A grid of other σ values
is mapped back the way diffusers' Euler/Heun schedulers (and k-diffusion's ``DiscreteSchedule``) do: linear
interpolation in log σ between the two trained neighbours, which gives a fractional timestep t(σ) that the
sinusoidal embedding takes as it is; outside [σ(0), σ(T−1)] t is clamped to the ends. The ODE samplers
(euler, heun) evaluate the network at that fractional t; the discrete-chain samplers (ddpm, ddim, dpm_solver++)
round it to the nearest trained timestep, so that the jumps they make are exact on the respaced schedule.
"""

from __future__ import annotations

import math

import torch

from diffusion_lab.diffusion.schedules import NoiseSchedule

SIGMA_SPACINGS = ("karras", "log_snr")
# ᾱ of a zero-terminal-SNR schedule's last step is 0, i.e. σ = ∞. As diffusers does for its σ samplers, it is
# replaced by 2⁻²⁴ (σ ≈ 4096), far beyond any data scale, so an ODE started there still starts from noise — or
# by the geometric continuation ᾱ_{T−2}²/ᾱ_{T−3} where that is smaller, so that σ keeps increasing with t.
ZERO_SNR_ALPHA_CUMPROD = 2.0**-24


def trained_sigmas(schedule: NoiseSchedule) -> torch.Tensor:
    """σ_t = √((1 − ᾱ_t)/ᾱ_t) for every training timestep (float64, increasing, finite)."""
    alphas_cumprod = schedule.alphas_cumprod.clone()
    if alphas_cumprod[-1] <= 0:
        stand_in = ZERO_SNR_ALPHA_CUMPROD
        if alphas_cumprod.numel() >= 3:
            stand_in = min(stand_in, float(alphas_cumprod[-2] ** 2 / alphas_cumprod[-3]))
        alphas_cumprod[-1] = stand_in
    return ((1.0 - alphas_cumprod) / alphas_cumprod).sqrt()


def sigma_grid(
    schedule: NoiseSchedule, num_steps: int, spacing: str, rho: float = 7.0, sigma_max: float | None = None
) -> torch.Tensor:
    """``num_steps`` decreasing σ from σ_max = σ(T−1) (or the given ``sigma_max``, if lower) to σ_min = σ(0) of
    the trained schedule.

    ``karras``: σ_i = (σ_max^{1/ρ} + i/(N−1) (σ_min^{1/ρ} − σ_max^{1/ρ}))^ρ, denser at low noise for larger ρ
    (EDM's ρ = 7). ``log_snr``: uniform in log σ, i.e. in log-SNR = −2 log σ (the ρ → ∞ limit). A cosine
    schedule's σ(T−1) ≈ 2·10⁴ spends steps far above any data scale; EDM starts at σ_max = 80.
    """
    if spacing not in SIGMA_SPACINGS:
        raise ValueError(f"Unknown sigma spacing {spacing!r}; valid choices: {', '.join(SIGMA_SPACINGS)}.")
    if not (isinstance(rho, int | float) and math.isfinite(rho) and rho > 0):
        raise ValueError(f"rho={rho!r} must be a positive number (Karras et al. use 7).")
    sigmas = trained_sigmas(schedule)
    sigma_min, trained_max = float(sigmas[0]), float(sigmas[-1])
    if sigma_max is not None and not (isinstance(sigma_max, int | float) and sigma_min < sigma_max):
        raise ValueError(
            f"sigma_max={sigma_max!r} must be a number above the schedule's σ_min = {sigma_min:.4g} (EDM uses 80; "
            f"null: the trained σ_max = {trained_max:.4g})."
        )
    sigma_max = trained_max if sigma_max is None else min(float(sigma_max), trained_max)
    if num_steps == 1:
        return torch.tensor([sigma_max], dtype=torch.float64)
    ramp = torch.linspace(0.0, 1.0, num_steps, dtype=torch.float64)
    if spacing == "log_snr":
        return torch.exp(math.log(sigma_max) + ramp * (math.log(sigma_min) - math.log(sigma_max)))
    inv_rho_max, inv_rho_min = sigma_max ** (1.0 / rho), sigma_min ** (1.0 / rho)
    return (inv_rho_max + ramp * (inv_rho_min - inv_rho_max)) ** rho


def sigma_to_timestep(sigma: torch.Tensor | float, schedule: NoiseSchedule) -> torch.Tensor:
    """Fractional training timestep of each σ: linear in log σ between the trained neighbours, clamped to
    [0, T−1]. A trained σ(k) maps exactly to k."""
    return timestep_of_sigma(torch.as_tensor(sigma, dtype=torch.float64), trained_sigmas(schedule).log())


def timestep_of_sigma(sigma: torch.Tensor, log_sigmas: torch.Tensor) -> torch.Tensor:
    """``sigma_to_timestep`` against precomputed trained log σ (a sampler calls it once per network call)."""
    log_sigma = sigma.clamp(min=1e-10).log()
    low = (torch.searchsorted(log_sigmas, log_sigma, right=True) - 1).clamp(0, log_sigmas.numel() - 2)
    low_value, high_value = log_sigmas[low], log_sigmas[low + 1]
    weight = ((log_sigma - low_value) / (high_value - low_value)).clamp(0.0, 1.0)
    return low.to(torch.float64) + weight


def sigma_timesteps(
    schedule: NoiseSchedule, num_steps: int, spacing: str, rho: float = 7.0, sigma_max: float | None = None
) -> torch.Tensor:
    """The σ grid rounded to the nearest trained timesteps (descending, unique), for the discrete samplers."""
    grid = sigma_grid(schedule, num_steps, spacing, rho, sigma_max)
    timesteps = sigma_to_timestep(grid, schedule).round().long()
    values, counts = timesteps.unique(return_counts=True)
    if (counts > 1).any():
        repeated = values[counts > 1].tolist()
        raise ValueError(
            f"num_steps={num_steps} is too many for timestep_spacing={spacing!r} on this schedule: rounded to the "
            f"trained timesteps its σ grid repeats timesteps {repeated} (the schedule's σ changes faster there than "
            "the grid). Use fewer steps, a lower sigma_max (EDM's 80), timestep_spacing='trailing', or "
            "sampler=euler/heun (which take fractional timesteps)."
        )
    return timesteps
