"""What every training job (``train``, ``distill``) does around its module: show and guard the config, find the
checkpoint to resume, build the trainer from the config's groups, fit, and close the loggers.

``fit(cfg, build)`` takes the job's own ``build(cfg) -> LightningModule``: a fresh DiffusionModule for ``train``,
a student and its teacher for ``distill``; everything else is shared, so both resume, log and checkpoint alike.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path

import lightning as L
from hydra.utils import instantiate
from lightning.pytorch.loggers import WandbLogger
from lightning.pytorch.utilities import rank_zero_only
from omegaconf import DictConfig, open_dict

from diffusion_lab.cli.console import print_config_tree, route_lightning_logs
from diffusion_lab.cli.user_errors import config_errors
from diffusion_lab.config.build import instantiate_group
from diffusion_lab.config.secrets import refuse_secrets
from diffusion_lab.runs.checkpoints import load_checkpoint
from diffusion_lab.runs.folders import resolve_checkpoint
from diffusion_lab.runs.layout import HYDRA_DIR

log = logging.getLogger("diffusion_lab")


def fit(cfg: DictConfig, build: Callable[[DictConfig], L.LightningModule]) -> dict[str, float]:
    """Fit the module ``build`` makes from ``cfg`` on ``cfg.data``; returns the final callback metrics as floats."""
    route_lightning_logs()
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
        module = build(cfg)
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
