"""The throughput benchmark runs end to end and reports consistent figures, against a real peer (diffusers, a dev
dependency; lucidrains' package is in the bench extra only), at a tiny batch."""

import argparse
import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

from diffusion_lab.models.kernels.winograd import CPU_WINOGRAD as WINOGRAD_ACTIVE

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "unet_throughput.py"


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench") / "bench.json"
    command = [sys.executable, str(SCRIPT), "--models", "ours", "diffusers", "ours-stock", "--batch-size", "2"]
    command += ["--rounds", "1"]
    command += ["--steps-per-round", "1", "--warmup", "1", "--profile", "--json", str(out)]
    result = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr
    return result.stdout, json.loads(out.read_text())


def test_figures_are_consistent(report):
    stdout, record = report
    ours = record["results"]["ours"]
    assert ours["images_per_s"] == pytest.approx(2 / (ours["ms_per_step"] / 1e3))
    assert ours["ours_over_this"] == pytest.approx(1.0)
    peer = record["results"]["diffusers"]
    # the ratio is the peer's step time over ours, from the same run's figures
    assert peer["ours_over_this"] == pytest.approx(peer["ms_per_step"] / ours["ms_per_step"])
    assert peer["images_per_s"] == pytest.approx(2 / (peer["ms_per_step"] / 1e3))
    assert peer["gflop_per_step"] * 32 == pytest.approx(576.0, rel=0.01)  # diffusers' own FLOPs, not ours
    assert f"ours vs the fastest peer (diffusers): {peer['ours_over_this']:.2f}x" in stdout
    # The mnist layout costs 540.7 GFLOP per training step at batch 64; FLOPs scale with the batch.
    assert ours["gflop_per_step"] * 32 == pytest.approx(540.7, rel=0.01)
    assert ours["tflops"] == pytest.approx(ours["gflop_per_step"] / ours["ms_per_step"])
    assert "measured here" in record["mfu_against"] and 0 < ours["mfu"] < 2
    assert "6.470 M parameters" in stdout
    # AdamW's two moments and the gradients alone are 3 × 6.47 M floats ≈ 74 MiB more than the bare model.
    assert ours["peak_mib"] > 70
    if not WINOGRAD_ACTIVE:  # ours-stock would be ours again: it is left out, and says so
        assert "ours-stock" not in record["results"] and "ours-stock left out" in stdout
        return
    # The Winograd weight gradient changes the time, not the model FLOPs that utilisation is read against.
    assert record["results"]["ours-stock"]["gflop_per_step"] == ours["gflop_per_step"]


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
    if not WINOGRAD_ACTIVE:
        return
    # Our Winograd weight gradient is matmuls and additions inside a "winograd" block: it counts as the
    # convolution backward it replaces, so the two variants split their time alike.
    stock = record["time_ms"]["ours-stock"]
    share = {name: b["other"] / sum(b.values()) for name, b in (("ours", breakdown), ("stock", stock))}
    assert share["ours"] < share["stock"] + 0.05


CPU_ARGS = argparse.Namespace(device="cpu", channels_last="auto", compile=["none"])


@pytest.fixture(scope="module")
def bench():
    """The benchmark script, loaded once from its path (it is not a package module)."""
    spec = importlib.util.spec_from_file_location("unet_throughput", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("layout", ["mnist", "cifar10"])
def test_peers_match_our_parameter_count(bench, layout):
    """A throughput ratio is only fair between models of about the same size: every layout's peers are
    within ±10 % of ours (lucidrains' package is in the bench extra only, so it joins when installed)."""
    names = ["ours", "diffusers"]
    if importlib.util.find_spec("denoising_diffusion_pytorch"):
        names.append("lucidrains")
    contenders = [bench.build(name, bench.LAYOUTS[layout], CPU_ARGS) for name in names]
    assert bench.parameter_mismatches(contenders) == []


def test_a_peer_of_another_size_is_named(bench):
    ours = bench.build("ours", bench.LAYOUTS["mnist"], CPU_ARGS)
    bigger = bench.build("ours", bench.LAYOUTS["cifar10"], CPU_ARGS)
    bigger.name = "cifar-sized"
    assert bench.parameter_mismatches([ours, bigger]) == ["cifar-sized"]


def test_winograd_layer_benchmark_covers_every_wide_convolution():
    """benchmarks/winograd_weight_grad.py times the weight gradient of each wide residual conv the U-Net runs."""
    script = SCRIPT.with_name("winograd_weight_grad.py")
    command = [sys.executable, str(script), "--batch-size", "2", "--image-size", "16", "--repeats", "1"]
    result = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    rows = [line.split() for line in result.stdout.splitlines() if "² " in line]
    shapes = {(row[0], row[2]): int(row[3]) for row in rows}
    # At 16×16 the 6.5 M layout has levels of 16² (64 channels), 8² (128) and 4² (too small): four convs
    # down and three second convs up at 16², the up blocks' first convs reading the skips (192 then 128
    # channels in), the 8² level's convs the same way, and the 4² level and the middle on the stock kernels.
    assert shapes == {
        ("64→64", "16²"): 7,
        ("192→64", "16²"): 1,
        ("128→64", "16²"): 2,
        ("64→128", "8²"): 1,
        ("128→128", "8²"): 6,
        ("256→128", "8²"): 2,
        ("192→128", "8²"): 1,
    }, result.stdout
    assert "per training step: oneDNN" in result.stdout
