"""Time to quality: our recipe and a peer trained for the same wall-clock budget on this machine, then scored by
the same evaluation job (same N, same seed, same reference split), side by side in one run.

    pip install -e ".[bench]"
    python benchmarks/time_to_quality.py                          # MNIST, 600 s each, N = 1000
    python benchmarks/time_to_quality.py --case digits            # the quickstart's 8×8 digits, 120 s each
    python benchmarks/time_to_quality.py --peer-select-budget 120 # pick the peer's setting at 120 s, then train it

Ours is ``python -m diffusion_lab.train experiment=<recipe> trainer.max_time=<budget>`` run as a user runs it,
scored by ``python -m diffusion_lab.evaluate ckpt_path=…`` with the recipe's own sampler. The peer is lucidrains'
``denoising-diffusion-pytorch`` with its own defaults (``GaussianDiffusion``: v-prediction, sigmoid schedule,
DDIM with 50 steps; its ``Trainer``'s Adam with betas (0.9, 0.99), gradient clipping at 1, EMA 0.995 every 10
steps), trained by the same loop as its ``Trainer`` (which needs a folder of image files and accelerate) on the
same uint8 images, without the horizontal flip its Trainer defaults to (digits are not mirror-symmetric). Its
samples go through ``python -m diffusion_lab.evaluate samples=…``. Each peer setting of the grid (``dim`` 16 / 32
with ``dim_mults=(1, 2, 4)``, batch 64 / 128, learning rate 2e-4 / 1e-3) gets the full budget unless
``--peer-select-budget`` picks one at a shorter budget first. Sampling time is reported, not counted in the
budget; neither is process start-up or model construction.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from datetime import datetime
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
PEER_GRID = tuple(
    {"dim": dim, "batch_size": batch, "lr": lr} for dim in (16, 32) for batch in (64, 128) for lr in (2e-4, 1e-3)
)
CASES = {
    # our recipe (an experiment file), its dataset, the default budget in seconds, overrides for an offline machine
    "mnist": {"experiment": "mnist_cpu", "data": "mnist", "budget": 600.0, "data_overrides": ["data.download=false"]},
    # the quickstart finishes its steps in about 90 s; both systems are scored in the digits classifier's feature
    # space against the 1617 train digits (eval.features=digits), which sees what the upscaled Inception cannot
    "digits": {
        "experiment": "quickstart",
        "data": "digits",
        "budget": 120.0,
        "data_overrides": [],
        "eval_overrides": ["eval.features=digits", "reference_split=train"],
    },
}


@dataclass
class Result:
    """One trained system scored by the evaluation job."""

    system: str
    setting: str
    seed: int
    steps: int
    train_s: float
    images_per_s: float
    sample_s: float
    nfe: int
    metrics: dict[str, float] = field(default_factory=dict)
    floor_fid: float | None = None
    run_dir: str = ""


def budget_string(seconds: float) -> str:
    """Lightning's ``max_time`` "DD:HH:MM:SS" for a whole number of seconds (at least one)."""
    total = max(1, round(seconds))
    return f"00:{total // 3600:02d}:{total % 3600 // 60:02d}:{total % 60:02d}"


def run_module(module: str, overrides: list[str], log_path: Path) -> None:
    """``python -m <module> <overrides>`` with this interpreter; its console goes to ``log_path``."""
    command = [sys.executable, "-m", module, *overrides]
    with log_path.open("w") as log:
        finished = subprocess.run(command, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, check=False)
    if finished.returncode != 0:
        tail = log_path.read_text().splitlines()[-15:]
        raise SystemExit(
            f"{' '.join(command)} failed ({finished.returncode}); the end of {log_path}:\n" + "\n".join(tail)
        )


def evaluate(overrides: list[str], out_dir: Path, num_samples: int, seed: int, metrics: list[str], case: dict) -> dict:
    """The evaluation job's metrics.json for ``overrides`` (a checkpoint or a samples file). It runs in this
    process, composed as its CLI composes it: an interpreter per evaluation would add ~8 s of imports to each."""
    from diffusion_lab.config.compose import compose_job
    from diffusion_lab.evaluation.job import evaluate as evaluation_job

    common = [f"num_samples={num_samples}", f"seed={seed}", f"metrics=[{','.join(metrics)}]", "logger=none"]
    common += case.get("eval_overrides", [])
    evaluation_job(compose_job("evaluate", [*overrides, *common], out_dir))
    return json.loads((out_dir / "metrics.json").read_text())


