"""Image grids: many small samples in one picture, enlarged so that 8×8 digits stay visible."""

from __future__ import annotations

import math
from pathlib import Path

import torch
from torchvision.utils import make_grid, save_image


def image_grid(images: torch.Tensor, nrow: int | None = None, upscale_to: int = 0) -> torch.Tensor:
    """uint8 (N, C, H, W) → one uint8 (3 or C, H', W') grid; tiny images are enlarged by nearest neighbour
    to at least ``upscale_to`` pixels a side so 8×8 digits stay visible."""
    if upscale_to and images.shape[-1] < upscale_to:
        factor = math.ceil(upscale_to / images.shape[-1])
        images = images.repeat_interleave(factor, dim=-1).repeat_interleave(factor, dim=-2)
    nrow = nrow or max(1, int(math.sqrt(images.shape[0])))
    return make_grid(images, nrow=nrow, padding=2, pad_value=255)


def save_grid(images: torch.Tensor, path: str | Path, nrow: int | None = None, upscale_to: int = 32) -> Path:
    """Write a PNG grid of uint8 images."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    grid = image_grid(images.cpu(), nrow, upscale_to)
    save_image(grid.float() / 255.0, path)
    return path
