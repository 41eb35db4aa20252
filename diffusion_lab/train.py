"""Train a diffusion model: ``python -m diffusion_lab.train [group=option ...] [key=value ...]``.

python -m diffusion_lab.train experiment=quickstart
python -m diffusion_lab.train schedule=cosine trainer=ddp trainer.devices=4
python -m diffusion_lab.train -m schedule=linear,cosine loss_weighting=uniform,min_snr
python -m diffusion_lab.train ckpt_path=last
"""

from __future__ import annotations

import logging
from pathlib import Path

import hydra
import lightning as L
from hydra.utils import instantiate
from lightning.pytorch.loggers import WandbLogger
from lightning.pytorch.utilities import rank_zero_only
from omegaconf import DictConfig, open_dict

from diffusion_lab.cli.console import print_config_tree, route_lightning_logs
from diffusion_lab.cli.user_errors import config_errors, report_user_errors
from diffusion_lab.config import CONFIG_DIR, register_configs
from diffusion_lab.config.build import (
    build_module,
    command_line_overrides,
    drop_preset_schedule,
    instantiate_group,
    storable_config,
)
from diffusion_lab.config.secrets import refuse_secrets
from diffusion_lab.runs.checkpoints import load_checkpoint
from diffusion_lab.runs.folders import resolve_checkpoint
from diffusion_lab.runs.layout import HYDRA_DIR

log = logging.getLogger(__name__)
register_configs()


def train(cfg: DictConfig) -> dict[str, float]:
    """Fit the configured model; returns the final callback metrics as floats."""
    route_lightning_logs()
    with config_errors():
        drop_preset_schedule(cfg, command_line_overrides())
    if cfg.get("print_config"):
        print_config_tree(cfg, Path(cfg.paths.output_dir) / "config_tree.log")
    refuse_secrets(cfg, hydra_dir=Path(cfg.paths.output_dir) / HYDRA_DIR)
    L.seed_everything(cfg.seed, workers=True)
    with config_errors():
        checkpoint = resolve_checkpoint(
            cfg.get("ckpt_path"),
            Path(cfg.paths.log_dir),
            Path(cfg.paths.output_dir),
            announce=log_rank_zero,
            fresh_start_allowed=True,
        )
        if checkpoint is not None:
            continue_logger_runs(cfg, load_checkpoint(checkpoint, mmap=True))
        datamodule = instantiate(cfg.data)
        module = build_module(cfg, run_config=storable_config(cfg))
        trainer: L.Trainer = instantiate(
            cfg.trainer,
            callbacks=instantiate_group(cfg.get("callbacks")),
            logger=instantiate_group(cfg.get("logger")) or False,
        )
    if checkpoint is not None:
        log_rank_zero(f"Resuming from {checkpoint}")
    # Every rank draws its own timesteps and noise; the network was initialised identically above.
    L.seed_everything(cfg.seed + trainer.global_rank, workers=True, verbose=False)
    try:
        # Our checkpoints hold only tensors and plain values, so resuming never unpickles code either.
        trainer.fit(module, datamodule=datamodule, ckpt_path=checkpoint, weights_only=True)
    finally:
        finish_wandb_runs(trainer)
    return {key: float(value) for key, value in trainer.callback_metrics.items()}


def continue_logger_runs(cfg: DictConfig, checkpoint: dict) -> None:
    """A resumed run logs to the W&B run it started (unless logger.wandb.id names another)."""
    run_id = checkpoint.get("logger_run_ids", {}).get("wandb")
    wandb_cfg = (cfg.get("logger") or {}).get("wandb")
    if run_id and wandb_cfg is not None and not wandb_cfg.get("id"):
        with open_dict(wandb_cfg):
            wandb_cfg.id = run_id
            wandb_cfg.resume = "allow"


def finish_wandb_runs(trainer: L.Trainer) -> None:
    """Close W&B runs so their summary is written (and an offline run is complete for ``wandb sync``);
    Lightning leaves this to the caller, and a sweep's next job would otherwise reuse the run."""
    for logger in trainer.loggers:
        if isinstance(logger, WandbLogger) and logger._experiment is not None:
            logger.experiment.finish()


@rank_zero_only
def log_rank_zero(message: str) -> None:
    log.info(message)


@hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name="train")
def main(cfg: DictConfig) -> float | None:
    metrics = report_user_errors(train, cfg)
    metric = cfg.get("optimized_metric")
    return metrics.get(metric) if metric else None


if __name__ == "__main__":
    main()
