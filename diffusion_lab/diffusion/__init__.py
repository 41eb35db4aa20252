"""The diffusion maths in pure torch (no Lightning): schedules, the Gaussian process, loss weightings and
samplers. Timesteps are 0-indexed: index t is step t+1 of the papers."""

from diffusion_lab.diffusion.process import PREDICTION_TYPES, VARIANCE_TYPES, GaussianDiffusion
from diffusion_lab.diffusion.samplers import SAMPLERS, TIMESTEP_SPACINGS, classifier_free_guidance, sample
from diffusion_lab.diffusion.schedules import SCHEDULE_NAMES, NoiseSchedule, make_schedule
from diffusion_lab.diffusion.weighting import WEIGHTING_NAMES, LossWeighting, make_loss_weighting

__all__ = [
    "PREDICTION_TYPES",
    "SAMPLERS",
    "SCHEDULE_NAMES",
    "TIMESTEP_SPACINGS",
    "VARIANCE_TYPES",
    "WEIGHTING_NAMES",
    "GaussianDiffusion",
    "LossWeighting",
    "NoiseSchedule",
    "classifier_free_guidance",
    "make_loss_weighting",
    "make_schedule",
    "sample",
]
