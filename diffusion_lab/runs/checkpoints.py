"""Loading a trained model from a checkpoint, safely: for sampling and evaluation.

Checkpoints are read with ``torch.load(weights_only=True)``, which only rebuilds tensors and plain containers;
a file crafted to run code when unpickled is refused before any of it runs. Ours need nothing else: the run
config is stored as plain values, so the module is rebuilt from it.
"""

from __future__ import annotations

import pickle
import zipfile
from pathlib import Path
from typing import Any

import torch
from omegaconf import OmegaConf

from diffusion_lab.errors import CheckpointError
from diffusion_lab.runs.layout import CONFIG_KEY


def load_checkpoint(path: str | Path, mmap: bool = False) -> dict[str, Any]:
    """The checkpoint's contents (on the CPU), or a CheckpointError saying why it cannot be used.

    ``mmap=True`` maps the tensors instead of reading them: a cheap look at a large checkpoint's metadata.
    """
    path = Path(path).expanduser()
    if not path.is_file():
        raise CheckpointError(
            f"Checkpoint {path} does not exist; pass ckpt_path=<run>/checkpoints/last.ckpt (or another .ckpt)."
        )
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as error:
        if "GLOBAL" in str(error) or "Unsupported global" in str(error):
            raise CheckpointError(
                f"Refused to load {path}: it holds objects other than tensors and plain values, which could run "
                f"code when unpickled ({_unsupported_global(error)}). Load only checkpoints written by diffusion_lab "
                "or that you trust."
            ) from None
        raise CheckpointError(
            f"Checkpoint {path} is truncated or corrupt (not a readable PyTorch checkpoint); use another checkpoint "
            "of the run (checkpoints/step_*.ckpt or best.ckpt)."
        ) from None
    except (RuntimeError, EOFError, zipfile.BadZipFile, OSError) as error:
        raise CheckpointError(
            f"Checkpoint {path} is truncated or corrupt ({_first_line(error)}); use another checkpoint of the run "
            "(checkpoints/step_*.ckpt or best.ckpt)."
        ) from None
    if not isinstance(checkpoint, dict) or CONFIG_KEY not in checkpoint or "state_dict" not in checkpoint:
        raise CheckpointError(
            f"{path} is not a diffusion_lab training checkpoint (it has no stored run config); "
            "pass a .ckpt written by python -m diffusion_lab.train."
        )
    return checkpoint


def load_module(path: str | Path, use_ema: bool = True):
    """(DiffusionModule in eval mode, checkpoint) with the EMA weights (default) or the raw ones."""
    checkpoint = load_checkpoint(path)
    return module_from_checkpoint(checkpoint, path, use_ema), checkpoint


def module_from_checkpoint(checkpoint: dict[str, Any], path: str | Path, use_ema: bool = True):
    """The DiffusionModule (eval mode) a loaded checkpoint describes, with its EMA weights or the raw ones."""
    from diffusion_lab.config.build import build_module

    config = OmegaConf.create(checkpoint[CONFIG_KEY])
    module = build_module(config)
    if use_ema:
        state = checkpoint["state_dict"]  # EMAWeightAveraging stores the averaged weights here
    elif "current_model_state" in checkpoint:
        state = checkpoint["current_model_state"]
    else:
        raise CheckpointError(
            f"{path} holds only one set of weights (it was trained without EMA); use use_ema=true to load them."
        )
    missing, unexpected = module.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise CheckpointError(
            f"{path} does not match the network its config describes (missing {missing[:3]}, unexpected "
            f"{unexpected[:3]}); was it written by another version of diffusion_lab?"
        )
    module.eval()
    return module


def _unsupported_global(error: BaseException) -> str:
    """torch's line naming the refused callable, e.g. "unsupported GLOBAL posix.system …"."""
    for line in str(error).splitlines():
        if "GLOBAL" in line or "Unsupported global" in line:
            return line.strip().rstrip(".")
    return _first_line(error)


def _first_line(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    return text[0] if text else type(error).__name__
