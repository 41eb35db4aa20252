"""The time-to-quality benchmark runs end to end at a tiny budget: both systems trained, sampled and scored by the
evaluation job, every column printed, the peer's setting picked by its selection run."""

import contextlib
import importlib.util
import io
import json
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

import time_to_quality  # noqa: E402

# Its module fixture takes minutes on a 2-core CPU.
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def benchmark_run(tmp_path_factory):
    if importlib.util.find_spec("denoising_diffusion_pytorch") is None:
        pytest.fail("denoising-diffusion-pytorch (the peer, a dev dependency) is not installed")
    out = tmp_path_factory.mktemp("ttq")
    argv = ["--case", "digits", "--budget", "3", "--num-samples", "16", "--out", str(out)]
    argv += ["--peer-settings", "1", "3", "--peer-select-budget", "2", "--select-samples", "8"]
    argv += ["--ours-overrides", "callbacks.sample_grid.num_samples=4"]
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        record = time_to_quality.main(argv)
    return out, record, printed.getvalue()


def test_every_column_for_both_systems(benchmark_run):
    out, record, printed = benchmark_run
    results = {r["system"]: r for r in record["results"]}
    assert set(results) == {"ours", "peer"}
    ours, peer = results["ours"], results["peer"]
    # The selection trained both chosen settings and kept the one with the lower FID for the budget.
    assert [s["setting"] for s in record["selection"]] == ["dim=16 batch=64 lr=0.001", "dim=16 batch=128 lr=0.001"]
    winner = min(record["selection"], key=lambda s: s["metrics"]["fid"])["setting"]
    assert peer["setting"] == record["peer_winner"] == winner
    for result in (ours, peer):
        assert result["steps"] >= 1 and result["train_s"] > 0
        batch = 128 if result is ours else int(result["setting"].split("batch=")[1].split()[0])
        assert result["images_per_s"] == pytest.approx(result["steps"] * batch / result["train_s"])
        assert np.isfinite(result["metrics"]["fid"]) and result["metrics"]["fid"] > 0
        assert "kid_mean" in result["metrics"]
    assert ours["nfe"] == 19 and peer["nfe"] == 50  # Heun's 10 steps (the quickstart's sampler); the peer's DDIM-50
    # Ours stopped at the wall-clock budget, not at its 700 steps; the budget counts training only.
    assert ours["steps"] < 700 and ours["train_s"] <= 3 + 2
    assert peer["train_s"] == pytest.approx(3, abs=1.0)
    assert record["fid_ratio"] == [pytest.approx(ours["metrics"]["fid"] / peer["metrics"]["fid"])]
    # The peer's samples went through the evaluation job, which scored them against the digits' held-out split.
    protocol = json.loads((Path(peer["run_dir"]) / "eval" / "metrics.json").read_text())["protocol"]
    assert protocol["dataset"] == "digits" and protocol["num_samples"] == 16
    # …in the digits classifier's feature space, against the 1617 train digits (the quickstart's measure)
    assert protocol["feature_extractor"] == "digits-classifier" and protocol["num_reference"] == 1617
    assert np.load(Path(peer["run_dir"]) / "samples.npz")["arr_0"].shape == (16, 8, 8, 1)
    for result in (ours, peer):  # a grid of each system's evaluated samples: 4 × 4 digits of 32 + 2 px
        assert Image.open(Path(result["run_dir"]) / "grid.png").size == (4 * 34 + 2, 4 * 34 + 2)
    assert json.loads((out / "results.json").read_text())["peer_winner"] == winner
    # The printed table has every column and one row per system, the ratio and the winner.
    header = next(line for line in printed.splitlines() if line.startswith("system"))
    columns = ["system", "setting", "seed", "steps", "images/s", "train s", "sample s", "NFE", "FID", "KID"]
    positions = [header.find(column) for column in columns]
    assert -1 not in positions and positions == sorted(positions), header
    table = printed.split("digits: 3 s of training each")[1]
    assert any(line.startswith("ours ") and f"{ours['metrics']['fid']:.2f}" in line for line in table.splitlines())
    assert any(line.startswith("peer ") and winner in line for line in table.splitlines())
    assert f"peer setting that won: {winner}" in printed
    assert f"FID ours / peer: {record['fid_ratio'][0]:.2f}" in printed