def timer_seconds(checkpoint: Path) -> float:
    """Seconds of training Lightning's Timer (the ``max_time`` budget) had counted when ``checkpoint`` was saved."""
    state = torch.load(checkpoint, map_location="cpu", weights_only=False)  # our own run's file
    return float(state["callbacks"]["Timer"]["time_elapsed"]["train"])


def run_ours(case: dict, budget: float, num_samples: int, seed: int, out: Path, metrics: list[str], extra: list[str]):
    run_dir = out / f"ours-seed{seed}"
    run_dir.mkdir(parents=True, exist_ok=True)
    overrides = [
        f"experiment={case['experiment']}",
        f"trainer.max_time={budget_string(budget)}",
        f"seed={seed}",
        *case["data_overrides"],
        *case.get("recipe_overrides", []),
        "logger=csv",
        f"hydra.run.dir={run_dir / 'train'}",
        *extra,
    ]
    run_module("diffusion_lab.train", overrides, run_dir / "train.log")
    checkpoint = run_dir / "train" / "checkpoints" / "last.ckpt"
    sampler = recipe_sampler(run_dir / "train")
    report = evaluate([f"ckpt_path={checkpoint}", *sampler], run_dir / "eval", num_samples, seed, metrics, case)
    save_sample_grid(run_dir / "eval" / "samples.npz", run_dir / "grid.png")
    protocol = report["protocol"]
    steps = int(protocol["global_step"])
    train_s = timer_seconds(checkpoint)
    batch = int(_config_value(run_dir / "train", "data.batch_size"))
    return Result(
        system="ours",
        setting=" ".join([case["experiment"], *case.get("recipe_overrides", [])]),
        seed=seed,
        steps=steps,
        train_s=train_s,
        images_per_s=steps * batch / train_s,
        sample_s=float(protocol["sampling_seconds"]),
        nfe=int(protocol["nfe_per_sample"]),
        metrics=report["metrics"],
        floor_fid=(protocol.get("real_data_floor") or {}).get("fid"),
        run_dir=str(run_dir),
    )


def recipe_sampler(run_dir: Path) -> list[str]:
    """The evaluation overrides that draw with the sampler the recipe trained with (its stored settings): the
    evaluate job's own default is DPM-Solver++ 20, and the quickstart samples with Heun."""
    settings = _config_value(run_dir, "sampler")
    option = {"dpm_solver++": "dpm_solver"}.get(settings.sampler, settings.sampler)
    keys = ("num_steps", "timestep_spacing", "sigma_max", "eta", "clip_sample")
    return [f"sampler={option}", *(f"sampler.{k}={settings[k]}" for k in keys if settings.get(k) is not None)]


def _config_value(run_dir: Path, dotted: str):
    from omegaconf import OmegaConf

    from diffusion_lab.runs.layout import run_config

    return OmegaConf.select(run_config(run_dir), dotted)


def training_images(data: str) -> torch.Tensor:
    """uint8 (N, C, H, W) training split, loaded by the same DataModule our recipe uses."""
    from diffusion_lab.data import DigitsDataModule, MNISTDataModule
    from diffusion_lab.data.base import default_data_root

    root = ROOT / default_data_root()  # the training job runs in ROOT; an absolute $DIFFUSION_LAB_DATA_DIR wins
    module = {"mnist": MNISTDataModule, "digits": DigitsDataModule}[data](root=str(root))
    return module.load_split("train")[0]


def save_sample_grid(samples_npz: Path, path: Path, count: int = 100) -> Path:
    """The first ``count`` evaluated samples (uint8 N×H×W×C) as one PNG grid."""
    from diffusion_lab.generation.grids import save_grid

    with np.load(samples_npz) as archive:
        images = torch.from_numpy(archive["arr_0"][:count]).permute(0, 3, 1, 2)
    return save_grid(images, path)


def setting_name(setting: dict) -> str:
    return f"dim={setting['dim']} batch={setting['batch_size']} lr={setting['lr']:g}"


