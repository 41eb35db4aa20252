"""The LightningModule and its training helpers."""

from diffusion_lab.lit.lr_schedule import WarmupDecay, warmup_schedule
from diffusion_lab.lit.module import DiffusionModule

__all__ = ["DiffusionModule", "WarmupDecay", "warmup_schedule"]
