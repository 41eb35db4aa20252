"""Callbacks that tests attach to real runs through the config (``+callbacks.probe._target_=tests.probes.…``)."""

from __future__ import annotations

from pathlib import Path
from typing import Any, ClassVar

import lightning as L
import torch


class AutocastProbe(L.Callback):
    """Records, for every convolution the network runs in training steps, whether autocast was on and the
    dtype it computed in (class-level, so the test reads it after an in-process run)."""

    seen: ClassVar[list[tuple[bool, torch.dtype, torch.dtype]]] = []

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        AutocastProbe.seen = []
        self._handles = [
            module.register_forward_hook(self._record)
            for module in pl_module.net.modules()
            if isinstance(module, torch.nn.Conv2d)
        ]

    @staticmethod
    def _record(module: torch.nn.Module, inputs: Any, output: torch.Tensor) -> None:
        if module.training:
            AutocastProbe.seen.append((torch.is_autocast_enabled("cpu"), inputs[0].dtype, output.dtype))

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        for handle in self._handles:
            handle.remove()


class StopAtStep(L.Callback):
    """Stops training after ``step`` optimiser steps, as ``max_time`` or an early-stopping rule would."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, *args: Any) -> None:
        if trainer.global_step >= self.step:
            trainer.should_stop = True


class DumpBankPerRank(L.Callback):
    """At the end of a distillation from a trajectory bank, each rank writes its bank's first states and its student's
    weights to ``<output_dir>/bank_rank<r>.pt`` (DDP tests run in other processes)."""

    def __init__(self, output_dir: str) -> None:
        self.output_dir = output_dir

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        bank = pl_module.trajectory_bank(pl_module.device)
        folder = Path(self.output_dir)
        folder.mkdir(parents=True, exist_ok=True)
        weights = {k: v.detach().clone() for k, v in pl_module.net.state_dict().items()}
        dump = {"states": bank.states[:4].clone(), "weights": weights}
        torch.save(dump, folder / f"bank_rank{trainer.global_rank}.pt")
