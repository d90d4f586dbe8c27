# Copyright 2026 The ddpm-paper authors. Licensed under the Apache License, Version 2.0.
"""The diffusion process of Ho et al. 2020, "Denoising Diffusion Probabilistic Models" (arXiv:2006.11239).

`DDPMPaperScheduler` is config-compatible with `diffusers.DDPMScheduler` (a config saved by either loads into the
other) and gives the same samples from the same generator, but writes the paper's math out explicitly: the forward
process q(x_t|x_0), the posterior q(x_{t-1}|x_t,x_0), the reverse process p_theta(x_{t-1}|x_t) and the terms of the
variational bound, with coefficients computed once in float64.
"""

import math
from dataclasses import dataclass
from typing import Literal, get_args

import numpy as np
import torch
from diffusers import DDPMScheduler
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.schedulers.scheduling_utils import KarrasDiffusionSchedulers, SchedulerMixin
from diffusers.utils import BaseOutput
from diffusers.utils.torch_utils import randn_tensor

VarianceType = Literal["fixed_small", "fixed_small_log", "fixed_large", "fixed_large_log", "learned", "learned_range"]
BetaSchedule = Literal["linear", "scaled_linear", "squaredcos_cap_v2", "laplace", "sigmoid", "quad"]
VARIANCE_TYPES: tuple[str, ...] = get_args(VarianceType)
BETA_SCHEDULES: tuple[str, ...] = get_args(BetaSchedule)
PredictionType = Literal["epsilon", "sample", "v_prediction", "mean"]
PREDICTION_TYPES: tuple[str, ...] = get_args(PredictionType)
# What `DDPMScheduler.step` can sample; `mean` (the posterior mean mu-tilde, Table 2 of the paper) is ours alone.
DIFFUSERS_PREDICTION_TYPES = ("epsilon", "sample", "v_prediction")

# Schedules DDPMScheduler builds itself; any other one is exported to it as `trained_betas`.
DIFFUSERS_BETA_SCHEDULES = ("linear", "scaled_linear", "squaredcos_cap_v2", "laplace", "sigmoid")


@dataclass
class DDPMPaperSchedulerOutput(BaseOutput):
    """
    Output of [`DDPMPaperScheduler.step`], the same fields as diffusers' `DDPMSchedulerOutput`.

    Args:
        prev_sample (`torch.Tensor` of shape `(batch_size, num_channels, height, width)`):
            The sample x_{t-1} drawn from p_theta(x_{t-1}|x_t); the next input of the denoising loop.
        pred_original_sample (`torch.Tensor` of shape `(batch_size, num_channels, height, width)`):
            The model's prediction of x_0 at this step (clipped when the config says so).
    """

    prev_sample: torch.Tensor
    pred_original_sample: torch.Tensor | None = None


@dataclass
class DDPMPaperMeanVarianceOutput(BaseOutput):
    """
    Output of [`DDPMPaperScheduler.p_mean_variance`]: the Gaussian p_theta(x_{t-1}|x_t). Every field has x_t's shape.

    Args:
        mean (`torch.Tensor`):
            mu_theta(x_t, t); Eq. 11 for epsilon prediction without clipping.
        variance (`torch.Tensor`):
            sigma_t^2 of the configured `variance_type`.
        log_variance (`torch.Tensor`):
            log sigma_t^2 (finite at t = 0, where beta-tilde_1 stands in for beta-tilde_0 = 0).
        pred_original_sample (`torch.Tensor`):
            The model's prediction of x_0 (clipped when `clip_denoised`).
    """

    mean: torch.Tensor
    variance: torch.Tensor
    log_variance: torch.Tensor
    pred_original_sample: torch.Tensor


@dataclass
class DDPMPaperVLBOutput(BaseOutput):
    """
    Output of [`DDPMPaperScheduler.vlb_terms`].

    Args:
        bpd (`torch.Tensor` of shape `(batch_size,)`):
            The term of the bound (Eq. 5) at each example's t, in bits/dim: L_{t-1} for t > 0, L_0 for t = 0.
        pred_original_sample (`torch.Tensor`):
            The model's prediction of x_0 (clipped when `clip_denoised`).
    """

    bpd: torch.Tensor
    pred_original_sample: torch.Tensor


def _alpha_bar_betas(num_timesteps: int, alpha_bar, max_beta: float = 0.999) -> np.ndarray:
    """Betas that discretise a continuous abar(s), s in [0, 1] (Nichol & Dhariwal 2021, Eq. 17)."""
    s = np.arange(num_timesteps + 1, dtype=np.float64) / num_timesteps
    abar = np.array([alpha_bar(v) for v in s])
    return np.minimum(1.0 - abar[1:] / abar[:-1], max_beta)


