"""Evaluate a checkpoint (or a samples.npz): ``python -m diffusion_lab.evaluate ckpt_path=… metrics=[fid,kid]``.

Sample quality comes from torch-fidelity (``fid``, ``kid``, ``isc``, ``prc``) against the held-out split of the
training data; ``nll`` is the variational bound in bits/dim on that split. ``metrics.json`` records the values and
the protocol (data, split, N, sampler and function evaluations, EMA or raw, seed, feature extractor).
"""

from __future__ import annotations

import json
import logging
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import hydra
import numpy as np
import torch
from hydra.core.hydra_config import HydraConfig
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf, open_dict

from diffusion_lab.build import build_schedule, sampler_settings
from diffusion_lab.checkpoints import load_module
from diffusion_lab.configs import plain, register_configs
from diffusion_lab.data.base import to_model_range
from diffusion_lab.diffusion.process import split_learned_variance
from diffusion_lab.diffusion.samplers import check_sampler_settings, resolve_variance_type
from diffusion_lab.errors import CheckpointError, ConfigError
from diffusion_lab.evaluation import (
    FIDELITY_METRICS,
    fidelity_metrics,
    nll_bits_per_dim,
    reference_cache_name,
    resolve_inception_weights,
)
from diffusion_lab.evaluation.fidelity import FEATURE_EXTRACTOR, inception_input, real_data_floor
from diffusion_lab.evaluation.records import append_record, done_metrics
from diffusion_lab.evaluation.sweep import (
    CHECKPOINT_CHOICES,
    find_runs,
    is_run_folder,
    sampler_grid,
    saved_step,
    select_checkpoints,
)
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


