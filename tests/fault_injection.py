"""Callbacks the fault tests add to real runs (through ``+callbacks.<name>=…`` or in-process configs)."""

from __future__ import annotations

from pathlib import Path

import lightning as L
import torch

from diffusion_lab.callbacks import find_ema


class PoisonBatches(L.Callback):
    """Turn the images of the chosen optimiser steps (global_step values) into NaN before the step runs."""

    def __init__(self, steps: list[int] | None = None, from_step: int | None = None) -> None:
        self.steps, self.from_step = set(steps or []), from_step

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        step = trainer.global_step
        if step in self.steps or (self.from_step is not None and step >= self.from_step):
            batch[0].fill_(float("nan"))


class RecordWeights(L.Callback):
    """Raw weights after every optimiser step: {global_step: flat parameter vector} (``latest`` is the last
    instance made, for in-process runs that build their callbacks from the config)."""

    latest: RecordWeights | None = None

    def __init__(self) -> None:
        self.after_step: dict[int, torch.Tensor] = {}
        RecordWeights.latest = self

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        ema = find_ema(trainer)
        module = ema.raw_module(pl_module) if ema is not None else pl_module
        self.after_step[trainer.global_step] = torch.cat([p.detach().flatten() for p in module.net.parameters()])


class DumpWeightsPerRank(L.Callback):
    """At the last step, each rank writes its raw and EMA weights to ``<output_dir>/weights_rank<r>.pt``."""

    def __init__(self, output_dir: str) -> None:
        self.output_dir = Path(output_dir)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.global_step != trainer.max_steps:
            return
        ema = find_ema(trainer)
        weights = {
            "raw": {k: v.detach().clone() for k, v in ema.raw_module(pl_module).state_dict().items()},
            "ema": {k: v.detach().clone() for k, v in ema.ema_module(pl_module).state_dict().items()},
        }
        self.output_dir.mkdir(parents=True, exist_ok=True)
        torch.save(weights, self.output_dir / f"weights_rank{trainer.global_rank}.pt")