def make_betas(beta_schedule: str, num_train_timesteps: int, beta_start: float, beta_end: float) -> np.ndarray:
    """The beta_1..beta_T of a named schedule, in float64."""
    T = num_train_timesteps
    if beta_schedule == "linear":  # the paper's schedule (Sec. 4): 1e-4 to 0.02
        return np.linspace(beta_start, beta_end, T, dtype=np.float64)
    if beta_schedule == "scaled_linear":
        return np.linspace(beta_start**0.5, beta_end**0.5, T, dtype=np.float64) ** 2
    if beta_schedule == "quad":  # the paper's code (diffusion_utils_2.get_beta_schedule): same as scaled_linear
        return np.linspace(beta_start**0.5, beta_end**0.5, T, dtype=np.float64) ** 2
    if beta_schedule == "sigmoid":
        return 1.0 / (1.0 + np.exp(-np.linspace(-6, 6, T, dtype=np.float64))) * (beta_end - beta_start) + beta_start
    if beta_schedule == "squaredcos_cap_v2":  # cosine schedule, Nichol & Dhariwal 2021
        return _alpha_bar_betas(T, lambda s: math.cos((s + 0.008) / 1.008 * math.pi / 2) ** 2)
    if beta_schedule == "laplace":

        def laplace(s):
            lmb = -0.5 * math.copysign(1, 0.5 - s) * math.log(1 - 2 * math.fabs(0.5 - s) + 1e-6)
            return math.sqrt(math.exp(lmb) / (1 + math.exp(lmb)))

        return _alpha_bar_betas(T, laplace)
    raise ValueError(
        f"Unknown beta_schedule {beta_schedule!r}: choose one of {', '.join(BETA_SCHEDULES)}, or pass trained_betas."
    )


def _rescale_zero_terminal_snr(betas: np.ndarray) -> np.ndarray:
    """Lin et al. 2023 (arXiv:2305.08891), Algorithm 1: shift and scale sqrt(abar) so that abar_T = 0."""
    sqrt_abar = np.sqrt(np.cumprod(1.0 - betas))
    first, last = sqrt_abar[0], sqrt_abar[-1]
    sqrt_abar = (sqrt_abar - last) * first / (first - last)
    abar = sqrt_abar**2
    alphas = np.concatenate([abar[:1], abar[1:] / abar[:-1]])
    return 1.0 - alphas


def _chain_coefficients(alphas_cumprod: np.ndarray, timesteps: np.ndarray) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """
    Coefficients of the reverse chain that visits `timesteps` (descending), in float64, indexed by timestep, and the
    chain's previous timestep of each timestep (-1 after the last one).

    For the full chain T-1, ..., 0 these are the paper's coefficients; for a respaced chain they are those of the
    diffusion whose betas are 1 - abar_t / abar_prev(t) (Nichol & Dhariwal 2021, Appendix), which is what
    `DDPMScheduler.step` computes on the fly. Entries for timesteps the chain does not visit are NaN.
    """
    T = len(alphas_cumprod)
    prev_timestep = np.full(T, -1, dtype=np.int64)
    prev_timestep[timesteps[:-1]] = timesteps[1:]
    prev = prev_timestep[timesteps]
    abar = alphas_cumprod[timesteps]
    abar_prev = np.where(prev >= 0, alphas_cumprod[np.maximum(prev, 0)], 1.0)
    betas = 1.0 - abar / abar_prev
    posterior_variance = (1.0 - abar_prev) / (1.0 - abar) * betas  # Eq. 7, beta-tilde_t
    # beta-tilde is 0 at the chain's last step; the paper's code uses the next one there (its log is finite).
    posterior_log_variance_clipped = np.log(np.where(posterior_variance > 0, posterior_variance, np.nan))
    if len(timesteps) > 1 and posterior_variance[-1] <= 0:
        posterior_log_variance_clipped[-1] = posterior_log_variance_clipped[-2]
    # fixed_large: sigma_t^2 = beta_t, except beta-tilde_1 at t = 0, whose beta would give the decoder L_0 a different
    # variance from the one the paper's code evaluates (and `step` adds no noise at t = 0).
    fixed_large_variance = np.where(timesteps == 0, np.exp(posterior_log_variance_clipped), betas)
    chain = {
        "log_betas": np.log(betas),
        "posterior_variance": posterior_variance,
        "posterior_log_variance_clipped": posterior_log_variance_clipped,
        "posterior_mean_coef1": np.sqrt(abar_prev) * betas / (1.0 - abar),  # Eq. 7, the weight of x_0
        "posterior_mean_coef2": np.sqrt(1.0 - betas) * (1.0 - abar_prev) / (1.0 - abar),  # Eq. 7, the weight of x_t
        "fixed_large_variance": fixed_large_variance,
        "fixed_large_log_variance": np.log(fixed_large_variance),
    }
    table = {}
    for name, values in chain.items():
        table[name] = np.full(T, np.nan)
        table[name][timesteps] = values
    return table, prev_timestep


def normal_kl(mean1: torch.Tensor, logvar1: torch.Tensor, mean2: torch.Tensor, logvar2: torch.Tensor) -> torch.Tensor:
    """KL(N(mean1, exp(logvar1)) || N(mean2, exp(logvar2))) per element, in nats."""
    return 0.5 * (-1.0 + logvar2 - logvar1 + torch.exp(logvar1 - logvar2) + (mean1 - mean2) ** 2 * torch.exp(-logvar2))


def _standard_normal_cdf(x: torch.Tensor) -> torch.Tensor:
    return 0.5 * (1.0 + torch.erf(x / math.sqrt(2.0)))


