"""Training runs for real: in-process for speed, and through the CLI where processes matter (DDP, multirun)."""

import csv
import time
from pathlib import Path

import pytest
import torch

from diffusion_lab.train import train
from tests.conftest import FAST, REPO_ROOT, run_cli
from tests.helpers import read_wandb_records


def read_metrics(run_dir: Path) -> list[dict[str, str]]:
    with open(run_dir / "csv" / "metrics.csv") as handle:
        return list(csv.DictReader(handle))


def test_a_short_run_writes_checkpoints_grids_and_metrics(compose_config, tmp_path):
    metrics = train(compose_config(FAST))
    run = tmp_path / "run"
    assert {p.name for p in (run / "checkpoints").iterdir()} >= {"last.ckpt", "best.ckpt", "step_0000005.ckpt"}
    assert sorted(p.name for p in (run / "samples").iterdir()) == ["step_0000005.png", "step_0000010.png"]
    rows = read_metrics(run)
    logged = {key for row in rows for key, value in row.items() if value}
    assert {"train/loss", "val/loss", "val/loss_ema", "lr-AdamW"} <= logged
    assert {f"train/loss_t{k}" for k in range(10)} <= logged
    assert metrics["val/loss_ema"] > 0 and torch.isfinite(torch.tensor(metrics["val/loss_ema"]))
    checkpoint = torch.load(run / "checkpoints" / "last.ckpt", weights_only=False, map_location="cpu")
    assert checkpoint["global_step"] == 10
    assert checkpoint["diffusion_lab_config"]["model"]["model_channels"] == 16
    # EMA: the averaged weights are the checkpoint's state_dict, the raw ones are kept alongside.
    ema, raw = checkpoint["state_dict"], checkpoint["current_model_state"]
    assert any(not torch.equal(ema[k], raw[k]) for k in ema)


def test_last_checkpoint_holds_the_final_step_between_periodic_saves(compose_config, tmp_path):
    train(compose_config([*FAST, "trainer.max_steps=8"]))  # saves every 5 steps; 8 is mid-epoch, no validation
    checkpoints = tmp_path / "run" / "checkpoints"
    assert torch.load(checkpoints / "last.ckpt", weights_only=True)["global_step"] == 8
    assert torch.load(checkpoints / "step_0000005.ckpt", weights_only=True)["global_step"] == 5


@pytest.mark.parametrize("every", [100, 4])
def test_a_run_stopped_early_keeps_its_raw_weights_beside_the_average(compose_config, tmp_path, every):
    """A run stopped before max_steps (max_time, should_stop) writes last.ckpt of the step it stopped at (also
    after an earlier periodic save: every=4 saves at step 4), after Lightning has copied the EMA into the model;
    the checkpoint must still hold the optimiser's weights as current_model_state (which use_ema=false and
    resuming read), not a second copy of the average."""
    overrides = [*FAST, "trainer.max_steps=50", f"callbacks.last_and_periodic.every_n_train_steps={every}",
                 "+callbacks.stop._target_=tests.probes.StopAtStep", "+callbacks.stop.step=6"]  # fmt: skip
    train(compose_config(overrides))
    checkpoint = torch.load(tmp_path / "run" / "checkpoints" / "last.ckpt", weights_only=False)
    assert checkpoint["global_step"] == 6
    average, raw = checkpoint["state_dict"], checkpoint["current_model_state"]
    gap = max((average[k] - raw[k]).abs().max().item() for k in average if k.startswith("net."))
    assert gap > 1e-4  # two different sets of weights


def test_validation_losses_are_reproducible(compose_config, tmp_path):
    first = train(compose_config(FAST, run_dir=tmp_path / "a"))
    second = train(compose_config(FAST, run_dir=tmp_path / "b"))
    assert first["val/loss"] == second["val/loss"] and first["val/loss_ema"] == second["val/loss_ema"]


@pytest.mark.parametrize("precision", ["bf16-mixed", "32-true"])
def test_bf16_mixed_runs_the_network_under_autocast(compose_config, tmp_path, precision):
    """Under bf16-mixed every convolution of the training steps computes in bfloat16 inside autocast (while
    the loss stays float32); under 32-true none does."""
    from tests.probes import AutocastProbe

    metrics = train(
        compose_config(
            [*FAST, f"trainer.precision={precision}", "+callbacks.probe._target_=tests.probes.AutocastProbe"]
        )
    )
    assert torch.isfinite(torch.tensor(metrics["train/loss"]))
    assert torch.load(tmp_path / "run" / "checkpoints" / "last.ckpt", weights_only=False)["global_step"] == 10
    seen = AutocastProbe.seen
    assert len(seen) >= 10 * 10  # every conv of every step
    if precision == "bf16-mixed":
        assert all(enabled and out == torch.bfloat16 for enabled, _, out in seen)
    else:
        assert not any(enabled for enabled, _, _ in seen) and all(out == torch.float32 for _, _, out in seen)


