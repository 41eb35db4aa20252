"""Samplers: functions of a ``model_fn(x_t, t) -> model_output`` callable, so a trained network, a guided
wrapper or an analytic test model can all be sampled the same way.

``sample`` (``dispatch.py``) is the one entry point; ``options.py`` holds the names, defaults and checks of the
settings; each algorithm has its own module (``ddpm``, ``ddim``, ``dpm_solver``, ``euler``) on the grids of
``timesteps`` and ``sigmas``. ``num_steps`` is always the number of steps; ``network_calls`` says what they cost.
"""

from diffusion_lab.diffusion.samplers.chain import TrajectoryStep
from diffusion_lab.diffusion.samplers.dispatch import check_sampler_settings, sample, sampler_sigmas, sampler_timesteps
from diffusion_lab.diffusion.samplers.guidance import classifier_free_guidance
from diffusion_lab.diffusion.samplers.options import (
    CHAIN_SAMPLERS,
    DEFAULT_NUM_STEPS,
    SAMPLERS,
    SIGMA_SAMPLERS,
    TIMESTEP_SPACINGS,
    network_calls,
    resolve_num_steps,
    resolve_variance_type,
)

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
