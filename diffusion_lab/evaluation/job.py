"""The evaluation job: one checkpoint (drawing samples), a samples.npz (scoring it), or a sweep's runs; writes
``metrics.json`` (or ``summary.json``) and appends each record to the run's eval/metrics.jsonl."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from omegaconf import DictConfig

from diffusion_lab.cli.user_errors import config_errors
from diffusion_lab.config.build import checkpoint_sampler, instantiate_group, sampler_settings
from diffusion_lab.diffusion.samplers import check_sampler_settings
from diffusion_lab.errors import ConfigError
from diffusion_lab.evaluation.nll import check_nll_applies
from diffusion_lab.evaluation.scoring import Evaluation, with_ema_length
from diffusion_lab.evaluation.sweep import evaluate_runs
from diffusion_lab.generation.files import load_samples_npz
from diffusion_lab.runs.checkpoints import load_module
from diffusion_lab.runs.folders import is_run_folder, resolve_checkpoint
from diffusion_lab.runs.layout import CONFIG_KEY
from diffusion_lab.runs.records import append_record, stamped

log = logging.getLogger("diffusion_lab.evaluate")


def evaluate(cfg: DictConfig) -> dict[str, Any]:
    """Run the evaluation job; returns the metrics.json content (on rank 0), or the sweep's summary."""
    with config_errors():
        if cfg.get("runs"):
            return evaluate_runs(cfg)
        if not cfg.ckpt_path and not cfg.samples:
            raise ConfigError(
                "Give ckpt_path=<checkpoint> (to draw samples), samples=<samples.npz> (to score them) or "
                "runs=<run or multirun folder> (to evaluate every run's checkpoints)."
            )
        if "nll" in list(cfg.metrics) and not cfg.ckpt_path:
            raise ConfigError("metrics=[nll] needs ckpt_path: the likelihood bound is computed with the model.")
        job = Evaluation(cfg)
        module, checkpoint, path = None, None, None
        if cfg.ckpt_path:
            path = resolve_checkpoint(cfg.ckpt_path, Path(cfg.paths.log_dir), Path(cfg.output_dir))
            module, checkpoint = load_module(path, use_ema=cfg.use_ema)
            if cfg.get("ema_length") is not None:
                with_ema_length(module, checkpoint, path, cfg.ema_length)
            if "nll" in job.metrics:
                check_nll_applies(module.continuous.name if module.continuous is not None else "ddpm")
        job.data(checkpoint[CONFIG_KEY] if checkpoint else None)
        settings = (checkpoint and checkpoint_sampler(cfg, checkpoint[CONFIG_KEY])) or sampler_settings(cfg.sampler)
        if module is not None:
            check_sampler_settings(module.noise_process, **settings)
            settings = module.resolve_sampler_settings(**settings)
        samples = load_samples_npz(cfg.samples) if cfg.samples and job.fidelity else None

    output = Path(cfg.output_dir)
    report = job.score(
        module=module, checkpoint=checkpoint, checkpoint_path=path, samples=samples, settings=settings,
        save_samples_to=output / "samples.npz" if samples is None else None, ema_length=cfg.get("ema_length"),
    )  # fmt: skip
    if report is None:
        return {}
    if cfg.samples:
        report["protocol"]["samples_file"] = str(cfg.samples)
    output.mkdir(parents=True, exist_ok=True)
    (output / "metrics.json").write_text(json.dumps({k: report[k] for k in ("metrics", "protocol")}, indent=2))
    if path is not None and is_run_folder(Path(path).resolve().parent.parent):
        append_record(Path(path).resolve().parent.parent, stamped(report))
    log_to_loggers(cfg, report["metrics"], report["protocol"].get("global_step", 0))
    log.info("metrics: %s", json.dumps(report["metrics"]))
    return {k: report[k] for k in ("metrics", "protocol")}


def log_to_loggers(cfg: DictConfig, results: dict[str, float], step: int) -> None:
    for logger in instantiate_group(cfg.get("logger")):
        logger.log_metrics({f"eval/{key}": value for key, value in results.items()}, step=step)
        logger.finalize("success")
        experiment = getattr(logger, "_experiment", None)
        if experiment is not None and hasattr(experiment, "finish"):
            experiment.finish()
