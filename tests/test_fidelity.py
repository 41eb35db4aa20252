"""FID through our wrapper is torch-fidelity's FID: zero for a set against itself, equal to a direct
``torch_fidelity.calculate_metrics`` call on the same images, and worse for a degraded set. Concurrent jobs
meeting a cold reference cache wait for the one extracting it.

Inception costs ~0.25 s per image on this CPU, so the test uses 24 images, each set extracted once."""

import threading

import numpy as np
import pytest
import torch
import torch_fidelity
from filelock import FileLock

from diffusion_lab.data import DigitsDataModule
from diffusion_lab.errors import ConfigError
from diffusion_lab.evaluation import fidelity
from diffusion_lab.evaluation.fidelity import (
    FEATURE_EXTRACTOR,
    feature_extractor_for,
    fidelity_metrics,
    frechet_distance,
    symmetric_fid,
    trace_sqrt_product,
)


class PlainRGB(torch.utils.data.Dataset):
    """An independent conversion of uint8 grey images to what torch-fidelity reads (uint8 3×H×W)."""

    def __init__(self, images: torch.Tensor) -> None:
        self.images = images

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> torch.Tensor:
        return self.images[index].repeat(3, 1, 1)


def test_fid_is_zero_for_itself_equals_torch_fidelity_orders_quality_and_waits_for_a_cold_reference(
    inception_weights, tmp_path, monkeypatch
):
    symmetric_calls = []  # FID alone takes torch-fidelity's FID-only shortcut: ours must still use frechet_distance
    monkeypatch.setattr(
        fidelity, "frechet_distance", lambda *args, **kw: symmetric_calls.append(1) or frechet_distance(*args, **kw)
    )
    images = DigitsDataModule(image_size=8).reference_images("train")[:6]
    generator = torch.Generator().manual_seed(0)
    noise = torch.randint(-60, 61, images.shape, generator=generator)
    degraded = (images.int() + noise).clamp(0, 255).to(torch.uint8)
    common = {"reference_name": "self-6", "weights_path": inception_weights, "cache_dir": tmp_path, "batch_size": 6}

    results = {}

    def evaluate_in_thread(name: str, samples: torch.Tensor) -> threading.Thread:
        def job() -> None:
            results[name] = fidelity_metrics(samples, images, ["fid"], **common)["fid"]

        thread = threading.Thread(target=job)
        thread.start()
        return thread

    another_job = FileLock(str(tmp_path / "self-6.lock"))
    with another_job:  # another job is extracting this (uncached) reference: ours waits for it
        cold = evaluate_in_thread("itself", images)
        cold.join(timeout=3)
        assert cold.is_alive() and results == {}
    cold.join(timeout=300)
    with another_job:  # the reference is cached now: the lock no longer holds anyone up
        cached = evaluate_in_thread("worse", degraded)
        cached.join(timeout=300)
        assert not cached.is_alive()
    itself, worse = results["itself"], results["worse"]
    direct = torch_fidelity.calculate_metrics(
        input1=PlainRGB(degraded), input2=PlainRGB(images), fid=True, cuda=False, batch_size=6, verbose=False,
        feature_extractor=FEATURE_EXTRACTOR, feature_extractor_weights_path=inception_weights, save_cpu_ram=True,
    )["frechet_inception_distance"]  # fmt: skip

    assert abs(itself) < 1e-3 and len(symmetric_calls) == 2
    # The direct call runs the stock (NCHW) network, ours its channels-last copy on CPU: equal to float rounding.
    assert worse == pytest.approx(direct, rel=1e-5)
    assert worse > 10.0  # ±60 grey levels of noise is far from the digits


