"""torch.compile for the U-Net, region by region.

Compiling the whole U-Net traces one graph through every level, and its compile time grows with the depth (the
DDPM CIFAR-10 network did not finish within 150 s on an H200). Its repeated blocks — the residual and attention
blocks — are compiled instead, each in place (``nn.Module.compile``, so state-dict keys stay free of
``_orig_mod``): blocks of one class with the same shapes share one compiled graph (torch ≥ 2.5 treats their
parameters as graph inputs), so a level's blocks compile once, and the compiler fuses each GroupNorm with its SiLU.
"""

from __future__ import annotations

from typing import Any

from torch import nn

from diffusion_lab.models.blocks import AttentionBlock, ResBlock

COMPILE_CHOICES = (False, True, "regional", "full")
REPEATED_BLOCKS = (ResBlock, AttentionBlock)


def compile_network(net: nn.Module, how: bool | str, **options: Any) -> int:
    """Compile ``net`` in place: ``True``/"regional" its repeated blocks, "full" the whole network, ``False``
    nothing. ``options`` go to ``torch.compile`` (e.g. mode="max-autotune-no-cudagraphs"). Returns how many
    modules were compiled."""
    if how not in COMPILE_CHOICES:
        raise ValueError(
            f"compile={how!r}: use false, true / regional (the U-Net's residual and attention blocks, each compiled "
            "once per shape) or full (the whole network as one graph)."
        )
    if how is False:
        return 0
    if how == "full":
        net.compile(**options)
        return 1
    blocks = [module for module in net.modules() if isinstance(module, REPEATED_BLOCKS)]
    if not blocks:  # not our U-Net: the whole network is the only region there is
        net.compile(**options)
        return 1
    for block in blocks:
        block.compile(**options)
    return len(blocks)
