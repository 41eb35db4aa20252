"""Shared fixtures: compose the real conf/ tree in-process, run the CLI in a subprocess, real data paths."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from filelock import FileLock
from hydra.core.global_hydra import GlobalHydra
from omegaconf import DictConfig, open_dict

from diffusion_lab.config.compose import compose_job

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
# pytest-xdist runs the suite on every core (pyproject's addopts): one compute thread per worker, inherited by the
# CLI runs the tests start, so that the workers share the cores instead of oversubscribing them.
if os.environ.get("PYTEST_XDIST_WORKER") and "OMP_NUM_THREADS" not in os.environ:
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    os.environ["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // workers))
    torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))
# Small, fast settings shared by the training tests: the tiny U-Net on 8×8 digits, a few steps.
FAST = [
    "experiment=quickstart",
    "model=unet_tiny",
    "debug=limit",
    "print_config=false",
    "callbacks.progress_bar=null",
    "callbacks.model_summary=null",
]


# The modules that take longest in all, in the order xdist should hand them out (measured on 2 cores): the two
# longest single tests (the quickstart, 114 s; the MNIST recipe, 95 s) start at once, one per worker; the first
# evaluation of the digits reference (~36 s of Inception features, time-to-quality) comes before the other
# modules that need it, so none of them waits on its lock; the short modules fill the end. Chosen by simulating
# xdist's loadscope hand-out (a worker takes the next module when it has two tests left) over the measured
# durations, ±15 %: 380 s on average against 393 s for plain longest-first.
LONGEST_MODULES = (
    "test_quickstart", "test_mnist_recipe", "test_training", "test_time_to_quality", "test_benchmark", "test_report",
    "test_fidelity", "test_faults", "test_sample_evaluate",
)  # fmt: skip


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """LONGEST_MODULES' order first: xdist (``--no-loadscope-reorder`` in pyproject) hands out whole modules in
    this order, so the long ones start at once and the short ones fill the end, instead of one worker finishing a
    long module alone while the other idles. LONGEST_MODULES in its order, then other modules holding a ``slow`` test,
    then the rest."""
    slow_modules = {item.module for item in items if item.get_closest_marker("slow")}

    def rank(item: pytest.Item) -> tuple[int, int]:
        name = item.module.__name__.rsplit(".", 1)[-1]
        if name in LONGEST_MODULES:
            return 0, LONGEST_MODULES.index(name)
        return (1 if item.module in slow_modules else 2), 0

    items.sort(key=rank)  # stable: the order within each module stays


def shared_tmp(tmp_path_factory) -> Path:
    """The session's temporary folder that every pytest-xdist worker sees (each worker's own basetemp sits in it)."""
    base = tmp_path_factory.getbasetemp()
    return base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base


def made_once(tmp_path_factory, name: str, make: Callable[[Path], None]) -> Path:
    """``make(folder)`` runs once per test session, not once per xdist worker: the first worker to arrive builds
    the folder under a file lock, the others wait and reuse it. A failed build is retried by the next caller."""
    folder = shared_tmp(tmp_path_factory) / name
    with FileLock(f"{folder}.lock"):
        if not (folder / ".complete").is_file():
            shutil.rmtree(folder, ignore_errors=True)
            folder.mkdir(parents=True)
            make(folder)
            (folder / ".complete").touch()
    return folder


@pytest.fixture(scope="session", autouse=True)
def _one_reference_cache_per_session(tmp_path_factory):
    """Every evaluation in the session (in-process or CLI, on any xdist worker) shares one torch-fidelity cache:
    the digits' reference features are extracted once, not once per test."""
    previous = os.environ.get("DIFFUSION_LAB_CACHE_DIR")
    cache = shared_tmp(tmp_path_factory) / "cache"
    cache.mkdir(exist_ok=True)
    os.environ["DIFFUSION_LAB_CACHE_DIR"] = str(cache)
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
    """compose_config(overrides, run_dir=None, config_name="train") → the job's config as its CLI would build it,
    writing under tmp_path (earlier runs looked up under tmp_path/outputs)."""

    def _compose(overrides: list[str] = (), run_dir: Path | None = None, config_name: str = "train") -> DictConfig:
        cfg = compose_job(config_name, overrides, run_dir or tmp_path / "run")
        with open_dict(cfg):
            cfg.paths.log_dir = str(tmp_path / "outputs")
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
    """A briefly trained tiny model on the 8×8 digits (10 steps), made once per session (in-process: the train CLI
    runs for real in test_quickstart and test_faults). Tests only read it."""

    def train(folder: Path) -> None:
        from diffusion_lab.train import train as train_job

        train_job(compose_job("train", [*FAST, f"paths.log_dir={folder / 'outputs'}"], folder / "run"))

    return made_once(tmp_path_factory, "checkpoint", train) / "run" / "checkpoints" / "last.ckpt"


def skip_or_fail(reason: str) -> None:
    """Without ../shared a developer's run skips what needs it; CI (``CI`` set) must fail instead of passing
    by skipping."""
    if os.environ.get("CI"):
        pytest.fail(f"{reason}; CI must run these tests (see ../shared/README.md)")
    pytest.skip(reason)


@pytest.fixture(scope="session")
def quickstart_sweep(tmp_path_factory) -> Path:
    """A real 2×2 multirun (schedule × loss weighting) of the tiny quickstart, made once per session through the
    CLI. test_report appends evaluation records to its jobs; other tests only read their checkpoints."""

    def sweep(folder: Path) -> None:
        result = run_cli(
            ["-m", "schedule=linear,cosine", "loss_weighting=uniform,min_snr", *FAST, f"hydra.sweep.dir={folder}"],
            cwd=folder,
        )
        assert result.returncode == 0, result.stderr[-3000:]

    return made_once(tmp_path_factory, "multirun", sweep)


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
