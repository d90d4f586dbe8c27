"""DDPMPaperScheduler against the closed forms of Ho et al. 2020 and against diffusers' DDPMScheduler."""

import dataclasses
import inspect
import json
import logging
import math

import numpy as np
import pytest
import torch
from diffusers import DDPMScheduler

from schedulers import (
    BETA_SCHEDULES,
    VARIANCE_TYPES,
    DDPMPaperMeanVarianceOutput,
    DDPMPaperScheduler,
    DDPMPaperVLBOutput,
)

T = 1000
SHARED_VARIANCE_TYPES = ["fixed_small", "fixed_small_log", "fixed_large", "learned", "learned_range"]
PREDICTION_TYPES = ["epsilon", "sample", "v_prediction"]


def closed_form_betas(schedule: str) -> list[float]:
    """The schedules written out one value at a time, independently of the scheduler's vectorised code."""
    if schedule == "linear":
        return [1e-4 + (0.02 - 1e-4) * i / (T - 1) for i in range(T)]
    if schedule == "quad":
        return [(1e-4**0.5 + (0.02**0.5 - 1e-4**0.5) * i / (T - 1)) ** 2 for i in range(T)]
    if schedule == "sigmoid":
        return [1e-4 + (0.02 - 1e-4) / (1 + math.exp(-(-6 + 12 * i / (T - 1)))) for i in range(T)]
    if schedule == "squaredcos_cap_v2":

        def f(s):
            return math.cos((s + 0.008) / 1.008 * math.pi / 2) ** 2

        return [min(1 - f((i + 1) / T) / f(i / T), 0.999) for i in range(T)]
    raise AssertionError(schedule)


@pytest.mark.parametrize("schedule", ["linear", "quad", "squaredcos_cap_v2", "sigmoid"])
def test_coefficients_match_closed_forms(schedule):
    scheduler = DDPMPaperScheduler(beta_schedule=schedule)
    betas = closed_form_betas(schedule)
    abar, abar_prev = [], []
    running = 1.0
    for beta in betas:
        abar_prev.append(running)
        running *= 1 - beta
        abar.append(running)
    beta, abar, abar_prev = (np.array(v) for v in (betas, abar, abar_prev))
    alpha = 1 - beta
    expected = {
        "betas": beta,
        "alphas_cumprod": abar,
        "alphas_cumprod_prev": abar_prev,
        "sqrt_alphas_cumprod": np.sqrt(abar),
        "sqrt_one_minus_alphas_cumprod": np.sqrt(1 - abar),
        "sqrt_recip_alphas_cumprod": 1 / np.sqrt(abar),
        "sqrt_recipm1_alphas_cumprod": np.sqrt(1 / abar - 1),
        # beta-tilde_t = (1 - abar_{t-1}) / (1 - abar_t) beta_t (Eq. 7)
        "posterior_variance": (1 - abar_prev) / (1 - abar) * beta,
        # mu-tilde_t = sqrt(abar_{t-1}) beta_t / (1 - abar_t) x_0 + sqrt(alpha_t) (1 - abar_{t-1}) / (1 - abar_t) x_t
        "posterior_mean_coef1": np.sqrt(abar_prev) * beta / (1 - abar),
        "posterior_mean_coef2": np.sqrt(alpha) * (1 - abar_prev) / (1 - abar),
    }
    for name, value in expected.items():
        got = getattr(scheduler, name)
        assert got.dtype == torch.float32, name
        np.testing.assert_allclose(got.double().numpy(), value, rtol=2e-6, atol=1e-12, err_msg=name)
    # Clipped log-variance: log beta-tilde_t, with beta-tilde_1 standing in at t = 0 (where beta-tilde is 0).
    clipped = np.log(np.append(expected["posterior_variance"][1], expected["posterior_variance"][1:]))
    np.testing.assert_allclose(scheduler.posterior_log_variance_clipped.double().numpy(), clipped, rtol=1e-6)


