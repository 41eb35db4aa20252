"""Which training timesteps a sampler visits: the spacings of Lin et al. 2024 (Table 2), as diffusers
implements them, so that a grid named here is the grid a diffusers user gets.

``leading``   every ⌊T/N⌋-th index from 0 (never visits T-1; diffusers' DDIM/DDPM default)
``linspace``  N rounded points evenly from 0 to T-1 (both ends)
``trailing``  N rounded points stepping down from T-1 by T/N (always starts at pure noise)

DPM-Solver (diffusers' ``DPMSolverMultistepScheduler``) lays ``linspace`` and ``leading`` out over N+1 points
and drops the smallest, because its last step always goes to the clean sample; ``trailing`` is the same.
"""

from __future__ import annotations

import numpy as np
import torch

GRID_SPACINGS = ("leading", "linspace", "trailing")


def _grid(num_train_timesteps: int, num_points: int, spacing: str) -> np.ndarray:
    T, N = num_train_timesteps, num_points
    if spacing == "linspace":
        return np.linspace(0, T - 1, N).round()[::-1].astype(np.int64)
    if spacing == "leading":
        return (np.arange(N) * (T // N)).round()[::-1].astype(np.int64)
    # trailing: T-1, T-1-T/N, ... rounded; written per point so that float drift never adds a point.
    return (np.round(T - np.arange(N) * (T / N)) - 1).astype(np.int64)


def sampling_timesteps(
    num_train_timesteps: int, num_steps: int, spacing: str, *, drop_final_point: bool = False
) -> torch.Tensor:
    """Descending LongTensor of the ``num_steps`` timesteps at which the network is evaluated.

    ``drop_final_point`` lays linspace/leading grids over ``num_steps + 1`` points and drops the last, as
    diffusers' DPM-Solver does.
    """
    if spacing not in GRID_SPACINGS:
        raise ValueError(f"Unknown timestep_spacing {spacing!r}; valid choices: {', '.join(GRID_SPACINGS)}.")
    if isinstance(num_steps, bool) or not isinstance(num_steps, int) or not 1 <= num_steps <= num_train_timesteps:
        raise ValueError(
            f"num_steps={num_steps!r} must be an integer between 1 and num_train_timesteps={num_train_timesteps}."
        )
    if drop_final_point and spacing != "trailing":
        grid = _grid(num_train_timesteps, num_steps + 1, spacing)[:-1]
    else:
        grid = _grid(num_train_timesteps, num_steps, spacing)
    if len(grid) != num_steps or np.any(np.diff(grid) >= 0) or grid[-1] < 0:
        raise ValueError(
            f"num_steps={num_steps} is too many for timestep_spacing={spacing!r} with "
            f"num_train_timesteps={num_train_timesteps}: the grid repeats timesteps. Use fewer steps or "
            "timestep_spacing='trailing'."
        )
    return torch.from_numpy(grid.copy())
