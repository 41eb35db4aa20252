"""Pictures of the reverse chain: x_t and the network's x̂₀ at each step — what diffusion does, at a glance."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import torch
from PIL import Image

from diffusion_lab.data.base import to_uint8
from diffusion_lab.diffusion.samplers import TrajectoryStep
from diffusion_lab.generation.grids import image_grid


def _as_picture(image: torch.Tensor):
    """(C, H, W) in [−1, 1] → an array matplotlib shows (grey or RGB)."""
    pixels = to_uint8(image)
    return pixels[0].numpy() if pixels.shape[0] == 1 else pixels.permute(1, 2, 0).numpy()


def save_trajectory_figure(
    trajectory: list[TrajectoryStep], path: str | Path, max_samples: int = 4, columns: int = 10
) -> Path:
    """A grid: for each of the first samples, a row of x_t and a row of x̂₀ at ``columns`` evenly spaced steps."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    count = min(max_samples, trajectory[0].x_t.shape[0])
    picks = sorted({round(i * (len(trajectory) - 1) / max(columns - 1, 1)) for i in range(columns)})
    figure, axes = plt.subplots(2 * count, len(picks), figsize=(1.3 * len(picks), 2.6 * count), squeeze=False)
    for column, step_index in enumerate(picks):
        step = trajectory[step_index]
        for sample in range(count):
            for row, (image, name) in enumerate(((step.x_t, "x_t"), (step.pred_x0, "x̂₀"))):
                axis = axes[2 * sample + row, column]
                axis.imshow(_as_picture(image[sample]), cmap="gray", vmin=0, vmax=255, interpolation="nearest")
                axis.set_xticks([])
                axis.set_yticks([])
                if column == 0:
                    axis.set_ylabel(name, rotation=0, labelpad=14, fontsize=10)
        axes[0, column].set_title(step.label or f"t={step.t}", fontsize=9)
    figure.suptitle("Reverse diffusion: the noisy state x_t (top) and the network's estimate x̂₀ (bottom)", fontsize=10)
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)
    return path


def save_trajectory_gif(
    trajectory: list[TrajectoryStep], path: str | Path, max_samples: int = 16, max_frames: int = 60
) -> Path:
    """An animation over the steps: the x_t grid beside the x̂₀ grid, with a pause on the final samples."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    count = min(max_samples, trajectory[0].x_t.shape[0])
    stride = max(1, len(trajectory) // max_frames)
    steps = trajectory[::stride]
    if steps[-1] is not trajectory[-1]:
        steps.append(trajectory[-1])
    frames = []
    for step in steps:
        left = image_grid(to_uint8(step.x_t[:count]), upscale_to=64)
        right = image_grid(to_uint8(step.pred_x0[:count]), upscale_to=64)
        both = torch.cat([left, torch.full_like(left[:, :, :8], 255), right], dim=2)
        array = both.permute(1, 2, 0).numpy()
        frames.append(Image.fromarray(array[..., 0] if array.shape[-1] == 1 else array))
    durations = [80] * (len(frames) - 1) + [1500]
    frames[0].save(path, save_all=True, append_images=frames[1:], duration=durations, loop=0)
    return path