def discretized_gaussian_log_likelihood(
    x: torch.Tensor, *, means: torch.Tensor, log_scales: torch.Tensor, bits: int = 8
) -> torch.Tensor:
    """
    log p(x) per element, in nats, of 8-bit data in [-1, 1] under N(means, exp(log_scales)^2) integrated over bins of
    width 2/255, with the first and last bins open-ended (the paper's decoder L_0, Sec. 3.3). `bits=16`: 16-bit data,
    bins of width 2/65535 (65,536 levels), computed in float64 (a float32 difference of two CDFs 2/65535 apart keeps
    few digits) and returned in the dtype of `x`.
    """
    half_bin = 1.0 / (2**bits - 1)
    edge = 0.999 if bits == 8 else 1.0 - half_bin  # 0.999: the paper's code, for 8 bits
    dtype = x.dtype
    if bits > 8 and x.device.type != "mps":  # mps has no float64
        x, means, log_scales = x.double(), means.double(), log_scales.double()
    centered = x - means
    inv_std = torch.exp(-log_scales)
    cdf_plus = _standard_normal_cdf(inv_std * (centered + half_bin))
    cdf_min = _standard_normal_cdf(inv_std * (centered - half_bin))
    log_cdf_plus = torch.log(cdf_plus.clamp(min=1e-12))
    log_one_minus_cdf_min = torch.log((1.0 - cdf_min).clamp(min=1e-12))
    log_probs = torch.where(
        x < -edge,
        log_cdf_plus,
        torch.where(x > edge, log_one_minus_cdf_min, torch.log((cdf_plus - cdf_min).clamp(min=1e-12))),
    )
    return log_probs.to(dtype)


def _mean_over_dims(x: torch.Tensor) -> torch.Tensor:
    return x.flatten(1).mean(dim=1)


