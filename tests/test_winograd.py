"""The Winograd weight gradient of wide 3×3 convolutions: the same gradients as the stock kernels, used exactly
where it is meant to be, and invisible to checkpoints."""

import pytest
import torch
import torch.nn.functional as F

from diffusion_lab.models import UNet
from diffusion_lab.models.kernels.winograd import (
    Conv3x3,
    _WinogradWeightGradConv,
    stock_kernels,
    winograd_pays,
    winograd_weight_grad,
)


@pytest.fixture(autouse=True)
def winograd_on_any_cpu(monkeypatch):
    """The path is taken on AVX2 CPUs only; these tests check its numbers and routing on whatever CPU runs them."""
    monkeypatch.setattr("diffusion_lab.models.kernels.winograd.CPU_WINOGRAD", True)


def test_taken_on_avx2_cpus_only():
    assert winograd_pays("AVX2")
    # oneDNN's AVX-512 weight gradient outruns it (0.4–1.0× on a 2-core Xeon); unmeasured sets keep the stock one.
    assert not any(winograd_pays(c) for c in ("AVX512", "DEFAULT", "NO AVX", "ZVECTOR", "SVE256"))


def test_stock_kernels_where_the_cpu_does_not_pay(monkeypatch):
    monkeypatch.setattr("diffusion_lab.models.kernels.winograd.CPU_WINOGRAD", False)
    out = Conv3x3(128, 64)(torch.randn(1, 128, 8, 8))
    assert type(out.grad_fn).__name__ == "ConvolutionBackward0"


def stock_weight_grad(x: torch.Tensor, grad_out: torch.Tensor, out_channels: int) -> torch.Tensor:
    weight = torch.zeros(out_channels, x.shape[1], 3, 3, dtype=x.dtype)
    return torch.ops.aten.convolution_backward(
        grad_out, x, weight, None, [1, 1], [1, 1], [1, 1], False, [0, 0], 1, [False, True, False]
    )[1]


@pytest.mark.parametrize(
    ("batch", "cin", "cout", "height", "width", "channels_last"),
    [
        (3, 5, 7, 8, 4, False),  # whole 4×4 tiles
        (2, 16, 8, 6, 10, True),  # partial tiles on both axes
        (2, 3, 4, 7, 5, False),  # odd sizes
        (1, 2, 3, 1, 1, True),  # a single pixel
        (4, 96, 64, 16, 16, True),  # a wide layer, as in the U-Net
    ],
)
def test_weight_gradient_matches_float64_reference(batch, cin, cout, height, width, channels_last):
    torch.manual_seed(0)
    x, grad_out = torch.randn(batch, cin, height, width), torch.randn(batch, cout, height, width)
    if channels_last:
        x, grad_out = x.to(memory_format=torch.channels_last), grad_out.to(memory_format=torch.channels_last)
    reference = stock_weight_grad(x.double(), grad_out.double(), cout)
    ours = winograd_weight_grad(x, grad_out)
    stock = stock_weight_grad(x, grad_out, cout)
    scale = reference.abs().max()
    assert ours.shape == (cout, cin, 3, 3) and ours.dtype == torch.float32
    # The stock float32 kernel is off by up to ~1e-5 of the largest tap at these sizes; so is Winograd.
    assert (ours.double() - reference).abs().max() / scale < 2e-5
    assert (stock.double() - reference).abs().max() / scale < 2e-5


