"""The 3×3 weight gradient of every wide residual convolution of the benchmark's U-Net: oneDNN's kernel
against the Winograd one in ``diffusion_lab.models.kernels.winograd``, shape by shape, to show whether the Winograd
path pays on this CPU.

    python benchmarks/winograd_weight_grad.py          # this CPU's own instruction set
    ONEDNN_MAX_CPU_ISA=AVX2 MKL_ENABLE_INSTRUCTIONS=AVX2 ATEN_CPU_CAPABILITY=avx2 \\
        python benchmarks/winograd_weight_grad.py      # an AVX-512 CPU limited to its AVX2 kernels

The U-Net takes the Winograd path where ``winograd.CPU_WINOGRAD`` says so (AVX2 CPUs); this script times both
kernels whatever that says.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections import Counter
from collections.abc import Callable
from functools import partial

import torch

from diffusion_lab.models import UNet
from diffusion_lab.models.kernels import winograd
from diffusion_lab.models.kernels.winograd import Conv3x3, winograd_weight_grad


def winograd_eligible_shapes(model: UNet, batch_size: int) -> Counter[tuple[int, int, int]]:
    """(in, out, size) of each Conv3x3 that is wide and large enough for the Winograd path, with its count
    per training step, from one forward pass."""
    shapes: Counter[tuple[int, int, int]] = Counter()

    def record(layer: Conv3x3, inputs: tuple[torch.Tensor], _) -> None:
        size = inputs[0].shape[-1]
        if layer.winograd and size >= winograd.MIN_WINOGRAD_SIZE:
            shapes[(layer.in_channels, layer.out_channels, size)] += 1

    hooks = [m.register_forward_hook(record) for m in model.modules() if isinstance(m, Conv3x3)]
    with torch.no_grad():
        model(torch.randn(batch_size, model.in_channels, model.image_size, model.image_size), torch.zeros(batch_size))
    for hook in hooks:
        hook.remove()
    return shapes


def stock_weight_grad(x: torch.Tensor, grad_out: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    return torch.ops.aten.convolution_backward(
        grad_out, x, weight, None, [1, 1], [1, 1], [1, 1], False, [0, 0], 1, [False, True, False]
    )[1]


def median_seconds(function: Callable[[], object], repeats: int) -> float:
    function()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        function()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--image-size", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()

    # unet_throughput.py's mnist layout (6.5 M parameters).
    model = UNet(args.image_size, 1, 64, (1, 2, 2), 2, (args.image_size // 2,))
    shapes = winograd_eligible_shapes(model, 2)
    capability = torch.backends.cpu.get_cpu_capability()
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, ATen CPU capability {capability} "
        f"(Winograd path {'on' if winograd.CPU_WINOGRAD else 'off'}), batch {args.batch_size}"
    )
    print(f"{'in→out @ size':>16} {'calls':>5} {'oneDNN ms':>10} {'GFLOP/s':>8} {'Winograd ms':>12} {'speed-up':>9}")
    totals = [0.0, 0.0]
    for (cin, cout, size), calls in sorted(shapes.items(), key=lambda item: (-item[0][2], item[0])):
        x = torch.randn(args.batch_size, cin, size, size).to(memory_format=torch.channels_last)
        grad_out = torch.randn(args.batch_size, cout, size, size).to(memory_format=torch.channels_last)
        weight = torch.zeros(cout, cin, 3, 3).to(memory_format=torch.channels_last)
        stock = median_seconds(partial(stock_weight_grad, x, grad_out, weight), args.repeats)
        ours = median_seconds(partial(winograd_weight_grad, x, grad_out), args.repeats)
        totals[0] += calls * stock
        totals[1] += calls * ours
        rate = 2 * args.batch_size * cin * cout * 9 * size * size / stock / 1e9
        label = f"{cin}→{cout} @ {size}²"
        print(f"{label:>16} {calls:5d} {stock * 1e3:10.1f} {rate:8.0f} {ours * 1e3:12.1f} {stock / ours:8.2f}×")
    print(
        f"per training step: oneDNN {totals[0] * 1e3:.0f} ms, Winograd {totals[1] * 1e3:.0f} ms "
        f"({totals[0] / totals[1]:.2f}×)"
    )


if __name__ == "__main__":
    main()
