"""Lightning's ModelCheckpoint, plus a ``last.ckpt`` at the final step."""

from __future__ import annotations

from typing import Any

import lightning as L
from lightning.pytorch.callbacks import ModelCheckpoint


class RunCheckpoint(ModelCheckpoint):
    """ModelCheckpoint that also writes ``last.ckpt`` at the final step: when training reaches ``max_steps`` or
    is told to stop (``trainer.max_time``'s Timer, early stopping, a fault guard).

    With ``every_n_train_steps=N`` Lightning saves only at multiples of N, so a run of 700 steps saved every 300
    would end with a ``last.ckpt`` of step 600 — and a run stopped by its time budget at step 641 after a save at
    350 with one of step 350 — and its final steps would be lost to sampling, evaluation and resuming.
    """

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)
        final_step = trainer.should_stop or 0 < trainer.max_steps <= trainer.global_step
        saved_on_schedule = self._every_n_train_steps > 0 and trainer.global_step % self._every_n_train_steps == 0
        if self.save_last and final_step and not saved_on_schedule and not self._should_skip_saving_checkpoint(trainer):
            self._save_last_checkpoint(trainer, self._monitor_candidates(trainer))
