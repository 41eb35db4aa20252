"""Training-step throughput of diffusion_lab's UNet against the peers' U-Nets, side by side in one run.

Each model does forward + backward + AdamW on an ε-prediction MSE at random timesteps, with the same batch,
resolution and precision, and a parameter count within ±10 % of ours. Models alternate round by round so
that drifts of the machine hit all of them alike; the median round is reported.

    pip install -e ".[bench]"
    python benchmarks/unet_throughput.py                       # CPU: 32×32×1, batch 64, ~6.5 M parameters
    python benchmarks/unet_throughput.py --layout cifar10 --device cuda --precision bf16 --batch-size 128
    python benchmarks/unet_throughput.py --profile             # also: where each model's step time goes
    python benchmarks/unet_throughput.py --compile none regional full graphs   # eager vs compiled, compile times

``--compile`` takes one or more modes, each model is run in each: ``none`` (eager), ``regional`` (the repeated
residual and attention blocks compiled in place — ours through ``compile=true``'s own code, the peers' blocks of
the same kind by class name), ``full`` (the whole network as one graph) and ``graphs`` (the whole network with
``mode="reduce-overhead"``: CUDA graphs on a GPU; on a CPU it is ``full``). The compile time is the first step's
wall time less a steady step's.

Peers: huggingface diffusers' ``UNet2DModel`` and lucidrains' ``denoising_diffusion_pytorch.Unet``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from diffusion_lab.models import UNet, count_parameters
from diffusion_lab.models.compilation import compile_network
from diffusion_lab.models.kernels.winograd import stock_kernels

# Dense bf16 / tf32 tensor-core peaks (TFLOP/s) for model-FLOPs utilisation.
PEAK_TFLOPS = {"H100": {"bf16": 989.0, "fp32": 494.0}, "H200": {"bf16": 989.0, "fp32": 494.0}}

LAYOUTS = {
    # The CPU target: 32×32 grey images, ~6.5 M parameters, attention at 16×16.
    "mnist": {
        "image_size": 32,
        "channels": 1,
        "ours": {
            "model_channels": 64,
            "channel_mult": (1, 2, 2),
            "num_res_blocks": 2,
            "attention_resolutions": (16,),
        },
        "diffusers": {
            "block_out_channels": (64, 128, 128),
            "down_block_types": ("DownBlock2D", "AttnDownBlock2D", "DownBlock2D"),
            "up_block_types": ("UpBlock2D", "AttnUpBlock2D", "UpBlock2D"),
        },
        "lucidrains": {"dim": 72, "dim_mults": (1, 2, 2)},
    },
    # The DDPM paper's CIFAR-10 network (35.7 M).
    "cifar10": {
        "image_size": 32,
        "channels": 3,
        "ours": {
            "model_channels": 128,
            "channel_mult": (1, 2, 2, 2),
            "num_res_blocks": 2,
            "attention_resolutions": (16,),
            "dropout": 0.1,
        },
        "diffusers": {
            "block_out_channels": (128, 256, 256, 256),
            "down_block_types": ("DownBlock2D", "AttnDownBlock2D", "DownBlock2D", "DownBlock2D"),
            "up_block_types": ("UpBlock2D", "UpBlock2D", "AttnUpBlock2D", "UpBlock2D"),
            "dropout": 0.1,
        },
        "lucidrains": {"dim": 144, "dim_mults": (1, 2, 2, 2), "dropout": 0.1},
    },
}


COMPILE_MODES = ("none", "regional", "full", "graphs")
# The peers' repeated blocks, by class name (diffusers: ResnetBlock2D, Attention; lucidrains: ResnetBlock,
# Attention, LinearAttention): what "regional" compiles in them, as compile=true does in ours.
PEER_BLOCKS = {"ResnetBlock2D", "Attention", "ResnetBlock", "LinearAttention"}


@dataclass
class Contender:
    name: str
    model: nn.Module
    forward: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
    compile_mode: str = "none"


def contender_name(model: str, mode: str, modes: list[str]) -> str:
    """The model's name, with its compile mode when several are compared (``ours+regional``)."""
    return model if len(modes) == 1 else f"{model}+{mode}"


