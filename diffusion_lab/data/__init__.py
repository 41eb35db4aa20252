"""LightningDataModules: images as uint8 in memory, served as floats in [−1, 1]."""

from diffusion_lab.data.base import ImageDataModule, to_model_range, to_uint8
from diffusion_lab.data.datasets import (
    CIFAR10DataModule,
    DigitsDataModule,
    FashionMNISTDataModule,
    MNISTDataModule,
)
from diffusion_lab.data.image_folder import ImageFolderDataModule
from diffusion_lab.errors import DataNotFoundError, UnreadableImageError

__all__ = [
    "CIFAR10DataModule",
    "DataNotFoundError",
    "DigitsDataModule",
    "FashionMNISTDataModule",
    "ImageDataModule",
    "ImageFolderDataModule",
    "MNISTDataModule",
    "UnreadableImageError",
    "to_model_range",
    "to_uint8",
]
