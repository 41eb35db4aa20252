"""FID, KID, Inception Score and precision/recall with torch-fidelity, against a cached reference set.

All four use one feature space, so one set of reference features serves every metric: by default torch-fidelity's
``inception-v3-compat`` network (the TF FID Inception), whose numbers compare with the literature; for the 8×8
digits, ``features="digits"``, the shipped digits classifier (``digits_classifier.py``), which sees differences the
upscaled Inception cannot. On CPUs the Inception network runs with its weights in channels-last layout (1.5×
faster per image, the same features to float rounding). Reference features are
cached on disk under a name built from the dataset, split, resolution and size of the reference set; concurrent
jobs that meet an uncached reference (a parallel sweep's evaluations, test workers) extract its features once,
under a file lock.
"""

from __future__ import annotations

import json
import os
import threading
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import Any

import numpy as np
import torch
from filelock import FileLock
from torch.utils.data import Dataset

from diffusion_lab.errors import ConfigError, UserError
from diffusion_lab.evaluation import digits_classifier

FEATURE_EXTRACTOR = "inception-v3-compat"
# eval.features → the torch-fidelity extractor it names (the name kept in caches and protocols)
FEATURE_SETS = {"inception": FEATURE_EXTRACTOR, "digits": digits_classifier.NAME}
CHANNELS_LAST_EXTRACTOR = f"{FEATURE_EXTRACTOR}-channels-last"  # our registration of the same network, for CPUs
_REGISTRATION_LOCK = threading.Lock()
INCEPTION_URL = (
    "https://github.com/toshas/torch-fidelity/releases/download/v0.2.0/weights-inception-2015-12-05-6726825d.pth"
)
FIDELITY_METRICS = ("fid", "kid", "isc", "prc")
RESULT_KEYS = {
    "frechet_inception_distance": "fid",
    "kernel_inception_distance_mean": "kid_mean",
    "kernel_inception_distance_std": "kid_std",
    "inception_score_mean": "isc_mean",
    "inception_score_std": "isc_std",
    "precision": "precision",
    "recall": "recall",
    "f_score": "f_score",
}


class InceptionWeightsError(UserError):
    """The FID Inception weights can be neither found nor downloaded."""


class Images(Dataset):
    """uint8 (N, C, H, W) images as torch-fidelity reads them: one uint8 (3, H, W) tensor per item."""

    def __init__(self, images: torch.Tensor) -> None:
        if images.dtype != torch.uint8 or images.ndim != 4 or images.shape[1] not in (1, 3):
            raise ConfigError(f"Images must be uint8 (N, 1 or 3, H, W), got {images.dtype} {tuple(images.shape)}.")
        self.images = images

    def __len__(self) -> int:
        return self.images.shape[0]

    def __getitem__(self, index: int) -> torch.Tensor:
        image = self.images[index]
        return image.expand(3, -1, -1) if image.shape[0] == 1 else image


class ReferenceImages(Images):
    """The held-out real images (a separate class, so tests can tell its reads from the samples')."""


def reference_cache_name(dataset: str, split: str, images: torch.Tensor) -> str:
    channels, height, width = images.shape[1:]
    slug = "".join(c if c.isalnum() else "_" for c in dataset.lower())
    return f"diffusion_lab-{slug}-{split}-{channels}x{height}x{width}-n{images.shape[0]}"