def test_autograd_function_passes_gradcheck():
    torch.manual_seed(0)
    x = torch.randn(2, 3, 5, 6, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(4, 3, 3, 3, dtype=torch.float64, requires_grad=True)
    bias = torch.randn(4, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(_WinogradWeightGradConv.apply, (x, weight, bias))


def test_wide_conv_takes_winograd_and_matches_conv2d():
    torch.manual_seed(0)
    conv = Conv3x3(128, 64)
    stock = torch.nn.Conv2d(128, 64, 3, padding=1)
    stock.load_state_dict(conv.state_dict())
    x = torch.randn(2, 128, 8, 8, requires_grad=True)
    grad_out = torch.randn(2, 64, 8, 8)

    out = conv(x)
    assert type(out.grad_fn).__name__ == "_WinogradWeightGradConvBackward"
    out.backward(grad_out)
    reference_x = x.grad.clone()
    x.grad = None
    stock(x).backward(grad_out)

    torch.testing.assert_close(x.grad, reference_x, rtol=0, atol=0)  # the same stock input-gradient kernel
    scale = stock.weight.grad.abs().max().item()
    torch.testing.assert_close(conv.weight.grad, stock.weight.grad, rtol=0, atol=2e-5 * scale)
    torch.testing.assert_close(conv.bias.grad, stock.bias.grad)


@pytest.mark.parametrize(
    "situation",
    ["narrow layer", "small map", "switched off", "no grad", "frozen weight", "float64", "autocast", "stock_kernels"],
)
def test_stock_kernels_where_winograd_does_not_pay_or_apply(situation):
    conv = Conv3x3(32, 32) if situation == "narrow layer" else Conv3x3(128, 64, winograd=situation != "switched off")
    size = 4 if situation == "small map" else 8
    x = torch.randn(1, conv.in_channels, size, size, dtype=torch.float64 if situation == "float64" else torch.float32)
    if situation == "float64":
        conv.double()
    if situation == "frozen weight":
        conv.requires_grad_(False)
        x.requires_grad_(True)
    if situation == "no grad":
        with torch.no_grad():
            assert conv(x).grad_fn is None
        return
    if situation == "autocast":
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = conv(x)
        assert out.dtype == torch.bfloat16
    elif situation == "stock_kernels":
        with stock_kernels(conv):
            out = conv(x)
        assert conv.winograd  # restored on leaving
    else:
        out = conv(x)
    assert type(out.grad_fn).__name__ == "ConvolutionBackward0"


def test_checkpoints_are_interchangeable_with_conv2d():
    conv = Conv3x3(128, 64)
    plain = torch.nn.Conv2d(128, 64, 3, padding=1)
    plain.load_state_dict(conv.state_dict())
    conv.load_state_dict(plain.state_dict())
    assert set(conv.state_dict()) == {"weight", "bias"}
    x = torch.randn(1, 128, 6, 6)
    torch.testing.assert_close(conv(x), plain(x), rtol=0, atol=0)


def test_unet_training_gradients_match_the_stock_kernels():
    """A U-Net wide enough for the Winograd path: every parameter's gradient equals the stock one."""
    torch.manual_seed(0)
    model = UNet(16, 1, 64, (1, 2), 1, attention_resolutions=(8,))
    for parameter in model.parameters():  # DDPM's zero-initialised layers would hide weight gradients
        if torch.all(parameter == 0):
            torch.nn.init.normal_(parameter, std=0.05)
    paths = []
    for layer in model.modules():
        if isinstance(layer, Conv3x3):
            layer.register_forward_hook(lambda _, __, out: paths.append(type(out.grad_fn).__name__))
    x, t = torch.randn(4, 1, 16, 16), torch.randint(0, 1000, (4,))

    def gradients() -> dict[str, torch.Tensor]:
        model.zero_grad(set_to_none=True)
        F.mse_loss(model(x, t), torch.zeros_like(x)).backward()
        return {name: p.grad.clone() for name, p in model.named_parameters()}

    winograd = gradients()
    assert set(paths) == {"_WinogradWeightGradConvBackward"}  # every residual conv: 64+ channels, 8×8+ maps
    with stock_kernels(model):
        stock = gradients()
    assert paths.count("ConvolutionBackward0") == len(paths) // 2
    for name, grad in stock.items():
        scale = grad.abs().max().item()
        torch.testing.assert_close(winograd[name], grad, rtol=0, atol=2e-5 * scale, msg=name)


def test_batch_chunks_add_up_to_the_whole_batch(monkeypatch):
    """The batch is processed in cache-sized chunks; one sample per chunk gives the one-pass result."""
    torch.manual_seed(0)
    x, grad_out = torch.randn(5, 8, 12, 8), torch.randn(5, 6, 12, 8)
    whole = winograd_weight_grad(x, grad_out)
    monkeypatch.setattr("diffusion_lab.models.kernels.winograd.CHUNK_BYTES", 1)
    torch.testing.assert_close(winograd_weight_grad(x, grad_out), whole, rtol=0, atol=1e-5 * whole.abs().max().item())
    reference = stock_weight_grad(x.double(), grad_out.double(), 6)
    assert (winograd_weight_grad(x, grad_out).double() - reference).abs().max() / reference.abs().max() < 2e-5
