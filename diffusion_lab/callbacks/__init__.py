"""Lightning callbacks: EMA with warm-up, sample grids."""

from diffusion_lab.callbacks.ema import DiffusionEMA, find_ema
from diffusion_lab.callbacks.sample_grid import SampleGrid, save_grid

__all__ = ["DiffusionEMA", "SampleGrid", "find_ema", "save_grid"]
