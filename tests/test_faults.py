"""Faults a long run meets: a kill mid-run, a kill mid-save, NaN losses, unsafe checkpoints, bad input,
ranks drifting apart, and credentials leaking into what a run writes."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from diffusion_lab.cli.user_errors import report_user_errors
from diffusion_lab.config.secrets import secrets_in
from diffusion_lab.errors import NonFiniteLossError
from diffusion_lab.train import train
from tests.conftest import FAST, REPO_ROOT, run_cli
from tests.fault_injection import RecordWeights
from tests.helpers import user_error

# A run long enough to be killed in the middle of an epoch (12 batches of 128 digits per epoch), checkpointing
# every 7 steps so checkpoints fall mid-epoch, with validation, EMA, LR warm-up and cosine decay all active.
KILLABLE = [
    "experiment=quickstart",
    "model=unet_tiny",
    "print_config=false",
    "callbacks.progress_bar=null",
    "callbacks.model_summary=null",
    "trainer.max_steps=60",
    "trainer.val_check_interval=25",
    "trainer.limit_val_batches=1",
    "trainer.log_every_n_steps=5",
    "lr_scheduler.warmup_steps=5",
    "callbacks.last_and_periodic.every_n_train_steps=7",
    "callbacks.sample_grid.every_n_steps=1000",
    "callbacks.ema.decay=0.9",
]


def cli_command(args: list[str]) -> list[str]:
    return [sys.executable, "-m", "diffusion_lab.train", *args]


def cli_env() -> dict[str, str]:
    return {**os.environ, "WANDB_MODE": "offline", "PYTHONWARNINGS": "ignore", "PYTHONPATH": str(REPO_ROOT)}


def final_state(checkpoint_path: Path) -> dict:
    checkpoint = torch.load(checkpoint_path, map_location="cpu", weights_only=True)
    return {
        "global_step": checkpoint["global_step"],
        "ema": checkpoint["state_dict"],
        "raw": checkpoint["current_model_state"],
        "optimizer": checkpoint["optimizer_states"][0]["state"],
    }


def assert_bitwise_equal(a: dict, b: dict, where: str = "") -> None:
    assert a.keys() == b.keys(), where
    for key in a:
        if isinstance(a[key], dict):
            assert_bitwise_equal(a[key], b[key], f"{where}.{key}")
        elif isinstance(a[key], torch.Tensor):
            assert torch.equal(a[key], b[key]), f"{where}.{key} differs"
        else:
            assert a[key] == b[key], f"{where}.{key}: {a[key]} != {b[key]}"


def test_a_run_killed_mid_epoch_resumes_to_the_same_final_weights(tmp_path, compose_config):
    straight = tmp_path / "straight"  # the uninterrupted run, in-process; the killed and the resumed run are CLIs
    train(compose_config(KILLABLE, run_dir=straight))

    killed = tmp_path / "killed"
    process = subprocess.Popen(
        cli_command([*KILLABLE, f"hydra.run.dir={killed}"]),
        cwd=tmp_path,
        env=cli_env(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    target = killed / "checkpoints" / "step_0000035.ckpt"
    deadline = time.monotonic() + 300
    while not target.exists() and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)
    process.send_signal(signal.SIGKILL)
    assert process.wait() == -signal.SIGKILL, "the run finished before it could be killed"
    # last.ckpt is rewritten just after each step_*.ckpt, so the kill leaves it at step 28 or 35: mid-epoch.
    interrupted_at = torch.load(killed / "checkpoints" / "last.ckpt", weights_only=True)["global_step"]
    assert interrupted_at in (28, 35)

    resumed = tmp_path / "resumed"
    result = run_cli([*KILLABLE, f"ckpt_path={killed}/checkpoints/last.ckpt", f"hydra.run.dir={resumed}"], cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    # Same data order, timesteps, noise, optimiser moments, LR and EMA: bit for bit on the CPU.
    expected = final_state(straight / "checkpoints" / "last.ckpt")
    assert expected["global_step"] == 60
    assert_bitwise_equal(final_state(resumed / "checkpoints" / "last.ckpt"), expected)


# The writer is a child process importing only torch and diffusion_lab.runs.atomic (~2 s, not Lightning's ~6 s).
KILL_WHILE_PICKLED = """
class KillWhilePickled:
    # Pickling this object (mid-way through torch.save) kills the process, as an OOM killer or scancel would.
    def __reduce__(self):
        os.kill(os.getpid(), signal.SIGKILL)
