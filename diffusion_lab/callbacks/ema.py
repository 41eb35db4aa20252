"""Exponential moving average of the weights, on top of Lightning's EMAWeightAveraging."""

from __future__ import annotations

from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import EMAWeightAveraging


class DiffusionEMA(EMAWeightAveraging):
    """Lightning's EMA callback (checkpointed, updated on every rank after each optimiser step, swapped in
    for validation, copied into the model when training ends) with two additions diffusion training needs:

    - a warm-up of the decay, min(decay, (1 + n)/(10 + n)) at step n, so that short runs and the first
      thousands of steps of long ones get a usable average instead of one dominated by the random init;
    - ``ema_module`` / ``raw_module``, which return whichever copy holds those weights right now (the swap
      during validation moves them between the model and the average);
    - the optimiser's weights survive the end of training: Lightning copies the average into the model in
      ``on_train_end``, and a checkpoint written after that (ModelCheckpoint's last.ckpt of a run stopped by
      ``max_time`` or ``should_stop``) would otherwise store the average as ``current_model_state`` too —
      losing the raw weights that ``use_ema=false`` and resuming need.
    """

    def __init__(
        self,
        decay: float = 0.9999,
        warmup: bool = True,
        update_every_n_steps: int = 1,
        update_starting_at_step: int | None = None,
        device: torch.device | str | None = None,
    ) -> None:
        if not 0.0 < decay < 1.0:
            raise ValueError(f"ema decay={decay!r} must lie strictly between 0 and 1 (DDPM uses 0.9999).")
        super().__init__(
            device=device,
            use_buffers=True,
            decay=decay,
            update_every_n_steps=update_every_n_steps,
            update_starting_at_step=update_starting_at_step,
        )
        self.decay = decay
        self.warmup = warmup
        self.current_decay = decay
        # One foreach lerp over all tensors instead of a Python call per parameter.
        self._kwargs = {"multi_avg_fn": self._lerp}
        self._swapped = False
        self._raw_state_at_end: dict[str, torch.Tensor] | None = None

    def decay_at(self, step: int) -> float:
        return min(self.decay, (1.0 + step) / (10.0 + step)) if self.warmup else self.decay

    def _lerp(self, averaged: list[torch.Tensor], current: list[torch.Tensor], num_averaged: torch.Tensor) -> None:
        torch._foreach_lerp_(averaged, current, 1.0 - self.current_decay)

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ):
        if getattr(pl_module, "last_step_skipped", False):
            return  # the weights did not change (a non-finite step); the average should not count it
        self.current_decay = self.decay_at(trainer.global_step)
        super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        super().on_train_start(trainer, pl_module)
        self._raw_state_at_end = None

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._raw_state_at_end = {name: value.detach().clone() for name, value in pl_module.state_dict().items()}
        super().on_train_end(trainer, pl_module)

    def on_save_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict[str, Any]) -> None:
        super().on_save_checkpoint(trainer, pl_module, checkpoint)
        if self._raw_state_at_end is not None and "current_model_state" in checkpoint:
            checkpoint["current_model_state"] = self._raw_state_at_end  # the model now holds the average

    def _swap_models(self, pl_module: L.LightningModule) -> None:
        super()._swap_models(pl_module)
        self._swapped = not self._swapped

    def ema_module(self, pl_module: L.LightningModule) -> L.LightningModule:
        """The module that holds the averaged weights now, drawing with the live module's sampler settings: the
        average is a copy made when training started, and a distillation round changes the sampler since."""
        if self._average_model is None or self._swapped:
            return pl_module
        averaged = self._average_model.module
        if hasattr(pl_module, "sampler_settings"):
            averaged.sampler_settings = pl_module.sampler_settings
        return averaged

    def raw_module(self, pl_module: L.LightningModule) -> L.LightningModule:
        """The module that holds the optimiser's (un-averaged) weights now."""
        if self._average_model is not None and self._swapped:
            return self._average_model.module
        return pl_module


def find_ema(trainer: L.Trainer | None) -> DiffusionEMA | None:
    if trainer is None:
        return None
    return next((c for c in trainer.callbacks if isinstance(c, DiffusionEMA)), None)
