"""``sample``: one entry point for every sampler, from the settings a config holds to the clean samples.

On a DDPM model (a β schedule), DDPM, DDIM, DPM-Solver++(2M) and a consistency model's multistep sampler walk a
respaced chain of the training timesteps; Euler, Heun and Euler-ancestral walk a grid of noise levels σ. On a
continuous objective (EDM, flow matching) the samplers of ``continuous.py`` walk its own path. All end on the clean
sample.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from diffusion_lab.diffusion.consistency import ConsistencyParameterisation
from diffusion_lab.diffusion.consistency import sampling_grid as consistency_sampling_grid
from diffusion_lab.diffusion.continuous import ContinuousObjective
from diffusion_lab.diffusion.process import check_prediction_type
from diffusion_lab.diffusion.samplers.chain import Generator, ModelFn, SamplingChain, TrajectoryStep, randn
from diffusion_lab.diffusion.samplers.consistency import consistency_loop
from diffusion_lab.diffusion.samplers.continuous import check_continuous_settings, sample_continuous
from diffusion_lab.diffusion.samplers.ddim import ddim_loop
from diffusion_lab.diffusion.samplers.ddpm import ddpm_loop
from diffusion_lab.diffusion.samplers.dpm_solver import dpm_solver_2m_loop
from diffusion_lab.diffusion.samplers.euler import Churn, SigmaChain, euler_ancestral_loop, euler_loop
from diffusion_lab.diffusion.samplers.options import SIGMA_SAMPLERS, check_options, resolve_num_steps
from diffusion_lab.diffusion.samplers.sigmas import SIGMA_SPACINGS, sigma_grid, sigma_timesteps, trained_sigmas
from diffusion_lab.diffusion.samplers.timesteps import sampling_timesteps
from diffusion_lab.diffusion.schedules import NoiseSchedule


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
    if sampler == "consistency":
        return consistency_sampling_grid(T, num_steps)
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


def check_sampler_settings(
    schedule: NoiseSchedule | ContinuousObjective,
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
    shift: float = 1.0,
) -> None:
    """Raise the ValueError ``sample`` would, before any sampling starts. ``schedule``: a DDPM model's β schedule,
    or a continuous objective (EDM, flow matching), whose samplers live in ``continuous.py``."""
    if isinstance(schedule, ContinuousObjective):
        check_continuous_settings(
            schedule, sampler, num_steps, eta, timestep_spacing, variance_type, clip_sample, rho, sigma_max,
            s_churn, s_tmin, s_tmax, s_noise, shift,
        )  # fmt: skip
        return
    _check_no_shift(shift)
    churn = Churn(s_churn, s_tmin, s_tmax, s_noise)
    _grid(schedule, sampler, num_steps, eta, timestep_spacing, variance_type, rho, sigma_max, churn)


def _check_no_shift(shift: float) -> None:
    if shift != 1.0:
        raise ValueError(f"shift={shift} applies to flow matching's uniform-t grid only; leave shift=1.")


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
    check_options(sampler, steps, eta, variance_type, churn, spacing)
    if sampler in SIGMA_SAMPLERS:
        return sampler_sigmas(schedule, steps, spacing, rho, sigma_max)
    return sampler_timesteps(sampler, schedule, steps, spacing, rho, sigma_max)


def sample(
    model_fn: ModelFn,
    schedule: NoiseSchedule | ContinuousObjective,
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
    shift: float = 1.0,
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
    and ``euler_ancestral``, 10 for ``heun`` and 1 for ``consistency`` (a consistency model's f, re-noised
    between steps on an even grid from T − 1); ``rho`` shapes the ``karras`` spacing and ``sigma_max``
    (null: the trained σ(T−1)) caps where σ spacings start; ``s_churn``, ``s_tmin``, ``s_tmax``, ``s_noise``
    are EDM's churn for euler/heun. ``generator`` may be one generator or one per
    sample (then sample i depends only on generator i). With ``return_trajectory`` also returns, per network
    call on the main path, x_t and x̂₀ (on the CPU).
    """
    if isinstance(schedule, ContinuousObjective):  # its own parameterisation: prediction_type does not apply
        return sample_continuous(
            model_fn, schedule, shape, sampler=sampler, num_steps=num_steps, eta=eta, timestep_spacing=timestep_spacing,
            variance_type=variance_type, clip_sample=clip_sample, rho=rho, sigma_max=sigma_max, s_churn=s_churn,
            s_tmin=s_tmin, s_tmax=s_tmax, s_noise=s_noise, shift=shift, generator=generator, noise=noise,
            return_trajectory=return_trajectory, device=device, dtype=dtype,
        )  # fmt: skip
    check_prediction_type(prediction_type)
    _check_no_shift(shift)
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
            elif sampler == "consistency":
                parameterisation = ConsistencyParameterisation(schedule.alphas_cumprod)
                x = consistency_loop(
                    model_fn, chain, x, parameterisation=parameterisation, clip_sample=clip_sample, generator=generator
                )
            else:
                x = dpm_solver_2m_loop(model_fn, chain, x, clip_sample=clip_sample)
    if return_trajectory:
        return x, chain.trajectory
    return x
