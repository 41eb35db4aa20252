"""Drawing many samples reproducibly, on one device or sharded over several.

Sample i is drawn from its own generator seeded ``seed + i``, so the images depend on neither the batch size
nor the number of devices: rank r of w draws samples r, r+w, r+2w, … and the shards are gathered back into
seed order.
"""

from __future__ import annotations

from typing import Any

import torch
from lightning.fabric import Fabric

from diffusion_lab.data.base import to_uint8
from diffusion_lab.diffusion.samplers import DEFAULT_NUM_STEPS, network_calls, resolve_num_steps
from diffusion_lab.diffusion.schedules import NoiseSchedule
from diffusion_lab.errors import ConfigError


def make_fabric(accelerator: str = "auto", devices: int | str = 1, precision: str = "32-true") -> Fabric:
    """A launched Fabric: one process, or one per device (DDP) re-running the job with the same arguments."""
    strategy = "ddp" if (isinstance(devices, int) and devices > 1) else "auto"
    fabric = Fabric(accelerator=accelerator, devices=devices, strategy=strategy, precision=precision)
    fabric.launch()
    return fabric


def resolve_labels(class_label: Any, num_samples: int, num_classes: int | None) -> torch.Tensor | None:
    """``class_label``: null (unconditional), one class for all samples, or a list cycled over the samples."""
    if class_label is None:
        return None
    if not num_classes:
        raise ConfigError(
            f"class_label={class_label} needs a class-conditional model; this checkpoint is unconditional "
            "(train with model.num_classes=${data.num_classes}), so remove class_label."
        )
    chosen = [int(class_label)] if isinstance(class_label, int | str) else [int(c) for c in class_label]
    bad = [c for c in chosen if not 0 <= c < num_classes]
    if bad or not chosen:
        raise ConfigError(f"class_label={class_label} must name classes in [0, {num_classes - 1}].")
    return torch.tensor(chosen).repeat(-(-num_samples // len(chosen)))[:num_samples]


def draw_samples(
    module,
    fabric: Fabric,
    num_samples: int,
    *,
    seed: int = 0,
    batch_size: int = 64,
    labels: torch.Tensor | None = None,
    guidance_scale: float = 0.0,
    sampler: dict[str, Any] | None = None,
) -> torch.Tensor | None:
    """uint8 (N, C, H, W) samples on rank 0 (None on the other ranks), sample i from seed ``seed + i``."""
    if num_samples < 1 or batch_size < 1:
        raise ConfigError(f"num_samples={num_samples} and batch_size={batch_size} must be >= 1.")
    if guidance_scale and labels is None:
        raise ConfigError(
            f"guidance_scale={guidance_scale} needs class labels to guide towards; set class_label=<class> "
            "(or a list of classes) with a class-conditional checkpoint, or guidance_scale=0."
        )
    rank, world = fabric.global_rank, fabric.world_size
    mine = list(range(rank, num_samples, world))
    per_rank = -(-num_samples // world)
    chunks = []
    for start in range(0, len(mine), batch_size):
        indices = mine[start : start + batch_size]
        with fabric.autocast():
            images = module.generate(
                seeds=[seed + i for i in indices],
                labels=labels[indices] if labels is not None else None,
                guidance_scale=guidance_scale,
                **(sampler or {}),
            )
        chunks.append(to_uint8(images))
    if chunks:
        local = torch.cat(chunks)
    else:  # more devices than samples
        net = module.net
        local = torch.empty(0, net.in_channels, net.image_size, net.image_size, dtype=torch.uint8, device=fabric.device)
    return gather_in_seed_order(fabric, local, num_samples, per_rank)


def gather_in_seed_order(fabric: Fabric, local: torch.Tensor, num_samples: int, per_rank: int) -> torch.Tensor | None:
    """Collect each rank's samples (rank r holds r, r+w, …) into one tensor in sample order, on rank 0."""
    world = fabric.world_size
    if world == 1:
        return local.cpu()
    padded = torch.zeros((per_rank, *local.shape[1:]), dtype=torch.int32, device=fabric.device)
    padded[: len(local)] = local.to(padded)
    gathered = fabric.all_gather(padded)  # (world, per_rank, C, H, W); int32: gloo gathers no uint8 or int16
    if fabric.global_rank != 0:
        return None
    ordered = gathered.transpose(0, 1).reshape(-1, *local.shape[1:])[:num_samples]
    return ordered.to(torch.uint8).cpu()


def nfe_per_sample(sampler: dict[str, Any], schedule: NoiseSchedule | None, guidance_scale: float) -> int:
    """Network evaluations per sample: one per step (all T of a DDPM ``schedule`` for its ddpm sampler by default;
    None: a continuous objective's, whose defaults are the samplers' own), Heun two per step but the last, twice
    with guidance."""
    name = sampler.get("sampler", "ddim")
    if schedule is None:
        steps = sampler.get("num_steps") or DEFAULT_NUM_STEPS[name]
    else:
        steps = resolve_num_steps(name, sampler.get("num_steps"), schedule.num_train_timesteps)
    return network_calls(name, steps) * (2 if guidance_scale else 1)
