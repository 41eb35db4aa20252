"""Samplers: functions of a ``model_fn(x_t, t) -> model_output`` callable, so a trained network, a guided
wrapper or an analytic test model can all be sampled the same way.

``sample`` is the one entry point. DDPM, DDIM and DPM-Solver++(2M) walk a respaced chain of the training
timesteps; Euler, Heun and Euler-ancestral walk a grid of noise levels σ (``sigmas``). All end on the clean
sample. ``num_steps`` is always the number of steps; ``network_calls`` says what they cost.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from diffusion_lab.diffusion.process import VARIANCE_TYPES, check_prediction_type
from diffusion_lab.diffusion.samplers.chain import (
    Generator,
    ModelFn,
    SamplingChain,
    TrajectoryStep,
    randn,
)
from diffusion_lab.diffusion.samplers.ddim import ddim_loop
from diffusion_lab.diffusion.samplers.ddpm import ddpm_loop
from diffusion_lab.diffusion.samplers.dpm_solver import dpm_solver_2m_loop
from diffusion_lab.diffusion.samplers.euler import Churn, SigmaChain, euler_ancestral_loop, euler_loop
from diffusion_lab.diffusion.samplers.guidance import classifier_free_guidance
from diffusion_lab.diffusion.samplers.sigmas import SIGMA_SPACINGS, sigma_grid, sigma_timesteps, trained_sigmas
from diffusion_lab.diffusion.samplers.timesteps import GRID_SPACINGS, sampling_timesteps
from diffusion_lab.diffusion.schedules import NoiseSchedule

CHAIN_SAMPLERS = ("ddpm", "ddim", "dpm_solver++")
SIGMA_SAMPLERS = ("euler", "heun", "euler_ancestral")
SAMPLERS = CHAIN_SAMPLERS + SIGMA_SAMPLERS
# None: every training timestep. Heun's 10 steps are 19 network calls.
DEFAULT_NUM_STEPS = {"ddpm": None, "ddim": 50, "dpm_solver++": 20, "euler": 20, "heun": 10, "euler_ancestral": 20}
TIMESTEP_SPACINGS = GRID_SPACINGS + SIGMA_SPACINGS

__all__ = [
    "CHAIN_SAMPLERS",
    "DEFAULT_NUM_STEPS",
    "SAMPLERS",
    "SIGMA_SAMPLERS",
    "TIMESTEP_SPACINGS",
    "TrajectoryStep",
    "check_sampler_settings",
    "classifier_free_guidance",
    "network_calls",
    "resolve_num_steps",
    "resolve_variance_type",
    "sample",
    "sampler_sigmas",
    "sampler_timesteps",
]


def sampler_timesteps(
    sampler: str,
    schedule: NoiseSchedule | int,
    num_steps: int,
    spacing: str,
    rho: float = 7.0,
    sigma_max: float | None = None,
) -> torch.Tensor:
    """The descending training timesteps a chain sampler evaluates the network at: diffusers' grid for that
    sampler, or a σ spacing rounded to the trained timesteps (``schedule`` must then be a NoiseSchedule)."""
    if spacing in SIGMA_SPACINGS:
        if not isinstance(schedule, NoiseSchedule):
            raise TypeError(f"timestep_spacing={spacing!r} needs the NoiseSchedule, not only its length.")
        return sigma_timesteps(schedule, num_steps, spacing, rho, sigma_max)
    T = schedule if isinstance(schedule, int) else schedule.num_train_timesteps
    return sampling_timesteps(T, num_steps, spacing, drop_final_point=(sampler == "dpm_solver++"))


def sampler_sigmas(
    schedule: NoiseSchedule, num_steps: int, spacing: str, rho: float = 7.0, sigma_max: float | None = None
) -> list[float]:
    """The decreasing σ grid a σ sampler walks, ending at 0: Karras/log-SNR spacing between the trained σ_max
    and σ_min, or the trained σ at a timestep grid's points (diffusers' Euler/Heun without Karras σ)."""
    if spacing in SIGMA_SPACINGS:
        sigmas = sigma_grid(schedule, num_steps, spacing, rho, sigma_max)
    else:
        sigmas = trained_sigmas(schedule)[sampling_timesteps(schedule.num_train_timesteps, num_steps, spacing)]
    return [*sigmas.tolist(), 0.0]


def network_calls(sampler: str, num_steps: int) -> int:
    """Network evaluations per sample (without guidance) for ``num_steps`` steps: Heun's 2nd-order correction
    costs one more call on every step but the last, which goes to σ = 0."""
    return 2 * num_steps - 1 if sampler == "heun" else num_steps


def _check_options(
    sampler: str, num_steps: int, eta: float, variance_type: str | None, churn: Churn, spacing: str
) -> None:
    if sampler not in SAMPLERS:
        raise ValueError(f"Unknown sampler {sampler!r}; valid choices: {', '.join(SAMPLERS)}.")
    if spacing not in TIMESTEP_SPACINGS:
        raise ValueError(f"Unknown timestep_spacing {spacing!r}; valid choices: {', '.join(TIMESTEP_SPACINGS)}.")
    if not 0.0 <= eta <= 1.0:
        raise ValueError(f"eta={eta!r} must lie in [0, 1] (0: deterministic DDIM, 1: DDPM-like noise).")
    if eta != 0.0 and sampler != "ddim":
        raise ValueError(f"eta={eta} applies only to sampler='ddim', not {sampler!r}; leave eta=0.")
    if variance_type is not None and variance_type not in VARIANCE_TYPES:
        raise ValueError(f"Unknown variance_type {variance_type!r}; valid choices: {', '.join(VARIANCE_TYPES)}.")
    if variance_type == "learned_range" and sampler != "ddpm":
        raise ValueError(
            f"variance_type=learned_range applies only to sampler=ddpm; {sampler!r} uses the mean alone (a "
            "learned-variance model's prediction channels), so leave variance_type null."
        )
    if sampler == "heun" and num_steps < 2:
        raise ValueError(
            f"num_steps={num_steps} is too few for sampler='heun': its only step would go to σ = 0, which is an "
            "Euler step. Use num_steps >= 2 (each step but the last costs 2 network calls) or sampler=euler."
        )
    if churn.s_churn < 0 or not math.isfinite(churn.s_churn):
        raise ValueError(f"s_churn={churn.s_churn!r} must be a finite number >= 0 (0: the deterministic ODE).")
    if churn.s_churn > 0 and sampler not in ("euler", "heun"):
        raise ValueError(f"s_churn={churn.s_churn} applies only to sampler=euler or heun, not {sampler!r}; set 0.")
    if not 0.0 <= churn.s_tmin <= churn.s_tmax:
        raise ValueError(
            f"s_tmin={churn.s_tmin!r}, s_tmax={churn.s_tmax!r}: churn applies to σ in [s_tmin, s_tmax], so they "
            "need 0 <= s_tmin <= s_tmax (s_tmax may be .inf)."
        )
    if not (churn.s_noise > 0 and math.isfinite(churn.s_noise)):
        raise ValueError(f"s_noise={churn.s_noise!r} must be a positive number (EDM uses 1.0 to 1.007).")


def resolve_variance_type(settings: dict, learned_variance: bool) -> dict:
    """``settings`` with ``variance_type`` made concrete: null means the model's own — learned_range for DDPM on
    a model that learned its variance, fixed_small otherwise. learned_range without a learned variance is an
    error (the model has no variance output to read)."""
    variance_type = settings.get("variance_type")
    if variance_type is None:
        learned = learned_variance and settings.get("sampler") == "ddpm"
        variance_type = "learned_range" if learned else "fixed_small"
    if variance_type == "learned_range" and not learned_variance:
        raise ValueError(
            "variance_type=learned_range needs a model that learned its variance (trained with objective=hybrid); "
            "this one did not: use fixed_small, fixed_large or leave it null."
        )
    return {**settings, "variance_type": variance_type}


def resolve_num_steps(sampler: str, num_steps: int | None, num_train_timesteps: int) -> int:
    """``num_steps``, or the sampler's default when null (every timestep for ddpm); refused outside [1, T]."""
    if num_steps is None:
        return min(DEFAULT_NUM_STEPS.get(sampler) or num_train_timesteps, num_train_timesteps)
    if isinstance(num_steps, bool) or not isinstance(num_steps, int) or not 1 <= num_steps <= num_train_timesteps:
        raise ValueError(
            f"num_steps={num_steps!r} must be an integer between 1 and num_train_timesteps={num_train_timesteps}."
        )
    return num_steps


