"""The schedule figure: written as a real PNG with both panels drawn."""

import numpy as np
from PIL import Image

from diffusion_lab.plot_schedules import main, plot_schedules


def test_plot_schedules_writes_a_png_with_curves(tmp_path):
    path = plot_schedules(tmp_path / "figs" / "schedules.png")
    image = np.asarray(Image.open(path).convert("RGB"))
    assert image.shape == (400, 1000, 3)
    # Matplotlib's default first two colours (linear = blue, cosine = orange) are both drawn in each panel.
    for half in (image[:, :500], image[:, 500:]):
        blue = np.all(np.abs(half.astype(int) - [31, 119, 180]) < 30, axis=-1).sum()
        orange = np.all(np.abs(half.astype(int) - [255, 127, 14]) < 30, axis=-1).sum()
        assert blue > 300 and orange > 300


def test_command_line_writes_where_asked(tmp_path, capsys):
    main(
        [
            "--output",
            str(tmp_path / "s.png"),
            "--schedules",
            "linear",
            "sigmoid",
            "--num-train-timesteps",
            "50",
        ]
    )
    assert (tmp_path / "s.png").stat().st_size > 10_000
    assert "wrote" in capsys.readouterr().out
