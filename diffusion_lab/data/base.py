"""The DataModule every dataset shares: uint8 images in memory, [−1, 1] floats on the device, a held-out split."""

from __future__ import annotations

import os
from pathlib import Path

import lightning as L
import torch
import torchvision.transforms.v2.functional as TF

from diffusion_lab.data.batches import InMemoryBatches
from diffusion_lab.errors import ConfigError


def default_data_root() -> str:
    """``$DIFFUSION_LAB_DATA_DIR`` if set, else ``data/``."""
    return os.environ.get("DIFFUSION_LAB_DATA_DIR") or "data"


def to_model_range(images: torch.Tensor) -> torch.Tensor:
    """uint8 [0, 255] → float32 [−1, 1]."""
    return images.float().div_(127.5).sub_(1.0)


def to_uint8(images: torch.Tensor) -> torch.Tensor:
    """float [−1, 1] → uint8 [0, 255] (clamped, rounded): what people and metrics see."""
    return ((images.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)


class ImageDataModule(L.LightningDataModule):
    """Base class: subclasses load uint8 (N, C, H, W) images (and labels) for the ``train`` and held-out
    ``val`` splits; this class resizes them once to ``image_size``, keeps them in memory (on the accelerator
    when they take less than ``device_memory_limit_mb``), and serves batches as floats in [−1, 1].

    ``batch_size`` is global: under DDP each of the world's processes takes ``batch_size / world_size``.
    """

    name = "images"
    channels = 1
    native_size = 0
    num_classes: int | None = None
    horizontal_flip = False

    def __init__(
        self,
        root: str | None = None,
        batch_size: int = 128,
        image_size: int | None = None,
        val_batch_size: int | None = None,
        download: bool = False,
        seed: int = 0,
        device_memory_limit_mb: float = 2048.0,
        channels: int | None = None,
        num_classes: int | None = None,
    ) -> None:
        super().__init__()
        # channels / num_classes are declared in the data config (the model config reads them); check them.
        for key, declared, actual in (("channels", channels, self.channels), ("num_classes", num_classes, self.num_classes)):
            if declared is not None and actual is not None and declared != actual:
                raise ConfigError(f"data.{key}={declared} but {self.name} has {actual}; remove the override.")
        self.root = Path(root or default_data_root()).expanduser()
        self.batch_size = batch_size
        self.image_size = image_size or self.native_size
        self.val_batch_size = val_batch_size or batch_size
        self.download = download
        self.seed = seed
        self.device_memory_limit_mb = device_memory_limit_mb
        self.splits: dict[str, tuple[torch.Tensor, torch.Tensor | None]] = {}

    # -- what subclasses provide ------------------------------------------------------------------------

    def load_split(self, split: str) -> tuple[torch.Tensor, torch.Tensor | None]:
        """uint8 images (N, C, H, W) and int64 labels (or None) of ``split`` ∈ {"train", "val"}."""
        raise NotImplementedError

    # -- Lightning hooks ------------------------------------------------------------------------------

    def setup(self, stage: str | None = None) -> None:
        if self.splits:
            return
        for split in ("train", "val"):
            images, labels = self.load_split(split)
            images = self._resize(images)
            if images.shape[1] != self.channels:
                raise ValueError(f"{self.name} {split} images have {images.shape[1]} channels, expected {self.channels}.")
            self.splits[split] = (images, labels)
        device = self._storage_device()
        if device.type != "cpu":
            self.splits = {
                split: (images.to(device), labels.to(device) if labels is not None else None)
                for split, (images, labels) in self.splits.items()
            }

    def train_dataloader(self) -> InMemoryBatches:
        images, labels = self._split("train")
        return InMemoryBatches(
            images,
            labels,
            self.per_device_batch_size(self.batch_size, "data.batch_size"),
            shuffle=True,
            drop_last=True,
            seed=self.seed,
            **self._rank_and_world(),
        )

    def val_dataloader(self) -> InMemoryBatches:
        images, labels = self._split("val")
        return InMemoryBatches(
            images,
            labels,
            self.per_device_batch_size(self.val_batch_size, "data.val_batch_size"),
            shuffle=False,
            drop_last=False,
            **self._rank_and_world(),
        )

    def on_after_batch_transfer(self, batch, dataloader_idx: int):
        return self.prepare_batch(batch, training=self.trainer is not None and self.trainer.training)

    def prepare_batch(self, batch, training: bool):
        """uint8 → [−1, 1] on the device; random horizontal flips in training where the data allows."""
        images, labels = batch
        images = to_model_range(images)
        if self.horizontal_flip and training:
            flip = torch.rand(images.shape[0], device=images.device) < 0.5
            images = torch.where(flip[:, None, None, None], images.flip(-1), images)
        return images, labels

    # -- helpers -----------------------------------------------------------------------------------

    def reference_images(self, split: str = "val") -> torch.Tensor:
        """uint8 images of a split on the CPU (the FID reference set)."""
        self.setup()
        return self.splits[split][0].cpu()

    def per_device_batch_size(self, batch_size: int, key: str) -> int:
        world = self._rank_and_world()["world_size"]
        if batch_size % world:
            raise ConfigError(
                f"{key}={batch_size} is global and must split evenly over the {world} processes "
                f"(devices × nodes); choose a multiple of {world}."
            )
        return batch_size // world

    def _split(self, split: str) -> tuple[torch.Tensor, torch.Tensor | None]:
        self.setup()
        return self.splits[split]

    def _resize(self, images: torch.Tensor) -> torch.Tensor:
        if images.shape[-1] == self.image_size and images.shape[-2] == self.image_size:
            return images
        return TF.resize(images, [self.image_size, self.image_size], antialias=True)

    def _rank_and_world(self) -> dict[str, int]:
        if self.trainer is None:
            return {"rank": 0, "world_size": 1}
        return {"rank": self.trainer.global_rank, "world_size": self.trainer.world_size}

    def _storage_device(self) -> torch.device:
        """The accelerator if the uint8 splits fit under ``device_memory_limit_mb``, else the CPU."""
        if self.trainer is None:
            return torch.device("cpu")
        device = self.trainer.strategy.root_device
        size_mb = sum(images.numel() for images, _ in self.splits.values()) / 2**20
        return device if size_mb <= self.device_memory_limit_mb else torch.device("cpu")