def train_peer(setting: dict, images: torch.Tensor, budget: float, seed: int):
    """lucidrains' GaussianDiffusion + Unet trained for ``budget`` seconds the way its Trainer trains; returns
    the EMA model, the steps reached and the training seconds."""
    from denoising_diffusion_pytorch import GaussianDiffusion, Unet
    from ema_pytorch import EMA

    torch.manual_seed(seed)
    unet = Unet(dim=setting["dim"], dim_mults=(1, 2, 4), channels=images.shape[1])
    diffusion = GaussianDiffusion(unet, image_size=images.shape[-1], timesteps=1000, sampling_timesteps=50)
    optimizer = torch.optim.Adam(diffusion.parameters(), lr=setting["lr"], betas=(0.9, 0.99))
    ema = EMA(diffusion, beta=0.995, update_every=10)
    data = images.float() / 255.0  # its Trainer feeds [0, 1]; GaussianDiffusion normalises to [−1, 1] itself
    generator = torch.Generator().manual_seed(seed)
    order, cursor, steps = torch.randperm(len(data), generator=generator), 0, 0
    batch_size = setting["batch_size"]
    started = time.perf_counter()
    while time.perf_counter() - started < budget:
        if cursor + batch_size > len(order):
            order, cursor = torch.randperm(len(data), generator=generator), 0
        batch = data[order[cursor : cursor + batch_size]]
        cursor += batch_size
        loss = diffusion(batch)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(diffusion.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad()
        ema.update()
        steps += 1
    return ema.ema_model, steps, time.perf_counter() - started


@torch.inference_mode()
def sample_peer(model, num_samples: int, seed: int, batch_size: int = 250) -> tuple[np.ndarray, float]:
    """uint8 N×H×W×C samples from the peer's own sampler (DDIM, 50 steps) and the seconds they took."""
    model.eval()
    torch.manual_seed(seed)
    started = time.perf_counter()
    chunks = [model.sample(batch_size=min(batch_size, num_samples - i)) for i in range(0, num_samples, batch_size)]
    images = (torch.cat(chunks).clamp(0, 1) * 255).round().to(torch.uint8)
    return images.permute(0, 2, 3, 1).numpy(), time.perf_counter() - started


def run_peer(case: dict, setting: dict, images, budget, num_samples, seed, out: Path, metrics: list[str]) -> Result:
    name = setting_name(setting)
    run_dir = out / f"peer-dim{setting['dim']}-b{setting['batch_size']}-lr{setting['lr']:g}-seed{seed}"
    run_dir.mkdir(parents=True, exist_ok=True)
    model, steps, train_s = train_peer(setting, images, budget, seed)
    samples, sample_s = sample_peer(model, num_samples, seed)
    np.savez(run_dir / "samples.npz", samples)
    overrides = [f"samples={run_dir / 'samples.npz'}", f"data={case['data']}", *case["data_overrides"]]
    report = evaluate(overrides, run_dir / "eval", num_samples, seed, metrics, case)
    save_sample_grid(run_dir / "samples.npz", run_dir / "grid.png")
    return Result(
        system="peer",
        setting=name,
        seed=seed,
        steps=steps,
        train_s=train_s,
        images_per_s=steps * setting["batch_size"] / train_s,
        sample_s=sample_s,
        nfe=model.sampling_timesteps,
        metrics=report["metrics"],
        run_dir=str(run_dir),
    )


COLUMNS = ("system", "setting", "seed", "steps", "images/s", "train s", "sample s", "NFE", "FID", "KID")


def row(result: Result) -> list[str]:
    kid = result.metrics.get("kid_mean")
    return [
        result.system,
        result.setting,
        str(result.seed),
        str(result.steps),
        f"{result.images_per_s:.1f}",
        f"{result.train_s:.0f}",
        f"{result.sample_s:.1f}",
        str(result.nfe),
        f"{result.metrics['fid']:.2f}",
        "-" if kid is None else f"{kid:.4f}",
    ]


def print_table(title: str, results: list[Result]) -> None:
    rows = [list(COLUMNS), *[row(r) for r in results]]
    widths = [max(len(r[i]) for r in rows) for i in range(len(COLUMNS))]
    print(f"\n{title}")
    for i, cells in enumerate(rows):
        print("  ".join(cell.ljust(width) for cell, width in zip(cells, widths, strict=True)))
        if i == 0:
            print("  ".join("-" * width for width in widths))


def spread(values: list[float]) -> str:
    if len(values) == 1:
        return f"{values[0]:.2f}"
    return f"{statistics.mean(values):.2f} (min {min(values):.2f}, max {max(values):.2f}, {len(values)} runs)"


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--case", choices=sorted(CASES), default="mnist")
    parser.add_argument("--budget", type=float, help="training seconds per system (default: 600 mnist, 120 digits)")
    parser.add_argument("--num-samples", type=int, default=1000, help="N for FID/KID, both systems (default 1000)")
    parser.add_argument("--repeats", type=int, default=1, help="train and score each system this many times")
    parser.add_argument("--seed", type=int, default=0, help="first seed; repeat r uses seed + r")
    parser.add_argument("--peer-settings", nargs="*", type=int, help="indices into the peer grid (default: all)")
    parser.add_argument(
        "--peer-select-budget",
        type=float,
        help="train every peer setting this many seconds, score it at --select-samples, keep the best for the budget",
    )
    parser.add_argument("--select-samples", type=int, default=200)
    parser.add_argument("--ours-overrides", nargs="*", default=[], help="extra Hydra overrides for our run")
    parser.add_argument("--no-kid", action="store_true", help="FID only (KID needs N ≥ 2 on both sides)")
    parser.add_argument("--out", type=Path, help="folder for runs and results (default outputs/time_to_quality/…)")
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args(argv)

    case = CASES[args.case]
    budget = args.budget or case["budget"]
    metrics = ["fid"] if args.no_kid else ["fid", "kid"]
    out = args.out or ROOT / "outputs" / "time_to_quality" / f"{args.case}-{datetime.now():%Y-%m-%d_%H-%M-%S}"
    out.mkdir(parents=True, exist_ok=True)
    images = training_images(case["data"])
    grid = [PEER_GRID[i] for i in args.peer_settings] if args.peer_settings else list(PEER_GRID)
    shape = tuple(images.shape[1:])
    print(f"{args.case}: {len(images)} training images {shape}, budget {budget:g} s, N = {args.num_samples}")

    selection: list[Result] = []
    if args.peer_select_budget and len(grid) > 1:
        select_out = out / "peer-selection"
        for setting in grid:
            result = run_peer(
                case, setting, images, args.peer_select_budget, args.select_samples, args.seed, select_out, ["fid"]
            )
            selection.append(result)
            print(f"  selection {result.setting}: {result.steps} steps, FID {result.metrics['fid']:.2f}", flush=True)
        print_table(f"peer selection at {args.peer_select_budget:g} s, N = {args.select_samples}", selection)
        best = min(range(len(grid)), key=lambda i: selection[i].metrics["fid"])
        grid = [grid[best]]

    results: list[Result] = []
    for repeat in range(args.repeats):
        seed = args.seed + repeat
        results.append(run_ours(case, budget, args.num_samples, seed, out, metrics, args.ours_overrides))
        print(f"  ours seed {seed}: {results[-1].steps} steps, FID {results[-1].metrics['fid']:.2f}", flush=True)
        for setting in grid:
            results.append(run_peer(case, setting, images, budget, args.num_samples, seed, out, metrics))
            print(f"  peer {results[-1].setting} seed {seed}: FID {results[-1].metrics['fid']:.2f}", flush=True)

    space = (
        ", FID/KID in the digits classifier's features (cFID) against the train split" if args.case == "digits" else ""
    )
    print_table(f"{args.case}: {budget:g} s of training each on this machine, N = {args.num_samples}{space}", results)
    ours = [r for r in results if r.system == "ours"]
    peers = [r for r in results if r.system == "peer"]
    best_peer = min(
        {r.setting for r in peers}, key=lambda s: statistics.mean(r.metrics["fid"] for r in peers if r.setting == s)
    )
    peer_best = [r for r in peers if r.setting == best_peer]
    ratios = [o.metrics["fid"] / p.metrics["fid"] for o, p in zip(ours, peer_best, strict=True)]
    floor = ours[0].floor_fid
    print(f"\npeer setting that won: {best_peer}")
    print(
        f"FID ours: {spread([r.metrics['fid'] for r in ours])}; peer: {spread([r.metrics['fid'] for r in peer_best])}"
    )
    if floor is not None and not math.isnan(floor):
        print(f"FID of as many real training images against the same reference (the floor): {floor:.2f}")
    print(f"FID ours / peer: {spread(ratios)}")
    images_ratio = statistics.mean(o.images_per_s / p.images_per_s for o, p in zip(ours, peer_best, strict=True))
    print(f"training images/s ours / peer: {images_ratio:.2f}")
    record = {
        "case": args.case,
        "budget_s": budget,
        "num_samples": args.num_samples,
        "peer_winner": best_peer,
        "fid_ratio": ratios,
        "results": [asdict(r) for r in results],
        "selection": [asdict(r) for r in selection],
    }
    (out / "results.json").write_text(json.dumps(record, indent=2))
    if args.json:
        args.json.write_text(json.dumps(record, indent=2))
    return record


if __name__ == "__main__":
    main()
