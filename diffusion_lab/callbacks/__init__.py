"""Lightning callbacks: checkpoints, EMA with warm-up, sample grids, in-training FID."""

from diffusion_lab.callbacks.checkpoint import RunCheckpoint
from diffusion_lab.callbacks.ema import DiffusionEMA, find_ema
from diffusion_lab.callbacks.fid import FIDCallback
from diffusion_lab.callbacks.posthoc_ema import PostHocEMA
from diffusion_lab.callbacks.progress import StepProgressBar
from diffusion_lab.callbacks.sample_grid import SampleGrid

__all__ = ["DiffusionEMA", "FIDCallback", "PostHocEMA", "RunCheckpoint", "SampleGrid", "StepProgressBar", "find_ema"]
