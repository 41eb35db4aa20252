"""Distil a trained checkpoint into a few-step sampler:
``python -m diffusion_lab.distill teacher=<ckpt> [distillation=…] …``, where distillation is progressive,
progressive_bank (the measured best for 4 calls), progressive_bank_2call (for 2) or consistency.

Progressive distillation (Salimans & Ho 2022) halves the DDIM steps round by round, start_steps → final_steps;
consistency distillation (Song et al. 2023; ``distillation.pairs=data``: consistency tuning as in ECT) trains a
one- or two-call consistency model. Both run in the training loop (EMA, checkpoints, sample grids, DDP/bf16,
logging, resuming with ``ckpt_path=last``). The student's checkpoints record their sampler (DDIM with the round's
steps, or the consistency sampler), so ``sample`` and ``evaluate`` take them like any other checkpoint and draw with
it by default.
"""

from __future__ import annotations

import hydra
from omegaconf import DictConfig, OmegaConf, open_dict

from diffusion_lab.cli.fit import fit
from diffusion_lab.cli.user_errors import config_errors, report_user_errors
from diffusion_lab.config import CONFIG_DIR, register_configs
from diffusion_lab.config.build import build_distillation, storable_config
from diffusion_lab.runs.checkpoints import load_checkpoint
from diffusion_lab.runs.layout import CONFIG_KEY

register_configs()
# What the student takes from its teacher's stored config (the rest is this job's own).
TEACHER_KEYS = ("data", "model", "schedule", "objective", "loss_weighting", "sampler", "label_dropout", "loss_buckets")


def distill(cfg: DictConfig) -> dict[str, float]:
    """Run the distillation; returns the final callback metrics as floats."""
    with config_errors():
        teacher = load_checkpoint(cfg.teacher)
        inherit_teacher_config(cfg, teacher[CONFIG_KEY])
    return fit(cfg, lambda config: build_distillation(config, teacher, run_config=storable_config(config)))


def inherit_teacher_config(cfg: DictConfig, teacher_config: dict) -> None:
    """The student's network, data and process are its teacher's; ``data_root`` moves the data and ``batch_size``
    changes the teacher's."""
    with open_dict(cfg):
        for key in TEACHER_KEYS:
            if key in teacher_config:
                value = teacher_config[key]
                cfg[key] = OmegaConf.create(value) if isinstance(value, dict) else value
        if cfg.get("data_root"):
            cfg.data.root = cfg.data_root
        if cfg.get("batch_size"):
            cfg.data.batch_size = int(cfg.batch_size)
        cfg.compile = teacher_config.get("compile", False)
        cfg.max_nonfinite_steps = int(teacher_config.get("max_nonfinite_steps", 10))


@hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name="distill")
def main(cfg: DictConfig) -> float | None:
    metrics = report_user_errors(distill, cfg)
    metric = cfg.get("optimized_metric")
    return metrics.get(metric) if metric else None


if __name__ == "__main__":
    main()