"""

KILL_POINTS = {
    # torch.save is pickling the new checkpoint into the file
    "while pickling": 'atomic_torch_save({"weights": torch.zeros(1_000_000), "then": KillWhilePickled()}, path)',
    # every byte of the new checkpoint is written, not yet flushed and moved into place
    "before the rename": (
        "os.fsync = lambda fd: os.kill(os.getpid(), signal.SIGKILL)\n"
        'atomic_torch_save({"weights": torch.zeros(1_000_000)}, path)'
    ),
}


@pytest.mark.parametrize("moment", KILL_POINTS)
def test_a_kill_during_a_checkpoint_write_leaves_the_previous_checkpoint_whole(tmp_path, moment):
    path = tmp_path / "last.ckpt"
    script = "\n".join(
        [
            "import os, signal, sys, torch",
            "from diffusion_lab.runs.atomic import atomic_torch_save",
            "assert not [m for m in sys.modules if m.split('.')[0] in ('lightning', 'hydra', 'omegaconf')]",
            KILL_WHILE_PICKLED,
            f"path = {str(path)!r}",
            'atomic_torch_save({"global_step": 7, "weights": torch.ones(1000)}, path)',
            KILL_POINTS[moment],
        ]
    )
    process = subprocess.run([sys.executable, "-c", script], cwd=REPO_ROOT, env=cli_env(), capture_output=True)
    assert process.returncode == -signal.SIGKILL, process.stderr.decode()[-2000:]
    survivor = torch.load(path, weights_only=True)
    assert survivor["global_step"] == 7 and torch.equal(survivor["weights"], torch.ones(1000))
    # The killed writer's partial file is left beside it, and the next successful write clears it away.
    assert len(list(tmp_path.glob(".last.ckpt.*.partial"))) == 1
    from diffusion_lab.runs.atomic import atomic_torch_save

    atomic_torch_save({"global_step": 8}, path)
    assert torch.load(path, weights_only=True) == {"global_step": 8}
    assert not list(tmp_path.glob(".last.ckpt.*.partial"))


def test_the_trainer_writes_checkpoints_atomically(compose_config):
    from hydra.utils import instantiate

    from diffusion_lab.runs.checkpoint_io import AtomicCheckpointIO

    for trainer_option in ("default", "cpu", "ddp_cpu"):
        cfg = compose_config([*FAST, f"trainer={trainer_option}"])
        trainer = instantiate(cfg.trainer, logger=False, enable_progress_bar=False)
        assert isinstance(trainer.strategy.checkpoint_io, AtomicCheckpointIO), trainer_option


def test_nan_steps_are_skipped_and_counted_without_touching_the_weights(compose_config, tmp_path):
    overrides = [
        *FAST,
        "+callbacks.poison._target_=tests.fault_injection.PoisonBatches",
        "+callbacks.poison.steps=[3,4]",
        "+callbacks.record._target_=tests.fault_injection.RecordWeights",
    ]
    with pytest.warns(UserWarning, match=r"step 3: non-finite loss or gradient, update skipped \(1 in a row"):
        metrics = train(compose_config(overrides))
    assert metrics["train/skipped_steps"] == 2.0
    after = RecordWeights.latest.after_step
    # global_step 3 and 4 ran as steps 4 and 5: the weights after them are those after step 3.
    assert torch.equal(after[4], after[3]) and torch.equal(after[5], after[3])
    assert not torch.equal(after[6], after[5]) and all(torch.isfinite(w).all() for w in after.values())
    checkpoint = torch.load(tmp_path / "run" / "checkpoints" / "last.ckpt", weights_only=True)
    adam_steps = {float(state["step"]) for state in checkpoint["optimizer_states"][0]["state"].values()}
    assert adam_steps == {8.0}  # 10 steps, 2 of them skipped: AdamW's moments saw 8 updates
    assert checkpoint["nonfinite_steps"] == {"total_skipped": 2, "in_a_row": 0, "first_of_streak": None}


def test_nan_steps_in_a_row_stop_the_run_with_a_clear_message_and_keep_the_checkpoint(compose_config, tmp_path, capsys):
    overrides = [
        *FAST,
        "max_nonfinite_steps=3",
        "+callbacks.poison._target_=tests.fault_injection.PoisonBatches",
        "+callbacks.poison.from_step=5",
    ]
    cfg = compose_config(overrides)
    with pytest.raises(NonFiniteLossError):
        train(cfg)
    with pytest.raises(SystemExit) as exit_info, pytest.warns(UserWarning):
        report_user_errors(train, compose_config(overrides, run_dir=tmp_path / "again"))
    assert exit_info.value.code == 1
    message = capsys.readouterr().err.strip().splitlines()[-1]
    assert message.startswith("Error: training stopped at step 7: the loss or its gradients were NaN/Inf for 3")
    assert "since step 5" in message and "last.ckpt" in message and "optimizer.lr" in message
    kept = torch.load(tmp_path / "again" / "checkpoints" / "last.ckpt", weights_only=True)
    assert kept["global_step"] == 5
    assert all(torch.isfinite(v).all() for v in kept["state_dict"].values() if v.is_floating_point())


class RunsCodeWhenUnpickled:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


@pytest.mark.parametrize("job", ["sample", "evaluate", "train"])
def test_a_checkpoint_crafted_to_run_code_is_refused_and_the_code_never_runs(
    checkpoint, tmp_path, job, compose_config, capsys
):
    """In-process through each job's CLI error path (the CLIs themselves are run by other tests)."""
    from diffusion_lab.evaluation.job import evaluate
    from diffusion_lab.sample import sample

    marker = tmp_path / "code_ran"
    crafted = torch.load(checkpoint, weights_only=True)
    crafted["payload"] = RunsCodeWhenUnpickled(marker)
    evil = tmp_path / "evil.ckpt"
    torch.save(crafted, evil)
    args = {
        "sample": ["num_samples=4", "sampler.num_steps=2"],
        "evaluate": ["num_samples=4", "metrics=[nll]"],
        "train": [*FAST],
    }[job]
    cfg = compose_config([*args, f"ckpt_path={evil}"], run_dir=tmp_path / "out", config_name=job)
    error = user_error({"sample": sample, "evaluate": evaluate, "train": train}[job], cfg, capsys)
    assert f"Refused to load {evil}" in error and "could run code" in error, error[-2000:]
    assert "Traceback" not in error
    assert not marker.exists()


