"""The README's main job, run as a user runs it, must produce clearly recognisable digits."""

import time

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf
from sklearn.datasets import load_digits
from sklearn.linear_model import LogisticRegression

from diffusion_lab.build import build_module
from tests.conftest import run_cli


def digit_classifier() -> LogisticRegression:
    digits = load_digits()
    return LogisticRegression(max_iter=5000, C=0.5).fit(digits.data, digits.target)


@pytest.mark.slow
def test_quickstart_samples_are_recognisable_digits(tmp_path):
    start = time.perf_counter()
    result = run_cli(["experiment=quickstart", f"hydra.run.dir={tmp_path / 'run'}"], cwd=tmp_path, timeout=900)
    wall = time.perf_counter() - start
    assert result.returncode == 0, result.stderr[-3000:]
    print(f"quickstart wall time: {wall:.0f} s")

    checkpoint = torch.load(tmp_path / "run" / "checkpoints" / "last.ckpt", weights_only=False, map_location="cpu")
    module = build_module(OmegaConf.create(checkpoint["diffusion_lab_config"]))
    module.load_state_dict(checkpoint["state_dict"])  # the EMA weights
    samples = module.generate(seeds=range(300))
    pixels = ((samples.clamp(-1, 1) + 1) * 8).reshape(300, 64).numpy()  # back to the digits' 0–16 scale

    probabilities = digit_classifier().predict_proba(pixels)
    confident = probabilities.max(1) >= 0.9
    predicted = probabilities.argmax(1)
    print(f"confident: {confident.mean():.2f}, classes: {np.bincount(predicted, minlength=10).tolist()}")
    assert confident.mean() >= 0.7
    assert set(predicted[confident]) == set(range(10))
    assert np.bincount(predicted, minlength=10).max() <= 0.25 * len(predicted)  # no collapse onto a few digits
    assert (tmp_path / "run" / "samples" / "step_0000700.png").is_file()