def check_sampler_settings(
    schedule: NoiseSchedule,
    sampler: str = "ddim",
    num_steps: int | None = None,
    eta: float = 0.0,
    timestep_spacing: str = "trailing",
    variance_type: str | None = None,
    clip_sample: bool | float = False,
    rho: float = 7.0,
    sigma_max: float | None = None,
    s_churn: float = 0.0,
    s_tmin: float = 0.0,
    s_tmax: float = math.inf,
    s_noise: float = 1.0,
) -> None:
    """Raise the ValueError ``sample`` would, before any sampling starts."""
    churn = Churn(s_churn, s_tmin, s_tmax, s_noise)
    _grid(schedule, sampler, num_steps, eta, timestep_spacing, variance_type, rho, sigma_max, churn)


def _grid(
    schedule: NoiseSchedule,
    sampler: str,
    num_steps: int | None,
    eta: float,
    spacing: str,
    variance_type: str | None,
    rho: float,
    sigma_max: float | None,
    churn: Churn,
) -> list[float] | torch.Tensor:
    """The checked settings' grid: σ values (ending at 0) for a σ sampler, training timesteps for a chain one."""
    steps = resolve_num_steps(sampler, num_steps, schedule.num_train_timesteps)
    _check_options(sampler, steps, eta, variance_type, churn, spacing)
    if sampler in SIGMA_SAMPLERS:
        return sampler_sigmas(schedule, steps, spacing, rho, sigma_max)
    return sampler_timesteps(sampler, schedule, steps, spacing, rho, sigma_max)


