"""FID through our wrapper is torch-fidelity's FID: zero for a set against itself, equal to a direct
``torch_fidelity.calculate_metrics`` call on the same images, and worse for a degraded set.

Inception costs ~0.25 s per image on this CPU, so the test uses 24 images, each set extracted once."""

import pytest
import torch
import torch_fidelity

from diffusion_lab.data import DigitsDataModule
from diffusion_lab.evaluation.fidelity import FEATURE_EXTRACTOR, fidelity_metrics


class PlainRGB(torch.utils.data.Dataset):
    """An independent conversion of uint8 grey images to what torch-fidelity reads (uint8 3×H×W)."""

    def __init__(self, images: torch.Tensor) -> None:
        self.images = images

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> torch.Tensor:
        return self.images[index].repeat(3, 1, 1)


def test_fid_is_zero_for_a_set_against_itself_equals_torch_fidelity_and_orders_quality(inception_weights, tmp_path):
    images = DigitsDataModule(image_size=8).reference_images("train")[:24]
    generator = torch.Generator().manual_seed(0)
    noise = torch.randint(-60, 61, images.shape, generator=generator)
    degraded = (images.int() + noise).clamp(0, 255).to(torch.uint8)
    common = {"reference_name": "self-24", "weights_path": inception_weights, "cache_dir": tmp_path, "batch_size": 24}

    itself = fidelity_metrics(images, images, ["fid"], **common)["fid"]
    worse = fidelity_metrics(degraded, images, ["fid"], **common)["fid"]  # reference now from the cache
    direct = torch_fidelity.calculate_metrics(
        input1=PlainRGB(degraded), input2=PlainRGB(images), fid=True, cuda=False, batch_size=24, verbose=False,
        feature_extractor=FEATURE_EXTRACTOR, feature_extractor_weights_path=inception_weights,
    )["frechet_inception_distance"]  # fmt: skip

    assert abs(itself) < 1e-3
    assert worse == pytest.approx(direct, rel=1e-6)
    assert worse > 10.0  # ±60 grey levels of noise is far from the digits
