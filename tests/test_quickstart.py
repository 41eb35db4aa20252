"""The README's main job, run as a user runs it, must produce clearly recognisable digits."""

import time

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf
from sklearn.datasets import load_digits
from sklearn.linear_model import LogisticRegression

from diffusion_lab.config.build import build_module
from tests.conftest import run_cli


def digit_classifier() -> LogisticRegression:
    digits = load_digits()
    return LogisticRegression(max_iter=5000, C=0.5).fit(digits.data, digits.target)


@pytest.mark.slow
def test_quickstart_samples_are_recognisable_digits(tmp_path, compose_config):
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
    assert_the_digits_measure_ranks_fewer_steps_below_more(tmp_path / "run", compose_config)


@pytest.mark.slow
def test_class_conditional_quickstart_samples_the_requested_digit(tmp_path, compose_config):
    """A short class-conditional quickstart; `sample class_label=… guidance_scale=…` must draw the asked-for
    digits (labelled so by a classifier fitted on real digits well above the 10 % of chance), and record the
    labels in samples.npz's arr_1. (v-prediction: in 100 steps it learns the classes where ε does not yet.)"""
    from diffusion_lab.sample import sample
    from diffusion_lab.train import train

    run = tmp_path / "run"
    overrides = ["experiment=quickstart", "objective=v_prediction", "model.num_classes=${data.num_classes}",
                 "trainer.max_steps=100", "trainer.val_check_interval=100", "callbacks.sample_grid=null",
                 "print_config=false", "callbacks.progress_bar=null", "callbacks.model_summary=null"]  # fmt: skip
    train(compose_config(overrides, run_dir=run))
    asked = list(range(10)) * 10
    sample(  # the sample job as its CLI runs it (the CLI itself is run by test_sample_evaluate)
        compose_config([f"ckpt_path={run / 'checkpoints' / 'last.ckpt'}", "num_samples=100",
                        "class_label=[0,1,2,3,4,5,6,7,8,9]", "guidance_scale=2", "sampler=dpm_solver"],
                       run_dir=tmp_path / "samples", config_name="sample")
    )  # fmt: skip
    with np.load(tmp_path / "samples" / "samples.npz") as archive:
        images, labels = archive["arr_0"], archive["arr_1"]
    assert labels.tolist() == asked
    pixels = images.reshape(100, 64).astype(np.float64) / 255.0 * 16.0
    predicted = digit_classifier().predict(pixels)
    accuracy = float((predicted == labels).mean())
    print(f"class-conditional accuracy: {accuracy:.2f}")
    assert accuracy >= 0.5


def assert_the_digits_measure_ranks_fewer_steps_below_more(run, compose_config) -> None:
    """The same run half-trained (its step-350 checkpoint) against fully trained (step 700), scored by the
    evaluation job in the digits classifier's feature space from two disjoint sets of sampling seeds: the
    half-trained model must score worse by far more than the seeds move either score. (At N = 2000 one draw's
    cFID moves by ~0.8 (std) with the seeds; the two checkpoints differ by ~8.)"""
    from diffusion_lab.evaluation.job import evaluate
    from diffusion_lab.runs.records import read_records

    for seed in (0, 2000):
        evaluate(compose_config([
            f"runs={run}", "checkpoints=all", "num_samples=2000", f"seed={seed}", "eval.features=digits",
            "reference_split=train", "metrics=[fid]", "sampler.num_steps=10", "save_samples=false",
        ], config_name="evaluate"))  # fmt: skip
    fid = {(r["protocol"]["global_step"], r["protocol"]["seed"]): r["metrics"]["fid"] for r in read_records(run)}
    spread = max(abs(fid[(step, 0)] - fid[(step, 2000)]) for step in (350, 700))
    margin = min(fid[(350, s)] for s in (0, 2000)) - max(fid[(700, s)] for s in (0, 2000))
    print(f"digits cFID at N = 2000: step 350 {fid[(350, 0)]:.2f}, 700 {fid[(700, 0)]:.2f}, seed spread {spread:.2f}")
    assert margin > 2 * spread and margin > 3.0, fid
