"""A 3×3 convolution whose weight gradient is computed with Winograd's minimal filtering on AVX2 CPUs.

Profiling the U-Net's training step on an AVX2 CPU shows the weight gradient of the 3×3 convolutions as the
slowest kernel of all (oneDNN runs it at roughly two thirds of the forward convolution's rate). That gradient
correlates each input tile with the output gradient, so Winograd's F(3×3, 4×4) algorithm (Lavin & Gray,
2016, with the roles of filter and output swapped) computes it with 36 instead of 144 multiplications per
4×4 output tile: both operands are transformed into 36 planes with additions and small multiples, each
plane pair becomes one matrix product summed over all tiles, and a final transform yields the 3×3 taps. The
transforms cost memory traffic proportional to the channel count while the products cost its square, so it
pays only for layers of 64 channels and more, and only while the transformed planes stay in cache, hence
the chunks; narrow layers, GPUs, autocast and compilation keep the stock kernels. Its rounding error is that
of the stock kernel (≈1e-5 of the largest tap in float32).

Whether it pays depends on the instruction set oneDNN picks. Its AVX2 weight-gradient kernel is the slow one
(50–57 GFLOP/s on a 2-core EPYC, where this path is 1.5–2× faster and the training step 1.13×), while its
AVX-512 kernel runs at 200–300 GFLOP/s on a 2-core Xeon, where this path is 0.4–1.0× as fast. So it is taken
on AVX2 CPUs only; ``benchmarks/winograd_weight_grad.py`` measures both kernels layer by layer on any CPU.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import nn
from torch.autograd.function import once_differentiable

# Gᵀ of F(4×4, 3×3) (points 0, ±1, ±2, ∞), which is the output transform of the swapped F(3×3, 4×4).
_OUTPUT_TRANSFORM = (
    (1 / 4, -1 / 6, -1 / 6, 1 / 24, 1 / 24, 0.0),
    (0.0, -1 / 6, 1 / 6, 1 / 12, -1 / 12, 0.0),
    (0.0, -1 / 6, -1 / 6, 1 / 6, 1 / 6, 1.0),
)

# Below this value of in·out / (in + out) the transforms' memory traffic outweighs the saved
# multiplications (measured on a 2-core AVX2 CPU at batch 64, weight gradient alone: 32→32 channels 1.0×,
# 64→64 1.5×, 128→128 2.1×).
MIN_WINOGRAD_CHANNELS = 32

# Below 8×8 pixels the per-call overheads win (64→64 channels at 4×4: 0.65× the stock kernel).
MIN_WINOGRAD_SIZE = 8

# The batch is processed in chunks whose input and output-gradient maps take about this many bytes, so that
# the transformed planes are still in cache when the matrix products read them (at 32×32 and 64 channels,
# 4 MiB chunks run 1.5× faster than one pass over the whole batch).
CHUNK_BYTES = 4 * 2**20


def winograd_pays(cpu_capability: str) -> bool:
    """Whether the Winograd weight gradient beats oneDNN's on a CPU of this ATen capability
    (``torch.backends.cpu.get_cpu_capability()``): measured faster on AVX2, slower on AVX-512; other
    instruction sets (ARM, no vector unit) are unmeasured and keep the stock kernel."""
    return cpu_capability == "AVX2"


# Decided once per process; tests set it to exercise the path on any CPU.
CPU_WINOGRAD = winograd_pays(torch.backends.cpu.get_cpu_capability())


def winograd_weight_grad(x: torch.Tensor, grad_out: torch.Tensor) -> torch.Tensor:
    """∂L/∂W (out, in, 3, 3) of a stride-1, padding-1 3×3 convolution of ``x`` (N, in, H, W) given
    ``grad_out`` (N, out, H, W)."""
    batch, in_channels, height, width = x.shape
    out_channels = grad_out.shape[1]
    tiles = (-(-height // 4), -(-width // 4))
    sample_bytes = (4 * tiles[0] + 2) * (4 * tiles[1] + 2) * (in_channels + out_channels) * x.element_size()
    chunk = max(1, CHUNK_BYTES // sample_bytes)
    products = x.new_zeros(36, out_channels, in_channels)
    for start in range(0, batch, chunk):
        input_planes = _input_planes(x[start : start + chunk], tiles)
        gradient_planes = _gradient_planes(grad_out[start : start + chunk], tiles)
        products.baddbmm_(gradient_planes.transpose(1, 2), input_planes)
    transform = x.new_tensor(_OUTPUT_TRANSFORM)
    return torch.einsum("ku,lv,uvoc->ockl", transform, transform, products.view(6, 6, out_channels, in_channels))


def _input_planes(x: torch.Tensor, tiles: tuple[int, int]) -> torch.Tensor:
    """Bᵀ d B of every 6×6 tile (stride 4) of the zero-padded input: (36, tiles, in). Zero rows and columns
    beyond the map round it up to whole tiles."""
    batch, channels, height, width = x.shape
    padded = x.new_zeros(batch, 4 * tiles[0] + 2, 4 * tiles[1] + 2, channels)
    padded[:, 1 : height + 1, 1 : width + 1] = x.permute(0, 2, 3, 1)
    return _transform_2d(padded, _apply_bt, tiles).view(36, -1, channels)


def _gradient_planes(grad_out: torch.Tensor, tiles: tuple[int, int]) -> torch.Tensor:
    """A g Aᵀ of every 4×4 tile of the output gradient: (36, tiles, out); a zero gradient beyond the map
    contributes nothing."""
    batch, channels, height, width = grad_out.shape
    gradient = grad_out.permute(0, 2, 3, 1)
    if height % 4 or width % 4:
        gradient = grad_out.new_zeros(batch, 4 * tiles[0], 4 * tiles[1], channels)
        gradient[:, :height, :width] = grad_out.permute(0, 2, 3, 1)
    return _transform_2d(gradient, _apply_a, tiles).view(36, -1, channels)


def _transform_2d(
    data: torch.Tensor, apply: Callable[[torch.Tensor, int, int, torch.Tensor], None], tiles: tuple[int, int]
) -> torch.Tensor:
    """A 1-D tile transform applied along the rows, then the columns, of (N, H, W, C) data:
    (6, 6, N, tiles_h, tiles_w, C)."""
    batch, _, width, channels = data.shape
    tiles_h, tiles_w = tiles
    rows = data.new_empty(6, batch, tiles_h, width, channels)
    apply(data, 1, tiles_h, rows)
    planes = data.new_empty(6, 6, batch, tiles_h, tiles_w, channels)
    apply(rows, 3, tiles_w, planes.transpose(0, 1))
    return planes


def _apply_bt(data: torch.Tensor, dim: int, tiles: int, out: torch.Tensor) -> None:
    """Bᵀ of F(4, 3) along ``dim`` on tiles of 6 that start every 4 positions, written to out[0..5]:
    rows (4, 0, −5, 0, 1, 0), (0, −4, −4, 1, 1, 0), (0, 4, −4, −1, 1, 0), (0, −2, −1, 2, 1, 0),
    (0, 2, −1, −2, 1, 0), (0, 4, 0, −5, 0, 1)."""
    d = [_taps(data, dim, i, tiles) for i in range(6)]
    torch.add(d[4], d[2], alpha=-4, out=out[1])
    odd = torch.add(d[3], d[1], alpha=-4)
    torch.sub(out[1], odd, out=out[2])
    out[1].add_(odd)
    torch.sub(d[4], d[2], out=out[3])
    odd = torch.sub(d[3], d[1])
    torch.add(out[3], odd, alpha=-2, out=out[4])
    out[3].add_(odd, alpha=2)
    torch.add(d[4], d[2], alpha=-5, out=out[0])
    out[0].add_(d[0], alpha=4)
    torch.add(d[5], d[3], alpha=-5, out=out[5])
    out[5].add_(d[1], alpha=4)


def _apply_a(data: torch.Tensor, dim: int, tiles: int, out: torch.Tensor) -> None:
    """A of F(4, 3) along ``dim`` on tiles of 4, written to out[0..5]: rows (1, 0, 0, 0), (1, 1, 1, 1),
    (1, −1, 1, −1), (1, 2, 4, 8), (1, −2, 4, −8), (0, 0, 0, 1)."""
    g = [_taps(data, dim, i, tiles) for i in range(4)]
    out[0].copy_(g[0])
    out[5].copy_(g[3])
    torch.add(g[0], g[2], out=out[1])
    odd = torch.add(g[1], g[3])
    torch.sub(out[1], odd, out=out[2])
    out[1].add_(odd)
    torch.add(g[0], g[2], alpha=4, out=out[3])
    odd = torch.add(g[1], g[3], alpha=4)
    torch.add(out[3], odd, alpha=-2, out=out[4])
    out[3].add_(odd, alpha=2)


def _taps(data: torch.Tensor, dim: int, offset: int, tiles: int) -> torch.Tensor:
    """Element ``offset`` of each of ``tiles`` tiles that start every 4 positions along ``dim``."""
    index = [slice(None)] * data.ndim
    index[dim] = slice(offset, offset + 4 * (tiles - 1) + 1, 4)
    return data[tuple(index)]


class _WinogradWeightGradConv(torch.autograd.Function):
    """conv2d(x, weight, bias, padding=1) with the stock forward and input gradient and a Winograd weight
    gradient."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        ctx.save_for_backward(x, weight)
        ctx.has_bias = bias is not None
        return F.conv2d(x, weight, bias, padding=1)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out: torch.Tensor):
        x, weight = ctx.saved_tensors
        grad_x = grad_weight = grad_bias = None
        if ctx.needs_input_grad[0]:
            grad_x = torch.ops.aten.convolution_backward(
                grad_out, x, weight, None, [1, 1], [1, 1], [1, 1], False, [0, 0], 1, [True, False, False]
            )[0]
        if ctx.needs_input_grad[1]:
            with torch.profiler.record_function("winograd_weight_grad"):
                grad_weight = torch.empty_like(weight).copy_(winograd_weight_grad(x, grad_out))
        if ctx.has_bias and ctx.needs_input_grad[2]:
            grad_bias = grad_out.sum((0, 2, 3))
        return grad_x, grad_weight, grad_bias