def test_class_conditional_training_on_labelled_digits(compose_config, tmp_path):
    train(compose_config([*FAST, "model.num_classes=${data.num_classes}", "callbacks.sample_grid.guidance_scale=2.0"]))
    from PIL import Image

    grid = Image.open(tmp_path / "run" / "samples" / "step_0000010.png")
    assert grid.size[0] == 10 * 34 + 2  # one column per class


def test_resume_continues_from_the_saved_step(compose_config, tmp_path):
    train(compose_config(FAST, run_dir=tmp_path / "first"))
    last = tmp_path / "first" / "checkpoints" / "last.ckpt"
    train(compose_config([*FAST, f"ckpt_path={last}", "trainer.max_steps=15"], run_dir=tmp_path / "second"))
    resumed = torch.load(tmp_path / "second" / "checkpoints" / "last.ckpt", weights_only=False)
    assert resumed["global_step"] == 15
    steps = [int(row["step"]) for row in read_metrics(tmp_path / "second") if row.get("train/loss")]
    assert steps and min(steps) >= 10


def test_resume_last_finds_the_newest_earlier_run(compose_config, tmp_path):
    outputs = tmp_path / "outputs"
    train(compose_config(FAST, run_dir=outputs / "2026-01-01" / "10-00-00"))
    metrics = train(compose_config([*FAST, "ckpt_path=last", "trainer.max_steps=12"], run_dir=outputs / "new"))
    assert "train/loss" in metrics
    assert torch.load(outputs / "new" / "checkpoints" / "last.ckpt", weights_only=False)["global_step"] == 12


def test_resume_last_prefers_this_run_folders_own_checkpoint(compose_config, tmp_path, caplog):
    """A fixed run folder (hydra.run.dir=outputs/myrun) resumes itself, even when another run is newer."""
    outputs = tmp_path / "outputs"
    train(compose_config([*FAST, "trainer.max_steps=4"], run_dir=outputs / "myrun"))
    train(compose_config([*FAST, "trainer.max_steps=6"], run_dir=outputs / "other"))  # newer, elsewhere
    with caplog.at_level("INFO"):
        train(compose_config([*FAST, "ckpt_path=last", "trainer.max_steps=8"], run_dir=outputs / "myrun"))
    assert "ckpt_path=last → " in caplog.text and "this run folder's own last checkpoint" in caplog.text
    steps = [int(row["step"]) for row in read_metrics(outputs / "myrun") if row.get("train/loss")]
    resumed = torch.load(outputs / "myrun" / "checkpoints" / "last.ckpt", weights_only=True)
    assert resumed["global_step"] == 8 and min(s for s in steps if s >= 4) >= 4


def test_the_requeue_shape_same_command_twice_resumes_the_second_time(compose_config, tmp_path, caplog):
    """SLURM requeue: the same command line (fixed folder, ckpt_path=auto) starts fresh, then resumes (in-process:
    the kill/resume test in test_faults runs the resume through the real CLI)."""
    run = tmp_path / "outputs" / "job-1234"
    command = [*FAST, "ckpt_path=auto", f"paths.log_dir={tmp_path / 'outputs'}"]
    with caplog.at_level("INFO"):
        train(compose_config([*command, "trainer.max_steps=4"], run_dir=run))
    assert (
        "has no checkpoints/last.ckpt yet; starting a fresh run" in caplog.text and "Resuming from" not in caplog.text
    )
    caplog.clear()
    with caplog.at_level("INFO"):
        train(compose_config([*command, "trainer.max_steps=7"], run_dir=run))
    assert f"ckpt_path=auto → {run / 'checkpoints' / 'last.ckpt'}" in caplog.text
    assert caplog.text.count("Resuming from") == 1
    assert torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)["global_step"] == 7


def test_wandb_offline_writes_a_run_with_the_logged_metrics(compose_config, tmp_path):
    train(compose_config([*FAST, "logger=wandb"]))
    runs = list((tmp_path / "run" / "wandb").glob("offline-run-*"))
    assert len(runs) == 1
    transaction_log = next(runs[0].glob("run-*.wandb"))
    # wandb-core, a separate process, writes the log: under a loaded CI it can land a moment after finish() returns
    deadline = time.monotonic() + 60
    while True:
        records = read_wandb_records(transaction_log)
        kinds = [record.WhichOneof("record_type") for record in records]
        if kinds[-1:] == ["exit"] or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    assert kinds[-1:] == ["exit"], kinds  # finished, so `wandb sync` uploads a complete run
    history = [
        {item.key or "/".join(item.nested_key): item.value_json for item in record.history.item}
        for record in records
        if record.WhichOneof("record_type") == "history"
    ]
    keys = {key for row in history for key in row}
    assert {"train/loss", "val/loss", "val/loss_ema", "train/loss_t0", "train/loss_t9", "lr-AdamW"} <= keys
    assert any(key.startswith("samples/") for key in keys)  # the sample grids, as images
    assert max(int(row["trainer/global_step"]) for row in history if "trainer/global_step" in row) == 10
    assert list((runs[0] / "files" / "media" / "images").glob("samples_*.png"))


