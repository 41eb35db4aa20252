"""The throughput benchmark runs end to end and reports consistent figures (peers need the bench extra, so
this runs ours alone, at a tiny batch)."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "unet_throughput.py"


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench") / "bench.json"
    command = [sys.executable, str(SCRIPT), "--models", "ours", "--batch-size", "2", "--rounds", "1"]
    command += ["--steps-per-round", "1", "--warmup", "1", "--profile", "--json", str(out)]
    result = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr
    return result.stdout, json.loads(out.read_text())


def test_figures_are_consistent(report):
    stdout, record = report
    ours = record["results"]["ours"]
    assert ours["images_per_s"] == pytest.approx(2 / (ours["ms_per_step"] / 1e3))
    assert ours["ours_over_this"] == pytest.approx(1.0)
    # The mnist layout costs 540.7 GFLOP per training step at batch 64; FLOPs scale with the batch.
    assert ours["gflop_per_step"] * 32 == pytest.approx(540.7, rel=0.01)
    assert ours["tflops"] == pytest.approx(ours["gflop_per_step"] / ours["ms_per_step"])
    assert "measured here" in record["mfu_against"] and 0 < ours["mfu"] < 2
    assert "6.470 M parameters" in stdout
    # AdamW's two moments and the gradients alone are 3 × 6.47 M floats ≈ 74 MiB more than the bare model.
    assert ours["peak_mib"] > 70


def test_profile_says_where_the_time_goes(report):
    stdout, record = report
    breakdown = record["time_ms"]["ours"]
    assert set(breakdown) == {
        "conv forward",
        "conv backward",
        "attention",
        "matmul",
        "normalisation",
        "activation",
        "other",
    }
    assert all(breakdown[k] > 0 for k in ("conv forward", "conv backward", "attention", "normalisation"))
    assert "where one step's time goes" in stdout
