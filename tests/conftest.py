"""Shared fixtures: compose the real conf/ tree in-process, run the CLI in a subprocess, real data paths."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, open_dict

from diffusion_lab.configs import register_configs
from diffusion_lab.train import CONFIG_DIR

REPO_ROOT = Path(__file__).resolve().parents[1]
SHARED = REPO_ROOT.parent / "shared"
# The real data and FID weights beside the checkout (../shared), as .ci/run exports them: a plain
# `python -m pytest` then runs the same tests as CI. Variables already set win.
if (SHARED / "datasets" / "MNIST" / "raw").is_dir():
    os.environ.setdefault("DIFFUSION_LAB_DATA_DIR", str(SHARED / "datasets"))
if (SHARED / "weights" / "weights-inception-2015-12-05-6726825d.pth").is_file():
    os.environ.setdefault(
        "DIFFUSION_LAB_INCEPTION_WEIGHTS", str(SHARED / "weights" / "weights-inception-2015-12-05-6726825d.pth")
    )
# Small, fast settings shared by the training tests: the tiny U-Net on 8×8 digits, a few steps.
FAST = [
    "experiment=quickstart",
    "model=unet_tiny",
    "debug=limit",
    "print_config=false",
    "callbacks.progress_bar=null",
    "callbacks.model_summary=null",
]


@pytest.fixture(scope="session", autouse=True)
def _one_reference_cache_per_session(tmp_path_factory):
    """Every evaluation in the session (in-process or CLI) shares one torch-fidelity cache: the digits'
    reference features are extracted once (~45 s of Inception on this CPU), not once per test."""
    previous = os.environ.get("DIFFUSION_LAB_CACHE_DIR")
    os.environ["DIFFUSION_LAB_CACHE_DIR"] = str(tmp_path_factory.mktemp("cache"))
    yield
    if previous is None:
        os.environ.pop("DIFFUSION_LAB_CACHE_DIR", None)
    else:
        os.environ["DIFFUSION_LAB_CACHE_DIR"] = previous


@pytest.fixture(autouse=True)
def _offline_wandb(monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")


@pytest.fixture
def compose_config(tmp_path: Path) -> Callable[..., DictConfig]:
    """compose_config(overrides, run_dir=None) → the train config as the CLI would build it, writing under tmp_path."""
    register_configs()

    def _compose(overrides: list[str] = (), run_dir: Path | None = None, config_name: str = "train") -> DictConfig:
        GlobalHydra.instance().clear()
        with initialize_config_dir(CONFIG_DIR, version_base="1.3"):
            cfg = compose(config_name, overrides=list(overrides), return_hydra_config=True)
        run_dir = run_dir or tmp_path / "run"
        run_dir.mkdir(parents=True, exist_ok=True)
        with open_dict(cfg):
            cfg.hydra.runtime.output_dir = str(run_dir)
            cfg.hydra.job.num = 0
        HydraConfig().set_config(cfg)
        with open_dict(cfg):
            cfg.paths.output_dir = str(run_dir)
            cfg.paths.log_dir = str(tmp_path / "outputs")
            del cfg["hydra"]
        return cfg

    yield _compose
    GlobalHydra.instance().clear()


def run_cli(args: list[str], cwd: Path, timeout: int = 600, module: str = "diffusion_lab.train", env_extra=None):
    """Run ``python -m <module> args`` as a user would; returns the CompletedProcess (text output)."""
    env = {**os.environ, "WANDB_MODE": "offline", "WANDB_SILENT": "true", "PYTHONWARNINGS": "ignore"}
    env.update(env_extra or {})
    return subprocess.run(
        [sys.executable, "-m", module, *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env,
    )


@pytest.fixture(scope="session")
def checkpoint(tmp_path_factory) -> Path:
    """A briefly trained tiny model on the 8×8 digits (10 steps), made once through the CLI."""
    run = tmp_path_factory.mktemp("train") / "run"
    result = run_cli([*FAST, f"hydra.run.dir={run}"], cwd=run.parent)
    assert result.returncode == 0, result.stderr[-3000:]
    return run / "checkpoints" / "last.ckpt"


def skip_or_fail(reason: str) -> None:
    """Without ../shared a developer's run skips what needs it; CI (``CI`` set) must fail instead of passing
    by skipping."""
    if os.environ.get("CI"):
        pytest.fail(f"{reason}; CI must run these tests (see ../shared/README.md)")
    pytest.skip(reason)


@pytest.fixture(scope="session")
def quickstart_sweep(tmp_path_factory) -> Path:
    """A real 2×2 multirun (schedule × loss weighting) of the tiny quickstart, made once through the CLI."""
    sweep = tmp_path_factory.mktemp("multirun") / "sweep"
    result = run_cli(
        ["-m", "schedule=linear,cosine", "loss_weighting=uniform,min_snr", *FAST, f"hydra.sweep.dir={sweep}"],
        cwd=sweep.parent,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return sweep


@pytest.fixture
def mnist_root() -> Path:
    root = os.environ.get("DIFFUSION_LAB_DATA_DIR")
    if not root or not (Path(root) / "MNIST" / "raw").is_dir():
        skip_or_fail("DIFFUSION_LAB_DATA_DIR does not point at a folder with MNIST/raw (../shared/datasets)")
    return Path(root)


@pytest.fixture
def inception_weights() -> str:
    path = os.environ.get("DIFFUSION_LAB_INCEPTION_WEIGHTS")
    if not path or not Path(path).is_file():
        skip_or_fail("DIFFUSION_LAB_INCEPTION_WEIGHTS is unset (../shared/weights/…)")
    return path
