"""The objectives of Table 2 (training/losses.py) and mean prediction in the scheduler, against closed forms computed
here in float64 from the betas, and one short real training run with `--loss_type vlb --prediction_type mean`."""

import logging
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import DiffusionPipeline

import train_ddpm
from pipelines import DDPMPaperPipeline
from schedulers import DDPMPaperScheduler
from training.args import ArgumentError, TrainingArguments, resolve_args
from training.losses import check_objective, diffusion_loss

REPO = Path(__file__).resolve().parents[1]
T = 1000


def paper_tables(num_timesteps: int = T) -> dict[str, np.ndarray]:
    """The paper's coefficients in float64 from its linear betas (Sec. 4 and Eqs. 4, 6, 7)."""
    betas = np.linspace(1e-4, 0.02, num_timesteps, dtype=np.float64)
    abar = np.cumprod(1.0 - betas)
    abar_prev = np.concatenate([[1.0], abar[:-1]])
    beta_tilde = (1.0 - abar_prev) / (1.0 - abar) * betas
    return {
        "betas": betas,
        "abar": abar,
        "beta_tilde": beta_tilde,
        "coef_x0": np.sqrt(abar_prev) * betas / (1.0 - abar),
        "coef_xt": np.sqrt(1.0 - betas) * (1.0 - abar_prev) / (1.0 - abar),
    }


def batch(seed: int = 0, timesteps=(0, 1, 37, 500, 999)):
    """8-bit images in [-1, 1] (both edge bins and interior ones), eps, t and x_t."""
    generator = torch.Generator().manual_seed(seed)
    pixels = torch.randint(0, 256, (len(timesteps), 1, 4, 4), generator=generator)
    pixels[:, :, 0, 0], pixels[:, :, 0, 1] = 0, 255
    x0 = pixels.float() / 127.5 - 1.0
    noise = torch.randn(x0.shape, generator=generator)
    t = torch.tensor(timesteps)
    tables = paper_tables()
    abar = torch.tensor(tables["abar"])[t].view(-1, 1, 1, 1)
    xt = (abar.sqrt() * x0.double() + (1 - abar).sqrt() * noise.double()).float()  # Eq. 4
    return x0, noise, t, xt