def test_the_channels_last_inception_gives_the_stock_features_under_the_stock_name(inception_weights):
    """What the evaluation job runs on CPU: the stock network's features (to float rounding) and name (so the cache
    files and the protocol say inception-v3-compat), with its convolution weights really stored channels-last."""
    from torch_fidelity.utils import create_feature_extractor

    images = DigitsDataModule(image_size=8).reference_images("train")[:2].expand(-1, 3, -1, -1)
    stock, ours = (
        create_feature_extractor(
            name, ["2048"], cuda=False, verbose=False, feature_extractor_weights_path=inception_weights
        )
        for name in (FEATURE_EXTRACTOR, feature_extractor_for(cuda=False))
    )
    assert feature_extractor_for(cuda=True) == FEATURE_EXTRACTOR and ours.get_name() == FEATURE_EXTRACTOR
    assert ours.Conv2d_4a_3x3.conv.weight.is_contiguous(memory_format=torch.channels_last)
    assert not stock.Conv2d_4a_3x3.conv.weight.is_contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        expected, features = stock(images)[0], ours(images)[0]
    assert torch.allclose(features, expected, rtol=1e-4, atol=1e-5)


def _features(rng: np.random.Generator, count: int, mixing: np.ndarray) -> np.ndarray:
    return np.abs(rng.standard_normal((count, mixing.shape[0])) @ mixing)  # ReLU-like, correlated


@pytest.mark.parametrize("count", [5, 40, 400])  # rank 4 and 39 (fewer images than dimensions), and full rank
def test_fid_cross_term_is_exact_and_equals_torch_fidelitys_eigvals_route(count):
    """FID from symmetric solvers (pivoted Cholesky of Σ₁, eigvalsh of Fᵀ Σ₂ F) against the exact cross term
    (Σ₁'s factor taken from the centred features themselves) and torch-fidelity's own statistics-to-FID
    function, on covariances of low and full rank; and tr √(Σ Σ) = tr Σ."""
    from torch_fidelity.metric_fid import fid_statistics_to_metric

    rng = np.random.default_rng(count)
    mixing = rng.standard_normal((64, 64)) * 0.1
    features_1, features_2 = _features(rng, count, mixing), _features(rng, 1000, mixing)
    stat_1 = {"mu": features_1.mean(0), "sigma": np.cov(features_1, rowvar=False)}
    stat_2 = {"mu": rng.standard_normal(64), "sigma": np.cov(features_2, rowvar=False)}
    factor = (features_1 - features_1.mean(0)).T / np.sqrt(count - 1)
    exact = np.sqrt(np.clip(np.linalg.eigvalsh(factor.T @ stat_2["sigma"] @ factor), 0, None)).sum()
    assert trace_sqrt_product(stat_1["sigma"], stat_2["sigma"]) == pytest.approx(exact, rel=1e-7)
    expected = fid_statistics_to_metric(stat_1, stat_2, verbose=False)["frechet_inception_distance"]
    assert frechet_distance(stat_1, stat_2)["frechet_inception_distance"] == pytest.approx(expected, rel=1e-6)
    assert trace_sqrt_product(stat_1["sigma"], stat_1["sigma"]) == pytest.approx(np.trace(stat_1["sigma"]), rel=1e-9)


def test_one_sample_is_refused_before_any_feature_is_extracted(tmp_path):
    images = torch.zeros(3, 1, 8, 8, dtype=torch.uint8)
    with pytest.raises(ConfigError, match=r"FID and KID need at least 2 samples and 2 reference images .* got 1 and 3"):
        fidelity_metrics(images[:1], images, ["fid"], reference_name="r", weights_path="unused", cache_dir=tmp_path)


def test_the_faster_fid_is_used_inside_evaluations_only():
    """Both of torch-fidelity's callers (FID with other metrics, and its FID-only shortcut) are swapped inside."""
    import torch_fidelity.metric_fid as fid_only
    import torch_fidelity.metrics as with_others

    own = {module: module.fid_statistics_to_metric for module in (with_others, fid_only)}
    with symmetric_fid(), symmetric_fid():  # nested (or concurrent) uses share one swap
        assert with_others.fid_statistics_to_metric is frechet_distance
        assert fid_only.fid_statistics_to_metric is frechet_distance
    assert all(module.fid_statistics_to_metric is function for module, function in own.items())