def compile_in_place(contender: Contender) -> None:
    """Apply the contender's compile mode to its model (in place, so its forward calls the compiled modules)."""
    mode, model = contender.compile_mode, contender.model
    if mode == "none":
        return
    if contender.name.startswith("ours"):
        compile_network(model, mode)  # the modes are compile=…'s own
    elif mode == "regional":
        blocks = [m for m in model.modules() if type(m).__name__ in PEER_BLOCKS]
        if not blocks:
            raise RuntimeError(f"{contender.name}: none of its modules is one of {sorted(PEER_BLOCKS)}")
        for block in blocks:
            block.compile()
    else:
        model.compile(**({"mode": "reduce-overhead"} if mode == "graphs" else {}))


def winograd_active(device: str) -> bool:
    """Whether our U-Net takes the Winograd weight-gradient path here (CPU, and only where it pays: AVX2)."""
    from diffusion_lab.models.kernels import winograd

    return device == "cpu" and winograd.CPU_WINOGRAD


def build(name: str, layout: dict, args: argparse.Namespace, compile_mode: str = "none") -> Contender:
    size, channels = layout["image_size"], layout["channels"]
    if name in ("ours", "ours-stock"):
        # "ours-stock": the same network without the CPU Winograd weight gradient, to show what it gives.
        model = UNet(
            size,
            channels,
            channels_last={"true": True, "false": False}.get(args.channels_last, args.channels_last),
            winograd=name == "ours",
            **layout["ours"],
        )
        return _finish(Contender(name, model, lambda x, t: model(x, t), compile_mode), args)
    if name == "diffusers":
        from diffusers import UNet2DModel

        model = UNet2DModel(sample_size=size, in_channels=channels, out_channels=channels, **layout["diffusers"])
        return _finish(Contender(name, model, lambda x, t: model(x, t).sample, compile_mode), args)
    from denoising_diffusion_pytorch import Unet

    model = Unet(channels=channels, **layout["lucidrains"])
    return _finish(Contender(name, model, lambda x, t: model(x, t), compile_mode), args)


def parameter_mismatches(contenders: list[Contender]) -> list[str]:
    """Names of the peers whose parameter count is not within ±10 % of ours (the first contender)."""
    ours = count_parameters(contenders[0].model)
    return [c.name for c in contenders[1:] if not 0.9 <= count_parameters(c.model) / ours <= 1.1]


def _finish(contender: Contender, args: argparse.Namespace) -> Contender:
    contender.model.to(args.device)
    compile_in_place(contender)
    return contender


def make_step(contender: Contender, args: argparse.Namespace, layout: dict) -> Callable[[], None]:
    """One training step: x_t from the closed form, MSE to ε, backward, AdamW."""
    optimizer = torch.optim.AdamW(contender.model.parameters(), lr=1e-4)
    alphas_cumprod = torch.cumprod(1 - torch.linspace(1e-4, 0.02, 1000), 0).to(args.device)
    shape = (args.batch_size, layout["channels"], layout["image_size"], layout["image_size"])
    x0 = torch.rand(shape, device=args.device) * 2 - 1
    autocast = (
        torch.autocast(device_type=torch.device(args.device).type, dtype=torch.bfloat16)
        if args.precision == "bf16"
        else nullcontext()
    )

    def step() -> None:
        t = torch.randint(0, 1000, (args.batch_size,), device=args.device)
        noise = torch.randn_like(x0)
        ab = alphas_cumprod[t].view(-1, 1, 1, 1)
        x_t = ab.sqrt() * x0 + (1 - ab).sqrt() * noise
        with autocast:
            prediction = contender.forward(x_t, t)
        loss = F.mse_loss(prediction.float(), noise)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    return step


def synchronize(device: str) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def seconds_per_step(step: Callable[[], None], device: str, steps: int) -> float:
    """Mean wall time of ``steps`` calls of ``step``, the device drained before and after."""
    synchronize(device)
    start = time.perf_counter()
    for _ in range(steps):
        step()
    synchronize(device)
    return (time.perf_counter() - start) / steps