def oracle_mean(x0: torch.Tensor, xt: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """mu-tilde_t(x_t, x_0) of Eq. 7 in float64, from this file's tables."""
    tables = paper_tables()
    c0 = torch.tensor(tables["coef_x0"])[t].view(-1, 1, 1, 1)
    ct = torch.tensor(tables["coef_xt"])[t].view(-1, 1, 1, 1)
    return c0 * x0.double() + ct * xt.double()


def decoder_nll_bits(x0: torch.Tensor, sigma: float) -> float:
    """-log2 p(x_0 | x_1) per dim of the paper's discretized Gaussian decoder (Eq. 13) centred on x_0 itself."""
    width = 1.0 / 255.0
    total = 0.0
    for value in x0.flatten().tolist():
        phi = 0.5 * (1 + math.erf(width / sigma / math.sqrt(2)))  # Phi(1/255 / sigma)
        prob = phi if value < -0.999 or value > 0.999 else 2 * phi - 1  # open-ended edge bins
        total -= math.log2(prob)
    return total / x0.numel()


def test_vlb_of_oracle_mean_predictor_is_T_times_the_decoder_nll_of_the_t0_examples():
    scheduler = DDPMPaperScheduler(prediction_type="mean")
    x0, noise, t, xt = batch()
    loss = diffusion_loss(scheduler, oracle_mean(x0, xt, t).float(), x0, noise, xt, t, loss_type="vlb")
    # At t = 0 the oracle's mean is x_0 itself, with variance beta-tilde of the paper's t = 2 (index 1); every
    # L_{t-1} with t > 0 is a KL between equal Gaussians, 0. The batch mean times T estimates the bound's sum.
    sigma = math.sqrt(paper_tables()["beta_tilde"][1])
    expected = T * decoder_nll_bits(x0[0], sigma) / len(t)
    assert loss.item() == pytest.approx(expected, rel=1e-4)
    terms = scheduler.vlb_terms(oracle_mean(x0, xt, t).float(), x0, xt, t).bpd
    assert terms[1:].abs().max().item() < 1e-4


def test_vlb_of_a_shifted_mean_is_the_gaussian_kl_c2_over_2_sigma2_times_T():
    scheduler = DDPMPaperScheduler(prediction_type="mean")
    x0, noise, t, xt = batch(timesteps=(1, 37, 500, 999))
    c = 0.01
    loss = diffusion_loss(scheduler, (oracle_mean(x0, xt, t) + c).float(), x0, noise, xt, t, loss_type="vlb")
    beta_tilde = paper_tables()["beta_tilde"][t.numpy()]
    kl_bits = c**2 / (2 * beta_tilde) / math.log(2)  # KL(N(m, s^2) || N(m + c, s^2)) per dim, Eq. 8 without C
    assert loss.item() == pytest.approx(T * kl_bits.mean(), rel=2e-3)


def test_vlb_with_epsilon_prediction_is_the_eq12_weighting_of_the_eps_error():
    scheduler = DDPMPaperScheduler()
    x0, noise, t, xt = batch(timesteps=(1, 37, 500, 999))
    c = 0.02
    loss = diffusion_loss(scheduler, noise + c, x0, noise, xt, t, loss_type="vlb")
    tables = paper_tables()
    i = t.numpy()
    # Eq. 12: L_{t-1} = beta_t^2 / (2 sigma_t^2 alpha_t (1 - abar_t)) ||eps - eps_theta||^2, in nats per dim.
    weight = tables["betas"][i] ** 2 / (
        2 * tables["beta_tilde"][i] * (1 - tables["betas"][i]) * (1 - tables["abar"][i])
    )
    assert loss.item() == pytest.approx(T * (weight * c**2).mean() / math.log(2), rel=2e-3)
    assert diffusion_loss(scheduler, noise, x0, noise, xt, t, loss_type="vlb").item() == pytest.approx(0, abs=1e-3)


def test_unweighted_mean_mse_is_zero_for_the_oracle_and_c2_for_a_shift():
    scheduler = DDPMPaperScheduler(prediction_type="mean")
    x0, noise, t, xt = batch()
    mu = oracle_mean(x0, xt, t).float()
    assert diffusion_loss(scheduler, mu, x0, noise, xt, t, loss_type="mse").item() == pytest.approx(0, abs=1e-10)
    assert diffusion_loss(scheduler, mu + 0.3, x0, noise, xt, t, loss_type="mse").item() == pytest.approx(0.09)


def test_simple_loss_is_the_squared_eps_error():
    scheduler = DDPMPaperScheduler()
    x0, noise, t, xt = batch()
    assert diffusion_loss(scheduler, noise - 0.5, x0, noise, xt, t).item() == pytest.approx(0.25)


def test_learned_range_vlb_at_the_lower_end_equals_fixed_small_and_trains_the_variance():
    fixed = DDPMPaperScheduler(prediction_type="mean")
    learned = DDPMPaperScheduler(prediction_type="mean", variance_type="learned_range")
    x0, noise, t, xt = batch(timesteps=(0, 3, 500))
    mu = (oracle_mean(x0, xt, t) + 0.01).float()
    v = torch.full_like(mu, -1.0, requires_grad=True)  # v = -1: log sigma^2 = log beta-tilde
    loss = diffusion_loss(learned, torch.cat([mu, v], dim=1), x0, noise, xt, t, loss_type="vlb")
    assert loss.item() == pytest.approx(diffusion_loss(fixed, mu, x0, noise, xt, t, loss_type="vlb").item(), rel=1e-5)
    loss.backward()
    assert v.grad.abs().sum().item() > 0
    # mse with learned_range: the variance gets L_vlb / 1000 * T with the mean held fixed (L_hybrid).
    mse = diffusion_loss(learned, torch.cat([mu, v.detach()], dim=1), x0, noise, xt, t, loss_type="mse")
    assert mse.item() == pytest.approx(1e-4 + loss.item() / 1000, rel=1e-4)


@pytest.mark.parametrize(
    "prediction_type, loss_type", [("mean", "simple"), ("epsilon", "mse"), ("sample", "mse"), ("v_prediction", "mse")]
)
def test_objectives_a_parameterisation_lacks_are_refused_with_what_to_use(prediction_type, loss_type):
    with pytest.raises(ValueError, match="does not apply"):
        check_objective(prediction_type, loss_type)
    with pytest.raises(ArgumentError, match="--loss_type"):
        resolve_args(TrainingArguments(prediction_type=prediction_type, loss_type=loss_type))


def test_train_script_calls_the_losses_module_function():
    assert train_ddpm.diffusion_loss is diffusion_loss


def test_mean_prediction_step_matches_float64_algorithm_2_with_mu_tilde():
    num_timesteps = 20
    scheduler = DDPMPaperScheduler(num_train_timesteps=num_timesteps, prediction_type="mean")
    scheduler.set_timesteps(num_timesteps)
    tables = paper_tables(num_timesteps)
    target = torch.linspace(-0.9, 0.9, 16).view(1, 1, 4, 4)  # the model predicts mu-tilde towards this x_0
    generator = torch.Generator().manual_seed(3)
    reference_generator = torch.Generator().manual_seed(3)
    x = torch.randn(target.shape, generator=generator)
    x_ref = torch.randn(target.shape, generator=reference_generator).double()
    for t in scheduler.timesteps.tolist():
        mu = tables["coef_x0"][t] * target + tables["coef_xt"][t] * x  # the model: Eq. 7 at the current x_t
        x = scheduler.step(mu.float(), t, x, generator=generator).prev_sample
        # Algorithm 2, line 4, with mu_theta = mu-tilde and sigma_t^2 = beta-tilde_t; no noise at the last step.
        mu_ref = tables["coef_x0"][t] * target.double() + tables["coef_xt"][t] * x_ref
        if t > 0:
            z = torch.randn(target.shape, generator=reference_generator).double()
            x_ref = mu_ref + math.sqrt(tables["beta_tilde"][t]) * z
        else:
            x_ref = mu_ref
        assert torch.allclose(x.double(), x_ref, atol=1e-5), t
    assert torch.allclose(x, target, atol=1e-6)  # mu-tilde_0(x_1, x_0) = x_0


def test_mean_prediction_p_mean_variance_returns_the_mean_and_inverts_eq7_for_x0():
    scheduler = DDPMPaperScheduler(prediction_type="mean", clip_sample=False)
    x0, _, t, xt = batch(timesteps=(0, 10, 300))
    mu = oracle_mean(x0, xt, t).float()
    out = scheduler.p_mean_variance(mu, xt, t)
    assert torch.equal(out.mean, mu)
    assert torch.allclose(out.pred_original_sample, x0, atol=1e-3)
    beta_tilde = paper_tables()["beta_tilde"]
    assert out.variance[1:, 0, 0, 0].tolist() == pytest.approx(beta_tilde[t[1:].numpy()], rel=1e-5)
    # At t = 0 (beta-tilde = 0) the log-variance is that of the next step, the decoder's (the paper's code).
    assert out.log_variance[0, 0, 0, 0].item() == pytest.approx(math.log(beta_tilde[1]), rel=1e-5)


def test_respaced_mean_prediction_samples_through_x0():
    scheduler = DDPMPaperScheduler(prediction_type="mean")
    scheduler.set_timesteps(10)  # 900, 800, ..., 0: steps of 100
    target = torch.full((1, 1, 2, 2), 0.25)
    tables = paper_tables()
    x = torch.randn(target.shape, generator=torch.Generator().manual_seed(0))
    for t in scheduler.timesteps.tolist():
        mu = tables["coef_x0"][t] * target + tables["coef_xt"][t] * x
        out = scheduler.step(mu.float(), t, x, generator=torch.Generator().manual_seed(t))
        # x_0 = (mu - coef_xt x_t) / coef_x0 in float32: coef_x0 is ~1e-3 at t = 900, so rounding grows ~1000-fold.
        assert torch.allclose(out.pred_original_sample, target, atol=2e-3), t
        x = out.prev_sample
    assert torch.allclose(x, target, atol=2e-3)


def test_mean_prediction_config_round_trips_and_is_not_offered_to_stock_diffusers(tmp_path):
    scheduler = DDPMPaperScheduler(prediction_type="mean")
    scheduler.save_config(tmp_path)
    assert DDPMPaperScheduler.from_pretrained(tmp_path).config.prediction_type == "mean"
    with pytest.raises(ValueError, match="Unknown prediction_type"):
        DDPMPaperScheduler(prediction_type="x_prev")
    from diffusers import UNet2DModel

    from pipelines.export import to_stock_pipeline

    unet = UNet2DModel(
        sample_size=4, in_channels=1, out_channels=1, block_out_channels=(4, 8), norm_num_groups=4, layers_per_block=1,
        down_block_types=("DownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "UpBlock2D"),
    )  # fmt: skip
    with pytest.raises(ValueError, match="DDPMScheduler cannot sample prediction_type='mean'"):
        to_stock_pipeline(DDPMPaperPipeline(unet=unet, scheduler=scheduler))
    for prediction_type in ("epsilon", "sample", "v_prediction"):
        stock = to_stock_pipeline(
            DDPMPaperPipeline(unet=unet, scheduler=DDPMPaperScheduler(prediction_type=prediction_type))
        )
        assert type(stock.scheduler).__name__ == "DDPMScheduler"


@pytest.mark.slow
@pytest.mark.fresh_process  # train_ddpm.main, in this process, builds an Accelerator
def test_short_vlb_mean_training_run_exports_a_loadable_paper_pipeline(tmp_path, monkeypatch, caplog):
    from helpers import one_thread

    import train_ddpm

    caplog.set_level(logging.INFO)
    monkeypatch.chdir(tmp_path)
    args = ["--cpu", "--model_preset", "tiny", "--max_train_steps", "3", "--loss_type", "vlb"]
    args += ["--prediction_type", "mean", "--variance_type", "learned_range", "--output_dir", "out"]
    args += ["--ddpm_num_steps", "50", "--ddpm_num_inference_steps", "5", "--eval_batch_size", "4", "--use_ema"]
    with one_thread():  # as the script runs (OMP_NUM_THREADS=1)
        train_ddpm.main([*args, "--cache_dir", str(tmp_path / "datasets-cache")])
    assert "exported as a DDPMPaperPipeline folder" in caplog.text
    pipeline = DDPMPaperPipeline.from_pretrained(tmp_path / "out")
    assert pipeline.scheduler.config.prediction_type == "mean"
    assert pipeline.scheduler.config.variance_type == "learned_range"
    pipeline.set_progress_bar_config(disable=True)
    images = pipeline(batch_size=2, num_inference_steps=5, generator=torch.manual_seed(0), output_type="pt").images
    assert images.shape == (2, 1, 8, 8) and torch.isfinite(images).all()
    card = (tmp_path / "out" / "README.md").read_text()
    assert "DDPMPaperPipeline.from_pretrained" in card and "custom_pipeline=" in card
    # diffusers' own loader with our pipeline file gives the same samples from the same generator.
    custom = DiffusionPipeline.from_pretrained(
        tmp_path / "out", custom_pipeline=str(REPO / "pipelines" / "pipeline_ddpm_paper.py"), trust_remote_code=True
    )
    custom.set_progress_bar_config(disable=True)
    again = custom(batch_size=2, num_inference_steps=5, generator=torch.manual_seed(0), output_type="pt").images
    assert type(custom).__name__ == "DDPMPaperPipeline" and torch.equal(again, images)
    bpd = pipeline.bits_per_dim(torch.zeros(2, 1, 8, 8), num_timesteps=5, generator=torch.manual_seed(0))
    assert torch.isfinite(bpd.total).all()


def _eps_unet_and_batch():
    """A tiny seeded epsilon net on 8x8 and a batch of digits-like images in [-1, 1] at t across the chain."""
    from diffusers import UNet2DModel

    torch.manual_seed(0)
    unet = UNet2DModel(
        sample_size=8, in_channels=1, out_channels=1, block_out_channels=(4, 8), norm_num_groups=4, layers_per_block=1,
        down_block_types=("DownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "UpBlock2D"),
    )  # fmt: skip
    generator = torch.Generator().manual_seed(1)
    timesteps = torch.tensor([0, 1, 2, 10, 37, 250, 500, 998, 999])
    x0 = torch.randint(0, 256, (len(timesteps), 1, 8, 8), generator=generator).float() / 127.5 - 1.0
    noise = torch.randn(x0.shape, generator=generator)
    return unet, x0, noise, timesteps


def _mean_of_eps(scheduler: DDPMPaperScheduler, eps: torch.Tensor, xt: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """Eq. 11 in float64 from the scheduler's coefficient arrays: 1/sqrt(alpha_t) (x_t - beta_t/sqrt(1-abar_t) eps)."""
    shape = (-1, 1, 1, 1)
    alphas = scheduler.alphas.double()[t].view(shape)
    betas = scheduler.betas.double()[t].view(shape)
    sqrt_one_minus_abar = scheduler.sqrt_one_minus_alphas_cumprod.double()[t].view(shape)
    return (xt.double() - betas / sqrt_one_minus_abar * eps.double()) / alphas.sqrt()


def test_mean_prediction_bound_of_an_eq11_wrapped_eps_net_equals_the_eps_bound_in_value_and_gradient():
    # Mean and epsilon prediction are one function class: mu_theta = Eq. 11 of eps_theta at each t. The true bound
    # (--loss_type vlb) of the wrapped net must be the eps net's bound, and so must its gradient, for the same batch.
    unet, x0, noise, t = _eps_unet_and_batch()
    eps_scheduler = DDPMPaperScheduler(prediction_type="epsilon")
    mean_scheduler = DDPMPaperScheduler(prediction_type="mean")
    xt = eps_scheduler.add_noise(x0, noise, t)
    assert torch.equal(xt, mean_scheduler.add_noise(x0, noise, t))

    def loss_and_grads(scheduler, wrap):
        unet.zero_grad()
        eps = unet(xt, t).sample
        output = _mean_of_eps(scheduler, eps, xt, t).float() if wrap else eps
        loss = diffusion_loss(scheduler, output, x0, noise, xt, t, loss_type="vlb")
        loss.backward()
        return loss.item(), torch.cat([p.grad.flatten().double() for p in unet.parameters()])

    eps_loss, eps_grads = loss_and_grads(eps_scheduler, wrap=False)
    mean_loss, mean_grads = loss_and_grads(mean_scheduler, wrap=True)
    assert math.isfinite(eps_loss) and eps_loss > 1.0  # an untrained net: far from the oracle
    assert mean_loss == pytest.approx(eps_loss, rel=1e-5)
    assert eps_grads.norm() > 0
    assert (mean_grads - eps_grads).norm() <= 1e-4 * eps_grads.norm()
    # Per example, not only on average: every term of the bound agrees.
    with torch.no_grad():
        eps = unet(xt, t).sample
        eps_terms = eps_scheduler.vlb_terms(eps, x0, xt, t).bpd
        mean_terms = mean_scheduler.vlb_terms(_mean_of_eps(mean_scheduler, eps, xt, t).float(), x0, xt, t).bpd
    assert torch.allclose(mean_terms.double(), eps_terms.double(), rtol=1e-5, atol=0)


def test_mean_prediction_kl_term_is_the_closed_form_squared_mean_error_over_two_sigma2_in_bits_per_dim():
    # Eqs. 8 and 12: with sigma_t^2 = beta-tilde_t fixed, L_{t-1} = ||mu-tilde_t - mu_theta||^2 / (2 sigma_t^2) + C,
    # and C = 0 because q and p_theta share the variance. Per dimension, in bits.
    unet, x0, noise, t = _eps_unet_and_batch()
    scheduler = DDPMPaperScheduler(prediction_type="mean")
    xt = scheduler.add_noise(x0, noise, t)
    with torch.no_grad():
        mu_theta = _mean_of_eps(scheduler, unet(xt, t).sample, xt, t)
    terms = scheduler.vlb_terms(mu_theta.float(), x0, xt, t).bpd.double()
    tables = paper_tables()
    i = t.numpy()
    mu_tilde = oracle_mean(x0, xt, t)  # Eq. 7, float64 from this file's tables
    sigma2 = torch.tensor(tables["beta_tilde"][i]).view(-1, 1, 1, 1)
    expected = ((mu_tilde - mu_theta) ** 2 / (2 * sigma2)).flatten(1).mean(dim=1) / math.log(2)
    positive = t > 0
    assert positive.sum() >= 5
    assert torch.allclose(terms[positive], expected[positive], rtol=1e-4, atol=0), (terms, expected)
    assert (expected[positive] > 0).all()
