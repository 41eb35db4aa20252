"""The optimiser's fused kernels where they exist: a launch-bound GPU step spends much of its time launching one
AdamW kernel per parameter group of tensors; ``fused=True`` updates every parameter in one."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

FUSABLE = (torch.optim.AdamW, torch.optim.Adam)


def fused_optimizer_option(factory: Callable[..., torch.optim.Optimizer], net: nn.Module) -> dict[str, Any]:
    """``{"fused": True}`` for Adam/AdamW on CUDA parameters when the config chose neither ``fused`` nor
    ``foreach``; nothing otherwise (CPU runs keep PyTorch's default)."""
    function = getattr(factory, "func", factory)
    chosen = getattr(factory, "keywords", {}) or {}
    parameters = list(net.parameters())
    on_cuda = bool(parameters) and all(p.is_cuda for p in parameters)
    if function in FUSABLE and on_cuda and "fused" not in chosen and "foreach" not in chosen:
        return {"fused": True}
    return {}
