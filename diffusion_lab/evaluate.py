"""Evaluate a checkpoint (or a samples.npz): ``python -m diffusion_lab.evaluate ckpt_path=… metrics=[fid,kid]``.

Sample quality comes from torch-fidelity (``fid``, ``kid``, ``isc``, ``prc``) against the held-out split of the
training data; ``nll`` is the variational bound in bits/dim on that split. ``metrics.json`` records the values and
the protocol (data, split, N, sampler and function evaluations, EMA or raw, seed, feature extractor).
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Any

import hydra
import numpy as np
import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf, open_dict

from diffusion_lab.build import sampler_settings
from diffusion_lab.checkpoints import load_module
from diffusion_lab.configs import plain, register_configs
from diffusion_lab.data.base import to_model_range
from diffusion_lab.diffusion.samplers import check_sampler_settings
from diffusion_lab.errors import ConfigError
from diffusion_lab.evaluation import (
    FIDELITY_METRICS,
    fidelity_metrics,
    nll_bits_per_dim,
    reference_cache_name,
    resolve_inception_weights,
)
from diffusion_lab.evaluation.fidelity import FEATURE_EXTRACTOR
from diffusion_lab.runs import config_errors, instantiate_group, report_user_errors, resolve_checkpoint
from diffusion_lab.sample import save_samples_npz
from diffusion_lab.sampling import draw_samples, make_fabric, nfe_per_sample, resolve_labels

CONFIG_DIR = str(Path(__file__).resolve().parent.parent / "conf")
log = logging.getLogger(__name__)
register_configs()


def load_samples_npz(path: str | Path) -> torch.Tensor:
    """uint8 (N, C, H, W) from an ADM-layout samples.npz (``arr_0`` N×H×W×C); never unpickles."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise ConfigError(f"samples={path} does not exist; pass a samples.npz written by diffusion_lab.sample.")
    try:
        with np.load(path, allow_pickle=False) as archive:
            array = archive["arr_0"]
    except (ValueError, KeyError, OSError) as error:
        raise ConfigError(f"samples={path} is not a samples.npz with an arr_0 array ({error}).") from None
    if array.dtype != np.uint8 or array.ndim != 4 or array.shape[-1] not in (1, 3):
        raise ConfigError(
            f"samples={path}: arr_0 must be uint8 N×H×W×C with C = 1 or 3, got {array.dtype} {array.shape}."
        )
    return torch.from_numpy(array).permute(0, 3, 1, 2).contiguous()


def reference_datamodule(cfg: DictConfig, checkpoint_config: dict[str, Any] | None):
    """The dataset whose held-out split is the reference: ``data=…`` if given, else the checkpoint's."""
    if cfg.get("data") is not None:
        data_cfg = cfg.data
    elif checkpoint_config is not None:
        data_cfg = OmegaConf.create(checkpoint_config["data"])
    else:
        raise ConfigError(
            "samples=… needs data=<dataset> (e.g. data=cifar10) to know which real images to compare with."
        )
    if cfg.get("data_root"):
        with open_dict(data_cfg):
            data_cfg.root = cfg.data_root
    return instantiate(data_cfg)