def resolve_inception_weights(configured: str | None, require_classifier: bool = False) -> str:
    """A local path to the FID Inception weights: the configured file, torch hub's copy, or a fresh download.

    The file is opened with ``weights_only=True`` first (torch-fidelity itself unpickles it without that guard).
    ``require_classifier`` (for the Inception Score) refuses weights whose logits layer is missing or zero.
    """
    if configured:
        path = Path(configured).expanduser()
        if not path.is_file():
            raise InceptionWeightsError(
                f"eval.inception_weights={configured} does not exist; point it (or $DIFFUSION_LAB_INCEPTION_WEIGHTS) "
                "at weights-inception-2015-12-05-6726825d.pth, or unset it to download the file."
            )
    else:
        url = os.environ.get("DIFFUSION_LAB_INCEPTION_URL") or INCEPTION_URL  # a mirror, where GitHub is blocked
        path = Path(torch.hub.get_dir()) / "checkpoints" / Path(INCEPTION_URL).name
        if not path.is_file():
            path.parent.mkdir(parents=True, exist_ok=True)
            try:
                torch.hub.download_url_to_file(url, str(path), progress=False)
            except Exception as error:  # no network, proxy, HTTP error: all mean the same to the user
                raise InceptionWeightsError(
                    f"Could not download the FID Inception weights from {url} ({type(error).__name__}: "
                    f"{error}). On a machine without network, copy that file here and set "
                    "eval.inception_weights=/path/to/weights-inception-2015-12-05-6726825d.pth "
                    "(or $DIFFUSION_LAB_INCEPTION_WEIGHTS)."
                ) from None
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:
        raise InceptionWeightsError(f"{path} is not a loadable Inception state dict ({error}).") from None
    if require_classifier and ("fc.weight" not in state or not bool(state["fc.weight"].abs().sum() > 0)):
        raise ConfigError(
            f"metrics include isc, but the Inception weights {path} have no classifier layer (fc weights absent or "
            "zero), so an Inception Score would be meaningless; drop isc or use torch-fidelity's own weights."
        )
    return str(path)


def channels_last_inception() -> type:
    """torch-fidelity's ``inception-v3-compat`` with its weights stored channels-last (NHWC), where oneDNN's CPU
    convolutions run it 1.5× faster (one core of a 2-core EPYC: 306 → 203 ms per image, measured by
    benchmarks/inception_features.py). Its features equal the stock layout's to float rounding (2e-6 relative),
    so it keeps the stock name, and with it the cache files and the name in every protocol: they describe the
    same network and weights."""
    from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3

    class ChannelsLastInception(FeatureExtractorInceptionV3):
        def __init__(self, name: str, features_list: list[str], **kwargs: Any) -> None:
            super().__init__(FEATURE_EXTRACTOR, features_list, **kwargs)
            self.to(memory_format=torch.channels_last)

    return ChannelsLastInception


def check_features(features: str) -> str:
    if features not in FEATURE_SETS:
        raise ConfigError(f"eval.features={features} is not one of {', '.join(FEATURE_SETS)}.")
    return features


def feature_extractor_for(cuda: bool, features: str = "inception") -> str:
    """The registered torch-fidelity extractor to use (registered on first use): the digits classifier; for
    Inception the stock network on CUDA (the layout is not measured there), its channels-last registration on CPU."""
    from torch_fidelity.registry import FEATURE_EXTRACTORS_REGISTRY, register_feature_extractor

    if check_features(features) == "digits":
        name, make = digits_classifier.NAME, digits_classifier.torch_fidelity_extractor
    elif cuda:
        return FEATURE_EXTRACTOR
    else:
        name, make = CHANNELS_LAST_EXTRACTOR, channels_last_inception
    with _REGISTRATION_LOCK:
        if name not in FEATURE_EXTRACTORS_REGISTRY:
            register_feature_extractor(name, make())
    return name


def check_feature_input(image_shape: tuple[int, ...], features: str) -> None:
    """The digits classifier takes 8×8 grey images (C, H, W) only; say so before any sampling, with the fix."""
    channels, height, width = image_shape
    if check_features(features) == "digits" and (channels, height, width) != (1, 8, 8):
        raise ConfigError(
            f"eval.features=digits scores 8×8 grey digits (data=digits), but these images are {height}×{width} with "
            f"{channels} channel(s); use eval.features=inception for them."
        )