@pytest.mark.parametrize("metric", ["val/loss_ema", "val/loss"])
def test_the_job_returns_the_optimized_metric(compose_config, tmp_path, metric):
    """What a sweeper minimises is exactly the run's last logged value of ``optimized_metric``."""
    from diffusion_lab.train import main

    value = main.__wrapped__(compose_config([*FAST, f"optimized_metric={metric}"]))
    logged = [float(row[metric]) for row in read_metrics(tmp_path / "run") if row.get(metric)]
    assert isinstance(value, float) and value == pytest.approx(logged[-1], rel=1e-6)
    best = torch.load(tmp_path / "run" / "checkpoints" / "best.ckpt", weights_only=False)
    assert f"ModelCheckpoint{{'monitor': '{metric}'" in "".join(best["callbacks"])  # "best" tracks it too


EXPERIMENTS = sorted(path.stem for path in (REPO_ROOT / "conf" / "experiment").glob("*.yaml"))


@pytest.mark.parametrize("experiment", EXPERIMENTS)
def test_fast_dev_run_over_every_experiment(experiment, compose_config, tmp_path):
    from tests.helpers import write_cifar10, write_idx_dataset

    overrides = [f"experiment={experiment}", "debug=fdr", "print_config=false", "callbacks.progress_bar=null"]
    if experiment.startswith("mnist"):
        overrides += [f"data.root={write_idx_dataset(tmp_path / 'mnist')}", "data.download=false", "data.batch_size=8"]
    if experiment == "cifar10_ddpm":
        overrides += [f"data.root={write_cifar10(tmp_path / 'cifar').parent}", "data.batch_size=4"]
    metrics = train(compose_config(overrides))
    assert torch.isfinite(torch.tensor(metrics["train/loss"]))


def test_mnist_trains_from_the_data_dir(compose_config, mnist_root):
    overrides = [
        "data=mnist",
        "model=unet_tiny",
        "debug=limit",
        "print_config=false",
        "data.download=false",
        f"data.root={mnist_root}",
        "data.batch_size=16",
        "callbacks.progress_bar=null",
        "lr_scheduler.warmup_steps=2",
    ]
    metrics = train(compose_config(overrides))
    assert torch.isfinite(torch.tensor(metrics["val/loss"]))


def test_a_two_by_two_multirun_sweep(quickstart_sweep):
    sweep = quickstart_sweep
    jobs = sorted(p.name for p in sweep.iterdir() if p.is_dir() and p.name.isdigit())
    assert jobs == ["0", "1", "2", "3"]
    seen = set()
    for job in jobs:
        config = torch.load(sweep / job / "checkpoints" / "last.ckpt", weights_only=False)["diffusion_lab_config"]
        seen.add((config["schedule"]["beta_schedule"], config["loss_weighting"]["name"]))
    assert seen == {("linear", "uniform"), ("linear", "min_snr"), ("cosine", "uniform"), ("cosine", "min_snr")}


def test_sweep_through_the_submitit_launcher_returns_each_jobs_metric(tmp_path):
    """The SLURM launcher's code path, with submitit's local executor standing in for the cluster: each job
    returns exactly its last val/loss_ema, the value a sweeper minimises."""
    import pickle

    import hydra_plugins.hydra_submitit_launcher  # noqa: F401  (a dev dependency: missing must fail, not skip)

    sweep = tmp_path / "sweep"
    result = run_cli(
        [
            "-m",
            "hydra/launcher=submitit_local",
            "hydra.launcher.timeout_min=10",
            "schedule=linear,cosine",
            *FAST,
            f"hydra.sweep.dir={sweep}",
        ],
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    returns = {}
    for path in sweep.glob(".submitit/*/*_result.pkl"):
        status, job = pickle.loads(path.read_bytes())
        assert status == "success"
        returns[job.overrides[0]] = (job.return_value, Path(job.hydra_cfg.hydra.runtime.output_dir))
    assert set(returns) == {"schedule=linear", "schedule=cosine"}
    for value, job_dir in returns.values():
        logged = [float(row["val/loss_ema"]) for row in read_metrics(job_dir) if row.get("val/loss_ema")]
        assert isinstance(value, float) and value == pytest.approx(logged[-1], rel=1e-6)
