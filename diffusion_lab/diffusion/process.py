"""The Gaussian diffusion process: the closed-form forward marginal, the posterior, and the conversions
between what a network may predict (ε, x₀ or v) — everything the objectives and samplers are built from.

Coefficient tables are float64 and cast to the sample's dtype only where they are used, so the maths keeps
its digits whatever precision the network runs in.
"""

from __future__ import annotations

import torch

from diffusion_lab.diffusion.schedules import NoiseSchedule

PREDICTION_TYPES = ("epsilon", "sample", "v_prediction")
VARIANCE_TYPES = ("fixed_small", "fixed_large", "learned_range")


def split_learned_variance(model_output: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """A learned-variance network's output: the first half of the channels is the usual prediction (ε, x₀ or
    v), the second half v ∈ [−1, 1] interpolating the log-variance (Nichol & Dhariwal 2021, eq. 15)."""
    channels = model_output.shape[1]
    if channels % 2:
        raise ValueError(
            f"a learned-variance model must output twice the image channels (prediction and variance), got "
            f"{channels}; train it with objective=hybrid."
        )
    return model_output[:, : channels // 2], model_output[:, channels // 2 :]


def check_prediction_type(prediction_type: str) -> None:
    if prediction_type not in PREDICTION_TYPES:
        raise ValueError(f"Unknown prediction_type {prediction_type!r}; valid choices: {', '.join(PREDICTION_TYPES)}.")


class GaussianDiffusion:
    """q(x_t | x_0) = N(√ᾱ_t x_0, (1-ᾱ_t) I) and its Gaussian reverse steps, for one noise schedule.

    ``t`` arguments are LongTensors of per-sample indices in [0, T); results broadcast over any trailing
    image dimensions and follow the dtype and device of the data.
    """

    def __init__(self, schedule: NoiseSchedule, prediction_type: str = "epsilon") -> None:
        check_prediction_type(prediction_type)
        alphas_cumprod = schedule.alphas_cumprod
        if prediction_type == "epsilon" and alphas_cumprod[-1] == 0:
            raise ValueError(
                "A zero-terminal-SNR schedule (ᾱ_{T-1} = 0) cannot recover x₀ from an ε prediction at "
                "the last step; use prediction_type='v_prediction' (or 'sample') with "
                "rescale_betas_zero_snr=True."
            )
        self.schedule = schedule
        self.prediction_type = prediction_type
        self.num_train_timesteps = schedule.num_train_timesteps

        betas = schedule.betas
        alphas_cumprod_prev = schedule.alphas_cumprod_prev
        one_minus = 1.0 - alphas_cumprod
        posterior_variance = betas * (1.0 - alphas_cumprod_prev) / one_minus
        self._tables: dict[str, torch.Tensor] = {
            "betas": betas,
            "alphas_cumprod": alphas_cumprod,
            "alphas_cumprod_prev": alphas_cumprod_prev,
            "sqrt_alphas_cumprod": alphas_cumprod.sqrt(),
            "sqrt_one_minus_alphas_cumprod": one_minus.sqrt(),
            "snr": schedule.snr,
            # q(x_{t-1} | x_t, x_0) = N(coef_x0 · x_0 + coef_xt · x_t, β̃_t I)
            "posterior_mean_coef_x0": betas * alphas_cumprod_prev.sqrt() / one_minus,
            "posterior_mean_coef_xt": (1.0 - alphas_cumprod_prev) * (1.0 - betas).sqrt() / one_minus,
            "posterior_variance": posterior_variance,
            # β̃_0 = 0, so the log variance borrows β̃_1 at t = 0 (Ho et al.'s decoder uses no variance there).
            "posterior_log_variance_clipped": torch.log(
                torch.cat([posterior_variance[1:2], posterior_variance[1:]])
                if posterior_variance.numel() > 1
                else betas
            ),
            "log_betas": torch.log(betas),
            # fixed_large's σ² = β_t, likewise with β̃_1 at t = 0 (Nichol & Dhariwal's convention for the NLL).
            "fixed_large_log_variance": torch.log(
                torch.cat([posterior_variance[1:2], betas[1:]]) if posterior_variance.numel() > 1 else betas
            ),
        }
        self._device_tables: dict[torch.device, dict[str, torch.Tensor]] = {}

    # -- coefficient lookup -------------------------------------------------------------------------------

    def table(self, name: str, device: torch.device) -> torch.Tensor:
        """The whole coefficient table ``name`` (length T) on ``device``, cached per device."""
        tables = self._device_tables.get(device)
        if tables is None:
            # MPS has no float64; everywhere else the tables keep full precision until they are gathered.
            dtype = torch.float32 if device.type == "mps" else torch.float64
            tables = {key: value.to(device=device, dtype=dtype) for key, value in self._tables.items()}
            self._device_tables[device] = tables
        return tables[name]

    def coefficient(self, name: str, t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        """``name``[t] as a tensor shaped (B, 1, …, 1) to broadcast against ``like``, in ``like``'s dtype."""
        values = self.table(name, like.device)[t.to(like.device)]
        return values.to(like.dtype).reshape(t.shape + (1,) * (like.ndim - t.ndim))

    # -- forward process ----------------------------------------------------------------------------------

    def q_sample(self, x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """Draw x_t ~ q(x_t | x_0) in one step: √ᾱ_t x_0 + √(1-ᾱ_t) ε."""
        return (
            self.coefficient("sqrt_alphas_cumprod", t, x0) * x0
            + self.coefficient("sqrt_one_minus_alphas_cumprod", t, x0) * noise
        )

    def q_mean_variance(self, x0: torch.Tensor, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Mean and variance of q(x_t | x_0)."""
        mean = self.coefficient("sqrt_alphas_cumprod", t, x0) * x0
        variance = 1.0 - self.coefficient("alphas_cumprod", t, x0)
        return mean, variance.expand_as(x0)

    def q_posterior(self, x0: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Mean and variance of q(x_{t-1} | x_t, x_0), the Gaussian every reverse step imitates."""
        mean = (
            self.coefficient("posterior_mean_coef_x0", t, x_t) * x0
            + self.coefficient("posterior_mean_coef_xt", t, x_t) * x_t
        )
        variance = self.coefficient("posterior_variance", t, x_t).expand_as(x_t)
        return mean, variance

    # -- what the network predicts ------------------------------------------------------------------------

    def predict_x0(self, x_t: torch.Tensor, t: torch.Tensor, model_output: torch.Tensor) -> torch.Tensor:
        """x̂₀ implied by the network output: (x_t - √(1-ᾱ) ε̂)/√ᾱ, the output itself, or √ᾱ x_t - √(1-ᾱ) v̂."""
        sqrt_ab = self.coefficient("sqrt_alphas_cumprod", t, x_t)
        sqrt_one_minus = self.coefficient("sqrt_one_minus_alphas_cumprod", t, x_t)
        if self.prediction_type == "epsilon":
            return (x_t - sqrt_one_minus * model_output) / sqrt_ab
        if self.prediction_type == "sample":
            return model_output
        return sqrt_ab * x_t - sqrt_one_minus * model_output

    def predict_eps(self, x_t: torch.Tensor, t: torch.Tensor, model_output: torch.Tensor) -> torch.Tensor:
        """ε̂ implied by the network output: the output itself, (x_t - √ᾱ x̂₀)/√(1-ᾱ), or √(1-ᾱ) x_t + √ᾱ v̂."""
        sqrt_ab = self.coefficient("sqrt_alphas_cumprod", t, x_t)
        sqrt_one_minus = self.coefficient("sqrt_one_minus_alphas_cumprod", t, x_t)
        if self.prediction_type == "epsilon":
            return model_output
        if self.prediction_type == "sample":
            return (x_t - sqrt_ab * model_output) / sqrt_one_minus
        return sqrt_one_minus * x_t + sqrt_ab * model_output

    def predict_v(self, x_t: torch.Tensor, t: torch.Tensor, model_output: torch.Tensor) -> torch.Tensor:
        """v̂ = √ᾱ ε̂ - √(1-ᾱ) x̂₀ (Salimans & Ho's velocity) implied by the network output."""
        if self.prediction_type == "v_prediction":
            return model_output
        eps = self.predict_eps(x_t, t, model_output)
        x0 = self.predict_x0(x_t, t, model_output)
        return (
            self.coefficient("sqrt_alphas_cumprod", t, x_t) * eps
            - self.coefficient("sqrt_one_minus_alphas_cumprod", t, x_t) * x0
        )

    def score(self, x_t: torch.Tensor, t: torch.Tensor, model_output: torch.Tensor) -> torch.Tensor:
        """∇ log p_t(x_t) ≈ -ε̂ / √(1-ᾱ_t): a noise predictor is a scaled score model (denoising score
        matching at noise level √(1-ᾱ_t))."""
        eps = self.predict_eps(x_t, t, model_output)
        return -eps / self.coefficient("sqrt_one_minus_alphas_cumprod", t, x_t)

    def training_target(self, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """What the network is regressed onto: ε, x₀, or v = √ᾱ ε - √(1-ᾱ) x₀."""
        if self.prediction_type == "epsilon":
            return noise
        if self.prediction_type == "sample":
            return x0
        return (
            self.coefficient("sqrt_alphas_cumprod", t, x0) * noise
            - self.coefficient("sqrt_one_minus_alphas_cumprod", t, x0) * x0
        )

    # -- reverse process ----------------------------------------------------------------------------------

    def p_mean_variance(
        self,
        x_t: torch.Tensor,
        t: torch.Tensor,
        model_output: torch.Tensor,
        variance_type: str = "fixed_small",
        clip_sample: bool | float = False,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Mean and variance of p_θ(x_{t-1} | x_t).

        The mean is the posterior mean at x̂₀; for ε-prediction without clipping it equals
        μ_θ = (x_t - β_t/√(1-ᾱ_t) ε̂)/√α_t. The variance is fixed — β̃_t (``fixed_small``) or β_t
        (``fixed_large``), Ho et al.'s two choices — or ``learned_range``: the output then carries a second half
        of channels v and log σ² = (v+1)/2 · log β_t + (1 − (v+1)/2) · log β̃_t (Nichol & Dhariwal). On a
        respaced chain β_t and β̃_t are the respaced schedule's own. ``clip_sample`` clamps x̂₀ to [-c, c].
        """
        if variance_type not in VARIANCE_TYPES:
            raise ValueError(f"Unknown variance_type {variance_type!r}; valid choices: {', '.join(VARIANCE_TYPES)}.")
        prediction = split_learned_variance(model_output)[0] if variance_type == "learned_range" else model_output
        x0 = clamp_x0(self.predict_x0(x_t, t, prediction), clip_sample)
        mean, posterior_variance = self.q_posterior(x0, x_t, t)
        if variance_type == "fixed_small":
            return mean, posterior_variance
        if variance_type == "fixed_large":
            return mean, self.coefficient("betas", t, x_t).expand_as(x_t)
        return mean, self.p_log_variance(t, x_t, variance_type, model_output).exp()

    def p_log_variance(
        self,
        t: torch.Tensor,
        like: torch.Tensor,
        variance_type: str = "fixed_small",
        model_output: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """log σ_t² of p_θ(x_{t−1} | x_t), finite at t = 0 (β̃_1 stands in for β̃_0 = 0): what likelihoods use.
        ``learned_range`` reads v from ``model_output``'s second half of channels."""
        if variance_type not in VARIANCE_TYPES:
            raise ValueError(f"Unknown variance_type {variance_type!r}; valid choices: {', '.join(VARIANCE_TYPES)}.")
        if variance_type == "fixed_small":
            return self.coefficient("posterior_log_variance_clipped", t, like)
        if variance_type == "fixed_large":
            return self.coefficient("fixed_large_log_variance", t, like)
        if model_output is None:
            raise ValueError("variance_type='learned_range' needs the model output that holds the variance.")
        fraction = (split_learned_variance(model_output)[1] + 1.0) / 2.0
        min_log = self.coefficient("posterior_log_variance_clipped", t, like)
        max_log = self.coefficient("log_betas", t, like)
        return fraction * max_log + (1.0 - fraction) * min_log


def clamp_x0(x0: torch.Tensor, clip_sample: bool | float) -> torch.Tensor:
    """Clamp x̂₀ to [-c, c]; ``True`` means c = 1 (data in [-1, 1]), ``False``/0 means no clamp."""
    if clip_sample is False or clip_sample is None or clip_sample == 0:
        return x0
    limit = 1.0 if clip_sample is True else float(clip_sample)
    return x0.clamp(-limit, limit)
