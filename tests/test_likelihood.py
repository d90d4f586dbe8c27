"""The likelihood evaluations (pipelines/likelihood.py) against closed forms of Ho et al. 2020."""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import DDPMScheduler, UNet2DModel
from diffusers.models.unets.unet_2d import UNet2DOutput

from evaluation.pipeline_metrics import model_range_and_bits
from pipelines.interpolation import interpolate
from pipelines.likelihood import bits_per_dim, rate_distortion, rate_distortion_curve
from schedulers import DDPMPaperScheduler

REPO_ROOT = Path(__file__).resolve().parents[1]


def _abar(scheduler) -> np.ndarray:
    """abar_t in float64, from the config, independently of the scheduler's tables."""
    config = scheduler.config
    betas = np.linspace(config.beta_start, config.beta_end, config.num_train_timesteps, dtype=np.float64)
    return np.cumprod(1.0 - betas)


class OracleNoisePredictor(torch.nn.Module):
    """
    The exact noise predictor of a one-image dataset {x0}: eps*(x_t, t) = (x_t - sqrt(abar_t) x0) / sqrt(1 - abar_t).
    `variance_channel` appends C channels holding that value (the learned variance types' extra output).
    """

    def __init__(self, scheduler, x0: torch.Tensor, variance_channel: float | None = None):
        super().__init__()
        self.abar = torch.from_numpy(_abar(scheduler))
        self.x0 = x0.double()
        self.variance_channel = variance_channel

    def forward(self, x: torch.Tensor, t) -> UNet2DOutput:
        t = torch.as_tensor(t).reshape(-1).expand(x.shape[0]).cpu()
        abar = self.abar[t].view(-1, 1, 1, 1)
        eps = ((x.double() - abar.sqrt() * self.x0) / (1 - abar).sqrt()).to(x.dtype)
        if self.variance_channel is not None:
            eps = torch.cat([eps, torch.full_like(eps, self.variance_channel)], dim=1)
        return UNet2DOutput(sample=eps)


class ZeroNoisePredictor(torch.nn.Module):
    """A model that always predicts eps = 0."""

    def forward(self, x: torch.Tensor, t) -> UNet2DOutput:
        return UNet2DOutput(sample=torch.zeros_like(x))


class GaussianDataNoisePredictor(torch.nn.Module):
    """eps(x_t, t) = sqrt(1 - abar_t) x_t, the exact predictor for N(0, I) data: cheap, and wrong for real images."""

    def __init__(self, scheduler):
        super().__init__()
        self.abar = torch.from_numpy(_abar(scheduler)).float()

    def forward(self, x: torch.Tensor, t) -> UNet2DOutput:
        t = torch.as_tensor(t).reshape(-1).expand(x.shape[0]).cpu()
        return UNet2DOutput(sample=(1 - self.abar[t]).sqrt().view(-1, 1, 1, 1) * x)


def one_image(seed: int = 0, channels: int = 1) -> torch.Tensor:
    """An 8-bit image in [-1, 1] whose pixels include both edge bins (0 and 255)."""
    pixels = torch.randint(0, 256, (1, channels, 8, 8), generator=torch.Generator().manual_seed(seed))
    pixels.view(-1)[:2] = torch.tensor([0, 255])
    return pixels.double() / 127.5 - 1.0