@pytest.mark.parametrize("t", [1, 2, 500, 999])
def test_named_tables_are_the_closed_forms_in_float64(t):
    """At a scalar t the math reads the float64 tables; unit inputs expose each coefficient to float64 rounding."""
    scheduler = DDPMPaperScheduler()
    betas = closed_form_betas("linear")
    abar_prev = math.prod(1 - beta for beta in betas[:t])
    beta = betas[t]
    abar = abar_prev * (1 - beta)
    one, zero = torch.ones(1, dtype=torch.float64), torch.zeros(1, dtype=torch.float64)
    closed_forms = {
        # Eq. 4: x_t = sqrt(abar_t) x_0 + sqrt(1 - abar_t) eps
        "sqrt_alphas_cumprod": (scheduler.add_noise(one, zero, t), math.sqrt(abar)),
        "sqrt_one_minus_alphas_cumprod": (scheduler.add_noise(zero, one, t), math.sqrt(1 - abar)),
        "1 - alphas_cumprod": (scheduler.q_mean_variance(one, t)[1], 1 - abar),
        # Eq. 7: mu-tilde_t = beta_t sqrt(abar_{t-1}) / (1 - abar_t) x_0 + sqrt(alpha_t) (1 - abar_{t-1}) / (1 - abar_t) x_t
        "posterior_mean_coef1": (
            scheduler.q_posterior_mean_variance(one, zero, t)[0],
            beta * math.sqrt(abar_prev) / (1 - abar),
        ),
        "posterior_mean_coef2": (
            scheduler.q_posterior_mean_variance(zero, one, t)[0],
            math.sqrt(1 - beta) * (1 - abar_prev) / (1 - abar),
        ),
        # Eq. 7: beta-tilde_t = (1 - abar_{t-1}) / (1 - abar_t) beta_t
        "posterior_variance": (
            scheduler.q_posterior_mean_variance(one, one, t)[1],
            (1 - abar_prev) / (1 - abar) * beta,
        ),
        "posterior_log_variance_clipped": (
            scheduler.q_posterior_mean_variance(one, one, t)[2],
            math.log((1 - abar_prev) / (1 - abar) * beta),
        ),
        # Eq. 15: x_0 = (x_t - sqrt(1 - abar_t) eps) / sqrt(abar_t)
        "sqrt_recip_alphas_cumprod": (scheduler.predict_x0_from_eps(one, t, zero), 1 / math.sqrt(abar)),
        "sqrt_recipm1_alphas_cumprod": (
            scheduler.predict_x0_from_eps(zero, t, one),
            -math.sqrt(1 - abar) / math.sqrt(abar),
        ),
    }
    for name, (got, expected) in closed_forms.items():
        assert got.dtype == torch.float64, name
        assert float(got) == pytest.approx(expected, rel=1e-11), name


def test_eq11_mean_equals_posterior_mean_of_predicted_x0():
    scheduler = DDPMPaperScheduler()
    gen = torch.Generator().manual_seed(0)
    xt = torch.randn(6, 3, 4, 4, generator=gen, dtype=torch.float64)
    eps = torch.randn(6, 3, 4, 4, generator=gen, dtype=torch.float64)
    t = torch.tensor([0, 1, 10, 500, 998, 999])
    mean = scheduler.p_mean_variance(eps, xt, t, clip_denoised=False).mean
    beta = torch.tensor(closed_form_betas("linear"), dtype=torch.float64)
    abar = torch.cumprod(1 - beta, 0)
    b, a = beta[t].view(-1, 1, 1, 1), abar[t].view(-1, 1, 1, 1)
    eq11 = (xt - b / torch.sqrt(1 - a) * eps) / torch.sqrt(1 - b)
    torch.testing.assert_close(mean, eq11, rtol=1e-5, atol=1e-5)
    # Same thing the long way: the posterior mean (Eqs. 6-7) at x0 = predict_x0_from_eps.
    x0 = scheduler.predict_x0_from_eps(xt, t, eps)
    torch.testing.assert_close(mean, scheduler.q_posterior_mean_variance(x0, xt, t)[0])


