"""eval.features=digits: FID/KID in the feature space of the digits classifier shipped with the package."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from scipy import linalg

from diffusion_lab.data import DigitsDataModule
from diffusion_lab.errors import ConfigError
from diffusion_lab.evaluation.digits_classifier import (
    WEIGHTS,
    accuracy,
    load_classifier,
    train_classifier,
    weights_digest,
)
from diffusion_lab.evaluation.fidelity import fidelity_metrics
from diffusion_lab.runs.records import record_key
from tests.test_report import write_run

# The classifier README's digits numbers were measured with (python -m diffusion_lab.evaluation.train_digits_classifier)
SHIPPED_DIGEST = "2d89ca8b3af8"


@pytest.fixture(scope="module")
def digits():
    data = DigitsDataModule(image_size=8)
    data.setup()
    return data.splits


def metrics_in_digit_space(samples, reference, tmp_path, metrics=("fid",)):
    return fidelity_metrics(
        samples, reference, list(metrics), reference_name=f"digits-test-n{len(reference)}", weights_path=None,
        cache_dir=tmp_path, features="digits",
    )  # fmt: skip


def test_the_shipped_classifier_reads_the_held_out_digits(digits):
    assert weights_digest() == SHIPPED_DIGEST and WEIGHTS.stat().st_size < 250_000
    assert accuracy(load_classifier(), *digits["val"]) >= 0.99  # 179 of the 180 held-out digits


def test_the_training_recipe_reaches_the_shipped_accuracy(digits):
    model = train_classifier(*digits["train"])  # the recipe that wrote the shipped weights; ~7 s on 2 cores
    assert accuracy(model, *digits["val"]) >= 0.98


def test_digits_fid_is_the_frechet_distance_of_the_classifier_embeddings(digits, tmp_path):
    (val, _), (train, _) = digits["val"], digits["train"]
    with torch.no_grad():
        a, b = (load_classifier()(images)[0].double().numpy() for images in (val, train))
    mean_a, mean_b, cov_a, cov_b = a.mean(0), b.mean(0), np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    expected = ((mean_a - mean_b) ** 2).sum() + np.trace(cov_a + cov_b - 2 * linalg.sqrtm(cov_a @ cov_b).real)
    # (torch-fidelity extracts in batches of 64: float32 convolutions round a little differently)
    assert metrics_in_digit_space(val, train, tmp_path)["fid"] == pytest.approx(expected, rel=1e-5)


def test_digits_fid_grows_with_what_is_wrong_with_the_digits(digits, tmp_path):
    (val, _), (train, _) = digits["val"], digits["train"]
    generator = torch.Generator().manual_seed(0)

    def noisy(level: float) -> torch.Tensor:
        return (val.float() + level * torch.randn(val.shape, generator=generator)).clamp(0, 255).to(torch.uint8)

    blurred = torch.nn.functional.avg_pool2d(val.float(), 3, 1, 1).round().to(torch.uint8)
    fids = [metrics_in_digit_space(images, train, tmp_path)["fid"] for images in (val, noisy(40), noisy(80), blurred)]
    assert fids == sorted(fids) and fids[-1] > 10 * fids[0], fids


def test_digits_features_refuse_images_that_are_not_8x8_grey(tmp_path):
    mnist_like = torch.zeros(4, 1, 28, 28, dtype=torch.uint8)
    with pytest.raises(ConfigError, match=r"eval.features=digits scores 8×8 grey digits .* 28×28 .*inception"):
        metrics_in_digit_space(mnist_like, mnist_like, tmp_path)
    with pytest.raises(ConfigError, match=r"eval\.features=clip is not one of inception, digits"):
        fidelity_metrics(mnist_like, mnist_like, ["fid"], reference_name="x", weights_path=None, cache_dir=tmp_path,
                         features="clip")  # fmt: skip


def test_the_evaluation_job_records_the_digits_protocol(checkpoint, compose_config):
    from diffusion_lab.evaluation.job import evaluate

    cfg = compose_config([
        f"ckpt_path={checkpoint}", "num_samples=300", "sampler.num_steps=5", "eval.features=digits",
        "reference_split=train", "metrics=[fid,kid]", "eval.inception_weights=/no/such/file",  # never needed
    ], config_name="evaluate")  # fmt: skip
    protocol = evaluate(cfg)["protocol"]
    assert protocol["feature_extractor"] == "digits-classifier" and "inception_weights" not in protocol
    assert protocol["feature_weights_sha256"] == SHIPPED_DIGEST
    assert protocol["resize"].startswith("none: 8×8 grey into the digits classifier")
    # 300 samples, only 180 held-out digits: the floor is 300 train digits of one half against the other half.
    floor = protocol["real_data_floor"]
    assert floor["n"] == 300 and floor["split"] == "train-half"
    assert floor["method"] == "300 'train' images against the other 809: the 'val' split has only 180 images, " \
                              "fewer than the 300 samples"  # fmt: skip
    saved = json.loads((Path(cfg.output_dir) / "metrics.json").read_text())
    assert saved["protocol"]["feature_extractor"] == "digits-classifier"
    # The same cell in Inception's space is another measurement, not one already recorded.
    assert record_key(protocol) != record_key({**protocol, "feature_extractor": "inception-v3-compat"})


def test_the_report_names_classifier_fids_apart_from_inception_fids(tmp_path):
    from diffusion_lab import report

    run = write_run(tmp_path / "run", {"schedule": "cosine"}, 0.1, 30.0, steps=(10, 20))
    inception = [json.loads(line) for line in (run / "eval" / "metrics.jsonl").read_text().splitlines()]
    digits = [{**r, "metrics": {"fid": r["metrics"]["fid"] / 10, "kid_mean": 2.0},
               "protocol": {**r["protocol"], "feature_extractor": "digits-classifier"}} for r in inception]  # fmt: skip
    (run / "eval" / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in inception + digits))
    assert report.main([str(run), "--output", str(tmp_path / "out")]) == 0
    markdown = (tmp_path / "out" / "report.md").read_text()
    header = next(line for line in markdown.splitlines() if line.startswith("| run"))
    assert "| FID ddim·10 |" in header and "| cFID ddim·10 |" in header and "| cKID ddim·10 |" in header
    assert "3.5" in markdown and "35" in markdown  # 30 + 100/20 in Inception's space, a tenth in the classifier's
    assert "cFID and cKID are FID and KID in the feature space of the digits classifier" in markdown
    figures = sorted(p.name for p in (tmp_path / "out" / "figures").glob("fid_vs_step*.png"))
    assert figures == ["fid_vs_step.png", "fid_vs_step_digits-classifier.png"]