class Evaluation:
    """What every checkpoint's evaluation in one job shares: the request, the devices, the Inception weights,
    and the reference data (loaded once per dataset, so a sweep reads its data and reference features once)."""

    def __init__(self, cfg: DictConfig) -> None:
        self.cfg = cfg
        self.metrics = list(cfg.metrics)
        unknown = [m for m in self.metrics if m not in (*FIDELITY_METRICS, "nll")]
        if unknown:
            raise ConfigError(
                f"metrics={self.metrics}: unknown {unknown}; valid choices: {', '.join(FIDELITY_METRICS)}, nll."
            )
        self.fidelity = [m for m in self.metrics if m in FIDELITY_METRICS]
        self.weights = (
            resolve_inception_weights(cfg.eval.inception_weights, require_classifier="isc" in self.metrics)
            if self.fidelity
            else None
        )
        self.fabric = make_fabric(cfg.accelerator, cfg.devices, cfg.precision)
        self._data: dict[str, tuple[Any, torch.Tensor | None]] = {}

    @property
    def is_main(self) -> bool:
        return self.fabric.global_rank == 0

    def data(self, checkpoint_config: dict[str, Any] | None):
        """(datamodule, reference images) for ``data=…`` or the checkpoint's dataset; reference on rank 0 only."""
        key = json.dumps(plain(self.cfg.data) if self.cfg.get("data") else (checkpoint_config or {}).get("data"))
        if key not in self._data:
            datamodule = reference_datamodule(self.cfg, checkpoint_config)
            reference = datamodule.reference_images(self.cfg.reference_split) if self.is_main else None
            self._data[key] = (datamodule, reference)
        return self._data[key]

    def score(
        self,
        *,
        module=None,
        checkpoint: dict[str, Any] | None = None,
        checkpoint_path: str | None = None,
        samples: torch.Tensor | None = None,
        settings: dict[str, Any] | None = None,
        save_samples_to: Path | None = None,
    ) -> dict[str, Any] | None:
        """The metrics and full protocol of one checkpoint × sampler setting (or of given samples); None off rank 0."""
        cfg = self.cfg
        datamodule, reference = self.data(checkpoint["diffusion_lab_config"] if checkpoint else None)
        protocol: dict[str, Any] = {
            "dataset": datamodule.name,
            "reference_split": cfg.reference_split,
            "feature_extractor": FEATURE_EXTRACTOR,
            "inception_weights": self.weights,
        }
        labels = None
        if self.fidelity and samples is None:
            module.to(self.fabric.device)
            labels = resolve_labels(cfg.class_label, cfg.num_samples, module.num_classes)
            start = time.perf_counter()
            samples = draw_samples(
                module, self.fabric, cfg.num_samples, seed=cfg.seed, batch_size=cfg.batch_size, labels=labels,
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
        elif samples is not None:
            protocol.update(num_samples=len(samples))
        if not self.is_main:
            return None
        if save_samples_to is not None and samples is not None and cfg.save_samples:
            save_samples_npz(save_samples_to, samples, labels)
        if checkpoint is not None:
            protocol.update(
                checkpoint=str(checkpoint_path),
                checkpoint_file=f"{Path(checkpoint_path).parent.name}/{Path(checkpoint_path).name}",
                global_step=int(checkpoint["global_step"]),
                ema=bool(cfg.use_ema),
            )
        protocol["num_reference"] = len(reference)
        results: dict[str, float] = {}
        if self.fidelity:
            results.update(self._fidelity(samples, reference, datamodule, protocol))
        if "nll" in self.metrics:
            results.update(held_out_nll(module, reference, cfg, self.fabric.device, protocol))
        return {"metrics": results, "protocol": protocol, "requested": self.metrics}

    def _fidelity(self, samples, reference, datamodule, protocol: dict[str, Any]) -> dict[str, float]:
        cfg = self.cfg
        common = {
            "reference_name": reference_cache_name(datamodule.name, cfg.reference_split, reference),
            "weights_path": self.weights,
            "cache_dir": Path(cfg.eval.cache_dir).expanduser(),
            "batch_size": cfg.eval.batch_size,
            "kid_subset_size": cfg.eval.kid_subset_size,
        }
        start = time.perf_counter()
        values = fidelity_metrics(
            samples, reference, self.fidelity, prc_neighborhood=cfg.eval.prc_neighborhood, verbose=cfg.eval.verbose,
            **common,
        )  # fmt: skip
        protocol["fidelity_seconds"] = round(time.perf_counter() - start, 1)
        protocol.update(inception_input(samples))
        if cfg.eval.floor and ("fid" in self.fidelity or "kid" in self.fidelity):
            floor = self._floor(datamodule, reference, len(samples), common)
            if floor is not None:
                protocol["real_data_floor"] = floor
        if len(samples) < 10_000:
            protocol["warning"] = (
                f"N = {len(samples)} < 10k: FID is biased upwards at small N; compare these values with each "
                "other (same N, same reference), not with published ones."
            )
        return values

    def _floor(self, datamodule, reference, count: int, common: dict[str, Any]) -> dict[str, Any] | None:
        """The real-data floor at this N: as many images of the other split as there are samples (a fixed
        random subset), against the same reference."""
        other = "train" if self.cfg.reference_split != "train" else "val"
        try:
            real = datamodule.reference_images(other)
        except KeyError:
            return None
        chosen = torch.randperm(len(real), generator=torch.Generator().manual_seed(0))[: min(count, len(real))]
        return real_data_floor(real[chosen.sort().values], reference, real_split=other, **common)


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
        job.data(checkpoint["diffusion_lab_config"] if checkpoint else None)
        settings = sampler_settings(cfg.sampler)
        if module is not None:
            check_sampler_settings(module.schedule, **settings)
            settings = module.resolve_sampler_settings(**settings)
        samples = load_samples_npz(cfg.samples) if cfg.samples and job.fidelity else None

    output = Path(cfg.output_dir)
    report = job.score(
        module=module, checkpoint=checkpoint, checkpoint_path=path, samples=samples, settings=settings,
        save_samples_to=output / "samples.npz" if samples is None else None,
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


def stamped(report: dict[str, Any]) -> dict[str, Any]:
    return {**report, "evaluated_at": datetime.now(timezone.utc).isoformat(timespec="seconds")}


def sampler_choice() -> str | None:
    """The ``sampler`` option this job was composed with (Hydra's runtime choice); None outside a Hydra job."""
    if not HydraConfig.initialized():
        return None
    return HydraConfig.get().runtime.choices.get("sampler")


def evaluate_runs(cfg: DictConfig) -> dict[str, Any]:
    """Every run under ``runs`` × its selected checkpoints × the sampler grid, appended to each run's
    eval/metrics.jsonl; measurements already recorded there are skipped (a rerun resumes)."""
    paths = [cfg.runs] if isinstance(cfg.runs, str) else list(cfg.runs)
    if cfg.checkpoints not in CHECKPOINT_CHOICES:
        raise ConfigError(f"checkpoints={cfg.checkpoints} is not one of {', '.join(CHECKPOINT_CHOICES)}.")
    runs = find_runs(paths)
    usable = [run for run in runs if run.problem is None]
    failed = {str(run.path): run.problem for run in runs if run.problem is not None}
    for path, problem in failed.items():
        log.warning("skipping %s: %s", path, problem)
    if not usable:
        raise ConfigError(
            f"runs={paths}: found no training run with checkpoints"
            + (f" ({len(failed)} without: {'; '.join(f'{p}: {m}' for p, m in failed.items())})" if failed else "")
            + "; point runs= at a run folder (outputs/<date>/<time>) or a multirun folder."
        )
    cells = sampler_grid(plain(cfg.sampler), plain(cfg.get("grid")), sampler_choice())
    for run in usable:  # every grid cell is checked against every run before anything is sampled
        schedule = build_schedule(OmegaConf.load(run.path / ".hydra" / "config.yaml").schedule)
        for cell in cells:
            check_sampler_settings(schedule, **cell)
    job = Evaluation(cfg)
    summary: dict[str, Any] = {"evaluated": 0, "skipped": 0, "failed": dict(failed), "records": []}
    started = time.perf_counter()
    for run in usable:
        for path in select_checkpoints(run, cfg.checkpoints):
            try:
                evaluate_checkpoint(job, run.path, path, cells, summary)
            except CheckpointError as error:
                log.warning("skipping %s: %s", path, error)
                summary["failed"][str(path)] = str(error)
    summary["seconds"] = round(time.perf_counter() - started, 1)
    if job.is_main:
        output = Path(cfg.output_dir)
        output.mkdir(parents=True, exist_ok=True)
        (output / "summary.json").write_text(json.dumps(summary, indent=2))
        log.info(
            "evaluated %d, already recorded %d, failed %d, in %.0f s",
            summary["evaluated"], summary["skipped"], len(summary["failed"]), summary["seconds"],
        )  # fmt: skip
    if not summary["evaluated"] and not summary["skipped"]:
        raise ConfigError(f"runs={paths}: nothing could be evaluated ({'; '.join(summary['failed'].values())}).")
    return summary


def evaluate_checkpoint(job: Evaluation, run_dir: Path, path: Path, cells: list[dict], summary: dict) -> None:
    cfg = job.cfg
    module = checkpoint = None
    step = saved_step(path)  # memory-mapped: a fully recorded checkpoint is never loaded
    learned_variance = bool(OmegaConf.load(run_dir / ".hydra" / "config.yaml").objective.get("learned_variance"))
    for settings in (resolve_variance_type(cell, learned_variance) for cell in cells):
        key = {
            "checkpoint_file": f"{path.parent.name}/{path.name}", "global_step": step,
            "ema": bool(cfg.use_ema), "sampler": settings if job.fidelity else None,
            "num_samples": cfg.num_samples if job.fidelity else None, "seed": cfg.seed if job.fidelity else None,
            "guidance_scale": cfg.guidance_scale if job.fidelity else None,
            "class_label": plain(cfg).get("class_label") if job.fidelity else None,
            "reference_split": cfg.reference_split,
        }  # fmt: skip
        if set(job.metrics) <= done_metrics(run_dir, key):
            summary["skipped"] += 1
            log.info("already recorded: %s %s %s", run_dir.name, path.name, settings.get("sampler"))
            continue
        if module is None:
            module, checkpoint = load_module(str(path), use_ema=cfg.use_ema)
        report = job.score(module=module, checkpoint=checkpoint, checkpoint_path=str(path), settings=settings)
        if report is not None:
            if not append_record(run_dir, stamped(report), unless_recorded=True):
                # Another evaluation job on this run scored the same cell meanwhile; one record is enough.
                summary["skipped"] += 1
                log.info("recorded meanwhile elsewhere: %s %s %s", run_dir.name, path.name, settings.get("sampler"))
                continue
            summary["records"].append({"run": str(run_dir), **{k: report[k] for k in ("metrics", "protocol")}})
            log.info("%s %s %s: %s", run_dir.name, path.name, settings.get("sampler"), json.dumps(report["metrics"]))
        summary["evaluated"] += 1
        if not job.fidelity:
            break  # nll does not depend on the sampler


def held_out_nll(module, reference: torch.Tensor, cfg: DictConfig, device, protocol: dict) -> dict[str, float]:
    """Mean bits/dim of the variational bound over the first num_batches × batch_size held-out images."""
    count = min(len(reference), cfg.nll.num_batches * cfg.nll.batch_size)
    net = module.net

    def model_fn(x_t, t):
        if module.num_classes:  # the unconditional model that label dropout trained
            return net(x_t, t, torch.full((x_t.shape[0],), module.null_label, device=x_t.device))
        return net(x_t, t)

    variance_type = resolve_variance_type(
        {"sampler": "ddpm", "variance_type": cfg.nll.variance_type}, module.learned_variance
    )["variance_type"]
    if module.learned_variance and variance_type != "learned_range":  # the bound with a fixed σ²: the mean only
        full_model_fn = model_fn
        model_fn = lambda x_t, t: split_learned_variance(full_model_fn(x_t, t))[0]  # noqa: E731
    generator = torch.Generator().manual_seed(cfg.seed)
    totals = []
    start = time.perf_counter()
    for begin in range(0, count, cfg.nll.batch_size):
        x0 = to_model_range(reference[begin : min(begin + cfg.nll.batch_size, count)].to(device))
        bits = nll_bits_per_dim(model_fn, module.diffusion, x0, variance_type=variance_type, generator=generator)
        totals.append(bits["total"].cpu())
    values = torch.cat(totals)
    protocol.update(
        nll_images=count, nll_variance_type=variance_type, nll_seconds=round(time.perf_counter() - start, 1)
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