@pytest.mark.slow  # 8M draws per timestep
@pytest.mark.parametrize("t", [1, 30, 500])
def test_posterior_matches_monte_carlo(t):
    """Draw x_{t-1} ~ q(x_{t-1}|x_0), x_t ~ q(x_t|x_{t-1}); keep draws whose x_t lies in a narrow window."""
    scheduler = DDPMPaperScheduler()
    x0, n = 0.7, 8_000_000
    gen = torch.Generator().manual_seed(1234)
    abar_prev = scheduler.alphas_cumprod_prev[t].double()
    beta = scheduler.betas[t].double()
    half_width = 0.1 * float(beta.sqrt())  # narrow next to the spread of x_t given x_{t-1}
    x_prev = abar_prev.sqrt() * x0 + (1 - abar_prev).sqrt() * torch.randn(n, generator=gen, dtype=torch.float64)
    x_t = (1 - beta).sqrt() * x_prev + beta.sqrt() * torch.randn(n, generator=gen, dtype=torch.float64)
    centre = float(x_t.median())
    kept = x_prev[(x_t - centre).abs() < half_width]
    assert kept.numel() > 5_000
    mean, variance, log_variance = scheduler.q_posterior_mean_variance(
        torch.tensor([x0], dtype=torch.float64), torch.tensor([centre], dtype=torch.float64), t
    )
    standard_error = math.sqrt(float(variance) / kept.numel())
    assert abs(float(kept.mean()) - float(mean)) < 5 * standard_error
    # Tolerance: 5 standard errors of a sample variance, plus 1 % for the spread the window adds
    # ((coef2 * 2 * half_width)^2 / 12 < 0.4 % of beta-tilde_t).
    tolerance = 5 * math.sqrt(2 / (kept.numel() - 1)) + 0.01
    assert float(kept.var()) == pytest.approx(float(variance), rel=tolerance)
    assert float(log_variance) == pytest.approx(math.log(float(variance)), rel=1e-6)


TARGET = torch.linspace(-0.9, 0.9, 2 * 3 * 8 * 8).reshape(2, 3, 8, 8)
ABAR = torch.tensor(np.cumprod(1 - np.array(closed_form_betas("linear"))))


def dummy_model(sample: torch.Tensor, t: int, variance_type: str, prediction_type: str = "epsilon") -> torch.Tensor:
    """
    A deterministic stand-in for a trained UNet: the exact predictor for the image TARGET, squashed to the unit
    scale of a real network's output (|eps| < 4), plus a smooth error.

    It tracks x_t as a trained model does. A model that ignores x_t (say tanh(x)) makes the reverse chain amplify
    float32 rounding up to 1/sqrt(abar_T) ~ 158-fold; an unsquashed oracle reaches |eps| ~ 100 at t = 1, where it
    multiplies the float32 rounding of 1 - abar_1 (relative 3e-5 in DDPMScheduler). With either, no two float32
    implementations agree to 1e-5.
    """
    abar = ABAR[t].float()
    error = 0.05 * torch.tanh(sample + t / T)
    eps = 4 * torch.tanh((sample - abar.sqrt() * TARGET) / (1 - abar).sqrt() / 4)
    out = {
        "epsilon": eps + error,
        "sample": TARGET + error,
        "v_prediction": abar.sqrt() * eps - (1 - abar).sqrt() * TARGET + error,
    }[prediction_type]
    if variance_type == "learned":
        beta = 1 - ABAR[t] / (ABAR[t - 1] if t > 0 else 1.0)
        return torch.cat([out, beta.float() * (1 + 0.5 * torch.sin(sample))], dim=1)
    if variance_type == "learned_range":
        return torch.cat([out, torch.tanh(0.5 * sample)], dim=1)
    return out


def run_chain(scheduler, variance_type: str, num_inference_steps: int | None, seed: int = 0) -> torch.Tensor:
    if num_inference_steps is not None:
        scheduler.set_timesteps(num_inference_steps)
    prediction_type = scheduler.config.prediction_type
    sample = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(seed))
    generator = torch.Generator().manual_seed(seed + 1)
    for t in scheduler.timesteps:
        model_output = dummy_model(sample, int(t), variance_type, prediction_type)
        sample = scheduler.step(model_output, t, sample, generator=generator).prev_sample
    return sample