class Conv3x3(nn.Conv2d):
    """A 3×3, stride-1, 'same' convolution that takes the Winograd weight gradient where it is faster:
    float32 training on an AVX2 CPU (``CPU_WINOGRAD``), maps of at least ``MIN_WINOGRAD_SIZE`` pixels a side
    and in·out/(in+out) ≥ ``MIN_WINOGRAD_CHANNELS``.
    Parameters and state-dict keys are those of ``nn.Conv2d``; ``winograd=False`` keeps the stock kernels."""

    def __init__(self, in_channels: int, out_channels: int, winograd: bool = True) -> None:
        super().__init__(in_channels, out_channels, 3, padding=1)
        self.winograd = winograd and in_channels * out_channels >= MIN_WINOGRAD_CHANNELS * (in_channels + out_channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.winograd and self.weight.requires_grad and _winograd_applies(x):
            return _WinogradWeightGradConv.apply(x, self.weight, self.bias)
        return super().forward(x)


def _winograd_applies(x: torch.Tensor) -> bool:
    return (
        CPU_WINOGRAD
        and torch.is_grad_enabled()
        and x.device.type == "cpu"
        and x.dtype == torch.float32
        and min(x.shape[-2:]) >= MIN_WINOGRAD_SIZE
        and not torch.is_autocast_enabled("cpu")
        and not torch.compiler.is_compiling()
    )


@contextmanager
def stock_kernels(module: nn.Module) -> Iterator[None]:
    """Run ``module``'s Conv3x3 layers on the stock kernels inside the block, e.g. to count model FLOPs
    (which do not depend on the algorithm) or to compare the two paths."""
    layers = [(layer, layer.winograd) for layer in module.modules() if isinstance(layer, Conv3x3)]
    for layer, _ in layers:
        layer.winograd = False
    try:
        yield
    finally:
        for layer, winograd in layers:
            layer.winograd = winograd
