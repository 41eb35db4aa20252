"""Samples on disk: ``samples.npz`` with ``arr_0`` uint8 N×H×W×C (the layout of the ADM / guided-diffusion
evaluation suite) and ``arr_1`` labels for class-conditional samples."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from diffusion_lab.errors import ConfigError


def save_samples_npz(path: Path, images: torch.Tensor, labels: torch.Tensor | None = None) -> Path:
    """uint8 (N, C, H, W) → ``arr_0`` N×H×W×C (and ``arr_1`` labels), the layout ADM's evaluator reads."""
    arrays = {"arr_0": images.permute(0, 2, 3, 1).contiguous().numpy()}
    if labels is not None:
        arrays["arr_1"] = labels.cpu().numpy()
    path.parent.mkdir(parents=True, exist_ok=True)
    np.savez(path, **arrays)
    return path


def load_samples_npz(path: str | Path) -> torch.Tensor:
    """uint8 (N, C, H, W) from an ADM-layout samples.npz (``arr_0`` N×H×W×C); never unpickles."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise ConfigError(f"samples={path} does not exist; pass a samples.npz written by diffusion_lab.sample.")
    try:
        with np.load(path, allow_pickle=False) as archive:
            array = archive["arr_0"]
    except (ValueError, KeyError, OSError) as error:
        raise ConfigError(f"samples={path} is not a samples.npz with an arr_0 array ({error}).") from None
    if array.dtype != np.uint8 or array.ndim != 4 or array.shape[-1] not in (1, 3):
        raise ConfigError(
            f"samples={path}: arr_0 must be uint8 N×H×W×C with C = 1 or 3, got {array.dtype} {array.shape}."
        )
    return torch.from_numpy(array).permute(0, 3, 1, 2).contiguous()
