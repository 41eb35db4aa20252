"""python -m diffusion_lab.sample / evaluate: reproducible samples, real FID/KID with torch-fidelity, NLL."""

import json
import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from diffusion_lab.evaluation import fidelity
from tests.conftest import FAST, run_cli
from tests.helpers import user_error


def sample_cli(checkpoint: Path, out: Path, *extra: str):
    return run_cli(
        [f"ckpt_path={checkpoint}", f"hydra.run.dir={out}", "sampler.num_steps=10", *extra],
        cwd=out.parent,
        module="diffusion_lab.sample",
    )


@pytest.fixture
def sample_in_process(compose_config, checkpoint):
    """sample_in_process(out, *overrides): the sample job as the CLI runs it, without a new interpreter (the
    CLI itself is exercised by the DDP and missing-checkpoint cases)."""
    from diffusion_lab.sample import sample

    def run(out: Path, *extra: str) -> Path:
        overrides = [f"ckpt_path={checkpoint}", "sampler.num_steps=10", *extra]
        return sample(compose_config(overrides, run_dir=out, config_name="sample"))

    return run


def test_sample_writes_npz_and_grid(sample_in_process, tmp_path):
    sample_in_process(tmp_path / "s", "num_samples=12", "batch_size=5")
    with np.load(tmp_path / "s" / "samples.npz") as archive:
        images = archive["arr_0"]
    assert images.shape == (12, 8, 8, 1) and images.dtype == np.uint8
    assert len(np.unique(images.reshape(12, -1), axis=0)) == 12  # twelve different images
    grid = Image.open(tmp_path / "s" / "grid.png")
    assert grid.size == (3 * 34 + 2, 4 * 34 + 2)  # 12 tiles of 32 px, 3 per row


def test_samples_do_not_depend_on_batch_size_or_devices(checkpoint, sample_in_process, tmp_path):
    sample_in_process(tmp_path / "one", "num_samples=10", "seed=3", "batch_size=7")
    sample_in_process(tmp_path / "other", "num_samples=10", "seed=3", "batch_size=3")
    ddp = sample_cli(checkpoint, tmp_path / "ddp", "num_samples=10", "seed=3", "batch_size=4", "accelerator=cpu",
                     "devices=2")  # fmt: skip
    assert ddp.returncode == 0, ddp.stderr[-3000:]
    arrays = {}
    for name in ("one", "other", "ddp"):
        with np.load(tmp_path / name / "samples.npz") as archive:
            arrays[name] = archive["arr_0"]
    assert np.array_equal(arrays["one"], arrays["other"])
    assert np.array_equal(arrays["one"], arrays["ddp"])
    sample_in_process(tmp_path / "shift", "num_samples=10", "seed=4")
    with np.load(tmp_path / "shift" / "samples.npz") as archive:
        assert np.array_equal(archive["arr_0"][:9], arrays["one"][1:])  # sample i is seed + i


def test_trajectory_figure_and_gif(sample_in_process, tmp_path):
    sample_in_process(tmp_path / "t", "num_samples=4", "trajectory=true")
    figure = Image.open(tmp_path / "t" / "trajectory.png")
    assert figure.size[0] > 600 and figure.size[1] > 600
    gif = Image.open(tmp_path / "t" / "trajectory.gif")
    assert gif.n_frames == 10  # one frame per step of the 10-step chain


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["guidance_scale=2.0"], "guidance_scale=2.0 needs class labels"),
        (["class_label=3"], "class_label=3 needs a class-conditional model"),
        (["num_samples=0"], "num_samples=0 and batch_size=64 must be >= 1"),
        (["sampler.num_steps=5000"], "num_steps=5000 must be an integer between 1 and num_train_timesteps=1000"),
        (["sampler.eta=-1"], r"eta=-1.0 must lie in \[0, 1\]"),
    ],
)
def test_bad_sampling_requests_end_in_one_clear_line(checkpoint, tmp_path, extra, message, compose_config, capsys):
    """In-process through the CLI's error path (one real CLI case is the missing checkpoint below)."""
    import re

    from diffusion_lab.sample import sample

    earlier = tmp_path / "bad" / "samples.npz"  # results of an earlier run in the same folder stay as they were
    earlier.parent.mkdir()
    earlier.write_bytes(b"earlier samples")
    cfg = compose_config([f"ckpt_path={checkpoint}", "sampler.num_steps=10", *extra], run_dir=tmp_path / "bad",
                         config_name="sample")  # fmt: skip
    error = user_error(sample, cfg, capsys)
    assert earlier.read_bytes() == b"earlier samples"
    assert re.search(message, error) and error.strip().startswith("Error:"), error[-2000:]


