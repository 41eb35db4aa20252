"""The U-Net: shapes, presets, conditioning, determinism, gradients, and its layout/memory options."""

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from hydra.utils import instantiate
from omegaconf import OmegaConf
from torch import nn

from diffusion_lab.config.schemas import register_resolvers
from diffusion_lab.models import UNet, count_parameters
from diffusion_lab.models.blocks import Upsample, group_norm
from diffusion_lab.models.embeddings import sinusoidal_embedding

CONF = Path(__file__).resolve().parents[1] / "conf" / "model"


def randomise_zero_layers(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """DDPM zero-initialises each residual branch's last layer and the output conv, so a fresh net outputs
    exactly 0; give those layers small random weights as training would."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in model.parameters():
            if torch.all(parameter == 0):
                parameter.copy_(0.05 * torch.randn(parameter.shape, generator=generator))
    return model


def small_unet(**overrides) -> UNet:
    kwargs = dict(
        image_size=16,
        in_channels=1,
        model_channels=16,
        channel_mult=(1, 2),
        num_res_blocks=1,
        attention_resolutions=(8,),
    )
    kwargs.update(overrides)
    torch.manual_seed(0)
    return randomise_zero_layers(UNet(**kwargs))


def preset(name: str, image_size: int, channels: int) -> UNet:
    """Instantiate a conf/model preset the way the training job does, for the given data geometry."""
    register_resolvers()
    root = OmegaConf.create({"data": {"image_size": image_size, "channels": channels}})
    root.model = OmegaConf.load(f"{CONF}/{name}.yaml")
    return instantiate(root.model)


def test_ddpm_cifar10_preset_has_the_papers_35_7m_parameters():
    model = preset("unet_ddpm_cifar10", 32, 3)
    assert count_parameters(model) == pytest.approx(35.7e6, rel=0.01)


def test_tiny_preset_is_under_300k_parameters():
    assert count_parameters(preset("unet_tiny", 8, 1)) < 300_000


@pytest.mark.parametrize(
    ("name", "size", "channels"),
    [("unet_small", 8, 1), ("unet_small", 16, 1), ("unet_mnist", 28, 1), ("unet_mnist", 32, 1)],
)
def test_presets_run_at_their_resolutions(name, size, channels):
    model = preset(name, size, channels)
    out = model(torch.randn(2, channels, size, size), torch.tensor([0, 999]))
    assert out.shape == (2, channels, size, size)


@pytest.mark.parametrize(
    ("image_size", "channels", "mult", "batch"),
    [(8, 1, (1, 2), 1), (16, 3, (1, 2, 2), 3), (28, 1, (1, 2, 2), 2), (32, 3, (1, 2, 2, 2), 2)],
)
def test_output_has_the_input_shape(image_size, channels, mult, batch):
    model = UNet(image_size, channels, 16, mult, 1, attention_resolutions=(image_size // 2,))
    x = torch.randn(batch, channels, image_size, image_size)
    out = model(x, torch.randint(0, 1000, (batch,)))
    assert out.shape == x.shape and out.dtype == torch.float32


def test_out_channels_can_differ_from_input():
    model = UNet(8, 3, 16, (1, 2), 1, (), out_channels=6)
    assert model(torch.randn(2, 3, 8, 8), torch.tensor([1, 2])).shape == (2, 6, 8, 8)


def test_scalar_timestep_broadcasts_over_the_batch():
    model = small_unet().eval()
    x = torch.randn(3, 1, 16, 16)
    assert torch.equal(model(x, torch.tensor(5)), model(x, torch.full((3,), 5)))


def test_bf16_autocast_matches_fp32():
    model = small_unet().eval()
    x, t = torch.randn(2, 1, 16, 16), torch.tensor([10, 700])
    reference = model(x, t)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        low = model(x, t)
    assert low.dtype == torch.bfloat16
    relative = (low.float() - reference).norm() / reference.norm()
    assert relative < 3e-2


def test_float64_round_trip():
    model = small_unet().double().eval()
    out = model(torch.randn(2, 1, 16, 16, dtype=torch.float64), torch.tensor([1, 2]))
    assert out.dtype == torch.float64


@pytest.mark.parametrize(("channels", "groups"), [(16, 4), (32, 8), (64, 16), (128, 32), (256, 32), (3, 1)])
def test_group_norm_keeps_several_channels_per_group(channels, groups):
    assert group_norm(channels).num_groups == groups


def test_time_embedding_distinguishes_timesteps():
    features = sinusoidal_embedding(torch.tensor([0, 1, 999]), 32)
    assert features.shape == (3, 32)
    assert torch.allclose(features[0, :16], torch.ones(16)) and torch.allclose(features[0, 16:], torch.zeros(16))
    assert (features[1] - features[2]).abs().max() > 0.5
    model = small_unet().eval()
    x = torch.randn(1, 1, 16, 16)
    assert not torch.allclose(model(x, torch.tensor([10])), model(x, torch.tensor([900])))


def test_class_labels_change_the_output_and_the_null_label_is_unconditional():
    model = small_unet(num_classes=10).eval()
    assert model.null_label == 10
    x, t = torch.randn(2, 1, 16, 16), torch.tensor([300, 300])
    out_3 = model(x, t, torch.tensor([3, 3]))
    out_7 = model(x, t, torch.tensor([7, 7]))
    assert (out_3 - out_7).abs().max() > 1e-3
    assert torch.equal(model(x, t), model(x, t, torch.tensor([10, 10])))


def test_labels_for_an_unconditional_model_are_refused():
    with pytest.raises(ValueError, match="unconditional"):
        small_unet()(torch.randn(1, 1, 16, 16), torch.tensor([1]), torch.tensor([0]))


def test_eval_mode_is_deterministic_and_dropout_acts_in_training():
    model = small_unet(dropout=0.3)
    x, t = torch.randn(2, 1, 16, 16), torch.tensor([5, 500])
    model.eval()
    assert torch.equal(model(x, t), model(x, t))
    model.train()
    assert not torch.equal(model(x, t), model(x, t))


def test_every_parameter_receives_a_finite_nonzero_gradient():
    model = small_unet(num_classes=4, scale_shift=True)
    x, t = torch.randn(4, 1, 16, 16), torch.tensor([0, 10, 500, 999])
    y = torch.tensor([0, 1, 2, 4])  # includes the null label
    F.mse_loss(model(x, t, y), torch.randn_like(x)).backward()
    for name, parameter in model.named_parameters():
        assert parameter.grad is not None, name
        assert torch.isfinite(parameter.grad).all(), name
        assert parameter.grad.abs().sum() > 0, name


def test_channels_last_and_contiguous_layouts_agree():
    fast = small_unet(channels_last=True).eval()
    plain = small_unet(channels_last=False).eval()
    plain.load_state_dict(fast.state_dict())
    x, t = torch.randn(2, 1, 16, 16), torch.tensor([3, 600])
    assert torch.allclose(fast(x, t), plain(x, t), atol=1e-5)


def _weights_in(model: UNet, layout: torch.memory_format) -> bool:
    # 4-d weights with more than one input channel: for one channel both layouts are the same strides.
    weights = [p for p in model.parameters() if p.dim() == 4 and p.shape[1] > 1]
    return all(p.is_contiguous(memory_format=layout) for p in weights)


def test_auto_layout_is_nhwc_on_cpu_and_follows_the_weights_to_another_device():
    model = small_unet()  # channels_last="auto"
    assert _weights_in(model, torch.channels_last) and not _weights_in(model, torch.contiguous_format)
    model.to("meta")  # any non-CPU device (CUDA here would be the same path): NCHW
    assert _weights_in(model, torch.contiguous_format) and not _weights_in(model, torch.channels_last)
    model.to_empty(device="cpu")
    assert _weights_in(model, torch.channels_last)
    forced = small_unet(channels_last=True).to("meta")  # an explicit choice is kept on any device
    assert _weights_in(forced, torch.channels_last)
    with pytest.raises(ValueError, match=r"channels_last='yes' is not a layout; set model\.channels_last to auto"):
        small_unet(channels_last="yes")


def test_gradient_checkpointing_gives_the_same_gradients():
    model = small_unet()
    checkpointed = small_unet(gradient_checkpointing=True)
    checkpointed.load_state_dict(model.state_dict())
    x, t = torch.randn(2, 1, 16, 16), torch.tensor([3, 600])
    model(x, t).square().mean().backward()
    checkpointed(x, t).square().mean().backward()
    for (name, a), b in zip(model.named_parameters(), checkpointed.parameters(), strict=True):
        assert torch.allclose(a.grad, b.grad, atol=1e-6), name


def test_subpixel_upsample_equals_nearest_then_conv_with_its_gradients():
    torch.manual_seed(0)
    up = Upsample(6).double()
    x = torch.randn(2, 6, 5, 7, dtype=torch.float64, requires_grad=True)
    reference = up.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))
    assert torch.allclose(up(x), reference, atol=1e-12)
    weight = torch.randn_like(reference)
    ours = torch.autograd.grad((up(x) * weight).sum(), [x, up.conv.weight, up.conv.bias])
    theirs = torch.autograd.grad((reference * weight).sum(), [x, up.conv.weight, up.conv.bias])
    for a, b in zip(ours, theirs, strict=True):
        assert torch.allclose(a, b, atol=1e-10)
    assert torch.autograd.gradcheck(up, (x,))


@pytest.mark.slow
def test_regional_compile_matches_eager_shares_graphs_across_blocks_and_keeps_state_dict_keys():
    """compile=true compiles the residual and attention blocks in place: the loss and gradients are eager's to
    float tolerance, blocks of equal shapes reuse one graph (fewer graphs than blocks), and the state dict — what
    checkpoints hold — has eager's keys (no ``_orig_mod``), so a compiled run's checkpoint loads uncompiled."""
    from torch._dynamo.utils import counters

    from diffusion_lab.models.compilation import compile_network

    torch.manual_seed(0)
    eager = small_unet()
    compiled = small_unet()
    compiled.load_state_dict(eager.state_dict())
    torch._dynamo.reset()
    counters.clear()
    blocks = compile_network(compiled, True)
    x, t = torch.randn(4, 1, 16, 16), torch.tensor([3, 600, 10, 999])
    losses, grads = [], []
    for net in (eager, compiled):
        loss = net(x, t).square().mean()
        loss.backward()
        losses.append(loss.detach())
        grads.append({name: p.grad for name, p in net.named_parameters()})
    assert torch.allclose(losses[0], losses[1], rtol=1e-5)
    for name, grad in grads[0].items():
        assert torch.allclose(grad, grads[1][name], rtol=1e-4, atol=1e-6), name
    graphs = counters["stats"]["unique_graphs"]
    assert 0 < graphs < blocks, (graphs, blocks)
    assert list(compiled.state_dict()) == list(eager.state_dict())
    with pytest.raises(ValueError, match=r"compile='fast': use false, true / regional"):
        compile_network(small_unet(), "fast")


def test_regional_compile_leaves_room_to_compile_every_block_shape(monkeypatch):
    """The MNIST preset's U-Net runs its ResBlock code at 9 shapes, more than dynamo's default recompile limit of
    8, past which the remaining blocks would silently run eager: regional compile raises the limit."""
    import torch._dynamo.config as dynamo_config

    from diffusion_lab.models.compilation import compile_network

    monkeypatch.setattr(dynamo_config, "recompile_limit", 8)
    net = UNet(32, 1, model_channels=64, channel_mult=(1, 2, 2), num_res_blocks=2, attention_resolutions=(16,))
    blocks = compile_network(net, True)
    assert blocks == 23 and dynamo_config.recompile_limit >= blocks


def test_graphs_mode_compiles_the_whole_network_and_samplers_get_outputs_that_outlive_a_replay():
    """compile=graphs: one compiled region (the whole network, CUDA graphs on a GPU); the sampling call copies each
    output, since the next replay of a CUDA graph overwrites its output buffers — and only in that mode."""
    from diffusion_lab.models.compilation import compile_network, graph_safe

    net = small_unet()
    assert compile_network(net, "graphs") == 1 and net._compiled_call_impl is not None
    assert list(net.state_dict()) == list(small_unet().state_dict())
    passthrough = nn.Identity()
    x = torch.randn(2, 3)
    copied = graph_safe(passthrough, "graphs")(x)
    assert copied is not x and copied.data_ptr() != x.data_ptr() and torch.equal(copied, x)
    for how in (False, True, "regional", "full"):
        assert graph_safe(passthrough, how) is passthrough


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (
            {"image_size": 30, "channel_mult": (1, 2, 2)},
            r"image_size=30 is not divisible by 2\^\(levels−1\) = 4",
        ),
        (
            {"attention_resolutions": (5,)},
            r"attention_resolutions=\[5\] includes \[5\].*levels are \[16, 8\]",
        ),
        ({"num_heads": 3}, "num_heads=3 must divide the 32 channels"),
    ],
)
def test_bad_geometry_is_named(kwargs, message):
    with pytest.raises(ValueError, match=message):
        small_unet(**kwargs)


def test_input_not_divisible_by_the_downsampling_factor_is_named():
    model = small_unet()
    with pytest.raises(ValueError, match=r"Input of 17×17 pixels is not divisible by this U-Net's downsampling"):
        model(torch.randn(1, 1, 17, 17), torch.tensor([1]))


@pytest.mark.parametrize("mult", [(1, 2), (1, 2, 2)])
def test_each_up_block_reads_its_own_skip_connection(mult):
    """The decoder's k-th block must concatenate the encoder's feature map saved k-th from the end (the
    U-Net's mirror pairing), unaltered: a zeroed, detached-and-noised or reordered skip fails here although
    every shape still fits."""
    net = small_unet(channel_mult=mult, attention_resolutions=()).eval()
    saved, received = [], []
    hooks = [net.input_conv.register_forward_hook(lambda m, i, out: saved.append(out))]
    for layers in net.down:
        hooks.append(layers[-1].register_forward_hook(lambda m, i, out: saved.append(out)))
    for layers in net.up:
        hooks.append(layers[0].register_forward_pre_hook(lambda m, args: received.append(args[0])))
    x = torch.randn(2, 1, 16, 16, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        net(x, torch.tensor([3, 700]))
    for hook in hooks:
        hook.remove()
    assert len(received) == len(saved) == len(net.up)
    for block_input, skip in zip(received, reversed(saved), strict=True):
        assert torch.equal(block_input[:, -skip.shape[1] :], skip)
    # and the output really depends on every skip: perturbing one changes the prediction
    for k in range(len(net.up)):

        def perturb(module, args, k=k):
            if module is net.up[k][0]:
                h = args[0].clone()
                h[:, -1] += 1.0
                return (h, *args[1:])

        handle = net.up[k][0].register_forward_pre_hook(perturb)
        with torch.no_grad():
            changed = net(x, torch.tensor([3, 700]))
            handle.remove()
            base = net(x, torch.tensor([3, 700]))
        assert (changed - base).abs().max() > 1e-4, k
