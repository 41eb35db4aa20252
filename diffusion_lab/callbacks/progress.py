"""A progress bar that counts optimiser steps toward ``max_steps``.

Diffusion runs are budgeted in steps, not epochs (``max_epochs=-1``), so Lightning's per-epoch bar read
``Epoch 116/-2`` and restarted every few seconds on small datasets. This one is a single bar of
``global_step / max_steps`` with the time left; runs without a step limit keep Lightning's per-epoch bar.
"""

from __future__ import annotations

from typing import Any

import lightning as L
from lightning.pytorch.callbacks import RichProgressBar


class StepProgressBar(RichProgressBar):
    """Rich progress bar over optimiser steps (``trainer.max_steps``) rather than the batches of an epoch."""

    def _counts_steps(self) -> bool:
        return self._trainer is not None and self.trainer.max_steps > 0

    @property
    def total_train_batches(self) -> int | float:
        return self.trainer.max_steps if self._counts_steps() else super().total_train_batches

    def _get_train_description(self, current_epoch: int) -> str:
        if not self._counts_steps():
            return super()._get_train_description(current_epoch)
        return f"{'Step':{len(self.validation_description)}}"

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not self._counts_steps():
            return super().on_train_epoch_start(trainer, pl_module)
        if self.is_disabled or self.progress is None:
            return None
        if self.train_progress_bar_id is None:  # one bar for the whole run: epochs do not reset it
            self.train_progress_bar_id = self._add_task(self.total_train_batches, self._get_train_description(0))
            self._update(self.train_progress_bar_id, trainer.global_step)
        self.refresh()
        return None

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if not self._counts_steps():
            return super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)
        if not self.is_disabled and self.train_progress_bar_id is None:
            self._initialize_train_progress_bar_id()
        self._update(self.train_progress_bar_id, trainer.global_step)
        self._update_metrics(trainer, pl_module)
        self.refresh()
        return None