def make_image_folder(root: Path) -> Path:
    from PIL import Image

    folder = root / "pictures"
    folder.mkdir()
    for i in range(12):
        Image.new("L", (10, 10), color=i * 20).save(folder / f"{i:02d}.png")
    (folder / "07_broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
    return folder


BAD_TRAINING_INPUT = [
    (["schedule=cosin"], "Could not find 'schedule/cosin'"),
    (["trainer.max_steps=-5"], "`max_steps` must be a non-negative integer or -1 (infinite steps). You passed in -5"),
    (["sampler.num_steps=0"], "num_steps=0 must be an integer between 1 and num_train_timesteps"),
    (["sampler.eta=-0.5"], "eta=-0.5 must lie in [0, 1]"),
    (["data.image_size=9"], "image_size=9 is not divisible by 2^(levels−1) = 2"),
    (["data=mnist", "data.root={tmp}/no_data", "data.download=false"], "no_data/MNIST"),
    (["data=image_folder", "data.root={folder}", "data.image_size=8"], "Cannot read image {folder}/07_broken.png"),
    (["ckpt_path={tmp}/missing.ckpt"], "ckpt_path={tmp}/missing.ckpt does not exist"),
]


def earlier_result(tmp_path: Path) -> Path:
    saved = tmp_path / "outputs" / "earlier" / "checkpoints" / "last.ckpt"
    saved.parent.mkdir(parents=True)
    saved.write_bytes(b"a result from an earlier run")
    return saved


def test_a_bad_override_through_the_real_cli_is_one_line_and_exit_status_1(tmp_path):
    """The process-level contract once for real: Hydra's composition error, exit status 1, no traceback."""
    saved = earlier_result(tmp_path)
    result = run_cli(
        [*FAST, "schedule=cosin", f"paths.log_dir={tmp_path / 'outputs'}", f"hydra.run.dir={tmp_path / 'now'}"],
        cwd=tmp_path,
    )
    assert result.returncode == 1
    assert "Could not find 'schedule/cosin'" in result.stderr and "Traceback" not in result.stderr
    assert saved.read_bytes() == b"a result from an earlier run"


@pytest.mark.parametrize(("overrides", "message"), BAD_TRAINING_INPUT[1:], ids=lambda v: str(v)[:40])
def test_bad_training_input_ends_in_one_clear_line_and_leaves_saved_results_alone(
    tmp_path, overrides, message, compose_config, capsys
):
    """In-process (the CLI's own error path, report_user_errors, without a process start per case)."""
    folder = make_image_folder(tmp_path) if any("{folder}" in o for o in overrides) else None
    fill = {"tmp": tmp_path, "folder": folder}
    overrides = [o.format(**fill) for o in overrides]
    saved = earlier_result(tmp_path)
    error = user_error(train, compose_config([*FAST, *overrides], run_dir=tmp_path / "outputs" / "now"), capsys)
    assert message.format(**fill) in error and error.strip().startswith("Error:"), error[-2000:]
    assert saved.read_bytes() == b"a result from an earlier run"
    assert not (tmp_path / "outputs" / "now" / "checkpoints").exists()


def test_ddp_in_bf16_shares_one_run_folder_ends_with_identical_ranks_and_resumes_bit_exact(tmp_path):
    """Two CPU processes under bf16-mixed autocast (one launch per run: DDP launches are the suite's dearest) write
    one run folder; both ranks end with the same raw and EMA weights; and resuming the run from its step-5
    checkpoint ends bitwise where the uninterrupted run did, which needs every rank to restore its own random
    generators (restoring rank 0's on both would draw the same noise on both and diverge)."""
    outputs = tmp_path / "outputs"

    def ddp_run(name: str, *extra: str) -> dict:
        dumps = tmp_path / f"dumps_{name}"
        result = run_cli(
            [*FAST, "trainer=ddp_cpu", "trainer.precision=bf16-mixed", "data.batch_size=32",
             "+callbacks.dump._target_=tests.fault_injection.DumpWeightsPerRank", f"+callbacks.dump.output_dir={dumps}",
             f"paths.log_dir={outputs}", f"hydra.run.dir={outputs / name}", *extra],
            cwd=tmp_path, env_extra={"PYTHONPATH": str(REPO_ROOT)},
        )  # fmt: skip
        assert result.returncode == 0, result.stderr[-3000:]
        return {r: torch.load(dumps / f"weights_rank{r}.pt", weights_only=True) for r in (0, 1)}

    full = ddp_run("full")
    assert [p.name for p in outputs.iterdir()] == ["full"]  # one run folder for both ranks
    assert len(list((outputs / "full" / "samples").iterdir())) == 2
    last = torch.load(outputs / "full" / "checkpoints" / "last.ckpt", weights_only=False)
    assert last["global_step"] == 10
    assert last["diffusion_lab_config"]["trainer"]["precision"] == "bf16-mixed"
    assert last["diffusion_lab_config"]["trainer"]["devices"] == 2
    assert_bitwise_equal(full[0], full[1])
    assert any(not torch.equal(full[0]["raw"][k], full[0]["ema"][k]) for k in full[0]["raw"])  # both were trained
    resumed = ddp_run("resumed", f"ckpt_path={outputs / 'full' / 'checkpoints' / 'step_0000005.ckpt'}")
    assert_bitwise_equal(resumed[0], full[0])
    assert_bitwise_equal(resumed[1], full[1])
    saved = torch.load(outputs / "full" / "checkpoints" / "step_0000005.ckpt", weights_only=True)
    assert len(saved["rng_states"]) == 2  # one state per rank


def files_containing(root: Path, secret: str) -> list[Path]:
    needle = secret.encode()
    return [path for path in root.rglob("*") if path.is_file() and needle in path.read_bytes()]


def test_the_wandb_api_key_never_reaches_logs_configs_or_checkpoints(compose_config, tmp_path, monkeypatch):
    key = "0123456789abcdef" * 2 + "feedc0de"
    monkeypatch.setenv("WANDB_API_KEY", key)
    train(compose_config([*FAST, "logger=wandb"]))
    run = tmp_path / "run"
    assert list((run / "wandb").glob("offline-run-*/run-*.wandb")) and (run / "checkpoints" / "last.ckpt").is_file()
    assert files_containing(run, key) == []


def test_a_credential_in_the_config_is_refused_and_scrubbed_from_the_saved_config(tmp_path):
    key = "s3cr3t-0123456789abcdef0123456789abcdef"
    run = tmp_path / "run"
    result = run_cli([*FAST, "logger=wandb", f"+logger.wandb.api_key={key}", f"hydra.run.dir={run}"], cwd=tmp_path)
    assert result.returncode == 1
    assert "logger.wandb.api_key would store a credential" in result.stderr and "WANDB_API_KEY" in result.stderr
    assert (run / ".hydra" / "overrides.yaml").is_file()
    assert files_containing(tmp_path, key) == []


@pytest.mark.parametrize("experiment", ["quickstart", "mnist_ddpm", "cifar10_ddpm"])
def test_no_shipped_config_holds_anything_that_looks_like_a_credential(compose_config, experiment):
    assert secrets_in(compose_config([f"experiment={experiment}", "logger=wandb", "callbacks=fid"])) == {}


def test_a_credential_read_from_the_environment_into_the_config_is_found(compose_config, monkeypatch):
    monkeypatch.setenv("WANDB_API_KEY", "from-the-environment")
    cfg = compose_config(["logger=wandb", "+logger.wandb.api_key=${oc.env:WANDB_API_KEY}"])
    assert secrets_in(cfg) == {"logger.wandb.api_key": "from-the-environment"}


def test_a_resumed_run_continues_the_same_wandb_run(compose_config, tmp_path):
    train(compose_config([*FAST, "logger=wandb"], run_dir=tmp_path / "first"))
    last = tmp_path / "first" / "checkpoints" / "last.ckpt"
    run_id = torch.load(last, weights_only=True)["logger_run_ids"]["wandb"]
    train(compose_config([*FAST, "logger=wandb", f"ckpt_path={last}", "trainer.max_steps=12"], tmp_path / "second"))
    resumed_runs = list((tmp_path / "second" / "wandb").glob("offline-run-*"))
    assert [path.name.rsplit("-", 1)[-1] for path in resumed_runs] == [run_id]
