"""The random-number state a resumed run needs to continue bit for bit.

Lightning checkpoints model, optimiser, schedulers, loops and callbacks but not the generators, so after a
resume the timesteps, noise and label dropout of every later step would differ from the run that was never
interrupted. The state is kept as tensors and plain Python values, which ``torch.load(weights_only=True)``
accepts.
"""

from __future__ import annotations

import random
from typing import Any

import numpy as np
import torch


def capture_rng_state() -> dict[str, Any]:
    """This process's torch (CPU and every CUDA device), NumPy and Python generator states."""
    kind, keys, position, has_gauss, cached_gaussian = np.random.get_state()  # noqa: NPY002 - the global generator is what seed_everything seeds
    version, python_state, gauss_next = random.getstate()
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "numpy": {
            "kind": kind,
            "keys": torch.from_numpy(keys.astype(np.int64)),
            "position": int(position),
            "has_gauss": int(has_gauss),
            "cached_gaussian": float(cached_gaussian),
        },
        "python": {"version": version, "state": torch.tensor(python_state, dtype=torch.int64), "gauss": gauss_next},
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng_state(state: dict[str, Any]) -> None:
    """Put back what :func:`capture_rng_state` returned (CUDA states only where the devices match)."""
    torch.set_rng_state(state["torch"].cpu())
    saved_numpy = state["numpy"]
    np.random.set_state(  # noqa: NPY002
        (
            saved_numpy["kind"],
            saved_numpy["keys"].numpy().astype(np.uint32),
            saved_numpy["position"],
            saved_numpy["has_gauss"],
            saved_numpy["cached_gaussian"],
        )
    )
    saved_python = state["python"]
    random.setstate((saved_python["version"], tuple(saved_python["state"].tolist()), saved_python["gauss"]))
    cuda_states = state.get("cuda")
    if cuda_states and torch.cuda.is_available() and len(cuda_states) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all([s.cpu() for s in cuda_states])
