"""A grid of samples from fixed seeds with the EMA weights, every N steps: the run's progress at a glance."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.loggers import TensorBoardLogger, WandbLogger
from lightning.pytorch.utilities import rank_zero_only

from diffusion_lab.callbacks.ema import find_ema
from diffusion_lab.data.base import to_uint8
from diffusion_lab.generation.grids import image_grid, save_grid


class SampleGrid(L.Callback):
    """Every ``every_n_steps`` optimiser steps (and when training ends) draw ``num_samples`` images from seeds
    ``seed, seed+1, …`` with the EMA weights, save ``samples/step_<N>.png`` in the run directory and send the
    grid to the logger. Class-conditional models get one class per column, guided by ``guidance_scale``."""

    def __init__(
        self,
        every_n_steps: int = 1000,
        num_samples: int = 64,
        seed: int = 0,
        guidance_scale: float = 0.0,
        output_dir: str | None = None,
        sampler: dict[str, Any] | None = None,
    ) -> None:
        if every_n_steps < 1 or num_samples < 1:
            raise ValueError(f"sample grid every_n_steps={every_n_steps} and num_samples={num_samples} must be >= 1.")
        self.every_n_steps, self.num_samples, self.seed = every_n_steps, num_samples, seed
        self.guidance_scale = guidance_scale
        self.output_dir = output_dir
        self.sampler = sampler or {}
        self._last_step = -1

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs, batch, batch_idx: int):
        if trainer.global_step % self.every_n_steps == 0 and trainer.global_step != self._last_step:
            self.draw(trainer, pl_module)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.global_step != self._last_step:
            self.draw(trainer, pl_module)

    @rank_zero_only
    def draw(self, trainer: L.Trainer, pl_module: L.LightningModule) -> Path:
        self._last_step = trainer.global_step
        ema = find_ema(trainer)
        module = ema.ema_module(pl_module) if ema is not None else pl_module
        num_samples, sampler = self.num_samples, dict(self.sampler)
        if trainer.fast_dev_run:  # a smoke test of the sampling path, not a picture
            num_samples, sampler["num_steps"] = min(num_samples, 4), 2
        labels, nrow = None, None
        if getattr(module, "num_classes", None):
            nrow = module.num_classes
            labels = torch.arange(num_samples) % module.num_classes
        seeds = range(self.seed, self.seed + num_samples)
        images = module.generate(
            seeds=seeds, labels=labels, guidance_scale=self.guidance_scale if labels is not None else 0.0, **sampler
        )
        images = to_uint8(images).cpu()
        directory = Path(self.output_dir or trainer.default_root_dir) / "samples"
        path = save_grid(images, directory / f"step_{trainer.global_step:07d}.png", nrow)
        self._send_to_loggers(trainer, image_grid(images, nrow, upscale_to=32))
        return path

    def _send_to_loggers(self, trainer: L.Trainer, grid: torch.Tensor) -> None:
        for logger in trainer.loggers:
            if isinstance(logger, WandbLogger):
                logger.log_image(key="samples", images=[grid.permute(1, 2, 0).numpy()], step=trainer.global_step)
            elif isinstance(logger, TensorBoardLogger):
                logger.experiment.add_image("samples", grid, global_step=trainer.global_step)
