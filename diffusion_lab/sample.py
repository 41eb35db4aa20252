"""Draw samples from a trained checkpoint: ``python -m diffusion_lab.sample ckpt_path=… [key=value …]``.

Writes ``samples.npz`` (``arr_0``: uint8 N×H×W×C, the ADM evaluation layout; ``arr_1``: labels when
class-conditional) and ``grid.png``; with ``trajectory=true`` also ``trajectory.png`` and ``trajectory.gif``.
"""

from __future__ import annotations

import logging
from pathlib import Path

import hydra
from omegaconf import DictConfig

from diffusion_lab.cli.user_errors import config_errors, report_user_errors
from diffusion_lab.config import CONFIG_DIR, register_configs
from diffusion_lab.config.build import checkpoint_sampler, sampler_settings
from diffusion_lab.diffusion.samplers import check_sampler_settings
from diffusion_lab.generation.draw import draw_samples, make_fabric, resolve_labels
from diffusion_lab.generation.files import save_samples_npz
from diffusion_lab.generation.grids import save_grid
from diffusion_lab.generation.trajectory import save_trajectory_figure, save_trajectory_gif
from diffusion_lab.runs.checkpoints import load_module
from diffusion_lab.runs.folders import resolve_checkpoint
from diffusion_lab.runs.layout import CONFIG_KEY

log = logging.getLogger(__name__)
register_configs()


def sample(cfg: DictConfig) -> Path | None:
    """Run the sampling job; returns the output folder (on rank 0)."""
    with config_errors():
        checkpoint = resolve_checkpoint(cfg.ckpt_path, Path(cfg.paths.log_dir), Path(cfg.output_dir))
        fabric = make_fabric(cfg.accelerator, cfg.devices, cfg.precision)
        module, stored = load_module(checkpoint, use_ema=cfg.use_ema)
        module.to(fabric.device)
        labels = resolve_labels(cfg.class_label, cfg.num_samples, module.num_classes)
        settings = checkpoint_sampler(cfg, stored[CONFIG_KEY]) or sampler_settings(cfg.sampler)
        check_sampler_settings(module.noise_process, **settings)
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
