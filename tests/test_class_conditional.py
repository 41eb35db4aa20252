"""Class-conditional quickstart: classifier-free guidance must draw the digit asked for (its own module, so that
pytest-xdist runs it beside the long unconditional quickstart rather than after it)."""

import numpy as np
import pytest

from tests.conftest import run_cli
from tests.test_quickstart import digit_classifier


@pytest.mark.slow
def test_class_conditional_quickstart_samples_the_requested_digit(tmp_path, compose_config):
    """A short class-conditional quickstart; `sample class_label=… guidance_scale=…` must draw the asked-for
    digits (labelled so by a classifier fitted on real digits well above the 10 % of chance), and record the
    labels in samples.npz's arr_1."""
    from diffusion_lab.train import train

    run = tmp_path / "run"
    overrides = ["experiment=quickstart", "model.num_classes=${data.num_classes}", "trainer.max_steps=100",
                 "trainer.val_check_interval=100", "callbacks.sample_grid=null", "print_config=false",
                 "callbacks.progress_bar=null", "callbacks.model_summary=null"]  # fmt: skip
    train(compose_config(overrides, run_dir=run))
    asked = list(range(10)) * 10
    result = run_cli(
        [f"ckpt_path={run / 'checkpoints' / 'last.ckpt'}", "num_samples=100", "class_label=[0,1,2,3,4,5,6,7,8,9]",
         "guidance_scale=2", "sampler=dpm_solver", f"hydra.run.dir={tmp_path / 'samples'}"],
        cwd=tmp_path, module="diffusion_lab.sample",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    with np.load(tmp_path / "samples" / "samples.npz") as archive:
        images, labels = archive["arr_0"], archive["arr_1"]
    assert labels.tolist() == asked
    pixels = images.reshape(100, 64).astype(np.float64) / 255.0 * 16.0
    predicted = digit_classifier().predict(pixels)
    accuracy = float((predicted == labels).mean())
    print(f"class-conditional accuracy: {accuracy:.2f}")
    assert accuracy >= 0.5
