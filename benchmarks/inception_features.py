"""Inception feature extraction per image: torch-fidelity's stock ``inception-v3-compat`` (NCHW weights) against
the channels-last registration the evaluation job uses on CPUs, on the same images in one run, and how far their
features differ.

    python benchmarks/inception_features.py                       # 64 images of 8×8 digits, batch 64
    python benchmarks/inception_features.py --images 128 --threads 2

Needs the FID Inception weights ($DIFFUSION_LAB_INCEPTION_WEIGHTS or --weights).
"""

from __future__ import annotations

import argparse
import os
import time

import torch
from torch_fidelity.utils import create_feature_extractor

from diffusion_lab.data import DigitsDataModule
from diffusion_lab.evaluation.fidelity import FEATURE_EXTRACTOR, feature_extractor_for, resolve_inception_weights


def seconds_per_image(extractor: torch.nn.Module, images: torch.Tensor, batch_size: int) -> tuple[float, torch.Tensor]:
    """Wall seconds per image of one pass over ``images`` (after one warm-up batch), and the 2048-d features."""
    with torch.no_grad():
        extractor(images[:batch_size])
        start = time.perf_counter()
        features = torch.cat([extractor(batch)[0] for batch in images.split(batch_size)])
    return (time.perf_counter() - start) / len(images), features


def main(argv: list[str] | None = None) -> dict[str, float]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--weights", default=os.environ.get("DIFFUSION_LAB_INCEPTION_WEIGHTS"))
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    weights = resolve_inception_weights(args.weights)
    digits = DigitsDataModule(image_size=8).reference_images("train")[: args.images].expand(-1, 3, -1, -1)

    timings, features = {}, {}
    for label, name in (
        ("stock NCHW", FEATURE_EXTRACTOR),
        ("channels-last (ours on CPU)", feature_extractor_for(False)),
    ):
        extractor = create_feature_extractor(
            name, ["2048"], cuda=False, verbose=False, feature_extractor_weights_path=weights
        )
        timings[label], features[label] = seconds_per_image(extractor, digits, args.batch_size)
    stock, ours = features.values()
    relative = ((ours - stock).norm() / stock.norm()).item()
    speedup = timings["stock NCHW"] / timings["channels-last (ours on CPU)"]
    print(f"{len(digits)} images of 8×8 digits → 299×299, batch {args.batch_size}, {args.threads} thread(s)")
    for label, seconds in timings.items():
        print(f"  {label:<28} {seconds * 1000:7.1f} ms/image")
    print(f"  speed-up {speedup:.2f}×; features differ by {relative:.1e} (relative Frobenius norm)")
    return {"speedup": speedup, "relative_difference": relative}


if __name__ == "__main__":
    main()