def training_flops(contender: Contender, args: argparse.Namespace, layout: dict) -> int:
    """Model FLOPs of one forward + backward (torch.utils.flop_counter counts matmuls and convolutions),
    counted on the stock kernels: the Winograd weight gradient does fewer multiplications for the same
    function, which shows in the time, not in the FLOPs that utilisation is measured in."""
    shape = (args.batch_size, layout["channels"], layout["image_size"], layout["image_size"])
    x = torch.randn(shape, device=args.device)
    t = torch.randint(0, 1000, (args.batch_size,), device=args.device)
    model = contender.model
    with FlopCounterMode(display=False) as counter, stock_kernels(model):
        out = model(x, t)
        out = out.sample if hasattr(out, "sample") else out
        out.float().square().mean().backward()
    model.zero_grad(set_to_none=True)
    return counter.get_total_flops()


# Operator-name fragments → where a step's time goes (first match wins; the rest is elementwise work,
# copies and the optimizer).
TIME_CATEGORIES = {
    "conv backward": ("convolution_backward", "winograd"),
    "conv forward": ("convolution",),
    "attention": ("scaled_dot_product", "flash_attention", "efficient_attention", "softmax"),
    "matmul": ("aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm"),
    "normalisation": ("group_norm", "layer_norm", "batch_norm"),
    "activation": ("silu", "gelu", "sigmoid"),
}


def time_breakdown(step: Callable[[], None], device: str) -> dict[str, float]:
    """Milliseconds of one profiled step per category, from each operator's self time, so that nested
    operators are not counted twice. On a GPU that is the device time of the kernels each operator launched
    itself: kernel names (cuDNN's, cutlass') say little, the aten operator that launched them says what
    they compute."""
    activities = [torch.profiler.ProfilerActivity.CPU]
    on_gpu = torch.device(device).type == "cuda"
    if on_gpu:
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    with torch.profiler.profile(activities=activities) as profiler:
        step()
        synchronize(device)
    breakdown = dict.fromkeys([*TIME_CATEGORIES, "other"], 0.0)
    for event in profiler.events():
        if event.device_type != torch.autograd.DeviceType.CPU:
            continue  # a kernel: counted in the self device time of the operator that launched it
        # The Winograd weight gradient is made of matmuls and additions; count them as what they compute.
        enclosing, parent = event.name, event.cpu_parent
        while parent is not None:
            enclosing = parent.name if "winograd" in parent.name else enclosing
            parent = parent.cpu_parent
        self_time = event.self_device_time_total if on_gpu else event.self_cpu_time_total
        breakdown[_category(enclosing)] += self_time / 1e3
    return breakdown


def _category(operator: str) -> str:
    return next((name for name, parts in TIME_CATEGORIES.items() if any(p in operator for p in parts)), "other")


def print_breakdown(breakdowns: dict[str, dict[str, float]]) -> None:
    names = list(breakdowns)
    print(f"\nwhere one step's time goes (torch.profiler, ms and share)\n{'':<14}" + "".join(f"{n:>20}" for n in names))
    for category in next(iter(breakdowns.values())):
        cells = []
        for name in names:
            total = sum(breakdowns[name].values())
            cells.append(f"{breakdowns[name][category]:12.0f} {breakdowns[name][category] / total:6.1%}")
        print(f"{category:<14}" + "".join(f"{cell:>20}" for cell in cells))


def dense_matmul_rate(device: str, precision: str, size: int = 2048, budget_s: float = 1.0) -> tuple[float, int]:
    """FLOP/s of a square matmul in the benchmark's precision, and its size: the ceiling that model-FLOPs
    utilisation is read against where no vendor peak is listed (CPUs). The size halves while one product
    takes longer than the budget (bf16 on a CPU without bf16 instructions runs at ~1 GFLOP/s)."""
    dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    while True:
        a = torch.randn(size, size, device=device, dtype=dtype)
        synchronize(device)
        start = time.perf_counter()
        a @ a
        synchronize(device)
        if time.perf_counter() - start <= budget_s or size <= 256:
            break
        size //= 2
    per_sync = 1 if torch.device(device).type == "cpu" else 20  # keep host syncs off a GPU's clock
    repeats, start = 0, time.perf_counter()
    while repeats < 3 or time.perf_counter() - start < budget_s:
        for _ in range(per_sync):
            a @ a
        synchronize(device)
        repeats += per_sync
    return 2 * size**3 * repeats / (time.perf_counter() - start), size


