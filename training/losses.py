# Copyright 2026 The ddpm-paper authors. Licensed under the Apache License, Version 2.0.
"""The training objectives of Ho et al. 2020, Table 2: `--loss_type simple` (L_simple, Eq. 14), `vlb` (the true bound,
Eq. 5, from the scheduler's own `vlb_terms`, as the bits/dim evaluation) and `mse` (the MSE of the posterior mean);
with a learned variance, the variance's L_vlb is added (L_hybrid, Nichol & Dhariwal 2021)."""

from __future__ import annotations

from typing import Literal, get_args

import torch
import torch.nn.functional as F

from schedulers import DDPMPaperScheduler

LossType = Literal["simple", "vlb", "mse"]
LOSS_TYPES: tuple[str, ...] = get_args(LossType)
LOSSES_OF_PREDICTION: dict[str, tuple[str, ...]] = {
    "epsilon": ("simple", "vlb"),
    "sample": ("simple", "vlb"),
    "v_prediction": ("simple", "vlb"),
    "mean": ("vlb", "mse"),
}
"""The objectives each `prediction_type` can be trained with (the rows of Table 2, plus sample and v)."""


def check_objective(prediction_type: str, loss_type: str) -> None:
    """
    Raises `ValueError` saying what to use when `loss_type` does not apply to `prediction_type`: L_simple has no
    definition for mean prediction, and `mse` (of mu-tilde) is mean prediction's own.
    """
    if loss_type not in LOSS_TYPES:
        raise ValueError(f"Unknown loss_type {loss_type!r}: choose one of {', '.join(LOSS_TYPES)}.")
    allowed = LOSSES_OF_PREDICTION.get(prediction_type)
    if allowed is not None and loss_type not in allowed:
        raise ValueError(
            f"--loss_type {loss_type} does not apply to --prediction_type {prediction_type}: use "
            f"{' or '.join(allowed)} (mean prediction trains with vlb, the paper's Eq. 8, or mse, Table 2's "
            "unweighted MSE of mu-tilde; the other parameterisations with simple, L_simple of Eq. 14, or vlb)."
        )


def _vlb_weight(noise_scheduler: DDPMPaperScheduler) -> float:
    # A uniform t estimates the sum of the T terms L_0 + ... + L_{T-1} unbiasedly when its term is scaled by T.
    return float(noise_scheduler.config.num_train_timesteps)


def diffusion_loss(
    noise_scheduler: DDPMPaperScheduler,
    model_output: torch.Tensor,
    x0: torch.Tensor,
    noise: torch.Tensor,
    xt: torch.Tensor,
    timesteps: torch.Tensor,
    loss_type: str = "simple",
) -> torch.Tensor:
    r"""
    The training loss of a batch for the scheduler's `prediction_type` and `variance_type` and `loss_type`.

    `simple`, L_simple (Eq. 14) in the parameterisation's units:
    - `epsilon`: ||eps - eps_theta(x_t, t)||^2, the paper's loss.
    - `sample`: ||x_0 - x0_theta(x_t, t)||^2 weighted by SNR(t) = abar_t / (1 - abar_t), which makes it L_simple
      in units of eps (as train_unconditional.py does).
    - `v_prediction`: ||v - v_theta(x_t, t)||^2 with v = sqrt(abar_t) eps - sqrt(1 - abar_t) x_0.

    `vlb`: T * L_{t-1} (Eq. 5), in bits/dim, averaged over the batch; a t = 0 example contributes T * L_0, the
    discretized decoder's NLL. Its expectation over t ~ U{0..T-1} is the bound minus the constant L_T.

    `mse` (mean prediction): ||mu-tilde_t(x_t, x_0) - mu_theta(x_t, t)||^2, unweighted (Table 2's second row).

    With `variance_type="learned_range"` and `simple` or `mse` the variance channels are trained by L_hybrid = loss +
    (T / 1000) * L_t (Nichol & Dhariwal 2021, Eq. 16 with lambda = 0.001, as their code scales it), the mean held
    fixed (stop-gradient) inside the L_vlb term.

    Args:
        noise_scheduler ([`DDPMPaperScheduler`]): The diffusion; its config holds the parameterisation.
        model_output (`torch.Tensor`): The net's output at (x_t, t), variance channels after the prediction.
        x0 (`torch.Tensor`): The clean images in [-1, 1].
        noise (`torch.Tensor`): The eps that made x_t.
        xt (`torch.Tensor`): x_t = sqrt(abar_t) x_0 + sqrt(1 - abar_t) eps (Eq. 4).
        timesteps (`torch.Tensor`): Each example's t, 0-based.
        loss_type (`str`, defaults to `"simple"`): `simple`, `vlb` or `mse`.
    """
    config = noise_scheduler.config
    check_objective(config.prediction_type, loss_type)
    channels = x0.shape[1]
    prediction = model_output[:, :channels].float()
    learned_variance = config.variance_type == "learned_range"
    if loss_type == "vlb":
        # Eq. 5: the variance channels (if any) get the bound's gradient too, with nothing held fixed.
        terms = noise_scheduler.vlb_terms(model_output.float(), x0.float(), xt.float(), timesteps).bpd
        return terms.mean() * _vlb_weight(noise_scheduler)
    if loss_type == "mse":
        target, _, _ = noise_scheduler.q_posterior_mean_variance(x0.float(), xt.float(), timesteps)  # Eq. 7
        loss = F.mse_loss(prediction, target)
    elif config.prediction_type == "epsilon":
        loss = F.mse_loss(prediction, noise.float())  # Eq. 14
    elif config.prediction_type == "sample":
        snr = noise_scheduler.snr(timesteps, prediction)  # from a table cached on the device: no copy per step
        loss = (snr * (prediction - x0.float()) ** 2).mean()  # Eq. 14 in units of eps
    else:
        loss = F.mse_loss(prediction, noise_scheduler.get_velocity(x0, noise, timesteps).float())
    if learned_variance:
        frozen_mean = torch.cat([prediction.detach(), model_output[:, channels:].float()], dim=1)
        vlb = noise_scheduler.vlb_terms(frozen_mean, x0.float(), xt.float(), timesteps).bpd  # Eq. 5, L_{t-1}
        loss = loss + vlb.mean() * config.num_train_timesteps / 1000.0
    return loss
