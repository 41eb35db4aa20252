"""torch.compile for the U-Net, region by region.

Compiling the whole U-Net traces one graph through every level, and its compile time grows with the depth (the
DDPM CIFAR-10 network did not finish within 150 s on an H200). Its repeated blocks — the residual and attention
blocks — are compiled instead, each in place (``nn.Module.compile``, so state-dict keys stay free of
``_orig_mod``): blocks of one class with the same shapes share one compiled graph (torch ≥ 2.5 treats their
parameters as graph inputs), so a level's blocks compile once, and the compiler fuses each GroupNorm with its SiLU.

``graphs`` compiles the whole network with ``mode="reduce-overhead"``: on a GPU its forward and backward are
replayed as CUDA graphs, one launch instead of hundreds, for steps bound by kernel launches (small batches, the
sampling loops); on a CPU it is ``full``. A replay reuses its output buffers, so whoever keeps an output past the
next call must copy it (``graph_safe``).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from diffusion_lab.models.blocks import AttentionBlock, ResBlock

COMPILE_CHOICES = (False, True, "regional", "full", "graphs")
REPEATED_BLOCKS = (ResBlock, AttentionBlock)


def compile_network(net: nn.Module, how: bool | str, **options: Any) -> int:
    """Compile ``net`` in place: ``True``/"regional" its repeated blocks, "full" the whole network, ``False``
    nothing. ``options`` go to ``torch.compile`` (e.g. mode="max-autotune-no-cudagraphs"). Returns how many
    modules were compiled."""
    if how not in COMPILE_CHOICES:
        raise ValueError(
            f"compile={how!r}: use false, true / regional (the U-Net's residual and attention blocks, each compiled "
            "once per shape), full (the whole network as one graph) or graphs (full, replayed as CUDA graphs)."
        )
    if how is False:
        return 0
    if how == "graphs":
        net.compile(**{"mode": "reduce-overhead", **options})
        return 1
    if how == "full":
        net.compile(**options)
        return 1
    blocks = [module for module in net.modules() if isinstance(module, REPEATED_BLOCKS)]
    if not blocks:  # not our U-Net: the whole network is the only region there is
        net.compile(**options)
        return 1
    # Every block of a class shares one code object, so each distinct shape is a recompile of it: past dynamo's
    # recompile_limit (8) the remaining shapes would silently run eager (ResBlock shapes: 9 in the 6.5 M MNIST U-Net,
    # 11 in the 35.7 M CIFAR-10 one).
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, len(blocks))
    for block in blocks:
        block.compile(**options)
    return len(blocks)


def graph_safe(network: Callable[..., torch.Tensor], how: bool | str) -> Callable[..., torch.Tensor]:
    """``network`` whose outputs outlive the next call: under ``graphs`` each call starts a new CUDA-graph
    iteration whose replay overwrites the previous output (a sampler keeps x̂₀ across steps, guidance calls the
    network twice), so the output is copied; otherwise ``network`` itself."""
    if how != "graphs":
        return network

    def call(*args: Any) -> torch.Tensor:
        return network(*args).clone()

    return call