def measure_peak_memory(name: str, args: argparse.Namespace) -> float:
    """Peak memory of training, in MiB: CUDA's allocator peak, or on the CPU (Linux) the growth of a fresh
    process's peak resident size over its size once the model and data exist (a subprocess per model)."""
    if torch.device(args.device).type == "cuda":
        layout = LAYOUTS[args.layout]
        contender = build_named(name, layout, args)
        step = make_step(contender, args, layout)
        step()
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        step()
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() / 2**20
        del contender, step
        torch.cuda.empty_cache()
        return peak
    command = [sys.executable, __file__, "--memory-probe", name, *sys.argv[1:]]
    output = subprocess.run(command, capture_output=True, text=True, check=True).stdout
    return float(output.strip().splitlines()[-1])


def build_named(name: str, layout: dict, args: argparse.Namespace) -> Contender:
    """The contender a (possibly ``model+mode``) name stands for."""
    model, _, mode = name.partition("+")
    contender = build(model, layout, args, mode or args.compile[0])
    contender.name = name
    return contender


def memory_probe(name: str, args: argparse.Namespace) -> None:
    layout = LAYOUTS[args.layout]
    contender = build_named(name, layout, args)
    step = make_step(contender, args, layout)
    baseline = _resident_mib("VmRSS")
    # Linux carries a forked parent's peak into getrusage's ru_maxrss, so read this process's own
    # high-water mark, reset to the current size once the model and data exist.
    Path("/proc/self/clear_refs").write_text("5")
    step()
    step()
    print(_resident_mib("VmHWM") - baseline)