def evaluate(cfg: DictConfig) -> dict[str, Any]:
    """Run the evaluation job; returns the metrics.json content (on rank 0)."""
    metrics = list(cfg.metrics)
    unknown = [m for m in metrics if m not in (*FIDELITY_METRICS, "nll")]
    fidelity = [m for m in metrics if m in FIDELITY_METRICS]
    with config_errors():
        if unknown:
            raise ConfigError(
                f"metrics={metrics}: unknown {unknown}; valid choices: {', '.join(FIDELITY_METRICS)}, nll."
            )
        if not cfg.ckpt_path and not cfg.samples:
            raise ConfigError("Give ckpt_path=<checkpoint> (to draw samples) or samples=<samples.npz> (to score them).")
        if "nll" in metrics and not cfg.ckpt_path:
            raise ConfigError("metrics=[nll] needs ckpt_path: the likelihood bound is computed with the model.")
        weights = (
            resolve_inception_weights(cfg.eval.inception_weights, require_classifier="isc" in metrics)
            if fidelity
            else None
        )
        module, checkpoint = None, None
        if cfg.ckpt_path:
            path = resolve_checkpoint(cfg.ckpt_path, Path(cfg.paths.log_dir), Path(cfg.output_dir))
            module, checkpoint = load_module(path, use_ema=cfg.use_ema)
        fabric = make_fabric(cfg.accelerator, cfg.devices, cfg.precision)
        datamodule = reference_datamodule(cfg, checkpoint["diffusion_lab_config"] if checkpoint else None)
        settings = sampler_settings(cfg.sampler)
        if module is not None:
            check_sampler_settings(module.schedule.num_train_timesteps, **settings)

    protocol: dict[str, Any] = {
        "dataset": datamodule.name,
        "reference_split": cfg.reference_split,
        "feature_extractor": FEATURE_EXTRACTOR,
        "inception_weights": weights,
    }
    results: dict[str, float] = {}
    output = Path(cfg.output_dir)
    samples = None
    if fidelity:
        if cfg.samples:
            samples = load_samples_npz(cfg.samples)
            protocol.update(samples_file=str(cfg.samples), num_samples=len(samples))
        else:
            module.to(fabric.device)
            labels = resolve_labels(cfg.class_label, cfg.num_samples, module.num_classes)
            start = time.perf_counter()
            samples = draw_samples(
                module, fabric, cfg.num_samples, seed=cfg.seed, batch_size=cfg.batch_size, labels=labels,
                guidance_scale=cfg.guidance_scale, sampler=settings,
            )  # fmt: skip
            protocol.update(
                num_samples=cfg.num_samples,
                sampler=settings,
                nfe_per_sample=nfe_per_sample(settings, module.schedule.num_train_timesteps, cfg.guidance_scale),
                guidance_scale=cfg.guidance_scale,
                class_label=plain(cfg).get("class_label"),
                seed=cfg.seed,
                sampling_seconds=round(time.perf_counter() - start, 1),
            )
            if fabric.global_rank == 0 and cfg.save_samples:
                save_samples_npz(output / "samples.npz", samples, labels)
    if fabric.global_rank != 0:
        return {}
    if checkpoint is not None:
        protocol.update(
            checkpoint=str(cfg.ckpt_path), global_step=int(checkpoint["global_step"]), ema=bool(cfg.use_ema)
        )
    reference = datamodule.reference_images(cfg.reference_split)
    protocol["num_reference"] = len(reference)
    if fidelity:
        start = time.perf_counter()
        results.update(
            fidelity_metrics(
                samples,
                reference,
                fidelity,
                reference_name=reference_cache_name(datamodule.name, cfg.reference_split, reference),
                weights_path=weights,
                cache_dir=Path(cfg.eval.cache_dir).expanduser(),
                batch_size=cfg.eval.batch_size,
                kid_subset_size=cfg.eval.kid_subset_size,
                prc_neighborhood=cfg.eval.prc_neighborhood,
                verbose=cfg.eval.verbose,
            )
        )
        protocol["fidelity_seconds"] = round(time.perf_counter() - start, 1)
    if "nll" in metrics:
        results.update(held_out_nll(module, reference, cfg, fabric.device, protocol))
    report = {"metrics": results, "protocol": protocol}
    output.mkdir(parents=True, exist_ok=True)
    (output / "metrics.json").write_text(json.dumps(report, indent=2))
    log_to_loggers(cfg, results, protocol.get("global_step", 0))
    log.info("metrics: %s", json.dumps(results))
    return report


def held_out_nll(module, reference: torch.Tensor, cfg: DictConfig, device, protocol: dict) -> dict[str, float]:
    """Mean bits/dim of the variational bound over the first num_batches × batch_size held-out images."""
    count = min(len(reference), cfg.nll.num_batches * cfg.nll.batch_size)
    net = module.net

    def model_fn(x_t, t):
        if module.num_classes:  # the unconditional model that label dropout trained
            return net(x_t, t, torch.full((x_t.shape[0],), module.null_label, device=x_t.device))
        return net(x_t, t)

    generator = torch.Generator().manual_seed(cfg.seed)
    totals = []
    start = time.perf_counter()
    for begin in range(0, count, cfg.nll.batch_size):
        x0 = to_model_range(reference[begin : min(begin + cfg.nll.batch_size, count)].to(device))
        bits = nll_bits_per_dim(
            model_fn, module.diffusion, x0, variance_type=cfg.nll.variance_type, generator=generator
        )
        totals.append(bits["total"].cpu())
    values = torch.cat(totals)
    protocol.update(
        nll_images=count, nll_variance_type=cfg.nll.variance_type, nll_seconds=round(time.perf_counter() - start, 1)
    )
    return {"nll_bpd": float(values.mean()), "nll_bpd_stderr": float(values.std() / max(len(values), 1) ** 0.5)}


def log_to_loggers(cfg: DictConfig, results: dict[str, float], step: int) -> None:
    for logger in instantiate_group(cfg.get("logger")):
        logger.log_metrics({f"eval/{key}": value for key, value in results.items()}, step=step)
        logger.finalize("success")
        experiment = getattr(logger, "_experiment", None)
        if experiment is not None and hasattr(experiment, "finish"):
            experiment.finish()


@hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name="evaluate")
def main(cfg: DictConfig) -> float | None:
    report = report_user_errors(evaluate, cfg)
    return report.get("metrics", {}).get("fid") if report else None


if __name__ == "__main__":
    main()