def sample(
    model_fn: ModelFn,
    schedule: NoiseSchedule,
    shape: Sequence[int],
    *,
    sampler: str = "ddim",
    num_steps: int | None = None,
    eta: float = 0.0,
    timestep_spacing: str = "trailing",
    prediction_type: str = "epsilon",
    variance_type: str | None = None,
    clip_sample: bool | float = False,
    rho: float = 7.0,
    sigma_max: float | None = None,
    s_churn: float = 0.0,
    s_tmin: float = 0.0,
    s_tmax: float = math.inf,
    s_noise: float = 1.0,
    generator: Generator = None,
    noise: torch.Tensor | None = None,
    return_trajectory: bool = False,
    device: torch.device | str | None = None,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor | tuple[torch.Tensor, list[TrajectoryStep]]:
    """Draw samples by walking the reverse chain from x_T ~ N(0, I) (or the given ``noise``).

    ``variance_type`` (DDPM's σ²: fixed_small = β̃ when null, fixed_large, or learned_range — then
    ``model_fn`` returns the prediction and v stacked along channels) applies to ``ddpm`` only.
    ``num_steps`` defaults to every timestep for ``ddpm``, 50 for ``ddim``, 20 for ``dpm_solver++``, ``euler``
    and ``euler_ancestral`` and 10 for ``heun``; ``rho`` shapes the ``karras`` spacing and ``sigma_max``
    (null: the trained σ(T−1)) caps where σ spacings start; ``s_churn``, ``s_tmin``, ``s_tmax``, ``s_noise``
    are EDM's churn for euler/heun. ``generator`` may be one generator or one per
    sample (then sample i depends only on generator i). With ``return_trajectory`` also returns, per network
    call on the main path, x_t and x̂₀ (on the CPU).
    """
    check_prediction_type(prediction_type)
    churn = Churn(s_churn, s_tmin, s_tmax, s_noise)
    grid = _grid(schedule, sampler, num_steps, eta, timestep_spacing, variance_type, rho, sigma_max, churn)
    variance_type = variance_type or "fixed_small"

    if noise is None:
        if device is None:
            device = "cpu"
        x = randn(shape, generator, device, dtype)
    else:
        if tuple(noise.shape) != tuple(shape):
            raise ValueError(f"noise has shape {tuple(noise.shape)} but shape={tuple(shape)} was asked for.")
        x = noise.to(device=device or noise.device, dtype=dtype)

    if sampler in SIGMA_SAMPLERS:
        chain = SigmaChain(schedule, grid, prediction_type, clip_sample, [] if return_trajectory else None)
        with torch.no_grad():
            x = chain.start(x)
            if sampler == "euler_ancestral":
                x = euler_ancestral_loop(model_fn, chain, x, generator=generator)
            else:
                x = euler_loop(model_fn, chain, x, second_order=(sampler == "heun"), churn=churn, generator=generator)
    else:
        chain = SamplingChain.build(schedule, grid, prediction_type, record=return_trajectory)
        with torch.no_grad():
            if sampler == "ddpm":
                x = ddpm_loop(
                    model_fn, chain, x, variance_type=variance_type, clip_sample=clip_sample, generator=generator
                )
            elif sampler == "ddim":
                x = ddim_loop(model_fn, chain, x, eta=eta, clip_sample=clip_sample, generator=generator)
            else:
                x = dpm_solver_2m_loop(model_fn, chain, x, clip_sample=clip_sample)
    if return_trajectory:
        return x, chain.trajectory
    return x
