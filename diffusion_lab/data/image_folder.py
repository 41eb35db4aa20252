"""A user's own folder of images: ``data=image_folder data.root=path/to/images``.

Images anywhere below the folder are used; if they sit in sub-folders, each sub-folder is a class. Each image
is resized (shorter side) and centre-cropped to ``image_size``. Folders small enough to hold as uint8 in memory
(``in_memory_limit_mb``) are decoded once; larger ones stream through worker processes with pinned memory.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torchvision.transforms.v2.functional as TF
from torch.utils.data import DataLoader, Dataset
from torchvision.io import ImageReadMode, decode_image

from diffusion_lab.data.base import ImageDataModule
from diffusion_lab.errors import ConfigError, DataNotFoundError, UnreadableImageError

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".webp", ".gif", ".tif", ".tiff"}


def read_image(path: Path, channels: int, size: int) -> torch.Tensor:
    """uint8 (C, size, size): decoded, resized on the shorter side, centre-cropped."""
    mode = ImageReadMode.RGB if channels == 3 else ImageReadMode.GRAY
    try:
        image = decode_image(str(path), mode=mode)
    except Exception as error:  # torchvision raises RuntimeError/ValueError variants per codec
        raise UnreadableImageError(
            f"Cannot read image {path} ({error}). Remove or replace the file, then run again."
        ) from None
    image = TF.resize(image, size, antialias=True)
    return TF.center_crop(image, [size, size])


class _FolderDataset(Dataset):
    def __init__(self, files: list[Path], labels: list[int] | None, channels: int, size: int) -> None:
        self.files, self.labels, self.channels, self.size = files, labels, channels, size

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, index: int):
        image = read_image(self.files[index], self.channels, self.size)
        label = self.labels[index] if self.labels is not None else -1
        return image, label


class ImageFolderDataModule(ImageDataModule):
    name = "image folder"

    def __init__(
        self,
        root: str | None = None,
        batch_size: int = 64,
        image_size: int = 64,
        channels: int = 3,
        held_out_fraction: float = 0.05,
        in_memory_limit_mb: float = 4096.0,
        num_workers: int = 4,
        pin_memory: bool = True,
        **kwargs,
    ) -> None:
        super().__init__(root=root, batch_size=batch_size, image_size=image_size, **kwargs)
        self.num_classes = None
        if channels not in (1, 3):
            raise ConfigError(f"data.channels={channels} must be 1 (grey) or 3 (RGB).")
        if not 0.0 < held_out_fraction < 1.0:
            raise ConfigError(f"data.held_out_fraction={held_out_fraction} must lie strictly between 0 and 1.")
        self.channels = channels
        self.held_out_fraction = held_out_fraction
        self.in_memory_limit_mb = in_memory_limit_mb
        self.num_workers, self.pin_memory = num_workers, pin_memory
        self._files: dict[str, tuple[list[Path], list[int] | None]] = {}
        self._scan()

    def _scan(self) -> None:
        if not self.root.is_dir():
            raise DataNotFoundError(
                f"data.root={self.root} is not a folder. Point data.root at a folder of images "
                f"({', '.join(sorted(IMAGE_SUFFIXES))}), optionally in one sub-folder per class."
            )
        files = sorted(p for p in self.root.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
        if len(files) < 2:
            raise DataNotFoundError(
                f"Found {len(files)} images under {self.root}; need at least 2 "
                f"({', '.join(sorted(IMAGE_SUFFIXES))}), optionally in one sub-folder per class."
            )
        class_names = sorted({p.relative_to(self.root).parts[0] for p in files if p.parent != self.root})
        labelled = len(class_names) >= 2 and all(p.parent != self.root for p in files)
        labels = [class_names.index(p.relative_to(self.root).parts[0]) for p in files] if labelled else None
        self.class_names = class_names if labelled else []
        self.num_classes = len(class_names) if labelled else None
        order = torch.randperm(len(files), generator=torch.Generator().manual_seed(0)).tolist()
        held_out = max(1, int(round(len(files) * self.held_out_fraction)))
        for split, chosen in (("val", order[:held_out]), ("train", order[held_out:])):
            self._files[split] = ([files[i] for i in chosen], [labels[i] for i in chosen] if labels else None)

    @property
    def streaming(self) -> bool:
        count = sum(len(files) for files, _ in self._files.values())
        return count * self.channels * self.image_size**2 / 2**20 > self.in_memory_limit_mb

    def load_split(self, split: str) -> tuple[torch.Tensor, torch.Tensor | None]:
        files, labels = self._files[split]
        images = torch.stack([read_image(path, self.channels, self.image_size) for path in files])
        return images, torch.tensor(labels, dtype=torch.long) if labels is not None else None

    def setup(self, stage: str | None = None) -> None:
        if not self.streaming:
            super().setup(stage)

    def _loader(self, split: str, batch_size: int, shuffle: bool) -> DataLoader:
        files, labels = self._files[split]
        return DataLoader(
            _FolderDataset(files, labels, self.channels, self.image_size),
            batch_size=batch_size,
            shuffle=shuffle,
            drop_last=shuffle,
            num_workers=self.num_workers,
            pin_memory=self.pin_memory,
            persistent_workers=self.num_workers > 0,
            collate_fn=_collate,
        )

    def train_dataloader(self):
        if not self.streaming:
            return super().train_dataloader()
        return self._loader("train", self.per_device_batch_size(self.batch_size, "data.batch_size"), shuffle=True)

    def val_dataloader(self):
        if not self.streaming:
            return super().val_dataloader()
        return self._loader("val", self.per_device_batch_size(self.val_batch_size, "data.val_batch_size"), False)

    def reference_images(self, split: str = "val") -> torch.Tensor:
        if self.streaming:
            return self.load_split(split)[0]
        return super().reference_images(split)


def _collate(items):
    images = torch.stack([image for image, _ in items])
    labels = torch.tensor([label for _, label in items], dtype=torch.long)
    return images, (labels if bool((labels >= 0).all()) else None)