def tiny_unet(out_channels: int = 1) -> UNet2DModel:
    torch.manual_seed(0)
    return UNet2DModel(
        sample_size=8,
        in_channels=1,
        out_channels=out_channels,
        block_out_channels=(4, 8),
        norm_num_groups=4,
        layers_per_block=1,
        down_block_types=("DownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "UpBlock2D"),
    ).eval()


def closed_form_prior_bpd(x0: np.ndarray, abar_T: float) -> float:
    """L_T = KL(N(sqrt(abar_T) x0, 1 - abar_T) || N(0, 1)) averaged over pixels, in bits."""
    kl = 0.5 * (-1.0 - math.log(1.0 - abar_T) + (1.0 - abar_T) + abar_T * x0**2)
    return float(kl.mean() / math.log(2.0))


def closed_form_decoder_bpd(x0: np.ndarray, variance: float) -> float:
    """
    L_0 = -log p(x0|x1) of the discretized Gaussian decoder (Sec. 3.3) when its mean is exactly x0: each interior
    pixel has mass Phi(d/s) - Phi(-d/s) = erf(d / (s sqrt 2)) on its bin [x - d, x + d], d = 1/255, and the edge bins
    extend to infinity, mass Phi(d/s) = (1 + erf(d / (s sqrt 2))) / 2.
    """
    z = (1.0 / 255.0) / math.sqrt(variance) / math.sqrt(2.0)
    interior, edge = math.erf(z), 0.5 * (1.0 + math.erf(z))
    nats = [-math.log(edge if abs(v) > 0.999 else interior) for v in x0.ravel()]
    return float(np.mean(nats) / math.log(2.0))


@pytest.mark.parametrize(
    "variance_type, variance_channel",
    [("fixed_small", None), ("fixed_large", None), ("learned_range", -1.0)],
)
@pytest.mark.parametrize("clip_denoised", [True, False])
def test_oracle_bits_per_dim_is_prior_plus_decoder_in_closed_form(variance_type, variance_channel, clip_denoised):
    scheduler = DDPMPaperScheduler(variance_type=variance_type)  # the paper's T = 1000 and linear betas
    x0 = one_image()
    oracle = OracleNoisePredictor(scheduler, x0, variance_channel)
    output = bits_per_dim(
        oracle, scheduler, x0.float(), generator=torch.Generator().manual_seed(1), clip_denoised=clip_denoised
    )

    abar = _abar(scheduler)
    betas = 1.0 - abar / np.append(1.0, abar[:-1])
    beta_tilde = (1.0 - np.append(1.0, abar[:-1])) / (1.0 - abar) * betas  # Eq. 7, 0-based
    x = x0.numpy()
    prior = closed_form_prior_bpd(x, abar[-1])
    # The decoder's variance is beta-tilde at 0-based step 1 (beta-tilde at step 0 is 0), for every variance type.
    decoder = closed_form_decoder_bpd(x, beta_tilde[1])
    if variance_type == "fixed_large":
        # Means agree, variances are beta-tilde_t (q) against beta_t (p): KL = (log(b/bt) + bt/b - 1) / 2.
        t = np.arange(1, len(abar))
        kl_terms = 0.5 * (np.log(betas[t] / beta_tilde[t]) + beta_tilde[t] / betas[t] - 1.0) / math.log(2.0)
    else:
        kl_terms = np.zeros(len(abar) - 1)  # the oracle's p_theta(x_{t-1}|x_t) is q(x_{t-1}|x_t,x0) exactly

    assert output.prior.item() == pytest.approx(prior, rel=1e-5, abs=1e-9)
    assert output.terms[0, 0].item() == pytest.approx(decoder, rel=1e-5)
    np.testing.assert_allclose(output.terms[0, 1:].numpy(), kl_terms, atol=2e-6, rtol=1e-4)
    expected_total = prior + kl_terms.sum() + decoder
    assert output.total.item() == pytest.approx(expected_total, rel=1e-5)
    assert torch.equal(output.timesteps[0], torch.arange(999, -1, -1))
    assert output.pred_original_sample_mse.max() < 1e-8


def test_k_timestep_estimate_is_unbiased():
    # T = 100 with betas up to 0.2 (abar_T ~ 3e-5, as the paper's schedule), a cheap analytic model that is not the
    # oracle (its terms vary over t by orders of magnitude), 20,000 estimates from K = 10 timesteps against 100 exact
    # sums, each with its own noise.
    scheduler = DDPMPaperScheduler(num_train_timesteps=100, beta_start=1e-3, beta_end=0.2)
    model = GaussianDataNoisePredictor(scheduler)
    x0 = one_image(seed=3).float()
    generator = torch.Generator().manual_seed(0)

    estimates = bits_per_dim(model, scheduler, x0.expand(20_000, -1, -1, -1), num_timesteps=10, generator=generator)
    exact = bits_per_dim(model, scheduler, x0.expand(100, -1, -1, -1), generator=generator)

    mean_estimate, se_estimate = estimates.total.double().mean(), estimates.total.double().std() / math.sqrt(20_000)
    mean_exact, se_exact = exact.total.double().mean(), exact.total.double().std() / math.sqrt(100)
    difference, se = (mean_estimate - mean_exact).item(), math.hypot(se_estimate, se_exact)
    print(f"\nK=10 estimate {mean_estimate:.4f} +- {se_estimate:.4f}, exact sum {mean_exact:.4f} +- {se_exact:.4f}")
    assert abs(difference) < 4 * se
    assert se < 0.02 * mean_exact  # precise enough to catch a wrong weight (T/(K+1) would be 9% off)
    # Each estimate draws K distinct timesteps; the others stay NaN in `terms`.
    assert estimates.timesteps.shape == (20_000, 10)
    assert (estimates.timesteps.sort(dim=1).values.diff(dim=1) > 0).all()
    assert torch.equal(estimates.terms.isnan().sum(dim=1), torch.full((20_000,), 90))
    # The first K // 2 terms exactly, one draw in each of the other strata: random, and spread over them.
    assert torch.equal(estimates.timesteps[:, :5], torch.arange(5).expand(20_000, 5))
    assert len(estimates.timesteps[:, 5:].unique(dim=0)) > 10_000
    assert estimates.total.std() > exact.total.std()


def test_per_image_generators_make_results_independent_of_batching():
    scheduler = DDPMPaperScheduler(num_train_timesteps=50, beta_end=0.3)
    model = tiny_unet()
    images = torch.cat([one_image(seed) for seed in range(5)]).float()

    def run(batch_size, num_timesteps):
        generators = [torch.Generator().manual_seed(100 + i) for i in range(5)]
        return bits_per_dim(
            model, scheduler, images, num_timesteps=num_timesteps, generator=generators, batch_size=batch_size
        )

    for num_timesteps in (None, 7):
        one, three = run(1, num_timesteps), run(3, num_timesteps)
        torch.testing.assert_close(one.total, three.total, rtol=1e-5, atol=1e-6)
        assert torch.equal(one.timesteps, three.timesteps)
        last_two = bits_per_dim(
            model,
            scheduler,
            images[3:],
            num_timesteps=num_timesteps,
            generator=[torch.Generator().manual_seed(100 + i) for i in (3, 4)],
        )
        torch.testing.assert_close(last_two.total, one.total[3:], rtol=1e-5, atol=1e-6)


def test_zero_noise_model_is_finite_and_worse_than_the_oracle():
    scheduler = DDPMPaperScheduler(num_train_timesteps=20, beta_end=0.5)
    x0 = one_image().float()
    zero = bits_per_dim(ZeroNoisePredictor(), scheduler, x0, generator=torch.Generator().manual_seed(0))
    oracle = bits_per_dim(
        OracleNoisePredictor(scheduler, x0), scheduler, x0, generator=torch.Generator().manual_seed(0)
    )
    assert torch.isfinite(zero.total).all() and torch.isfinite(zero.terms).all()
    assert zero.total.item() > oracle.total.item() + 1.0
    assert (zero.terms[0, 1:] > 1e-3).all()  # every KL term pays for the wrong mean


class Recorded(torch.nn.Module):
    """`unet`, keeping every (x_t, t, output) it was called with, in float64."""

    def __init__(self, unet):
        super().__init__()
        self.unet, self.calls = unet, []

    def forward(self, x, t):
        output = self.unet(x, t)
        self.calls.append((x.double(), torch.as_tensor(t).reshape(-1).expand(x.shape[0]), output.sample.double()))
        return output


def reference_terms(scheduler, x0: torch.Tensor, calls, clip_denoised: bool) -> dict[int, float]:
    """
    L_{t-1} and L_0 of one image in bits/dim, in float64 from the paper's formulas and the model's outputs, for a
    learned_range model (Nichol & Dhariwal's interpolation of log beta_t and log beta-tilde_t): by 0-based timestep.
    """
    abar = torch.from_numpy(_abar(scheduler))
    abar_prev = torch.cat([torch.ones(1, dtype=torch.float64), abar[:-1]])
    betas = 1 - abar / abar_prev
    beta_tilde = (1 - abar_prev) / (1 - abar) * betas  # Eq. 7
    log_beta_tilde = torch.cat([beta_tilde[1:2], beta_tilde[1:]]).log()  # 0 at t = 0: clipped to the next one
    x0, channels, terms = x0.double(), x0.shape[1], {}
    for xt, t, output in calls:
        (t,) = t.tolist()
        eps, v = output[:, :channels], output[:, channels:]
        x0_pred = (xt - (1 - abar[t]).sqrt() * eps) / abar[t].sqrt()  # Eq. 4 solved for x_0
        if clip_denoised:
            x0_pred = x0_pred.clamp(-1, 1)
        coef_x0, coef_xt = (
            abar_prev[t].sqrt() * betas[t] / (1 - abar[t]),
            (1 - betas[t]).sqrt() * (1 - abar_prev[t]) / (1 - abar[t]),
        )
        mean = coef_x0 * x0_pred + coef_xt * xt  # Eq. 7 with the predicted x_0
        log_variance = (v + 1) / 2 * betas[t].log() + (1 - v) / 2 * log_beta_tilde[t]
        if t == 0:  # the discretized Gaussian decoder: mass of the pixel's bin of width 2/255, the edges unbounded
            normal = torch.distributions.Normal(mean, (log_variance / 2).exp())
            upper = torch.where(x0 > 0.999, torch.ones_like(x0), normal.cdf(x0 + 1 / 255))
            lower = torch.where(x0 < -0.999, torch.zeros_like(x0), normal.cdf(x0 - 1 / 255))
            nats = -(upper - lower).log()
        else:  # KL(q(x_{t-1}|x_t,x_0) || p(x_{t-1}|x_t)) of two Gaussians
            posterior_mean = coef_x0 * x0 + coef_xt * xt
            nats = 0.5 * (log_variance - log_beta_tilde[t] - 1)
            nats = nats + 0.5 * (beta_tilde[t] + (posterior_mean - mean) ** 2) / log_variance.exp()
        terms[t] = nats.mean().item() / math.log(2)
    return terms


@pytest.mark.parametrize("clip_denoised", [True, False])
def test_learned_variance_models_are_evaluated(clip_denoised):
    """A real network with a variance output (learned_range), two images one per call: each term equals a float64
    reference computed from the paper's formulas and the outputs the network gave, and the batching does not matter."""
    scheduler = DDPMPaperScheduler(num_train_timesteps=20, beta_end=0.5, variance_type="learned_range")
    model = tiny_unet(out_channels=2)
    with torch.no_grad():  # an untrained output sits near v = 0 (the middle of the range): spread it wider
        model.conv_out.weight.mul_(4)
    images = torch.cat([one_image(0), one_image(1)]).float()
    output = bits_per_dim(
        model,
        scheduler,
        images,
        generator=[torch.Generator().manual_seed(100 + i) for i in range(2)],
        batch_size=1,
        clip_denoised=clip_denoised,
    )
    assert output.total.shape == (2,) and torch.isfinite(output.total).all()
    for i in range(2):
        recorded = Recorded(model)
        alone = bits_per_dim(
            recorded,
            scheduler,
            images[i : i + 1],
            generator=torch.Generator().manual_seed(100 + i),
            clip_denoised=clip_denoised,
        )
        assert alone.total.item() == pytest.approx(output.total[i].item(), rel=1e-6)
        terms = reference_terms(scheduler, images[i : i + 1], recorded.calls, clip_denoised)
        assert sorted(terms) == list(range(20))
        expected = np.array([terms[t] for t in range(20)])
        np.testing.assert_allclose(output.terms[i].numpy(), expected, rtol=1e-4, atol=1e-6)
        prior = closed_form_prior_bpd(images[i].double().numpy(), _abar(scheduler)[-1])
        assert output.total[i].item() == pytest.approx(prior + expected.sum(), rel=1e-5)


def test_stock_ddpm_scheduler_is_accepted_through_its_config():
    config = {"num_train_timesteps": 20, "beta_end": 0.5}
    x0 = one_image().float()
    ours = bits_per_dim(
        ZeroNoisePredictor(), DDPMPaperScheduler(**config), x0, generator=torch.Generator().manual_seed(0)
    )
    stock = bits_per_dim(ZeroNoisePredictor(), DDPMScheduler(**config), x0, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(ours.total, stock.total)


def test_rate_distortion_of_the_oracle_has_zero_distortion_and_rate_equal_to_the_prior():
    scheduler = DDPMPaperScheduler(num_train_timesteps=50, beta_end=0.3)
    x0 = one_image().float()
    curve = rate_distortion(OracleNoisePredictor(scheduler, x0), scheduler, x0, timesteps=[0, 10, 49])
    prior = closed_form_prior_bpd(x0.double().numpy(), _abar(scheduler)[-1])
    assert curve.timesteps.tolist() == [49, 10, 0]
    np.testing.assert_allclose(curve.rate.numpy(), prior, rtol=1e-4, atol=2e-6)  # + 49 KL terms of ~1e-8
    assert curve.distortion.max() < 1e-2  # RMSE on [0, 255]


def test_rate_grows_and_distortion_falls_along_the_reverse_process():
    scheduler = DDPMPaperScheduler(num_train_timesteps=20, beta_end=0.5)
    images = torch.cat([one_image(seed) for seed in range(4)]).float()
    generator = torch.Generator().manual_seed(0)
    bpd = bits_per_dim(GaussianDataNoisePredictor(scheduler), scheduler, images, generator=generator)
    curve = rate_distortion_curve(bpd)
    assert curve.timesteps.tolist() == list(range(19, -1, -1))
    assert (curve.rate.diff() >= -1e-6).all()  # bits only accumulate as t goes down
    # At t = 0 the receiver holds everything but the decoder term: rate = bound - L_0 (Table 4's last row).
    assert curve.rate[-1].item() == pytest.approx((bpd.total - bpd.terms[:, 0]).mean().item(), rel=1e-5)
    assert curve.rate[0].item() == pytest.approx(bpd.prior.mean().item(), rel=1e-6)
    assert curve.distortion[-1] < curve.distortion[0]
    expected_rmse = bpd.pred_original_sample_mse[:, 0].mean().sqrt().item() * 127.5
    assert curve.distortion[-1].item() == pytest.approx(expected_rmse, rel=1e-6)
    estimate = bits_per_dim(GaussianDataNoisePredictor(scheduler), scheduler, images, num_timesteps=3)
    with pytest.raises(ValueError, match="num_timesteps=None"):
        rate_distortion_curve(estimate)


def test_interpolation_of_the_oracle_decodes_its_image_and_lambdas_share_the_reverse_noise():
    scheduler = DDPMPaperScheduler(num_train_timesteps=30, beta_end=0.4)
    a, b = one_image(0).float(), one_image(1).float()
    decoded = interpolate(
        OracleNoisePredictor(scheduler, a), scheduler, a[0], b[0], t=20, generator=torch.Generator().manual_seed(0)
    )
    assert decoded.shape == (11, 1, 8, 8)
    # The exact denoiser of {a} maps any x_t to a (the last step is the mean, whose x0 weight is 1).
    torch.testing.assert_close(decoded, a.expand(11, -1, -1, -1), atol=1e-4, rtol=0)

    scheduler.set_timesteps(5)
    chain = scheduler.timesteps.clone()
    mixed = interpolate(
        tiny_unet(), scheduler, a, b, t=15, lambdas=[0.0, 0.5, 0.5, 1.0], generator=torch.Generator().manual_seed(0)
    )
    assert torch.equal(mixed[1], mixed[2])  # the same lambda gives the same image: only lambda differs
    assert not torch.equal(mixed[0], mixed[3])
    assert mixed.abs().max() <= 1.0
    assert torch.equal(scheduler.timesteps, chain)  # the caller's sampling chain is left alone


TWO_PROCESS_SCRIPT = """
import json, sys
import torch
from accelerate import Accelerator
from diffusers.models.unets.unet_2d import UNet2DOutput
from pipelines.likelihood import bits_per_dim
from schedulers import DDPMPaperScheduler
from evaluation import evaluate
from evaluate_ddpm import main
sys.path.insert(0, sys.argv[2])
from test_likelihood import CLI_FLAGS, ZeroNoisePredictor, tiny_unet, one_image, two_process_inputs

accelerator = Accelerator(cpu=True)
scheduler, images, pipeline, pixels = two_process_inputs()
# Zero-noise model: split the images, one generator per image, gather.
with accelerator.split_between_processes(list(range(len(images)))) as indices:
    output = bits_per_dim(
        ZeroNoisePredictor(), scheduler, images[indices],
        generator=[torch.Generator().manual_seed(100 + i) for i in indices],
    )
totals = accelerator.gather(accelerator.pad_across_processes(output.total, dim=0))
# Each process generates its share of the samples: count the images of every pipeline call during `evaluate`.
generated, call = [], type(pipeline).__call__


def counted(self, *args, **kwargs):
    generated.append(kwargs["batch_size"])
    return call(self, *args, **kwargs)


type(pipeline).__call__ = counted
metrics = evaluate(pipeline, pixels, num_images=5, num_samples=9, batch_size=4, accelerator=accelerator)
type(pipeline).__call__ = call
shares = accelerator.gather(torch.tensor([sum(generated)])).tolist()
# The command line: only the main process writes the report (and returns it).
report = main([*CLI_FLAGS, "--pipeline", sys.argv[3], "--output_dir", sys.argv[4]])
assert ("settings" in report) == accelerator.is_main_process, report.keys()
if accelerator.is_main_process:
    result = {"num_processes": accelerator.num_processes, "totals": totals.tolist(), "metrics": metrics}
    result["samples_per_process"] = shares
    json.dump(result, open(sys.argv[1], "w"))
"""
CLI_FLAGS = ["--num_images", "5", "--bpd_timesteps", "3", "--num_samples", "9", "--rate_distortion_images", "2"]
CLI_FLAGS += ["--batch_size", "4", "--device", "cpu"]


def two_process_inputs():
    """The inputs of the two-process test, built the same way in both processes and in pytest."""
    from pipelines import DDPMPaperPipeline

    scheduler = DDPMPaperScheduler(num_train_timesteps=10, beta_end=0.6)
    images = torch.cat([one_image(seed) for seed in range(6)]).float()
    pipeline = DDPMPaperPipeline(unet=tiny_unet(), scheduler=scheduler)
    pixels = ((images + 1) * 127.5).round().to(torch.uint8)
    return scheduler, images, pipeline, pixels


@pytest.mark.slow
@pytest.mark.fresh_process  # evaluate_ddpm.main builds an Accelerator here too
def test_bits_per_dim_evaluate_and_the_cli_are_the_same_on_one_and_two_processes(tmp_path, digits_cache):
    from evaluate_ddpm import main
    from evaluation import evaluate

    script, result_file = tmp_path / "two_processes.py", tmp_path / "result.json"
    script.write_text(TWO_PROCESS_SCRIPT)
    scheduler, images, pipeline, pixels = two_process_inputs()
    folder = tmp_path / "pipeline"  # exported as train_ddpm.py exports it: a stock DDPMPipeline folder
    pipeline.to_stock_pipeline().save_pretrained(folder)
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(REPO_ROOT), os.environ.get("PYTHONPATH", "")]),
        "OMP_NUM_THREADS": "1",  # two processes on a small CPU: one thread each
        "CUDA_VISIBLE_DEVICES": "",  # CPU processes (gloo) even on a machine with GPUs
    }
    command = [
        *(sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2"),
        *("--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no"),
        *("--main_process_port", "0"),  # a free port: never 29500 held by another run
        *(str(script), str(result_file), str(Path(__file__).parent), str(folder), str(tmp_path / "two")),
    ]
    completed = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert completed.returncode == 0, completed.stderr[-3000:]
    result = json.loads(result_file.read_text())
    assert result["num_processes"] == 2
    assert result["samples_per_process"] == [4, 5]  # the 9 samples split, each generated once, not 9 on each process

    single = bits_per_dim(
        ZeroNoisePredictor(), scheduler, images, generator=[torch.Generator().manual_seed(100 + i) for i in range(6)]
    )
    assert torch.isfinite(single.total).all()
    np.testing.assert_allclose(result["totals"], single.total.numpy(), rtol=1e-6)
    metrics = evaluate(pipeline, pixels, num_images=5, num_samples=9, batch_size=4)
    assert result["metrics"].keys() == metrics.keys()
    for name, value in metrics.items():
        assert result["metrics"][name] == pytest.approx(value, rel=1e-5, abs=1e-6), name

    # The command line on two processes: one report, from the main process, with the numbers of one process.
    two = json.loads((tmp_path / "two" / "metrics.json").read_text())
    one = main([*CLI_FLAGS, "--pipeline", str(folder), "--output_dir", str(tmp_path / "one")])
    assert (two["settings"]["num_processes"], one["settings"]["num_processes"]) == (2, 1)
    scalars = ["bits_per_dim", "bits_per_dim_stderr", "prior_bpd", "fid", "kid_mean", "kid_std", "precision", "recall"]
    for name in [*scalars, "num_images", "num_samples"]:
        assert two[name] == pytest.approx(one[name], rel=1e-5, abs=1e-6), name


T, K, IMAGES, DRAWS = 1000, 10, 32, 200


@pytest.mark.slow  # 64,000 terms of the bound
def test_reported_standard_error_matches_the_spread_across_draws_and_the_mean_is_the_full_bound():
    # The paper's schedule (T = 1000, betas 1e-4..0.02) and a cheap analytic model whose terms fall by orders of
    # magnitude from t = 0 on. One evaluation: IMAGES images (distinct ones), K terms each, as evaluate() reports it:
    # the mean over images and std / sqrt(IMAGES). DRAWS independent evaluations run as one batch.
    scheduler = DDPMPaperScheduler(num_train_timesteps=T)
    model = GaussianDataNoisePredictor(scheduler)
    pixels = torch.cat([((one_image(seed) + 1) * 127.5).round().to(torch.uint8) for seed in range(IMAGES)])
    x0, _ = model_range_and_bits(pixels)
    generator = torch.Generator().manual_seed(0)

    estimates = bits_per_dim(model, scheduler, x0.repeat(DRAWS, 1, 1, 1), num_timesteps=K, generator=generator)
    per_draw = estimates.total.double().view(DRAWS, IMAGES)
    values = per_draw.mean(dim=1)  # the bits/dim of each evaluation
    reported = per_draw.std(dim=1) / math.sqrt(IMAGES)  # its reported standard error
    empirical = values.std().item()
    exact = bits_per_dim(model, scheduler, x0.repeat(2, 1, 1, 1), generator=generator).total.double()
    print(
        f"\nK={K}: estimate {values.mean():.4f} +- {empirical / math.sqrt(DRAWS):.4f} over {DRAWS} draws, all {T} "
        f"terms {exact.mean():.4f} +- {exact.std() / math.sqrt(exact.numel()):.4f}; spread of one evaluation "
        f"{empirical:.4f}, reported standard error median {reported.median():.4f} (10% {reported.quantile(0.1):.4f})"
    )
    # Nearly every evaluation reports an error bar within a factor 2 of the estimate's real spread.
    ratio = reported / empirical
    assert 0.5 < ratio.median().item() < 2.0
    assert ((ratio > 0.5) & (ratio < 2.0)).double().mean().item() > 0.9
    # Unbiased: the mean over draws is the bound summed over all T terms, within the error of both.
    error = math.hypot(empirical / math.sqrt(DRAWS), (exact.std() / math.sqrt(exact.numel())).item())
    assert abs(values.mean().item() - exact.mean().item()) < 4 * error