# DDPMScheduler computes 1 - abar_t and 1 - abar_t / abar_{t-1} in float32, which loses up to 3e-4 of their value
# at t = 1 (abar_t = 0.99978 is stored to 6e-8). Epsilon and v predictions go through those differences, and the final
# samples of the two schedulers then differ by up to 1.1e-5; `sample` prediction does not, and agrees to 4e-7.
# test_closer_to_exact_arithmetic_than_diffusers shows the difference is DDPMScheduler's rounding, not ours.
TOLERANCE_VS_DIFFUSERS = 2e-5


@pytest.mark.parametrize("variance_type", SHARED_VARIANCE_TYPES)
@pytest.mark.parametrize("num_inference_steps", [pytest.param(None, marks=pytest.mark.slow), 50])  # None: all 1000
def test_samples_equal_diffusers_ddpm_scheduler(variance_type, num_inference_steps):
    worst = 0.0
    for prediction_type in PREDICTION_TYPES:
        for clip_sample in (True, False):
            config = dict(variance_type=variance_type, prediction_type=prediction_type, clip_sample=clip_sample)
            # The respaced chain also runs with trailing spacing, whose last step has t > 0.
            if num_inference_steps is not None and not clip_sample:
                config["timestep_spacing"] = "trailing"
            ours = run_chain(DDPMPaperScheduler(**config), variance_type, num_inference_steps)
            theirs = run_chain(DDPMScheduler(**config), variance_type, num_inference_steps)
            assert torch.isfinite(ours).all()
            difference = float((ours - theirs).abs().max())
            worst = max(worst, difference)
            assert difference < TOLERANCE_VS_DIFFUSERS, (config, difference)
    print(f"max |ours - DDPMScheduler| {variance_type} steps={num_inference_steps or T}: {worst:.3g}")


@pytest.mark.parametrize("num_inference_steps", [None, 50])
def test_closer_to_exact_arithmetic_than_diffusers(num_inference_steps):
    """Algorithm 2 written out in float64 from the closed forms, with the same z draws, as the reference."""
    timesteps = list(range(T - 1, -1, -1))
    if num_inference_steps is not None:
        timesteps = list(range(0, T, T // num_inference_steps))[::-1]
    abar = ABAR.double()
    x = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(0)).double()
    generator = torch.Generator().manual_seed(1)
    for i, t in enumerate(timesteps):
        abar_prev = abar[timesteps[i + 1]] if i + 1 < len(timesteps) else torch.tensor(1.0, dtype=torch.float64)
        beta = 1 - abar[t] / abar_prev
        eps = dummy_model(x.float(), t, "fixed_small").double()
        x0 = ((x - (1 - abar[t]).sqrt() * eps) / abar[t].sqrt()).clamp(-1, 1)
        mean = abar_prev.sqrt() * beta / (1 - abar[t]) * x0 + (1 - beta).sqrt() * (1 - abar_prev) / (1 - abar[t]) * x
        if t > 0:
            z = torch.randn(x.shape, generator=generator).double()
            mean = mean + ((1 - abar_prev) / (1 - abar[t]) * beta).sqrt() * z
        x = mean
    ours = run_chain(DDPMPaperScheduler(), "fixed_small", num_inference_steps).double()
    theirs = run_chain(DDPMScheduler(), "fixed_small", num_inference_steps).double()
    ours_error, theirs_error = float((ours - x).abs().max()), float((theirs - x).abs().max())
    print(f"max |scheduler - float64 reference| ours {ours_error:.3g}, DDPMScheduler {theirs_error:.3g}")
    assert ours_error < 2e-6
    assert ours_error < theirs_error


def test_step_consumes_the_generator_like_diffusers():
    ours, theirs = DDPMPaperScheduler(), DDPMScheduler()
    sample = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    gen_ours, gen_theirs = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)
    for t in (999, 500, 1, 0):
        ours.step(dummy_model(sample, t, "fixed_small"), t, sample, generator=gen_ours)
        theirs.step(dummy_model(sample, t, "fixed_small"), t, sample, generator=gen_theirs)
        assert torch.equal(gen_ours.get_state(), gen_theirs.get_state()), t


