"""Draw samples from a trained checkpoint: ``python -m diffusion_lab.sample ckpt_path=… [key=value …]``.

Writes ``samples.npz`` (``arr_0``: uint8 N×H×W×C, the ADM evaluation layout; ``arr_1``: labels when
class-conditional) and ``grid.png``; with ``trajectory=true`` also ``trajectory.png`` and ``trajectory.gif``.
"""

from __future__ import annotations

import logging
from pathlib import Path

import hydra
import numpy as np
import torch
from omegaconf import DictConfig

from diffusion_lab.build import sampler_settings
from diffusion_lab.callbacks.sample_grid import save_grid
from diffusion_lab.checkpoints import load_module
from diffusion_lab.configs import register_configs
from diffusion_lab.diffusion.samplers import check_sampler_settings
from diffusion_lab.runs import config_errors, report_user_errors, resolve_checkpoint
from diffusion_lab.sampling import draw_samples, make_fabric, resolve_labels
from diffusion_lab.trajectory import save_trajectory_figure, save_trajectory_gif

CONFIG_DIR = str(Path(__file__).resolve().parent.parent / "conf")
log = logging.getLogger(__name__)
register_configs()


def save_samples_npz(path: Path, images: torch.Tensor, labels: torch.Tensor | None = None) -> Path:
    """uint8 (N, C, H, W) → ``arr_0`` N×H×W×C (and ``arr_1`` labels), the layout ADM's evaluator reads."""
    arrays = {"arr_0": images.permute(0, 2, 3, 1).contiguous().numpy()}
    if labels is not None:
        arrays["arr_1"] = labels.cpu().numpy()
    path.parent.mkdir(parents=True, exist_ok=True)
    np.savez(path, **arrays)
    return path


def sample(cfg: DictConfig) -> Path | None:
    """Run the sampling job; returns the output folder (on rank 0)."""
    with config_errors():
        checkpoint = resolve_checkpoint(cfg.ckpt_path, Path(cfg.paths.log_dir), Path(cfg.output_dir))
        fabric = make_fabric(cfg.accelerator, cfg.devices, cfg.precision)
        module, _ = load_module(checkpoint, use_ema=cfg.use_ema)
        module.to(fabric.device)
        labels = resolve_labels(cfg.class_label, cfg.num_samples, module.num_classes)
        settings = sampler_settings(cfg.sampler)
        check_sampler_settings(module.schedule, **settings)
        settings = module.resolve_sampler_settings(**settings)
    images = draw_samples(
        module,
        fabric,
        cfg.num_samples,
        seed=cfg.seed,
        batch_size=cfg.batch_size,
        labels=labels,
        guidance_scale=cfg.guidance_scale,
        sampler=settings,
    )
    if fabric.global_rank != 0:
        return None
    output = Path(cfg.output_dir)
    save_samples_npz(output / "samples.npz", images, labels)
    nrow = module.num_classes if labels is not None and labels.unique().numel() > 1 else None
    save_grid(images[: cfg.grid_max_images], output / "grid.png", nrow=nrow)
    if cfg.trajectory:
        write_trajectory(module, cfg, labels, settings, output)
    log.info("Wrote %d samples to %s", len(images), output / "samples.npz")
    return output


def write_trajectory(module, cfg: DictConfig, labels, settings: dict, output: Path) -> None:
    """The first few samples again (same seeds, so the same images), recording every step."""
    count = min(cfg.num_samples, 16)
    _, steps = module.generate(
        seeds=[cfg.seed + i for i in range(count)],
        labels=labels[:count] if labels is not None else None,
        guidance_scale=cfg.guidance_scale,
        return_trajectory=True,
        **settings,
    )
    save_trajectory_figure(steps, output / "trajectory.png")
    save_trajectory_gif(steps, output / "trajectory.gif")


@hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name="sample")
def main(cfg: DictConfig) -> None:
    report_user_errors(sample, cfg)


if __name__ == "__main__":
    main()
