"""The bundled digits and the torchvision datasets (MNIST, Fashion-MNIST, CIFAR-10)."""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
import torch
import torchvision

from diffusion_lab.data.base import ImageDataModule
from diffusion_lab.errors import DataNotFoundError


class DigitsDataModule(ImageDataModule):
    """scikit-learn's 1,797 real 8×8 handwritten digits (bundled with scikit-learn: no download, no network).

    Pixel values 0–16 become 0–255; 10 % is held out (a fixed split, whatever the training seed)."""

    name = "digits"
    channels = 1
    native_size = 8
    num_classes = 10
    held_out_fraction = 0.1

    def load_split(self, split: str) -> tuple[torch.Tensor, torch.Tensor]:
        from sklearn.datasets import load_digits

        digits = load_digits()
        images = torch.from_numpy(np.round(digits.images * (255.0 / 16.0))).to(torch.uint8).unsqueeze(1)
        labels = torch.from_numpy(digits.target).long()
        order = torch.randperm(len(images), generator=torch.Generator().manual_seed(0))
        held_out = int(round(len(images) * self.held_out_fraction))
        chosen = order[:held_out] if split == "val" else order[held_out:]
        return images[chosen].contiguous(), labels[chosen]


class _TorchvisionIdx(ImageDataModule):
    """MNIST-format datasets as torchvision stores them: ``<root>/<Name>/raw/*-ubyte``; the test split is
    the held-out split."""

    channels = 1
    native_size = 28
    num_classes = 10
    dataset_class: type = torchvision.datasets.MNIST

    def load_split(self, split: str) -> tuple[torch.Tensor, torch.Tensor]:
        self._ensure_on_disk()
        dataset = self.dataset_class(str(self.root), train=(split == "train"), download=False)
        return dataset.data.unsqueeze(1).contiguous(), dataset.targets.long()

    def _ensure_on_disk(self) -> None:
        folder = self.root / self.dataset_class.__name__ / "raw"
        expected = [name.removesuffix(".gz") for name, _ in self.dataset_class.resources]
        missing = [name for name in expected if not (folder / name).exists()]
        if missing and self.download:
            self.dataset_class(str(self.root), train=True, download=True)
            missing = [name for name in expected if not (folder / name).exists()]
        if missing:
            raise DataNotFoundError(
                f"{self.name} is not in {folder} (missing {', '.join(missing)}). Either allow the download with "
                f"data.download=true (needs network), or point data.root (or $DIFFUSION_LAB_DATA_DIR) at a folder "
                f"holding {self.dataset_class.__name__}/raw/ with {', '.join(expected)}."
            )


class MNISTDataModule(_TorchvisionIdx):
    name = "MNIST"
    dataset_class = torchvision.datasets.MNIST


class FashionMNISTDataModule(_TorchvisionIdx):
    name = "Fashion-MNIST"
    dataset_class = torchvision.datasets.FashionMNIST


class _CifarBatchUnpickler(pickle.Unpickler):
    """CIFAR-10's batch files are pickles; admit only what they hold (dicts, lists, bytes and numpy arrays),
    so a crafted file cannot run code while it is read."""

    _allowed = {
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
        ("numpy.core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "_reconstruct"),
        ("_codecs", "encode"),  # how Python 3 writes bytes into protocol-2 pickles
    }

    def find_class(self, module: str, name: str):
        if (module, name) in self._allowed:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"{module}.{name} is not allowed in a CIFAR-10 batch file")


class CIFAR10DataModule(ImageDataModule):
    """CIFAR-10 from torchvision's ``<root>/cifar-10-batches-py/`` (data_batch_1…5 for training, test_batch
    held out), with random horizontal flips in training as in Ho et al."""

    name = "CIFAR-10"
    channels = 3
    native_size = 32
    num_classes = 10
    horizontal_flip = True
    folder_name = "cifar-10-batches-py"
    train_files = tuple(f"data_batch_{i}" for i in range(1, 6))
    val_files = ("test_batch",)

    def load_split(self, split: str) -> tuple[torch.Tensor, torch.Tensor]:
        folder = self._ensure_on_disk()
        images, labels = [], []
        for name in self.train_files if split == "train" else self.val_files:
            with open(folder / name, "rb") as handle:
                batch = _CifarBatchUnpickler(handle, encoding="bytes").load()
            images.append(np.asarray(batch[b"data"], dtype=np.uint8).reshape(-1, 3, 32, 32))
            labels.extend(batch[b"labels"])
        return torch.from_numpy(np.concatenate(images)), torch.tensor(labels, dtype=torch.long)

    def _ensure_on_disk(self) -> Path:
        folder = self.root / self.folder_name
        expected = [*self.train_files, *self.val_files]
        missing = [name for name in expected if not (folder / name).exists()]
        if missing and self.download:
            torchvision.datasets.CIFAR10(str(self.root), train=True, download=True)
            missing = [name for name in expected if not (folder / name).exists()]
        if missing:
            raise DataNotFoundError(
                f"{self.name} is not in {folder} (missing {', '.join(missing)}). Either allow the download with "
                f"data.download=true (needs network), or point data.root (or $DIFFUSION_LAB_DATA_DIR) at a folder "
                f"holding {self.folder_name}/ with {', '.join(expected)}."
            )
        return folder