def test_fixed_large_log_samples_are_finite_and_equal_fixed_large():
    """DDPMScheduler's fixed_large_log gives NaN (diffusers #14569); ours is fixed_large computed in log space."""
    log = run_chain(DDPMPaperScheduler(variance_type="fixed_large_log"), "fixed_large_log", 50)
    large = run_chain(DDPMPaperScheduler(variance_type="fixed_large"), "fixed_large", 50)
    assert torch.isfinite(log).all()
    torch.testing.assert_close(log, large, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("variance_type", ["fixed_small", "fixed_large", "fixed_large_log"])
def test_decoder_log_variance_at_t0_is_log_beta_tilde_1(variance_type):
    scheduler = DDPMPaperScheduler(variance_type=variance_type)
    x = torch.zeros(1, 1, 2, 2)
    p = scheduler.p_mean_variance(torch.zeros_like(x), x, torch.tensor([0]))
    beta = closed_form_betas("linear")
    beta_tilde_1 = (1 - (1 - beta[0])) / (1 - (1 - beta[0]) * (1 - beta[1])) * beta[1]
    torch.testing.assert_close(p.log_variance, torch.full_like(x, math.log(beta_tilde_1)))
    if variance_type != "fixed_small":  # beta_t for t > 0
        p = scheduler.p_mean_variance(torch.zeros_like(x), x, torch.tensor([7]))
        torch.testing.assert_close(p.log_variance, torch.full_like(x, math.log(beta[7])))


def test_p_mean_variance_and_vlb_terms_return_output_dataclasses():
    scheduler = DDPMPaperScheduler(variance_type="learned_range")
    x = torch.zeros(2, 3, 4, 4)
    t = torch.tensor([0, 7])
    model_output = torch.zeros(2, 6, 4, 4)  # v = 0: log sigma_t^2 halfway between log beta-tilde_t and log beta_t
    p = scheduler.p_mean_variance(model_output, x, t)
    assert isinstance(p, DDPMPaperMeanVarianceOutput)
    assert [f.name for f in dataclasses.fields(p)] == ["mean", "variance", "log_variance", "pred_original_sample"]
    assert all(value.shape == x.shape for value in p.to_tuple())
    beta = closed_form_betas("linear")
    abar = np.cumprod(1 - np.array(beta))
    beta_tilde_1 = (1 - abar[0]) / (1 - abar[1]) * beta[1]  # stands in for beta-tilde_0 = 0
    beta_tilde_7 = (1 - abar[6]) / (1 - abar[7]) * beta[7]
    expected = [0.5 * math.log(beta[0] * beta_tilde_1), 0.5 * math.log(beta[7] * beta_tilde_7)]
    torch.testing.assert_close(p.log_variance[:, 0, 0, 0], torch.tensor(expected))
    torch.testing.assert_close(p.variance, p.log_variance.exp())

    vlb = scheduler.vlb_terms(model_output, x, x, t)
    assert isinstance(vlb, DDPMPaperVLBOutput)
    assert [f.name for f in dataclasses.fields(vlb)] == ["bpd", "pred_original_sample"]
    assert vlb.bpd.shape == (2,) and torch.isfinite(vlb.bpd).all()
    torch.testing.assert_close(vlb.pred_original_sample, p.pred_original_sample)


def test_listed_beta_schedules_and_variance_types_are_the_accepted_ones():
    for beta_schedule in BETA_SCHEDULES:
        assert torch.all(DDPMPaperScheduler(beta_schedule=beta_schedule).betas > 0), beta_schedule
    assert set(VARIANCE_TYPES) == {*SHARED_VARIANCE_TYPES, "fixed_large_log"}
    for variance_type in VARIANCE_TYPES:
        DDPMPaperScheduler(variance_type=variance_type)


def test_respaced_previous_timestep_and_add_noise_match_diffusers():
    ours, theirs = DDPMPaperScheduler(), DDPMScheduler()
    for scheduler in (ours, theirs):
        scheduler.set_timesteps(37)
    assert torch.equal(ours.timesteps, theirs.timesteps)
    for t in ours.timesteps:
        assert int(ours.previous_timestep(t)) == int(theirs.previous_timestep(t))
    x0 = torch.randn(4, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    noise = torch.randn(4, 3, 8, 8, generator=torch.Generator().manual_seed(1))
    t = torch.tensor([0, 17, 600, 999])
    a = ABAR[t].view(-1, 1, 1, 1)
    exact = a.sqrt() * x0.double() + (1 - a).sqrt() * noise.double()  # Eq. 4 in float64
    torch.testing.assert_close(ours.add_noise(x0, noise, t).double(), exact, rtol=1e-6, atol=1e-6)
    # DDPMScheduler's float32 1 - abar_0 carries a relative error of 1e-4 (see TOLERANCE_VS_DIFFUSERS).
    torch.testing.assert_close(ours.add_noise(x0, noise, t), theirs.add_noise(x0, noise, t), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(
        ours.get_velocity(x0, noise, t), theirs.get_velocity(x0, noise, t), rtol=1e-5, atol=1e-5
    )
    assert len(ours) == len(theirs) == T
    assert ours.scale_model_input(x0, 3) is x0


def test_constructor_takes_exactly_ddpm_scheduler_arguments():
    ours = inspect.signature(DDPMPaperScheduler.__init__).parameters
    theirs = inspect.signature(DDPMScheduler.__init__).parameters
    assert list(ours) == list(theirs)
    assert {k: v.default for k, v in ours.items()} == {k: v.default for k, v in theirs.items()}
    assert "DDPMScheduler" in DDPMPaperScheduler._compatibles


@pytest.fixture
def diffusers_warnings():
    messages = []
    handler = logging.Handler(level=logging.WARNING)
    handler.emit = lambda record: messages.append(record.getMessage())
    logger = logging.getLogger("diffusers")
    logger.addHandler(handler)
    yield messages
    logger.removeHandler(handler)


@pytest.mark.parametrize("beta_schedule", ["linear", "squaredcos_cap_v2", "quad"])
def test_config_round_trips_without_unexpected_keys(tmp_path, diffusers_warnings, beta_schedule):
    ours = DDPMPaperScheduler(beta_schedule=beta_schedule, variance_type="fixed_large", prediction_type="v_prediction")
    theirs = DDPMScheduler.from_config(ours.to_diffusers_config())
    back = DDPMPaperScheduler.from_config(theirs.config)
    torch.testing.assert_close(theirs.betas, ours.betas, rtol=1e-6, atol=0)
    torch.testing.assert_close(back.betas, ours.betas, rtol=1e-6, atol=0)
    assert back.config.variance_type == "fixed_large" and back.config.prediction_type == "v_prediction"

    ours.save_pretrained(tmp_path / "ours")
    saved = json.loads((tmp_path / "ours" / "scheduler_config.json").read_text())
    assert set(saved) - {"_class_name", "_diffusers_version"} == set(inspect.signature(DDPMScheduler).parameters)
    reloaded = DDPMPaperScheduler.from_pretrained(tmp_path / "ours")
    public = {k: v for k, v in ours.config.items() if not k.startswith("_")}
    assert {k: v for k, v in reloaded.config.items() if not k.startswith("_")} == public

    theirs.save_pretrained(tmp_path / "theirs")
    from_theirs = DDPMPaperScheduler.from_pretrained(tmp_path / "theirs")
    torch.testing.assert_close(from_theirs.alphas_cumprod, ours.alphas_cumprod, rtol=1e-6, atol=0)
    if beta_schedule != "quad":  # DDPMScheduler cannot build `quad` itself; it reads our export instead
        DDPMScheduler.from_pretrained(tmp_path / "ours")
    assert diffusers_warnings == []


def test_bad_arguments_give_clear_errors():
    with pytest.raises(ValueError, match="variance_type"):
        DDPMPaperScheduler(variance_type="tiny")
    with pytest.raises(ValueError, match="beta_schedule"):
        DDPMPaperScheduler(beta_schedule="exponential")
    with pytest.raises(ValueError, match="num_inference_steps"):
        DDPMPaperScheduler().set_timesteps(2000)
    with pytest.raises(ValueError, match="output channels"):
        scheduler = DDPMPaperScheduler(variance_type="learned_range")
        scheduler.step(torch.zeros(1, 3, 2, 2), 5, torch.zeros(1, 3, 2, 2))
