"""objective=edm and objective=flow_matching through the framework: training, checkpoints, sampling, the
evaluation grid, and the combinations that mean nothing refused before anything runs."""

from __future__ import annotations

import csv
import json

import pytest
import torch

from diffusion_lab.diffusion.edm import EDM
from diffusion_lab.diffusion.flow_matching import FlowMatching
from diffusion_lab.runs.checkpoints import load_checkpoint, load_module
from tests.conftest import FAST
from tests.helpers import user_error

OBJECTIVES = {"edm": EDM, "flow_matching": FlowMatching}


@pytest.fixture(scope="module")
def continuous_runs(tmp_path_factory):
    """A tiny digits run of each continuous objective (10 steps), started from the quickstart preset: its cosine
    β schedule must be dropped, not refused. Trained in-process; the run's .hydra/config.yaml is written as Hydra's
    launcher writes it, with the preset's schedule still in it."""
    from omegaconf import OmegaConf

    from diffusion_lab.config.compose import compose_job
    from diffusion_lab.train import train

    runs = {}
    for name in OBJECTIVES:
        folder = tmp_path_factory.mktemp(name)
        cfg = compose_job("train", [*FAST, f"objective={name}", f"paths.log_dir={folder}"], folder / "run")
        (folder / "run" / ".hydra").mkdir()
        OmegaConf.save(cfg, folder / "run" / ".hydra" / "config.yaml")
        train(cfg)
        runs[name] = folder / "run"
    return runs


@pytest.mark.parametrize("name", list(OBJECTIVES))
def test_a_continuous_objective_trains_and_its_checkpoint_rebuilds_it(continuous_runs, name):
    run = continuous_runs[name]
    stored = load_checkpoint(run / "checkpoints" / "last.ckpt")["diffusion_lab_config"]
    assert stored["schedule"] is None and stored["objective"]["kind"] == name  # the preset's schedule dropped
    module, _ = load_module(run / "checkpoints" / "last.ckpt")
    assert isinstance(module.continuous, OBJECTIVES[name]) and module.schedule is None
    assert module.continuous == OBJECTIVES[name]()  # the config's values are the papers' defaults
    images = module.generate(seeds=range(3), sampler="heun", num_steps=3)
    assert images.shape == (3, 1, 8, 8) and torch.isfinite(images).all()
    # The loss is logged in ten ranges of the training distribution of noise levels, like DDPM's of t.
    with open(run / "csv" / "metrics.csv") as handle:
        columns = next(csv.reader(handle))
    assert {f"train/loss_t{k}" for k in range(10)} <= set(columns) and "val/loss_ema" in columns


def test_the_evaluation_grid_counts_the_continuous_samplers_calls(continuous_runs, compose_config):
    from diffusion_lab.evaluation.job import evaluate
    from diffusion_lab.runs.records import read_records

    runs = [str(continuous_runs[name]) for name in OBJECTIVES]
    summary = evaluate(compose_config([
        f"runs=[{','.join(runs)}]", "num_samples=20", "metrics=[fid]", "eval.features=digits", "reference_split=train",
        "grid.sampler=[euler,heun,dpm_solver]", "grid.num_steps=[4]",
    ], config_name="evaluate"))  # fmt: skip
    assert summary["evaluated"] == 6
    for run in runs:
        calls = {r["protocol"]["sampler"]["sampler"]: r["protocol"]["nfe_per_sample"] for r in read_records(run)}
        assert calls == {"euler": 4, "heun": 7, "dpm_solver++": 4}
        assert all(r["metrics"]["fid"] > 0 for r in read_records(run))


def test_the_sample_job_draws_from_a_continuous_checkpoint(continuous_runs, compose_config):
    from diffusion_lab.sample import sample

    output = sample(compose_config([
        f"ckpt_path={continuous_runs['flow_matching'] / 'checkpoints' / 'last.ckpt'}", "num_samples=4",
        "sampler=euler", "sampler.timestep_spacing=trailing", "sampler.shift=3", "trajectory=true",
    ], config_name="sample"))  # fmt: skip
    assert (output / "samples.npz").is_file() and (output / "trajectory.png").is_file()


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["objective=flow_matching", "schedule=cosine"],
         "schedule=cosine is a β schedule, which objective=flow_matching does not use"),
        (["objective=edm", "loss_weighting=min_snr"],
         "loss_weighting=min_snr weights DDPM's timesteps; objective=edm has its own weighting"),
        (["objective=edm", "sampler=ddpm"], "sampler='ddpm' walks a β schedule's discrete chain"),
        (["objective=epsilon", "schedule=none"], "schedule=none leaves DDPM's objective without its β schedule"),
        (["objective=flow_matching", "objective.time_sampling=beta"], "objective.time_sampling"),
    ],
)  # fmt: skip
def test_meaningless_combinations_are_one_clear_error(compose_config, capsys, overrides, message):
    from diffusion_lab.train import train

    if "beta" in overrides[-1]:  # the schema refuses it at composition, naming the key
        with pytest.raises(Exception, match=message):
            compose_config([*FAST, *overrides])
        return
    error = user_error(train, compose_config([*FAST, *overrides]), capsys)
    assert message in error and error.count("\n") <= 3, error


def test_nll_is_refused_for_a_continuous_objective(continuous_runs, compose_config, capsys):
    from diffusion_lab.evaluation.job import evaluate

    cfg = compose_config([f"ckpt_path={continuous_runs['edm'] / 'checkpoints' / 'last.ckpt'}", "metrics=[nll]"],
                         config_name="evaluate")  # fmt: skip
    error = user_error(evaluate, cfg, capsys)
    assert "metrics=[nll] is DDPM's variational bound" in error and "objective=edm" in error
    assert not list(continuous_runs["edm"].glob("eval/*.jsonl")) or all(
        "nll" not in json.loads(line).get("requested", [])
        for line in (continuous_runs["edm"] / "eval" / "metrics.jsonl").read_text().splitlines()
    )