def fidelity_metrics(
    samples: torch.Tensor,
    reference: torch.Tensor,
    metrics: list[str],
    *,
    reference_name: str,
    weights_path: str | None,
    cache_dir: str | Path,
    batch_size: int = 64,
    kid_subset_size: int = 1000,
    prc_neighborhood: int = 3,
    verbose: bool = False,
    features: str = "inception",
) -> dict[str, float]:
    """torch-fidelity's metrics of uint8 ``samples`` against uint8 ``reference`` in the ``features`` space
    (features of the reference are cached in ``cache_dir`` under ``reference_name`` and the extractor's name);
    ``weights_path``: the Inception weights (the digits classifier's are shipped)."""
    import torch_fidelity

    unknown = [m for m in metrics if m not in FIDELITY_METRICS]
    if unknown:
        raise ConfigError(f"Unknown metrics {unknown}; valid choices: {', '.join(FIDELITY_METRICS)}, nll.")
    smallest = min(len(samples), len(reference))
    if ("kid" in metrics or "fid" in metrics) and smallest < 2:
        raise ConfigError(
            f"FID and KID need at least 2 samples and 2 reference images (a covariance), got {len(samples)} and "
            f"{len(reference)}; raise num_samples."
        )
    if "prc" in metrics and smallest <= prc_neighborhood:
        raise ConfigError(f"Precision/recall needs more than prc_neighborhood={prc_neighborhood} images per set.")
    check_feature_input(tuple(samples.shape[1:]), features)
    check_feature_input(tuple(reference.shape[1:]), features)
    os.makedirs(cache_dir, exist_ok=True)
    # The first job to need these reference features computes them holding the lock; the others wait, then read
    # torch-fidelity's (atomically written) cache instead of extracting the same features again.
    stem = reference_name if features == "inception" else f"{reference_name}-{FEATURE_SETS[features]}"
    cached = Path(cache_dir) / f"{stem}-{'-'.join(sorted(metrics))}.cached"
    lock = nullcontext() if cached.is_file() else FileLock(f"{Path(cache_dir) / stem}.lock")
    cuda = torch.cuda.is_available()
    with lock, symmetric_fid():
        result = torch_fidelity.calculate_metrics(
            input1=Images(samples),
            input2=ReferenceImages(reference),
            input2_cache_name=reference_name,
            cache_root=str(cache_dir),
            cache=True,
            cuda=cuda,
            batch_size=batch_size,
            feature_extractor=feature_extractor_for(cuda, features),
            feature_extractor_weights_path=weights_path if features == "inception" else None,
            fid="fid" in metrics,
            kid="kid" in metrics,
            isc="isc" in metrics,
            prc="prc" in metrics,
            kid_subset_size=min(kid_subset_size, smallest),
            prc_neighborhood=prc_neighborhood,
            save_cpu_ram=True,
            verbose=verbose,
        )
        cached.touch()
    return {RESULT_KEYS.get(key, key): float(value) for key, value in result.items()}


def trace_sqrt_product(sigma1: np.ndarray, sigma2: np.ndarray) -> float:
    """tr √(Σ₁Σ₂) for two covariance matrices: FID's cross term, from symmetric solvers only.

    torch-fidelity takes ``eigvals`` of the non-symmetric 2048×2048 product (≈ 4.5 s on one core, whatever the
    number of images). With Σ₁ = F Fᵀ (pivoted Cholesky; F has rank(Σ₁) ≤ N − 1 columns for N samples), the
    non-zero eigenvalues of Σ₁Σ₂ are those of the small symmetric Fᵀ Σ₂ F: 0.1 s at N = 16, 0.6 s at 1000,
    2.3 s at full rank, equal to the eigvals route to ~1e-7 relative (closer to exact: no complex round-off).
    """
    from scipy.linalg.lapack import dpstrf

    factor, pivots, rank, info = dpstrf(np.asarray(sigma1, dtype=np.float64), lower=1)
    if info < 0:
        raise ValueError(f"pivoted Cholesky rejected argument {-info} of the covariance matrix")
    columns = np.zeros((sigma1.shape[0], rank))
    columns[pivots - 1] = np.tril(factor)[:, :rank]  # Σ₁ = P L Lᵀ Pᵀ
    eigenvalues = np.linalg.eigvalsh(columns.T @ np.asarray(sigma2, dtype=np.float64) @ columns)
    return float(np.sqrt(np.clip(eigenvalues, 0.0, None)).sum())


