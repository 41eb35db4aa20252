"""Post-hoc EMA: an EMA length chosen after training, reconstructed from two tracked EMAs' snapshots."""

from __future__ import annotations

import json

import pytest
import torch
from ema_pytorch import KarrasEMA
from torch import nn

from diffusion_lab.callbacks.posthoc_ema import (
    SETTINGS_FILE,
    _tracker,
    snapshot_steps,
    synthesize_ema_weights,
    write_snapshots,
)
from diffusion_lab.errors import ConfigError
from tests.conftest import FAST
from tests.helpers import user_error


def trajectory_step(net: nn.Module, step: int, generator: torch.Generator) -> None:
    """Weights that drift, oscillate and jitter, as an optimiser's do: a moving target for the averages."""
    with torch.no_grad():
        for parameter in net.parameters():
            drift = 1e-3 * torch.ones_like(parameter)
            swing = 5e-2 * torch.sin(torch.tensor(step / 60.0)) * torch.ones_like(parameter) / 60.0
            jitter = 2e-2 * torch.randn(parameter.shape, generator=generator)
            parameter.add_(drift + swing + jitter)


@pytest.mark.parametrize("sigma_rel", [0.03, 0.075, 0.15])
def test_a_reconstructed_ema_matches_the_ema_tracked_directly(tmp_path, sigma_rel):
    torch.manual_seed(0)
    net = nn.Linear(32, 32)
    tracker = _tracker(net, (0.05, 0.10), tmp_path)
    (tmp_path / SETTINGS_FILE).write_text(json.dumps({"sigma_rels": [0.05, 0.10]}))
    direct = KarrasEMA(net, sigma_rel=sigma_rel, update_every=1)
    generator = torch.Generator().manual_seed(1)
    for step in range(1, 2001):
        trajectory_step(net, step, generator)
        tracker.update()
        direct.update()
        if step % 100 == 0:
            write_snapshots(tracker, tmp_path)
    assert snapshot_steps(tmp_path) == list(range(100, 2001, 100))
    rebuilt = synthesize_ema_weights(net, tmp_path, sigma_rel, step=2000)
    for name, expected in direct.ema_model.state_dict().items():
        raw = net.state_dict()[name]
        error = (rebuilt[name] - expected).norm() / (expected - raw).norm()
        assert error < 0.02, (name, float(error))  # measured 0.6 % (0.03), 0.02 % (0.075), 0.04 % (0.15)


def test_a_reconstruction_uses_no_snapshot_from_after_its_step(tmp_path):
    torch.manual_seed(0)
    net = nn.Linear(4, 4)
    tracker = _tracker(net, (0.05, 0.10), tmp_path)
    (tmp_path / SETTINGS_FILE).write_text(json.dumps({"sigma_rels": [0.05, 0.10]}))
    generator = torch.Generator().manual_seed(1)
    for step in range(1, 401):
        trajectory_step(net, step, generator)
        tracker.update()
        if step % 100 == 0:
            write_snapshots(tracker, tmp_path)
        if step == 200:
            at_200 = synthesize_ema_weights(net, tmp_path, 0.08, step=200)
    assert all(torch.equal(at_200[k], v) for k, v in synthesize_ema_weights(net, tmp_path, 0.08, step=250).items())
    with pytest.raises(ConfigError, match=r"ema_length=0.5 must be a number in \(0, 0.3\)"):
        synthesize_ema_weights(net, tmp_path, 0.5, step=400)
    with pytest.raises(ConfigError, match=r"callbacks=\[default,posthoc_ema\]"):
        synthesize_ema_weights(net, tmp_path / "elsewhere", 0.08, step=400)


def test_training_snapshots_resumes_and_evaluates_ema_lengths(compose_config, tmp_path, capsys):
    from diffusion_lab.evaluation.job import evaluate
    from diffusion_lab.runs.checkpoints import load_checkpoint
    from diffusion_lab.runs.records import read_records
    from diffusion_lab.train import train

    run = tmp_path / "run"
    overrides = [*FAST, "callbacks=[default,posthoc_ema]", "callbacks.posthoc_ema.snapshot_every_n_steps=4",
                 "trainer.max_steps=8", "trainer.val_check_interval=8"]  # fmt: skip
    train(compose_config(overrides, run_dir=run))
    folder = run / "posthoc_ema"
    assert snapshot_steps(folder) == [4, 8] and sorted(p.name for p in folder.glob("0.*.pt")) == ["0.4.pt", "0.8.pt"]
    tracked = load_checkpoint(run / "checkpoints" / "last.ckpt")["callbacks"]
    assert any("PostHocEMA" in key for key in tracked)
    train(compose_config([*overrides[:-2], "trainer.max_steps=12", "trainer.val_check_interval=12", "ckpt_path=auto"],
                         run_dir=run))  # fmt: skip
    assert snapshot_steps(folder) == [4, 8, 12]  # the resumed run continued the same averages' count
    (run / ".hydra").mkdir()
    (run / ".hydra" / "config.yaml").write_text(
        "trainer: {}\nobjective: {prediction_type: v_prediction}\n"
        "schedule: {beta_schedule: cosine, num_train_timesteps: 1000}\n"
    )
    evaluate(compose_config([f"runs={run}", "num_samples=16", "metrics=[fid]", "eval.features=digits",
                             "reference_split=train", "sampler.num_steps=4", "grid.ema_length=[0.05,0.15]"],
                            config_name="evaluate"))  # fmt: skip
    records = read_records(run)
    assert sorted(r["protocol"]["ema_length"] for r in records) == [0.05, 0.15]
    assert records[0]["metrics"]["fid"] != records[1]["metrics"]["fid"]
    error = user_error(evaluate, compose_config([f"runs={run}", "grid.ema_length=[0.5]"], config_name="evaluate"),
                       capsys)  # fmt: skip
    assert "ema_length=0.5 must be a number in (0, 0.3)" in error