def _resident_mib(field: str) -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"/proc/self/status has no {field}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layout", choices=sorted(LAYOUTS), default="mnist")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--precision", choices=["fp32", "bf16"], default="fp32")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--steps-per-round", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument(
        "--compile",
        nargs="+",
        choices=COMPILE_MODES,
        default=["none"],
        help="compile modes, each model run in each: none (eager), regional, full, graphs (reduce-overhead)",
    )
    parser.add_argument(
        "--channels-last",
        choices=["auto", "true", "false"],
        default="auto",
        help="our UNet's channels_last option; auto = NHWC on CPUs, NCHW on CUDA (the peers run as shipped)",
    )
    parser.add_argument(
        "--models",
        nargs="+",
        default=["ours", "diffusers", "lucidrains"],
        choices=["ours", "ours-stock", "diffusers", "lucidrains"],
        help="the first is the reference; ours-stock is ours without the CPU Winograd weight gradient",
    )
    parser.add_argument("--no-memory", action="store_true")
    parser.add_argument("--profile", action="store_true", help="also print where each model's step time goes")
    parser.add_argument("--json", help="also write the results here")
    parser.add_argument("--memory-probe", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.memory_probe:
        memory_probe(args.memory_probe, args)
        return

    torch.manual_seed(0)
    layout = LAYOUTS[args.layout]
    if "ours-stock" in args.models and not winograd_active(args.device):
        # Off this path ours-stock would run exactly ours' code and "compare" it with itself.
        print("ours-stock left out: the Winograd weight gradient is off on this device/CPU, so it would be ours")
        args.models = [name for name in args.models if name != "ours-stock"]
    contenders = [
        build_named(contender_name(name, mode, args.compile), layout, args)
        for mode in args.compile
        for name in args.models
    ]
    ours_params = count_parameters(contenders[0].model)
    print(
        f"device={args.device} ({torch.cuda.get_device_name() if args.device.startswith('cuda') else os.cpu_count()} "
        f"{'GPU' if args.device.startswith('cuda') else 'CPU threads'}), torch {torch.__version__}, "
        f"layout={args.layout} {layout['image_size']}×{layout['image_size']}×{layout['channels']}, "
        f"batch={args.batch_size}, precision={args.precision}, compile={' '.join(args.compile)}"
    )
    for contender in contenders:
        params = count_parameters(contender.model)
        print(f"  {contender.name:<11} {params / 1e6:7.3f} M parameters ({params / ours_params:5.1%} of ours)")
    mismatched = parameter_mismatches(contenders)
    if mismatched:
        sys.exit(
            f"Error: {', '.join(mismatched)} not within ±10 % of our parameter count in layout {args.layout!r}; "
            "a throughput ratio between models of different sizes means nothing. Adjust LAYOUTS in this script."
        )

    flops = {c.name: training_flops(c, args, layout) for c in contenders}
    steps = {c.name: make_step(c, args, layout) for c in contenders}
    first_step_s = {}
    for name, step in steps.items():
        first_step_s[name] = seconds_per_step(step, args.device, 1)  # compiles, where the mode compiles
        for _ in range(args.warmup - 1):
            step()
        synchronize(args.device)
    seconds: dict[str, list[float]] = {name: [] for name in steps}
    for _ in range(args.rounds):
        for name, step in steps.items():
            seconds[name].append(seconds_per_step(step, args.device, args.steps_per_round))

    memory = {} if args.no_memory else {name: measure_peak_memory(name, args) for name in steps}
    results = {}
    reference = contenders[0].name
    ours_rate = args.batch_size / statistics.median(seconds[reference])
    peak, peak_source = None, ""
    if args.device.startswith("cuda"):
        gpu = torch.cuda.get_device_name()
        peak = next((v[args.precision] for k, v in PEAK_TFLOPS.items() if k in gpu), None)
        peak_source = f"{gpu}'s dense {args.precision} peak, {peak:.0f} TFLOP/s" if peak else ""
    if peak is None:
        rate, size = dense_matmul_rate(args.device, args.precision)
        peak = rate / 1e12
        peak_source = f"a {args.precision} {size}² matmul measured here, {peak * 1e3:.3g} GFLOP/s"
    print(
        f"\n{'model':<11} {'images/s':>9} {'spread':>8} {'ms/step':>8} {'GFLOP/step':>11} {'TFLOP/s':>8}"
        f" {'MFU':>7} {'peak MiB':>9} {'compile s':>10} {'ref/this':>9}"
    )
    for name in steps:
        step_time = statistics.median(seconds[name])
        rate = args.batch_size / step_time
        spread = (max(seconds[name]) - min(seconds[name])) / step_time
        achieved = flops[name] / step_time / 1e12
        mfu = f"{achieved / peak:7.1%}"
        mem = f"{memory[name]:9.0f}" if name in memory else "        -"
        compile_s = max(first_step_s[name] - step_time, 0.0)
        results[name] = {
            "images_per_s": rate,
            "ms_per_step": step_time * 1e3,
            "gflop_per_step": flops[name] / 1e9,
            "tflops": achieved,
            "mfu": achieved / peak,
            "peak_mib": memory.get(name),
            "ours_over_this": ours_rate / rate,
            "first_step_s": first_step_s[name],
            "compile_s": compile_s,
        }
        print(
            f"{name:<11} {rate:9.1f} {spread:8.1%} {step_time * 1e3:8.1f} {flops[name] / 1e9:11.1f} {achieved:8.3f}"
            f" {mfu} {mem} {compile_s:10.1f} {ours_rate / rate:8.2f}x"
        )
    print(f"MFU is against {peak_source}; ref/this: {reference}'s images/s over this row's.")
    peers = [n for n in steps if not n.startswith("ours")]
    if peers:
        fastest = max(peers, key=lambda n: results[n]["images_per_s"])
        ours_modes = [n for n in steps if n.partition("+")[0] == args.models[0]]  # the reference model, each mode
        ours_best = max(ours_modes, key=lambda n: results[n]["images_per_s"])
        ratio = results[ours_best]["images_per_s"] / results[fastest]["images_per_s"]
        print(f"\n{ours_best} vs the fastest peer ({fastest}): {ratio:.2f}x")
    breakdowns = {name: time_breakdown(step, args.device) for name, step in steps.items()} if args.profile else {}
    if breakdowns:
        print_breakdown(breakdowns)
    if args.json:
        with open(args.json, "w") as handle:
            record = {"args": vars(args), "mfu_against": peak_source, "results": results, "time_ms": breakdowns}
            json.dump(record, handle, indent=2)


if __name__ == "__main__":
    main()
