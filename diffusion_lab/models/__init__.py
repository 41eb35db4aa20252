"""Networks (plain nn.Modules, no Lightning)."""

from diffusion_lab.models.unet import UNet, count_parameters

__all__ = ["UNet", "count_parameters"]
