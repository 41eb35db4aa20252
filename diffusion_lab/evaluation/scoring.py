"""Scoring one checkpoint × sampler setting (or a given set of samples): draw the samples, compute the metrics
against the reference, and record the full protocol beside them."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf, open_dict

from diffusion_lab.callbacks.posthoc_ema import synthesize_ema_weights
from diffusion_lab.config.schemas import plain
from diffusion_lab.errors import ConfigError
from diffusion_lab.evaluation import digits_classifier
from diffusion_lab.evaluation.fidelity import (
    FEATURE_EXTRACTOR,
    FEATURE_SETS,
    FIDELITY_METRICS,
    check_feature_input,
    check_features,
    fidelity_metrics,
    inception_input,
    real_data_floor,
    reference_cache_name,
    resolve_inception_weights,
)
from diffusion_lab.evaluation.nll import held_out_nll
from diffusion_lab.generation.draw import draw_samples, make_fabric, nfe_per_sample, resolve_labels
from diffusion_lab.generation.files import save_samples_npz
from diffusion_lab.runs.layout import CONFIG_KEY, POSTHOC_EMA


def with_ema_length(module, checkpoint: dict[str, Any], checkpoint_path: str | Path, ema_length: float):
    """``module`` with its network's weights replaced by the post-hoc EMA of relative length ``ema_length`` at the
    checkpoint's step, reconstructed from the snapshots in the checkpoint's run folder."""
    folder = Path(checkpoint_path).resolve().parent.parent / POSTHOC_EMA
    state = synthesize_ema_weights(module.net, folder, float(ema_length), int(checkpoint["global_step"]))
    module.net.load_state_dict(state)
    return module


def ema_lengths(cfg: DictConfig) -> list[float | None]:
    """The EMA lengths to score each checkpoint with: ``grid.ema_length``, else ``ema_length`` (None: the
    checkpoint's own EMA weights)."""
    return list((cfg.get("grid") or {}).get("ema_length") or []) or [cfg.get("ema_length")]


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
    """What every checkpoint's evaluation in one job shares: the request, the devices, the feature space and its
    weights, and the reference data (loaded once per dataset, so a sweep reads its data and reference features once)."""

    def __init__(self, cfg: DictConfig) -> None:
        self.cfg = cfg
        self.metrics = list(cfg.metrics)
        unknown = [m for m in self.metrics if m not in (*FIDELITY_METRICS, "nll")]
        if unknown:
            raise ConfigError(
                f"metrics={self.metrics}: unknown {unknown}; valid choices: {', '.join(FIDELITY_METRICS)}, nll."
            )
        self.fidelity = [m for m in self.metrics if m in FIDELITY_METRICS]
        self.features = check_features(cfg.eval.get("features", "inception"))
        self.weights = (
            resolve_inception_weights(cfg.eval.inception_weights, require_classifier="isc" in self.metrics)
            if self.fidelity and self.features == "inception"
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
        ema_length: float | None = None,
    ) -> dict[str, Any] | None:
        """The metrics and full protocol of one checkpoint × sampler setting (or of given samples); None off rank 0."""
        cfg = self.cfg
        datamodule, reference = self.data(checkpoint[CONFIG_KEY] if checkpoint else None)
        protocol: dict[str, Any] = {
            "dataset": datamodule.name,
            "reference_split": cfg.reference_split,
            **self.feature_protocol(),
        }
        if self.fidelity:
            check_feature_input((datamodule.channels, datamodule.image_size, datamodule.image_size), self.features)
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
                nfe_per_sample=nfe_per_sample(settings, module.schedule, cfg.guidance_scale),
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
            if ema_length is not None:
                protocol["ema_length"] = float(ema_length)
        protocol["num_reference"] = len(reference)
        results: dict[str, float] = {}
        if self.fidelity:
            results.update(self._fidelity(samples, reference, datamodule, protocol))
        if "nll" in self.metrics:
            results.update(held_out_nll(module, reference, cfg, self.fabric.device, protocol))
        return {"metrics": results, "protocol": protocol, "requested": self.metrics}

    def feature_protocol(self) -> dict[str, Any]:
        """Which network the metrics were computed in, and which weights (the digits classifier's by digest)."""
        if self.features == "inception":
            return {"feature_extractor": FEATURE_EXTRACTOR, "inception_weights": self.weights}
        return {
            "feature_extractor": FEATURE_SETS[self.features],
            "feature_weights": digits_classifier.WEIGHTS.name,
            "feature_weights_sha256": digits_classifier.weights_digest(),
        }

    def _fidelity(self, samples, reference, datamodule, protocol: dict[str, Any]) -> dict[str, float]:
        cfg = self.cfg
        common = {
            "reference_name": reference_cache_name(datamodule.name, cfg.reference_split, reference),
            "weights_path": self.weights,
            "features": self.features,
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
        protocol.update(inception_input(samples, self.features))
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
        random subset), against the same reference. When the other split is smaller than N (the digits' 180
        held-out images against samples scored on the 1617 train images), half of the reference against its other
        half instead: real, disjoint, and at up to N images, where the small split would measure the floor of
        another N."""
        other = "train" if self.cfg.reference_split != "train" else "val"
        try:
            real = datamodule.reference_images(other)
        except KeyError:
            return None
        if len(real) >= count or len(reference) < 4:
            chosen = torch.randperm(len(real), generator=torch.Generator().manual_seed(0))[:count]
            return real_data_floor(real[chosen.sort().values], reference, real_split=other, **common)
        order = torch.randperm(len(reference), generator=torch.Generator().manual_seed(0))
        half = len(reference) // 2
        real_half, reference_half = (
            reference[order[: min(count, half)].sort().values],
            reference[order[half:].sort().values],
        )
        split = self.cfg.reference_split
        floor = real_data_floor(
            real_half, reference_half, real_split=f"{split}-half",
            **{**common, "reference_name": f"{common['reference_name']}-other-half"},
        )  # fmt: skip
        floor["method"] = (
            f"{len(real_half)} '{split}' images against the other {len(reference_half)}: the '{other}' split has "
            f"only {len(real)} images, fewer than the {count} samples"
        )
        return floor
