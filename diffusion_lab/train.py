"""Train a diffusion model: ``python -m diffusion_lab.train [group=option ...] [key=value ...]``.

python -m diffusion_lab.train experiment=quickstart
python -m diffusion_lab.train schedule=cosine trainer=ddp trainer.devices=4
python -m diffusion_lab.train -m schedule=linear,cosine loss_weighting=uniform,min_snr
python -m diffusion_lab.train ckpt_path=last
"""

from __future__ import annotations

import hydra
from omegaconf import DictConfig

from diffusion_lab.cli.fit import fit
from diffusion_lab.cli.user_errors import config_errors, report_user_errors
from diffusion_lab.config import CONFIG_DIR, register_configs
from diffusion_lab.config.build import build_module, command_line_overrides, drop_preset_schedule, storable_config

register_configs()


def train(cfg: DictConfig) -> dict[str, float]:
    """Fit the configured model; returns the final callback metrics as floats."""
    with config_errors():
        drop_preset_schedule(cfg, command_line_overrides())
    return fit(cfg, lambda config: build_module(config, run_config=storable_config(config)))


@hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name="train")
def main(cfg: DictConfig) -> float | None:
    metrics = report_user_errors(train, cfg)
    metric = cfg.get("optimized_metric")
    return metrics.get(metric) if metric else None


if __name__ == "__main__":
    main()