def test_a_missing_or_corrupt_checkpoint_is_a_clear_error(checkpoint, tmp_path, compose_config, capsys):
    from diffusion_lab.sample import sample

    missing = sample_cli(tmp_path / "nope.ckpt", tmp_path / "m")  # the sample CLI's real error path
    assert missing.returncode == 1 and "does not exist" in missing.stderr and "Traceback" not in missing.stderr
    corrupt = tmp_path / "half.ckpt"
    corrupt.write_bytes(checkpoint.read_bytes()[: checkpoint.stat().st_size // 2])
    cfg = compose_config([f"ckpt_path={corrupt}"], run_dir=tmp_path / "c", config_name="sample")
    error = user_error(sample, cfg, capsys)
    assert "truncated or corrupt" in error and "Traceback" not in error


def test_fid_and_kid_with_the_real_inception_and_a_cached_reference(
    checkpoint, tmp_path, inception_weights, monkeypatch, compose_config
):
    """In-process (the evaluate CLI runs for real in test_report's sweep evaluation)."""
    from diffusion_lab import evaluate

    cache = Path(os.environ["DIFFUSION_LAB_CACHE_DIR"]) / "fidelity"  # shared by the session's evaluations
    overrides = [f"ckpt_path={checkpoint}", "num_samples=10", "sampler.num_steps=10", "metrics=[fid,kid]"]
    evaluate.evaluate(compose_config(overrides, run_dir=tmp_path / "e1", config_name="evaluate"))
    report = json.loads((tmp_path / "e1" / "metrics.json").read_text())
    metrics, protocol = report["metrics"], report["protocol"]
    assert metrics["fid"] > 0 and np.isfinite(metrics["fid"]) and np.isfinite(metrics["kid_mean"])
    assert protocol["num_samples"] == 10 and protocol["num_reference"] == 180 and protocol["dataset"] == "digits"
    assert protocol["nfe_per_sample"] == 10 and protocol["ema"] is True and protocol["global_step"] == 10
    assert protocol["feature_extractor"] == "inception-v3-compat" and protocol["seed"] == 0
    cached = {p.name for p in cache.iterdir()}
    assert {
        "diffusion_lab-digits-val-1x8x8-n180-inception-v3-compat-features-2048.pt",
        "diffusion_lab-digits-val-1x8x8-n180-inception-v3-compat-stat-fid-2048.pt",
        "diffusion_lab-digits-val-1x8x8-n180-floor-train-n10.json",  # the real-data floor, at the same N
    } <= cached
    floor = protocol["real_data_floor"]
    assert floor["n"] == 10 and floor["split"] == "train" and 0 < floor["fid"] < metrics["fid"]

    # Second time: the same samples from their npz; the reference must come from the cache, never re-read.
    def no_reference_reads(self, index):
        raise AssertionError("reference images were read again instead of using the cache")

    monkeypatch.setattr(fidelity.ReferenceImages, "__getitem__", no_reference_reads)
    overrides = [
        f"samples={tmp_path / 'e1' / 'samples.npz'}",
        "data=digits",
        "metrics=[fid,kid]",
    ]
    cfg = compose_config(overrides, run_dir=tmp_path / "e2", config_name="evaluate")
    second = evaluate.evaluate(cfg)
    assert second["metrics"]["fid"] == pytest.approx(metrics["fid"], rel=1e-6)


def test_inception_score_is_refused_with_weights_that_lack_a_classifier(
    checkpoint, tmp_path, inception_weights, compose_config, capsys
):
    from diffusion_lab.evaluation.job import evaluate

    cfg = compose_config([f"ckpt_path={checkpoint}", "metrics=[isc]"], run_dir=tmp_path / "e", config_name="evaluate")
    error = user_error(evaluate, cfg, capsys)
    assert "no classifier layer" in error and "Traceback" not in error


def test_no_weights_and_no_network_is_one_clear_error(checkpoint, tmp_path, compose_config, capsys, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))
    monkeypatch.setenv("DIFFUSION_LAB_INCEPTION_URL", "http://127.0.0.1:9/weights.pth")
    from diffusion_lab.evaluation.job import evaluate

    overrides = [f"ckpt_path={checkpoint}", "metrics=[fid]", "eval.inception_weights=null"]
    error = user_error(evaluate, compose_config(overrides, run_dir=tmp_path / "e", config_name="evaluate"), capsys)
    assert "Could not download the FID Inception weights" in error
    assert "eval.inception_weights=" in error and "Traceback" not in error


def test_nll_is_finite_and_falls_with_training(tmp_path, compose_config):
    """A model with T = 100, scored on the same held-out digits before and after 150 steps of training (batch 64:
    8.6 → 6.3 bits per dimension here) in-process."""
    from diffusion_lab import evaluate
    from diffusion_lab.train import train

    common = [*FAST, "schedule.num_train_timesteps=100", "lr_scheduler.warmup_steps=0", "callbacks.sample_grid=null",
              "data.batch_size=64"]  # fmt: skip
    runs = {}
    for name, steps in (("before", 1), ("after", 150)):
        run = tmp_path / name
        train(compose_config([*common, f"trainer.max_steps={steps}", "trainer.val_check_interval=1000"], run_dir=run))
        overrides = [f"ckpt_path={run / 'checkpoints' / 'last.ckpt'}", "metrics=[nll]", "nll.num_batches=1",
                     "nll.batch_size=64"]  # fmt: skip
        cfg = compose_config(overrides, run_dir=tmp_path / f"nll_{name}", config_name="evaluate")
        runs[name] = evaluate.evaluate(cfg)["metrics"]["nll_bpd"]
    assert all(np.isfinite(value) for value in runs.values())
    assert runs["after"] < runs["before"] - 0.5


def test_fid_callback_logs_val_fid_during_training(compose_config, tmp_path, inception_weights):
    from diffusion_lab.train import train

    overrides = [
        *FAST,
        "callbacks=[default,fid]",
        "callbacks.progress_bar=null",
        "callbacks.model_summary=null",
        "callbacks.fid.every_n_steps=10",
        "callbacks.fid.num_samples=16",
        "+callbacks.fid.sampler={num_steps: 5}",
    ]
    metrics = train(compose_config(overrides))
    assert np.isfinite(metrics["val/fid"]) and metrics["val/fid"] > 0
    cache = Path(os.environ["DIFFUSION_LAB_CACHE_DIR"]) / "fidelity"  # the session's shared reference cache
    assert any(cache.glob("diffusion_lab-digits-val-*-stat-fid-2048.pt"))
