"""A feature space made for the 8×8 digits: a small CNN trained on the bundled digits and shipped with the package.

Inception sees an 8×8 digit only after a 37× upscale to 299×299, and its features, made for photographs, barely
tell a crisp digit from a blurred one: on the digits its FID's real-data floor is most of the values it measures.
The MNIST literature scores generators in the feature space of a digit classifier instead ("classifier FID");
this is that for the digits. ``eval.features=digits`` gives FID, KID and precision/recall on the 64-d penultimate
layer and an Inception-Score analogue on its logits, through torch-fidelity like the Inception metrics.

The network is trained on the train split only (1617 images), so the 180 held-out digits are unseen by it too:
real held-out digits against the train split are the real-data floor. ``python -m
diffusion_lab.evaluation.train_digits_classifier`` retrains it and rewrites the shipped weights (seconds on a CPU).
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

NAME = "digits-classifier"
WEIGHTS = Path(__file__).parent / "weights" / "digits_classifier.pt"
EMBEDDING, LOGITS = "embedding", "logits_unbiased"
IMAGE_SIZE = 8


class DigitsClassifier(nn.Module):
    """uint8 or [0, 255] grey 8×8 images → (64-d embedding, 10 logits)."""

    def __init__(self, width: int = 32, embedding: int = 64) -> None:
        super().__init__()
        self.trunk = nn.Sequential(
            nn.Conv2d(1, width, 3, padding=1), nn.ReLU(),
            nn.Conv2d(width, width, 3, padding=1), nn.ReLU(),
            nn.MaxPool2d(2),  # 4×4
            nn.Conv2d(width, 2 * width, 3, padding=1), nn.ReLU(),
            nn.MaxPool2d(2),  # 2×2
            nn.Flatten(),
            nn.Linear(8 * width, embedding), nn.ReLU(),
        )  # fmt: skip
        self.head = nn.Linear(embedding, 10)

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = images.float() / 127.5 - 1.0
        embedding = self.trunk(x)
        return embedding, self.head(embedding)


def load_classifier(path: str | Path = WEIGHTS) -> DigitsClassifier:
    """The shipped (or a retrained) classifier, in eval mode; opened with ``weights_only=True``."""
    model = DigitsClassifier()
    model.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
    return model.eval().requires_grad_(False)


def weights_digest(path: str | Path = WEIGHTS) -> str:
    """The first 12 hex digits of the weights file's SHA-256: which classifier a protocol's numbers came from."""
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()[:12]


def train_classifier(
    images: torch.Tensor, labels: torch.Tensor, *, epochs: int = 60, seed: int = 0, noise: float = 8.0
) -> DigitsClassifier:
    """Fit on uint8 (N, 1, 8, 8) digits: AdamW, cosine decay, ±1-pixel shifts and pixel noise of ``noise`` grey
    levels, so that its features answer to the shape of a digit rather than to the 17 grey levels of the data."""
    generator = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    model = DigitsClassifier()
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=1e-3)
    batches_per_epoch = -(-len(images) // 128)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, epochs * batches_per_epoch)
    for _ in range(epochs):
        order = torch.randperm(len(images), generator=generator)
        for start in range(0, len(images), 128):
            index = order[start : start + 128]
            x = _augment(images[index].float(), generator, noise)
            loss = F.cross_entropy(model(x)[1], labels[index])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            schedule.step()
    return model.eval().requires_grad_(False)


def _augment(x: torch.Tensor, generator: torch.Generator, noise: float) -> torch.Tensor:
    shifts = torch.randint(-1, 2, (2,), generator=generator).tolist()
    x = torch.roll(x, shifts=shifts, dims=(-2, -1))
    x = x + noise * torch.randn(x.shape, generator=generator)
    return x.clamp(0, 255)


def accuracy(model: DigitsClassifier, images: torch.Tensor, labels: torch.Tensor) -> float:
    with torch.no_grad():
        return float((model(images)[1].argmax(1) == labels).float().mean())


def torch_fidelity_extractor() -> type:
    """The classifier as a torch-fidelity feature extractor: features ``embedding`` (FID, KID, PRC) and
    ``logits_unbiased`` (ISC). Built on first use, so that importing this module does not import torch-fidelity."""
    from torch_fidelity.feature_extractor_base import FeatureExtractorBase

    class DigitsFeatureExtractor(FeatureExtractorBase):
        def __init__(self, name: str, features_list: list[str], **kwargs: Any) -> None:
            super().__init__(name, features_list)
            self.classifier = load_classifier(kwargs.get("feature_extractor_weights_path") or WEIGHTS)

        @staticmethod
        def get_provided_features_list() -> tuple[str, str]:
            return EMBEDDING, LOGITS

        @staticmethod
        def get_default_feature_layer_for_metric(metric: str) -> str:
            return LOGITS if metric == "isc" else EMBEDDING

        @staticmethod
        def can_be_compiled() -> bool:
            return False

        @staticmethod
        def get_dummy_input_for_compile() -> torch.Tensor:
            return torch.zeros(1, 3, IMAGE_SIZE, IMAGE_SIZE, dtype=torch.uint8)

        def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, ...]:
            if images.shape[-2:] != (IMAGE_SIZE, IMAGE_SIZE):
                raise ValueError(f"the digits classifier takes 8×8 images, got {tuple(images.shape[-2:])}")
            embedding, logits = self.classifier(images[:, :1])  # torch-fidelity's grey images are replicated to RGB
            features = {EMBEDDING: embedding, LOGITS: logits}
            return tuple(features[name] for name in self.features_list)

    return DigitsFeatureExtractor