def frechet_distance(stat_1: dict[str, np.ndarray], stat_2: dict[str, np.ndarray], verbose: bool = False) -> dict:
    """torch-fidelity's ``fid_statistics_to_metric`` (same statistics in, same result key out) with the cross
    term from :func:`trace_sqrt_product`."""
    diff = stat_1["mu"] - stat_2["mu"]
    trace_cross = trace_sqrt_product(stat_1["sigma"], stat_2["sigma"])
    fid = float(diff.dot(diff) + np.trace(stat_1["sigma"]) + np.trace(stat_2["sigma"]) - 2 * trace_cross)
    return {"frechet_inception_distance": fid}


_HOOK_LOCK = threading.Lock()
_hook_users = 0
_fidelity_own_fid: dict[str, Any] = {}
# torch-fidelity calls its statistics-to-FID function from two modules: ``metrics`` when FID comes with other
# metrics, ``metric_fid`` (its FID-only shortcut) when FID is the only one.
_FID_CALLERS = ("torch_fidelity.metrics", "torch_fidelity.metric_fid")


@contextmanager
def symmetric_fid() -> Iterator[None]:
    """While inside, torch-fidelity's ``calculate_metrics`` computes FID through :func:`frechet_distance`, alone
    or with other metrics; the features, statistics and caches stay torch-fidelity's own. Outside (a direct
    torch-fidelity call), its own eigvals route. Nested or concurrent uses (threads) share one swap. A
    torch-fidelity module without that function keeps its own."""
    global _hook_users
    import importlib

    callers = [importlib.import_module(name) for name in _FID_CALLERS]
    callers = [module for module in callers if hasattr(module, "fid_statistics_to_metric")]
    with _HOOK_LOCK:
        if _hook_users == 0:
            for module in callers:
                _fidelity_own_fid[module.__name__] = module.fid_statistics_to_metric
                module.fid_statistics_to_metric = frechet_distance
        _hook_users += 1
    try:
        yield
    finally:
        with _HOOK_LOCK:
            _hook_users -= 1
            if _hook_users == 0:
                for module in callers:
                    module.fid_statistics_to_metric = _fidelity_own_fid.pop(module.__name__)


def inception_input(images: torch.Tensor, features: str = "inception") -> dict[str, str]:
    """How images reach the feature network, for the protocol next to every FID."""
    channels, height, width = images.shape[1:]
    colour = "grey replicated to RGB" if channels == 1 else "RGB"
    if features == "digits":
        return {
            "image_resolution": f"{height}×{width}×{channels}",
            "resize": f"none: {height}×{width} grey into the digits classifier (its 64-d penultimate layer)",
        }
    return {
        "image_resolution": f"{height}×{width}×{channels}",
        "inception_input": "299×299 RGB, uint8 [0, 255]",
        "resize": f"{height}×{width} → 299×299 bilinear inside torch-fidelity's {FEATURE_EXTRACTOR} "
        f"(TF-1 compatible), {colour}",
    }


def real_data_floor(
    real: torch.Tensor,
    reference: torch.Tensor,
    *,
    real_split: str,
    reference_name: str,
    weights_path: str | None,
    cache_dir: str | Path,
    batch_size: int = 64,
    kid_subset_size: int = 1000,
    features: str = "inception",
) -> dict[str, Any]:
    """FID and KID of ``real`` images (another split of the same data, as many as the samples) against the
    reference: what a perfect model would score at this N. Computed once; cached beside the reference features."""
    extractor = "" if features == "inception" else f"-{FEATURE_SETS[features]}"
    cache = Path(cache_dir) / f"{reference_name}{extractor}-floor-{real_split}-n{len(real)}.json"
    if cache.is_file():
        return json.loads(cache.read_text())
    values = fidelity_metrics(
        real,
        reference,
        ["fid", "kid"],
        reference_name=reference_name,
        weights_path=weights_path,
        cache_dir=cache_dir,
        batch_size=batch_size,
        kid_subset_size=kid_subset_size,
        features=features,
    )
    floor = {"fid": values["fid"], "kid_mean": values["kid_mean"], "split": real_split, "n": len(real)}
    cache.parent.mkdir(parents=True, exist_ok=True)
    cache.write_text(json.dumps(floor))
    return floor
