"""Runs written by earlier versions keep working: a run folder written by diffusion_lab 0.1.0 (before the package
was reorganised) is committed under tests/fixtures/run_v0_1_0 — its ``.hydra/`` record and its ``last.ckpt`` (a
class-conditional 11k-parameter U-Net on the digits, 6 steps). Its samples were drawn with that version and stored
beside it (expected_samples.npz)."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import torch
import yaml
from hydra.utils import instantiate
from omegaconf import OmegaConf

from diffusion_lab.runs.checkpoints import load_checkpoint, load_module
from diffusion_lab.runs.folders import find_runs, select_checkpoints
from tests.conftest import FAST

FIXTURE = Path(__file__).parent / "fixtures" / "run_v0_1_0"
OVERRIDES = yaml.safe_load((FIXTURE / ".hydra" / "overrides.yaml").read_text())


def test_a_checkpoint_of_version_0_1_0_draws_the_samples_it_drew_then():
    expected = np.load(FIXTURE / "expected_samples.npz")
    for use_ema, key in ((True, "ema"), (False, "raw")):
        module, checkpoint = load_module(FIXTURE / "checkpoints" / "last.ckpt", use_ema=use_ema)
        images = module.generate(
            seeds=[0, 1, 2, 3], labels=torch.tensor([1, 2, 3, 4]), guidance_scale=1.0, sampler="ddim", num_steps=5
        )
        np.testing.assert_allclose(images.numpy(), expected[key], atol=1e-5)
    assert checkpoint["global_step"] == 6


def test_its_run_folder_is_found_and_its_stored_targets_still_resolve(tmp_path):
    runs = find_runs([FIXTURE])
    assert [run.path for run in runs] == [FIXTURE.resolve()] and runs[0].problem is None
    assert select_checkpoints(runs[0], "last") == [FIXTURE.resolve() / "checkpoints" / "last.ckpt"]
    stored = OmegaConf.create(load_checkpoint(FIXTURE / "checkpoints" / "last.ckpt")["diffusion_lab_config"])
    saved = OmegaConf.load(FIXTURE / ".hydra" / "config.yaml")
    assert OmegaConf.to_container(saved.model, resolve=True) == OmegaConf.to_container(stored.model)
    # The _target_ paths written then (model, data, callbacks, learning-rate schedule) name importable objects now.
    stored.paths.output_dir = str(tmp_path)
    assert type(instantiate(stored.model)).__name__ == "UNet"
    assert type(instantiate(stored.data)).__name__ == "DigitsDataModule"
    callbacks = [instantiate(entry) for entry in stored.callbacks.values() if entry is not None]
    assert {"RunCheckpoint", "DiffusionEMA", "SampleGrid", "StepProgressBar"} <= {type(c).__name__ for c in callbacks}
    optimizer = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))])
    assert instantiate(stored.lr_scheduler)(optimizer).get_last_lr() == [1e-3 / 2]  # step 1 of its 2 warm-up steps


def test_its_training_resumes(compose_config, tmp_path):
    from diffusion_lab.train import train

    run = tmp_path / "run"
    shutil.copytree(FIXTURE, run)
    overrides = [o for o in OVERRIDES if not o.startswith(("trainer.max_steps", "print_config"))]
    cfg = compose_config([*overrides, *FAST[-3:], "trainer.max_steps=8", "ckpt_path=auto"], run_dir=run)
    train(cfg)
    # The run folder moved since it was written: its last.ckpt is overwritten, not joined by a last-v1.ckpt.
    assert load_checkpoint(run / "checkpoints" / "last.ckpt")["global_step"] == 8
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["last.ckpt"]
