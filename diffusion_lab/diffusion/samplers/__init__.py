"""Samplers: functions of a ``model_fn(x_t, t) -> model_output`` callable, so a trained network, a guided
wrapper or an analytic test model can all be sampled the same way.

``sample`` is the one entry point; DDPM, DDIM and DPM-Solver++(2M) all walk a respaced chain of the training
schedule and end on the clean sample.
"""

from __future__ import annotations

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
from diffusion_lab.diffusion.samplers.guidance import classifier_free_guidance
from diffusion_lab.diffusion.samplers.timesteps import TIMESTEP_SPACINGS, sampling_timesteps
from diffusion_lab.diffusion.schedules import NoiseSchedule

SAMPLERS = ("ddpm", "ddim", "dpm_solver++")
DEFAULT_NUM_STEPS = {"ddpm": None, "ddim": 50, "dpm_solver++": 20}  # None: every training timestep

__all__ = [
    "DEFAULT_NUM_STEPS",
    "SAMPLERS",
    "TIMESTEP_SPACINGS",
    "TrajectoryStep",
    "check_sampler_settings",
    "classifier_free_guidance",
    "sample",
    "sampler_timesteps",
]


def sampler_timesteps(sampler: str, num_train_timesteps: int, num_steps: int, spacing: str) -> torch.Tensor:
    """The descending timesteps ``sampler`` evaluates the network at (diffusers' grid for that sampler)."""
    return sampling_timesteps(num_train_timesteps, num_steps, spacing, drop_final_point=(sampler == "dpm_solver++"))


def _check_options(sampler: str, eta: float, variance_type: str) -> None:
    if sampler not in SAMPLERS:
        raise ValueError(f"Unknown sampler {sampler!r}; valid choices: {', '.join(SAMPLERS)}.")
    if not 0.0 <= eta <= 1.0:
        raise ValueError(f"eta={eta!r} must lie in [0, 1] (0: deterministic DDIM, 1: DDPM-like noise).")
    if eta != 0.0 and sampler != "ddim":
        raise ValueError(f"eta={eta} applies only to sampler='ddim', not {sampler!r}; leave eta=0.")
    if variance_type not in VARIANCE_TYPES:
        raise ValueError(f"Unknown variance_type {variance_type!r}; valid choices: {', '.join(VARIANCE_TYPES)}.")


def check_sampler_settings(
    num_train_timesteps: int,
    sampler: str = "ddim",
    num_steps: int | None = None,
    eta: float = 0.0,
    timestep_spacing: str = "trailing",
    variance_type: str = "fixed_small",
    clip_sample: bool | float = False,
) -> None:
    """Raise the ValueError ``sample`` would, before any sampling starts."""
    _check_options(sampler, eta, variance_type)
    steps = (
        num_steps
        if num_steps is not None
        else min(DEFAULT_NUM_STEPS[sampler] or num_train_timesteps, num_train_timesteps)
    )
    sampler_timesteps(sampler, num_train_timesteps, steps, timestep_spacing)


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
    variance_type: str = "fixed_small",
    clip_sample: bool | float = False,
    generator: Generator = None,
    noise: torch.Tensor | None = None,
    return_trajectory: bool = False,
    device: torch.device | str | None = None,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor | tuple[torch.Tensor, list[TrajectoryStep]]:
    """Draw samples by walking the reverse chain from x_T ~ N(0, I) (or the given ``noise``).

    ``num_steps`` defaults to every timestep for ``ddpm``, 50 for ``ddim`` and 20 for ``dpm_solver++``;
    ``generator`` may be one generator or one per sample (then sample i depends only on generator i).
    With ``return_trajectory`` also returns, per step, x_t and x̂₀ (on the CPU).
    """
    _check_options(sampler, eta, variance_type)
    check_prediction_type(prediction_type)
    T = schedule.num_train_timesteps
    if num_steps is None:
        num_steps = DEFAULT_NUM_STEPS[sampler] or T
        num_steps = min(num_steps, T)
    timesteps = sampler_timesteps(sampler, T, num_steps, timestep_spacing)
    chain = SamplingChain.build(schedule, timesteps, prediction_type, record=return_trajectory)

    if noise is None:
        if device is None:
            device = "cpu"
        x = randn(shape, generator, device, dtype)
    else:
        if tuple(noise.shape) != tuple(shape):
            raise ValueError(f"noise has shape {tuple(noise.shape)} but shape={tuple(shape)} was asked for.")
        x = noise.to(device=device or noise.device, dtype=dtype)

    with torch.no_grad():
        if sampler == "ddpm":
            x = ddpm_loop(model_fn, chain, x, variance_type=variance_type, clip_sample=clip_sample, generator=generator)
        elif sampler == "ddim":
            x = ddim_loop(model_fn, chain, x, eta=eta, clip_sample=clip_sample, generator=generator)
        else:
            x = dpm_solver_2m_loop(model_fn, chain, x, clip_sample=clip_sample)
    if return_trajectory:
        return x, chain.trajectory
    return x
