"""A small-N FID during training, for the dashboard: ``callbacks=[default,fid]``.

Every ``every_n_steps`` steps, rank 0 draws ``num_samples`` images with the EMA weights (fixed seeds) and scores
them against the datamodule's held-out split with torch-fidelity; the value is logged as ``val/fid``. Small-N FID
is biased upwards: it tracks progress within a run, the evaluation job gives the number to report. On the digits,
``features=digits`` scores in the shipped digits classifier's feature space: milliseconds instead of Inception's
seconds, and sensitive where the upscaled Inception is not.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import lightning as L
import torch

from diffusion_lab.callbacks.ema import find_ema
from diffusion_lab.data.base import to_uint8
from diffusion_lab.evaluation.fidelity import (
    check_features,
    fidelity_metrics,
    reference_cache_name,
    resolve_inception_weights,
)


class FIDCallback(L.Callback):
    def __init__(
        self,
        every_n_steps: int = 5000,
        num_samples: int = 1000,
        batch_size: int = 250,
        seed: int = 0,
        inception_weights: str | None = None,
        cache_dir: str = "~/.cache/diffusion_lab/fidelity",
        reference_split: str = "val",
        sampler: dict[str, Any] | None = None,
        features: str = "inception",
    ) -> None:
        if every_n_steps < 1 or num_samples < 2:
            raise ValueError(f"fid every_n_steps={every_n_steps} must be >= 1 and num_samples={num_samples} >= 2.")
        self.every_n_steps, self.num_samples, self.batch_size, self.seed = every_n_steps, num_samples, batch_size, seed
        self.inception_weights, self.cache_dir = inception_weights, cache_dir
        self.reference_split = reference_split
        self.sampler = sampler or {}
        self.features = check_features(features)
        self._weights: str | None = None

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if stage == "fit" and trainer.is_global_zero and self.features == "inception":
            self._weights = resolve_inception_weights(self.inception_weights)  # fail before training, not after

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs, batch, batch_idx: int):
        if trainer.global_step % self.every_n_steps == 0 and not trainer.fast_dev_run:
            value = self.compute(trainer, pl_module) if trainer.is_global_zero else 0.0
            value = trainer.strategy.broadcast(value, src=0)
            pl_module.log("val/fid", value, on_step=True, on_epoch=False, sync_dist=False)

    def compute(self, trainer: L.Trainer, pl_module: L.LightningModule) -> float:
        ema = find_ema(trainer)
        module = ema.ema_module(pl_module) if ema is not None else pl_module
        chunks = []
        for start in range(0, self.num_samples, self.batch_size):
            seeds = range(self.seed + start, self.seed + min(start + self.batch_size, self.num_samples))
            chunks.append(to_uint8(module.generate(seeds=seeds, **self.sampler)).cpu())
        samples = torch.cat(chunks)
        datamodule = trainer.datamodule
        reference = datamodule.reference_images(self.reference_split)
        metrics = fidelity_metrics(
            samples,
            reference,
            ["fid"],
            reference_name=reference_cache_name(datamodule.name, self.reference_split, reference),
            weights_path=self._weights,
            cache_dir=Path(self.cache_dir).expanduser(),
            features=self.features,
        )
        return metrics["fid"]