class DDPMPaperScheduler(SchedulerMixin, ConfigMixin):
    """
    The DDPM of Ho et al. 2020 (arXiv:2006.11239), with the same constructor, `step` and config as
    `diffusers.DDPMScheduler`, so checkpoints move between the two.

    Defaults are the paper's: T = 1000, linear betas from 1e-4 to 0.02, `fixed_small` variance sigma_t^2 =
    beta-tilde_t, epsilon prediction, x_0 clipped to [-1, 1] while sampling. These are also DDPMScheduler's defaults.

    Args:
        num_train_timesteps (`int`, defaults to `1000`):
            T, the number of diffusion steps the model is trained with.
        beta_start (`float`, defaults to `0.0001`):
            beta_1 of the `linear`, `scaled_linear`, `quad` and `sigmoid` schedules.
        beta_end (`float`, defaults to `0.02`):
            beta_T of those schedules.
        beta_schedule (`str`, defaults to `"linear"`):
            `linear` (the paper), `scaled_linear` / `quad` (linear in sqrt(beta); `quad` is the paper code's name),
            `squaredcos_cap_v2` (cosine, Nichol & Dhariwal 2021), `laplace` or `sigmoid`.
        trained_betas (`np.ndarray` or `list[float]`, *optional*):
            Explicit betas; overrides `beta_schedule`. Schedules DDPMScheduler lacks are exported this way.
        variance_type (`str`, defaults to `"fixed_small"`):
            sigma_t^2 of p_theta(x_{t-1}|x_t): `fixed_small` (beta-tilde_t, the paper's lower bound),
            `fixed_large` (beta_t, the upper bound), their `_log` variants (same variance, computed in log space),
            `learned` (the model's extra output channels are sigma_t^2, as in DDPMScheduler) or `learned_range`
            (they interpolate log beta-tilde_t and log beta_t, Nichol & Dhariwal 2021 Sec. 3.1).
        clip_sample (`bool`, defaults to `True`):
            Clip the predicted x_0 to [-clip_sample_range, clip_sample_range] while sampling (the paper's code does).
        prediction_type (`str`, defaults to `"epsilon"`):
            What the model predicts: `epsilon` (the paper, Eq. 11), `sample` (x_0), `v_prediction`, or `mean`: the
            posterior mean mu-tilde_t(x_t, x_0) of Eq. 7 itself (the paper's Sec. 3.2 and Table 2; DDPMScheduler
            cannot sample such a model, see `to_diffusers_config`).
        thresholding (`bool`, defaults to `False`):
            Dynamic thresholding of the predicted x_0 (Saharia et al. 2022) instead of clipping.
        dynamic_thresholding_ratio (`float`, defaults to `0.995`):
            Percentile of |x_0| used by dynamic thresholding.
        clip_sample_range (`float`, defaults to `1.0`):
            The clipping range of `clip_sample`.
        sample_max_value (`float`, defaults to `1.0`):
            The largest threshold of dynamic thresholding.
        timestep_spacing (`str`, defaults to `"leading"`):
            How `set_timesteps` spaces a respaced chain: `linspace`, `leading` or `trailing`.
        steps_offset (`int`, defaults to `0`):
            Offset added to `leading` timesteps.
        rescale_betas_zero_snr (`bool`, defaults to `False`):
            Rescale the betas to zero terminal SNR (Lin et al. 2023).
    """

    _compatibles = [DDPMScheduler.__name__] + [e.name for e in KarrasDiffusionSchedulers]
    order = 1

    @register_to_config
    def __init__(
        self,
        num_train_timesteps: int = 1000,
        beta_start: float = 0.0001,
        beta_end: float = 0.02,
        beta_schedule: BetaSchedule = "linear",
        trained_betas: np.ndarray | list[float] | None = None,
        variance_type: VarianceType = "fixed_small",
        clip_sample: bool = True,
        prediction_type: PredictionType = "epsilon",
        thresholding: bool = False,
        dynamic_thresholding_ratio: float = 0.995,
        clip_sample_range: float = 1.0,
        sample_max_value: float = 1.0,
        timestep_spacing: Literal["linspace", "leading", "trailing"] = "leading",
        steps_offset: int = 0,
        rescale_betas_zero_snr: bool = False,
    ):
        if variance_type not in VARIANCE_TYPES:
            raise ValueError(f"Unknown variance_type {variance_type!r}: choose one of {', '.join(VARIANCE_TYPES)}.")
        if prediction_type not in PREDICTION_TYPES:
            raise ValueError(
                f"Unknown prediction_type {prediction_type!r}: choose one of {', '.join(PREDICTION_TYPES)}."
            )
        if trained_betas is not None:
            betas = np.asarray(trained_betas, dtype=np.float64)
        else:
            betas = make_betas(beta_schedule, num_train_timesteps, beta_start, beta_end)
        if rescale_betas_zero_snr:
            betas = _rescale_zero_terminal_snr(betas)
        if len(betas) != num_train_timesteps:
            raise ValueError(
                f"trained_betas has {len(betas)} values but num_train_timesteps is {num_train_timesteps}."
            )
        if not (np.all(betas > 0) and np.all(betas <= 1)):
            raise ValueError("Every beta must lie in (0, 1].")

        # The training chain T-1, ..., 0, in float64 under improved-diffusion's names: the forward process (Eq. 4),
        # then the posterior (Eqs. 6-7) and the reverse process's variances from `_chain_coefficients`.
        alphas = 1.0 - betas
        alphas_cumprod = np.cumprod(alphas)
        with np.errstate(divide="ignore"):  # abar_T = 0 under rescale_betas_zero_snr: 1/abar_T is infinite
            recip_alphas_cumprod = 1.0 / alphas_cumprod
        forward = {
            "betas": betas,
            "alphas": alphas,
            "alphas_cumprod": alphas_cumprod,
            "alphas_cumprod_prev": np.append(1.0, alphas_cumprod[:-1]),
            "sqrt_alphas_cumprod": np.sqrt(alphas_cumprod),
            "sqrt_one_minus_alphas_cumprod": np.sqrt(1.0 - alphas_cumprod),
            "log_one_minus_alphas_cumprod": np.log(1.0 - alphas_cumprod),
            "sqrt_recip_alphas_cumprod": np.sqrt(recip_alphas_cumprod),
            "sqrt_recipm1_alphas_cumprod": np.sqrt(recip_alphas_cumprod - 1.0),
        }
        training, _ = _chain_coefficients(alphas_cumprod, np.arange(num_train_timesteps)[::-1].copy())
        training.update(forward)
        self._tables = {"training": training}
        # Public float32 tensors, as DDPMScheduler and improved-diffusion expose them.
        posterior = (
            "posterior_variance",
            "posterior_log_variance_clipped",
            "posterior_mean_coef1",
            "posterior_mean_coef2",
        )
        for name in (*forward, *posterior):
            setattr(self, name, torch.from_numpy(training[name]).float())
        self._device_tables: dict[tuple[str, str, torch.device], torch.Tensor] = {}
        self.init_noise_sigma = 1.0

        self.custom_timesteps = False
        self.num_inference_steps = None
        self.timesteps = torch.from_numpy(np.arange(0, num_train_timesteps)[::-1].copy())
        self._set_sampling_chain(self.timesteps.numpy())

    @property
    def variance_type(self) -> str:
        return self.config.variance_type

    def _set_sampling_chain(self, timesteps: np.ndarray) -> None:
        """Precomputes the step coefficients of the chain `step` walks, so that a step only looks them up."""
        alphas_cumprod = self._tables["training"]["alphas_cumprod"]
        table, self._prev_timestep = _chain_coefficients(alphas_cumprod, np.asarray(timesteps, dtype=np.int64))
        # The respaced chain's own diffusion, for its bound (`vlb_terms(chain="respaced")`): the paper's clipped
        # log-variance at its last step, as the training chain has.
        self._tables["respaced"] = dict(table)
        # Sampling floors beta-tilde at 1e-20 as DDPMScheduler does, rather than borrowing the previous step's value:
        # the two differ only where the chain's last step has t > 0 (`trailing` spacing, `steps_offset`), and there
        # `fixed_small` draws with this variance and `learned_range` interpolates from its log.
        table["posterior_variance"] = np.maximum(table["posterior_variance"], 1e-20)
        table["posterior_log_variance_clipped"] = np.log(table["posterior_variance"])
        self._tables["sampling"] = table
        self._device_tables = {
            key: value for key, value in self._device_tables.items() if key[0] not in ("sampling", "respaced")
        }

    def _extract(self, chain: str, name: str, t: int | torch.Tensor, like: torch.Tensor) -> float | torch.Tensor:
        """
        Coefficient `name` of `chain` ("training", "sampling" or "respaced") at timestep t, shaped to broadcast against `like`:
        a Python float for a scalar t (no kernel, no host-device copy), else a gather from a tensor cached on
        `like`'s device.
        """
        values = self._tables[chain][name]
        if not torch.is_tensor(t) or t.ndim == 0:
            return float(values[int(t)])
        key = (chain, name, like.device)
        if key not in self._device_tables:
            self._device_tables[key] = torch.from_numpy(values).to(device=like.device, dtype=torch.float32)
        gathered = self._device_tables[key][t.to(like.device, torch.long)].to(like.dtype)
        return gathered.reshape(-1, *([1] * (like.ndim - 1)))

    # Forward process ------------------------------------------------------------------------------------------------
    def add_noise(
        self, original_samples: torch.Tensor, noise: torch.Tensor, timesteps: torch.IntTensor
    ) -> torch.Tensor:
        """x_t = sqrt(abar_t) x_0 + sqrt(1 - abar_t) eps, a draw of q(x_t|x_0) (Eq. 4)."""
        x0 = original_samples
        sqrt_alphas_cumprod = self._extract("training", "sqrt_alphas_cumprod", timesteps, x0)
        sqrt_one_minus_alphas_cumprod = self._extract("training", "sqrt_one_minus_alphas_cumprod", timesteps, x0)
        return sqrt_alphas_cumprod * x0 + sqrt_one_minus_alphas_cumprod * noise  # Eq. 4

    def get_velocity(self, sample: torch.Tensor, noise: torch.Tensor, timesteps: torch.IntTensor) -> torch.Tensor:
        """v = sqrt(abar_t) eps - sqrt(1 - abar_t) x_0, the v-prediction target (Salimans & Ho 2022, Sec. 4)."""
        return (
            self._extract("training", "sqrt_alphas_cumprod", timesteps, sample) * noise
            - self._extract("training", "sqrt_one_minus_alphas_cumprod", timesteps, sample) * sample
        )

    def snr(self, timesteps: torch.IntTensor, like: torch.Tensor) -> torch.Tensor:
        """SNR(t) = abar_t / (1 - abar_t) (Kingma et al. 2021, Eq. 1), gathered on `like`'s device, shaped to it."""
        alphas_cumprod = self._extract("training", "alphas_cumprod", timesteps, like)
        return alphas_cumprod / (1 - alphas_cumprod)

    def q_mean_variance(
        self, x0: torch.Tensor, t: int | torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Mean, variance and log-variance of q(x_t|x_0) = N(sqrt(abar_t) x_0, (1 - abar_t) I) (Eq. 4)."""
        mean = self._extract("training", "sqrt_alphas_cumprod", t, x0) * x0  # Eq. 4
        log_variance = self._extract("training", "log_one_minus_alphas_cumprod", t, x0) * torch.ones_like(x0)
        return mean, torch.exp(log_variance), log_variance

    def q_posterior_mean_variance(
        self, x0: torch.Tensor, xt: torch.Tensor, t: int | torch.Tensor, chain: str = "training"
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Mean mu-tilde_t(x_t, x_0), variance beta-tilde_t and clipped log-variance of q(x_{t-1}|x_t,x_0) (Eqs. 6-7);
        `chain="respaced"`: of q(x_s|x_t,x_0), s the timestep after t of the chain `set_timesteps` set."""
        posterior_mean_coef1 = self._extract(chain, "posterior_mean_coef1", t, xt)
        posterior_mean_coef2 = self._extract(chain, "posterior_mean_coef2", t, xt)
        mean = posterior_mean_coef1 * x0 + posterior_mean_coef2 * xt  # Eq. 7, mu-tilde_t(x_t, x_0)
        ones = torch.ones_like(xt)
        variance = self._extract(chain, "posterior_variance", t, xt) * ones  # Eq. 7, beta-tilde_t
        log_variance = self._extract(chain, "posterior_log_variance_clipped", t, xt) * ones
        return mean, variance, log_variance  # Eq. 6: q(x_{t-1}|x_t,x_0) = N(mean, variance I)

    def predict_x0_from_eps(self, xt: torch.Tensor, t: int | torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
        """x_0 = (x_t - sqrt(1 - abar_t) eps) / sqrt(abar_t) (Eq. 15), as sqrt(1/abar_t) x_t - sqrt(1/abar_t - 1) eps."""
        sqrt_recip_alphas_cumprod = self._extract("training", "sqrt_recip_alphas_cumprod", t, xt)
        sqrt_recipm1_alphas_cumprod = self._extract("training", "sqrt_recipm1_alphas_cumprod", t, xt)
        # A scalar t (each sampling step) computes the same sum in two kernels.
        if isinstance(sqrt_recipm1_alphas_cumprod, float):
            if math.isinf(sqrt_recip_alphas_cumprod):  # abar_t = 0 (zero terminal SNR): see `_predict_x0_at_zero_snr`
                return self._predict_x0_at_zero_snr(xt, t, eps)
            return torch.mul(xt, sqrt_recip_alphas_cumprod).add_(eps, alpha=-sqrt_recipm1_alphas_cumprod)  # Eq. 15
        x0 = sqrt_recip_alphas_cumprod * xt - sqrt_recipm1_alphas_cumprod * eps  # Eq. 15
        zero_snr = torch.isinf(sqrt_recip_alphas_cumprod)
        if zero_snr.any():
            x0 = torch.where(zero_snr, self._predict_x0_at_zero_snr(xt, t, eps), x0)
        return x0

    def _predict_x0_at_zero_snr(self, xt: torch.Tensor, t: int | torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
        """
        Eq. 15 as a quotient, (x_t - sqrt(1 - abar_t) eps) / sqrt(abar_t): where abar_t = 0 it is +-inf with the sign of
        x_t - eps (as DDPMScheduler computes it), which clipping or thresholding makes +-1; the product form of
        `predict_x0_from_eps` would give inf - inf = NaN there.
        """
        sqrt_alphas_cumprod = self._extract("training", "sqrt_alphas_cumprod", t, xt)
        sqrt_one_minus_alphas_cumprod = self._extract("training", "sqrt_one_minus_alphas_cumprod", t, xt)
        return (xt - sqrt_one_minus_alphas_cumprod * eps) / sqrt_alphas_cumprod  # Eq. 15

    def predict_eps_from_x0(self, xt: torch.Tensor, t: int | torch.Tensor, x0: torch.Tensor) -> torch.Tensor:
        """eps = (sqrt(1/abar_t) x_t - x_0) / sqrt(1/abar_t - 1): Eq. 15 solved for eps."""
        return (self._extract("training", "sqrt_recip_alphas_cumprod", t, xt) * xt - x0) / self._extract(
            "training", "sqrt_recipm1_alphas_cumprod", t, xt
        )

    # Reverse process ------------------------------------------------------------------------------------------------
    def _predict_x0(self, model_output: torch.Tensor, xt: torch.Tensor, t: int | torch.Tensor) -> torch.Tensor:
        if self.config.prediction_type == "epsilon":
            return self.predict_x0_from_eps(xt, t, model_output)
        if self.config.prediction_type == "sample":
            return model_output
        if self.config.prediction_type == "mean":
            posterior_mean_coef1 = self._extract("training", "posterior_mean_coef1", t, xt)
            posterior_mean_coef2 = self._extract("training", "posterior_mean_coef2", t, xt)
            return (model_output - posterior_mean_coef2 * xt) / posterior_mean_coef1  # Eq. 7 solved for x_0
        # v-prediction: x_0 = sqrt(abar_t) x_t - sqrt(1 - abar_t) v
        return (
            self._extract("training", "sqrt_alphas_cumprod", t, xt) * xt
            - self._extract("training", "sqrt_one_minus_alphas_cumprod", t, xt) * model_output
        )

    def _split_variance(
        self, model_output: torch.Tensor, xt: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        if self.variance_type not in ("learned", "learned_range"):
            return model_output, None
        if model_output.shape[1] != 2 * xt.shape[1]:
            raise ValueError(
                f"variance_type={self.variance_type!r} needs a model with {2 * xt.shape[1]} output channels "
                f"(prediction, then variance), got {model_output.shape[1]}."
            )
        return torch.split(model_output, xt.shape[1], dim=1)

    def _p_mean(
        self, model_output: torch.Tensor, xt: torch.Tensor, t: int | torch.Tensor, chain: str, clip: bool
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """
        mu_theta(x_t, t) and the predicted x_0 of p_theta(x_{t-1}|x_t), with the posterior coefficients of `chain`
        (the training chain or the sampling chain); `model_output` is the prediction without variance channels.
        """
        pred_x0 = self._predict_x0(model_output, xt, t)
        # Mean prediction on the chain it was trained for (every training step, and a sampling step from t to t - 1):
        # the output is mu_theta itself, used unclipped as in the paper's code; only the reported x_0 is clipped. A
        # respaced sampling step instead takes the posterior mean of its own chain at the (clipped) x_0 below.
        own_mean = self.config.prediction_type == "mean"
        if own_mean and chain != "training":
            steps = np.atleast_1d(t.cpu().numpy() if torch.is_tensor(t) else np.asarray(t))
            own_mean = bool(np.all(self._prev_timestep[steps] == steps - 1))
        if clip and self.config.thresholding:
            pred_x0 = self._threshold_sample(pred_x0)
        elif clip and self.config.clip_sample:
            limit = self.config.clip_sample_range
            # In place on a tensor made here; with `sample` prediction pred_x0 is (a view of) the model's output.
            if self.config.prediction_type in ("sample", "mean"):
                pred_x0 = pred_x0.clamp(-limit, limit)
            else:
                pred_x0 = pred_x0.clamp_(-limit, limit)
        if own_mean:
            return model_output.clone() if chain == "sampling" else model_output, pred_x0
        posterior_mean_coef1 = self._extract(chain, "posterior_mean_coef1", t, xt)
        posterior_mean_coef2 = self._extract(chain, "posterior_mean_coef2", t, xt)
        # mu_theta(x_t, t) = mu-tilde_t(x_t, x0_theta) of Eq. 7, which is Eq. 11 for epsilon prediction unclipped.
        if isinstance(posterior_mean_coef2, float):  # a scalar t (each sampling step): the same sum in two kernels
            mean = torch.mul(pred_x0, posterior_mean_coef1).add_(xt, alpha=posterior_mean_coef2)  # Eq. 11
        else:
            mean = posterior_mean_coef1 * pred_x0 + posterior_mean_coef2 * xt  # Eq. 11
        return mean, pred_x0

    def _p_variance(
        self, chain: str, t: int | torch.Tensor, xt: torch.Tensor, predicted_variance: torch.Tensor | None
    ) -> tuple[float | torch.Tensor, float | torch.Tensor]:
        """
        sigma_t^2 and log sigma_t^2 of p_theta(x_{t-1}|x_t) for `variance_type`, with the coefficients of `chain`: for
        a fixed type the coefficients at t (Python floats for a scalar t), for a learned type tensors like x_t.
        """
        if self.variance_type in ("fixed_small", "fixed_small_log"):  # sigma_t^2 = beta-tilde_t
            variance = self._extract(chain, "posterior_variance", t, xt)
            return variance, self._extract(chain, "posterior_log_variance_clipped", t, xt)
        if self.variance_type in ("fixed_large", "fixed_large_log"):  # sigma_t^2 = beta_t
            variance = self._extract(chain, "fixed_large_variance", t, xt)
            return variance, self._extract(chain, "fixed_large_log_variance", t, xt)
        if self.variance_type == "learned":  # the extra channels are sigma_t^2 itself, as in DDPMScheduler
            return predicted_variance, torch.log(predicted_variance)
        # learned_range: v in [-1, 1] interpolates log beta-tilde_t and log beta_t (Nichol & Dhariwal 2021, Sec. 3.1)
        frac = (predicted_variance + 1) / 2
        min_log = self._extract(chain, "posterior_log_variance_clipped", t, xt)
        log_variance = frac * self._extract(chain, "log_betas", t, xt) + (1 - frac) * min_log
        return torch.exp(log_variance), log_variance

    def p_mean_variance(
        self,
        model_output: torch.Tensor,
        xt: torch.Tensor,
        t: int | torch.Tensor,
        clip_denoised: bool = False,
        chain: str = "training",
    ) -> DDPMPaperMeanVarianceOutput:
        """Mean (Eq. 11 for epsilon prediction), variance, log-variance and predicted x_0 of p_theta(x_{t-1}|x_t)."""
        model_output, predicted_variance = self._split_variance(model_output, xt)
        mean, pred_x0 = self._p_mean(model_output, xt, t, chain, clip=clip_denoised)
        variance, log_variance = self._p_variance(chain, t, xt, predicted_variance)
        ones = torch.ones_like(xt)
        return DDPMPaperMeanVarianceOutput(
            mean=mean, variance=variance * ones, log_variance=log_variance * ones, pred_original_sample=pred_x0
        )

    def _threshold_sample(self, sample: torch.Tensor) -> torch.Tensor:
        """Dynamic thresholding (Saharia et al. 2022, Sec. 2.3): clip x_0 to the s-quantile of |x_0|, then rescale."""
        flat = sample.float().reshape(sample.shape[0], -1)
        s = torch.quantile(flat.abs(), self.config.dynamic_thresholding_ratio, dim=1)
        s = s.clamp(min=1, max=self.config.sample_max_value).unsqueeze(1)
        return (torch.clamp(flat, -s, s) / s).reshape(sample.shape).to(sample.dtype)

    def step(
        self,
        model_output: torch.Tensor,
        timestep: int | torch.Tensor,
        sample: torch.Tensor,
        generator: torch.Generator | None = None,
        return_dict: bool = True,
    ) -> DDPMPaperSchedulerOutput | tuple:
        """
        One step of ancestral sampling, x_{t-1} = mu_theta(x_t, t) + sigma_t z (Algorithm 2, line 4).

        Args:
            model_output (`torch.Tensor`):
                The model's output at `timestep` (with the variance channels for the learned variance types).
            timestep (`int`):
                The current timestep t of the chain set by `set_timesteps`.
            sample (`torch.Tensor`):
                x_t.
            generator (`torch.Generator`, *optional*):
                The source of z, drawn exactly as `DDPMScheduler.step` draws it (one `randn_tensor` of the sample's
                shape when t > 0), so both schedulers give the same samples from the same seed.
            return_dict (`bool`, defaults to `True`):
                Return a [`DDPMPaperSchedulerOutput`] instead of a tuple.
        """
        t = int(timestep)
        model_output, predicted_variance = self._split_variance(model_output, sample)
        prev_sample, pred_x0 = self._p_mean(model_output, sample, t, "sampling", clip=True)
        if t > 0:
            variance, log_variance = self._p_variance("sampling", t, sample, predicted_variance)
            z = randn_tensor(sample.shape, generator=generator, device=model_output.device, dtype=model_output.dtype)
            if isinstance(variance, float):  # a fixed variance type: sigma_t z added in one kernel
                prev_sample = prev_sample.add_(z, alpha=math.sqrt(variance))
            else:  # a learned one: sigma_t as DDPMScheduler computes it
                std = variance**0.5 if self.variance_type == "learned" else torch.exp(0.5 * log_variance)
                prev_sample = prev_sample + std * z
        if not return_dict:
            return prev_sample, pred_x0
        return DDPMPaperSchedulerOutput(prev_sample=prev_sample, pred_original_sample=pred_x0)

    # Variational bound (Eq. 5), in bits per dimension ---------------------------------------------------------------
    def prior_bpd(self, x0: torch.Tensor) -> torch.Tensor:
        """L_T = KL(q(x_T|x_0) || N(0, I)) per example, in bits/dim (Eq. 5, first term)."""
        mean, _, log_variance = self.q_mean_variance(x0, self.config.num_train_timesteps - 1)
        zeros = torch.zeros_like(mean)
        return _mean_over_dims(normal_kl(mean, log_variance, zeros, zeros)) / math.log(2.0)

    def vlb_terms(
        self,
        model_output: torch.Tensor,
        x0: torch.Tensor,
        xt: torch.Tensor,
        t: int | torch.Tensor,
        clip_denoised: bool = False,
        bits: int = 8,
        chain: str = "training",
    ) -> DDPMPaperVLBOutput:
        """
        L_{t-1} = KL(q(x_{t-1}|x_t,x_0) || p_theta(x_{t-1}|x_t)) for t > 0 and L_0 = -log p_theta(x_0|x_1) for t = 0,
        per example in bits/dim (Eq. 5; the decoder is the discretized Gaussian of Sec. 3.3). t is 0-based: t = 0 is
        the paper's x_1 -> x_0 step. `clip_denoised` clips the predicted x_0 as `step` does, giving the terms of the
        model the sampler draws from (the paper code's `calc_bpd_loop` default). `bits` is the data's bit depth: the
        decoder's bins are 2/(2^bits - 1) wide (8: the paper's 2/255; 16: `--preserve_input_precision` data).
        `chain="respaced"`: the terms of the respaced chain `set_timesteps` set (Nichol & Dhariwal 2021, Appendix),
        KL(q(x_s|x_t,x_0) || p_theta(x_s|x_t)) with s the chain's next timestep, and L_0 at t = 0.
        """
        if not torch.is_tensor(t) or t.ndim == 0:
            t = torch.full((x0.shape[0],), int(t), device=x0.device, dtype=torch.long)
        true_mean, _, true_log_variance = self.q_posterior_mean_variance(x0, xt, t, chain=chain)
        p = self.p_mean_variance(model_output, xt, t, clip_denoised=clip_denoised, chain=chain)
        kl = _mean_over_dims(normal_kl(true_mean, true_log_variance, p.mean, p.log_variance)) / math.log(2.0)
        nll = -discretized_gaussian_log_likelihood(x0, means=p.mean, log_scales=0.5 * p.log_variance, bits=bits)
        decoder_nll = _mean_over_dims(nll) / math.log(2.0)
        bpd = torch.where(t.to(x0.device) == 0, decoder_nll, kl)
        return DDPMPaperVLBOutput(bpd=bpd, pred_original_sample=p.pred_original_sample)

    # The sampling chain, DDPMScheduler's interface ------------------------------------------------------------------
    def scale_model_input(self, sample: torch.Tensor, timestep: int | None = None) -> torch.Tensor:
        """The identity: DDPM feeds x_t to the model as it is."""
        return sample

    def set_timesteps(
        self,
        num_inference_steps: int | None = None,
        device: str | torch.device | None = None,
        timesteps: list[int] | None = None,
    ):
        """
        Sets the chain of timesteps `step` walks, respaced as DDPMScheduler respaces it (`timestep_spacing`).

        Args:
            num_inference_steps (`int`, *optional*):
                Number of sampling steps.
            device (`str` or `torch.device`, *optional*):
                Where `timesteps` is placed.
            timesteps (`list[int]`, *optional*):
                An explicit strictly descending chain, instead of `num_inference_steps`.
        """
        T = self.config.num_train_timesteps
        if num_inference_steps is not None and timesteps is not None:
            raise ValueError("Pass either `num_inference_steps` or `timesteps`, not both.")
        if timesteps is not None:
            timesteps = np.array(timesteps, dtype=np.int64)
            if np.any(np.diff(timesteps) >= 0):
                raise ValueError("`timesteps` must be strictly descending.")
            if timesteps[0] >= T:
                raise ValueError(f"`timesteps` must start below num_train_timesteps={T}, got {timesteps[0]}.")
            self.custom_timesteps = True
        else:
            if num_inference_steps is None or not 0 < num_inference_steps <= T:
                raise ValueError(
                    f"num_inference_steps must be between 1 and num_train_timesteps={T}, got {num_inference_steps}."
                )
            self.num_inference_steps = num_inference_steps
            self.custom_timesteps = False
            spacing = self.config.timestep_spacing
            if spacing == "linspace":
                timesteps = np.linspace(0, T - 1, num_inference_steps).round()[::-1].copy().astype(np.int64)
            elif spacing == "leading":
                step_ratio = T // num_inference_steps
                timesteps = (np.arange(0, num_inference_steps) * step_ratio).round()[::-1].copy().astype(np.int64)
                timesteps += self.config.steps_offset
            elif spacing == "trailing":
                timesteps = np.round(np.arange(T, 0, -T / num_inference_steps)).astype(np.int64) - 1
            else:
                raise ValueError(f"Unknown timestep_spacing {spacing!r}: choose linspace, leading or trailing.")
        self._set_sampling_chain(timesteps)
        self.timesteps = torch.from_numpy(timesteps).to(device)

    def previous_timestep(self, timestep: int | torch.Tensor) -> int | torch.Tensor:
        """The timestep after `timestep` in the sampling chain (-1 after the last one)."""
        prev = int(self._prev_timestep[int(timestep)])
        return torch.tensor(prev) if torch.is_tensor(timestep) else prev

    def __len__(self) -> int:
        return self.config.num_train_timesteps

    # Interoperability -----------------------------------------------------------------------------------------------
    def to_diffusers_config(self) -> dict:
        """
        A `DDPMScheduler` config with the same betas: a schedule it lacks becomes `trained_betas`, and
        `fixed_large_log` becomes the equal `fixed_large` (DDPMScheduler's own `fixed_large_log` samples NaN,
        diffusers issue #14569).
        """
        config = {k: v for k, v in self.config.items() if not k.startswith("_")}
        if config["trained_betas"] is None and config["beta_schedule"] not in DIFFUSERS_BETA_SCHEDULES:
            config["trained_betas"] = self._tables["training"]["betas"].tolist()
            config["beta_schedule"] = "linear"
        if config["variance_type"] == "fixed_large_log":
            config["variance_type"] = "fixed_large"
        return config
