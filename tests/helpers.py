"""Shared test helpers: exact denoisers for Gaussian data (samplers against known answers), fake datasets on
disk, W&B records, and a job's one-line user error."""

from __future__ import annotations

import pytest
import torch

from diffusion_lab.diffusion.continuous import NOISE_INPUT_SCALE, ContinuousObjective
from diffusion_lab.diffusion.edm import EDM
from diffusion_lab.diffusion.schedules import NoiseSchedule


class GaussianDataDenoiser:
    """The Bayes-optimal network output for data x₀ ~ N(mean, std²) per pixel.

    With x_t = √ᾱ x₀ + √(1−ᾱ) ε, the posterior means are E[ε | x_t] = √(1−ᾱ)(x_t − √ᾱ μ)/(ᾱ s² + 1 − ᾱ)
    and E[x₀ | x_t] = μ + √ᾱ s² (x_t − √ᾱ μ)/(ᾱ s² + 1 − ᾱ); a perfect sampler driven by it returns
    samples distributed as N(μ, s²).

    A fractional t (the σ samplers') means the noise level between the trained neighbours that
    ``sigma_to_timestep`` maps to t: log σ interpolated linearly, ᾱ = 1/(1 + σ²). So the denoiser is exact
    at every σ a sampler asks for.
    """

    def __init__(self, schedule: NoiseSchedule, prediction_type: str, mean: float = 0.3, std: float = 0.5):
        self.alphas_cumprod = schedule.alphas_cumprod
        self.log_sigmas = (0.5 * (torch.log1p(-self.alphas_cumprod) - torch.log(self.alphas_cumprod))).tolist()
        self.prediction_type = prediction_type
        self.mean, self.std = mean, std

    def alpha_cumprod(self, t: torch.Tensor) -> torch.Tensor:
        if not t.is_floating_point():
            return self.alphas_cumprod[t.cpu()]
        t = t.detach().cpu().double().clamp(0, len(self.log_sigmas) - 1)
        low = t.floor().long().clamp(max=len(self.log_sigmas) - 2)
        log_sigmas = torch.tensor(self.log_sigmas, dtype=torch.float64)
        log_sigma = log_sigmas[low] + (t - low) * (log_sigmas[low + 1] - log_sigmas[low])
        return 1.0 / (1.0 + torch.exp(2.0 * log_sigma))

    def __call__(self, x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        ab = self.alpha_cumprod(t).to(x_t).reshape(-1, *([1] * (x_t.ndim - 1)))
        centred = x_t - ab.sqrt() * self.mean
        denominator = ab * self.std**2 + 1.0 - ab
        eps = (1.0 - ab).sqrt() * centred / denominator
        x0 = self.mean + ab.sqrt() * self.std**2 * centred / denominator
        if self.prediction_type == "epsilon":
            return eps
        if self.prediction_type == "sample":
            return x0
        return ab.sqrt() * eps - (1.0 - ab).sqrt() * x0


def write_cifar10(root, train_per_batch: int = 8, test: int = 8, seed: int = 0):
    """A small CIFAR-10 in torchvision's on-disk format (cifar-10-batches-py/ pickles of dicts with numpy data)."""
    import pickle
    from pathlib import Path

    import numpy as np

    folder = Path(root) / "cifar-10-batches-py"
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    files = {f"data_batch_{i}": train_per_batch for i in range(1, 6)} | {"test_batch": test}
    for name, count in files.items():
        batch = {
            b"batch_label": name.encode(),
            b"labels": rng.integers(0, 10, count).tolist(),
            b"data": rng.integers(0, 256, (count, 3072), dtype=np.uint8),
            b"filenames": [f"{name}_{i}.png".encode() for i in range(count)],
        }
        with open(folder / name, "wb") as handle:
            pickle.dump(batch, handle, protocol=2)
    return folder


def write_image_folder(root, classes=("cats", "dogs"), per_class: int = 6, size: int = 20):
    """PNG files in one sub-folder per class, with a different mean brightness per class."""
    from pathlib import Path

    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    for k, name in enumerate(classes):
        (Path(root) / name).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            pixels = np.clip(rng.normal(60 + 120 * k, 20, (size, size + 4, 3)), 0, 255).astype(np.uint8)
            Image.fromarray(pixels).save(Path(root) / name / f"{i}.png")
    return Path(root)


def write_idx_dataset(root, folder_name: str = "MNIST", train: int = 32, test: int = 16, seed: int = 0):
    """A small MNIST-format dataset (big-endian IDX files) under ``root/<folder_name>/raw``."""
    import struct
    from pathlib import Path

    import numpy as np

    raw = Path(root) / folder_name / "raw"
    raw.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for prefix, count in (("train", train), ("t10k", test)):
        images = rng.integers(0, 256, (count, 28, 28), dtype=np.uint8)
        labels = rng.integers(0, 10, count, dtype=np.uint8)
        (raw / f"{prefix}-images-idx3-ubyte").write_bytes(struct.pack(">IIII", 0x803, count, 28, 28) + images.tobytes())
        (raw / f"{prefix}-labels-idx1-ubyte").write_bytes(struct.pack(">II", 0x801, count) + labels.tobytes())
    return Path(root)


def read_wandb_records(path):
    """The protobuf Records of a W&B transaction log (``run-*.wandb``).

    The file is a 7-byte header (":W&B", magic 0xBEE1, version) followed by 32 KiB blocks of LevelDB-log records
    (crc32c: 4 bytes, length: 2, type: 1 = full, 2 = first, 3 = middle, 4 = last). A record still being written
    at the end (wandb-core, another process, appends to the file) is left out, not parsed half-written.
    """
    import struct

    from wandb.proto import wandb_internal_pb2

    with open(path, "rb") as handle:
        data = handle.read()
    assert data[:4] == b":W&B", f"{path} is not a W&B transaction log"
    records, pending, position, block = [], b"", 7, 32768
    while position + 7 <= len(data):
        room = block - position % block
        if room < 7:  # the rest of a block too small for a header is padding
            position += room
            continue
        _, length, kind = struct.unpack("<IHB", data[position : position + 7])
        if (kind == 0 and length == 0) or position + 7 + length > len(data):
            break
        chunk = data[position + 7 : position + 7 + length]
        position += 7 + length
        pending = chunk if kind in (1, 2) else pending + chunk
        if kind in (1, 4):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            records.append(record)
    return records


def user_error(job, cfg, capsys) -> str:
    """Run ``job(cfg)`` through the CLIs' own error path (``report_user_errors``) in this process; it must end with
    exit status 1. Returns what it printed on stderr."""
    from diffusion_lab.cli.user_errors import report_user_errors

    with pytest.raises(SystemExit) as exit_info:
        report_user_errors(job, cfg)
    assert exit_info.value.code == 1
    return capsys.readouterr().err


class IdealModel:
    """The network output that makes the objective's denoiser the exact posterior mean E[x₀ | x_τ] for Gaussian
    data: E[x₀ | x] = μ + α s_d² (x − α μ)/(α² s_d² + s²) on the path x = α x₀ + s ε."""

    def __init__(self, objective: ContinuousObjective, mean: float = 0.3, std: float = 0.5) -> None:
        self.objective, self.mean, self.std = objective, mean, std
        self.calls = 0

    def tau_of(self, noise_input: torch.Tensor) -> torch.Tensor:
        if isinstance(self.objective, EDM):
            return torch.exp(4.0 * noise_input.double() / NOISE_INPUT_SCALE)
        return noise_input.double() / NOISE_INPUT_SCALE

    def posterior_mean(self, x: torch.Tensor, tau: torch.Tensor) -> torch.Tensor:
        alpha = self.objective.alpha(tau).reshape(-1, 1, 1, 1)
        std = self.objective.noise_std(tau).reshape(-1, 1, 1, 1)
        x = x.double()
        return self.mean + alpha * self.std**2 * (x - alpha * self.mean) / (alpha**2 * self.std**2 + std**2)

    def __call__(self, x_in: torch.Tensor, noise_input: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        tau = self.tau_of(noise_input)
        if isinstance(self.objective, EDM):
            x = x_in.double() / self.objective.c_in(tau).reshape(-1, 1, 1, 1)
            skip, out = self.objective.c_skip(tau).reshape(-1, 1, 1, 1), self.objective.c_out(tau).reshape(-1, 1, 1, 1)
            return ((self.posterior_mean(x, tau) - skip * x) / out).float()
        t = tau.reshape(-1, 1, 1, 1)
        return ((x_in.double() - self.posterior_mean(x_in, tau)) / t).float()  # v = (x_t − x̂₀)/t
