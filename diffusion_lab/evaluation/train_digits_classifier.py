"""Retrain the digits classifier of ``eval.features=digits`` and write its weights (the shipped file by default):
``python -m diffusion_lab.evaluation.train_digits_classifier [--output PATH] [--seed N]``. About 10 s on 2 cores.

Training is not bit-for-bit repeatable across thread counts, so a retrained file is a new classifier: its digest
(in every protocol, ``feature_weights_sha256``) differs, and its numbers compare only with each other.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from diffusion_lab.data import DigitsDataModule
from diffusion_lab.evaluation.digits_classifier import IMAGE_SIZE, WEIGHTS, accuracy, train_classifier, weights_digest


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Retrain the digits classifier and write its weights.")
    parser.add_argument("--output", type=Path, default=WEIGHTS)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--epochs", type=int, default=60)
    args = parser.parse_args(argv)
    data = DigitsDataModule(image_size=IMAGE_SIZE)
    data.setup()
    (train_images, train_labels), (val_images, val_labels) = data.splits["train"], data.splits["val"]
    model = train_classifier(train_images, train_labels, epochs=args.epochs, seed=args.seed)
    args.output.parent.mkdir(parents=True, exist_ok=True)
    torch.save(model.state_dict(), args.output)
    print(
        f"wrote {args.output} ({weights_digest(args.output)}): train accuracy "
        f"{accuracy(model, train_images, train_labels):.4f}, "
        f"held-out accuracy {accuracy(model, val_images, val_labels):.4f}"
    )


if __name__ == "__main__":
    main()
