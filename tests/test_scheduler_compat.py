"""Every option of `diffusers.DDPMScheduler`, swept through it and through DDPMPaperScheduler along a respaced chain."""

import itertools

import numpy as np
import pytest
import torch
from diffusers import DDPMScheduler

from schedulers import DDPMPaperScheduler

T = 1000
SHAPE = (2, 2, 4, 4)  # two images of 2 channels: the learned variance types get 4 output channels

# Every value of every option DDPMScheduler has. `trained_betas` is a beta schedule of its own here (its values are
# the linear schedule's, given explicitly); `x0` is the handling of the predicted x_0: none, clipping, thresholding.
OPTIONS = {
    "betas": ["linear", "scaled_linear", "squaredcos_cap_v2", "sigmoid", "laplace", "trained_betas"],
    "rescale_betas_zero_snr": [False, True],
    "timestep_spacing": ["leading", "linspace", "trailing"],
    "steps_offset": [0, 1],
    "variance_type": ["fixed_small", "fixed_small_log", "fixed_large", "fixed_large_log", "learned", "learned_range"],
    "prediction_type": ["epsilon", "sample", "v_prediction"],
    "x0": ["none", "clip_sample", "thresholding"],
    "num_inference_steps": [10, 3],
}


OPTIONS_DEFAULTS = {name: values[0] for name, values in OPTIONS.items()}


def all_pairs(options: dict[str, list]) -> list[dict]:
    """
    A covering array of strength 2, built greedily: each value of each option appears together with each value of
    every other option in at least one configuration (about 40 configurations instead of the 7,776 of the product).
    """
    names = list(options)
    uncovered = {(a, va, b, vb) for a, b in itertools.combinations(names, 2) for va in options[a] for vb in options[b]}
    configurations = []
    rng = np.random.default_rng(0)
    while uncovered:
        # Start from an uncovered pair, then fill every other option with the value that covers most new pairs.
        a, va, b, vb = min(uncovered, key=repr)
        chosen = {a: va, b: vb}
        for name in (n for n in rng.permutation(names) if n not in chosen):
            others = [(other, chosen[other]) for other in chosen]
            gains = {
                value: sum((name, value, o, v) in uncovered or (o, v, name, value) in uncovered for o, v in others)
                for value in options[name]
            }
            chosen[name] = max(options[name], key=gains.get)
        configurations.append({name: chosen[name] for name in names})
        uncovered -= {(a, chosen[a], b, chosen[b]) for a, b in itertools.combinations(names, 2)}
    return configurations


# The ends of the schedule, where coefficients can become infinite: with zero terminal SNR abar_{T-1} = 0, and the
# chains of linspace and trailing spacing start at t = T-1. There every prediction type meets every x_0 handling.
ZERO_SNR_END = [
    {**OPTIONS_DEFAULTS, "betas": betas, "rescale_betas_zero_snr": True, "timestep_spacing": spacing,
     "prediction_type": prediction_type, "x0": x0}
    for (spacing, prediction_type, x0), betas in zip(
        itertools.product(["linspace", "trailing"], OPTIONS["prediction_type"], OPTIONS["x0"]),
        itertools.cycle(OPTIONS["betas"]),
    )
]  # fmt: skip
CONFIGURATIONS = all_pairs(OPTIONS) + ZERO_SNR_END


def scheduler_kwargs(configuration: dict) -> dict:
    kwargs = {name: configuration[name] for name in ("rescale_betas_zero_snr", "timestep_spacing", "steps_offset")}
    kwargs.update(variance_type=configuration["variance_type"], prediction_type=configuration["prediction_type"])
    kwargs.update(clip_sample=configuration["x0"] == "clip_sample", thresholding=configuration["x0"] == "thresholding")
    if configuration["betas"] == "trained_betas":
        kwargs["trained_betas"] = np.linspace(1e-4, 0.02, T).tolist()
    else:
        kwargs["beta_schedule"] = configuration["betas"]
    return kwargs


def tiny_model(x: torch.Tensor, t: int, variance_type: str) -> torch.Tensor:
    """A smooth random function of (x, t); for the learned variance types the extra channels are a valid sigma^2
    (`learned`: positive) or interpolation fraction (`learned_range`: in [-1, 1])."""
    scale = 1.0 + t / T
    prediction = torch.tanh(1.3 * x * scale) + 0.1 * torch.roll(x, 1, dims=-1)
    if variance_type == "learned":
        return torch.cat([prediction, 0.01 * torch.sigmoid(x)], dim=1)
    if variance_type == "learned_range":
        return torch.cat([prediction, torch.tanh(x - 0.2)], dim=1)
    return prediction


def run_chain(scheduler, configuration: dict) -> torch.Tensor:
    scheduler.set_timesteps(configuration["num_inference_steps"])
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(SHAPE, generator=generator)
    for t in scheduler.timesteps.tolist():
        output = tiny_model(x, t, configuration["variance_type"])
        x = scheduler.step(output, t, x, generator=generator).prev_sample
    return x


def test_the_sweep_covers_every_pair_of_option_values():
    for a, b in itertools.combinations(OPTIONS, 2):
        seen = {(c[a], c[b]) for c in CONFIGURATIONS}
        assert seen == set(itertools.product(OPTIONS[a], OPTIONS[b])), (a, b)
    assert len(CONFIGURATIONS) < 80


@pytest.mark.parametrize("configuration", CONFIGURATIONS, ids=lambda c: "-".join(str(v) for v in c.values()))
def test_respaced_chain_is_finite_and_agrees_with_diffusers_wherever_diffusers_is_finite(configuration):
    kwargs = scheduler_kwargs(configuration)
    stock = run_chain(DDPMScheduler(**kwargs), configuration)
    ours = run_chain(DDPMPaperScheduler(**kwargs), configuration)
    if not torch.isfinite(stock).all():  # e.g. DDPMScheduler's own fixed_large_log, or an unclipped x_0 of abar = 0
        return
    assert torch.isfinite(ours).all(), f"non-finite samples where DDPMScheduler's are finite: {kwargs}"
    # float64 coefficients against float32 ones, over up to 10 steps on values of order 1
    torch.testing.assert_close(ours, stock, rtol=1e-4, atol=1e-4, msg=lambda m: f"{kwargs}: {m}")


def test_zero_terminal_snr_makes_the_last_alphas_cumprod_zero_and_its_reciprocal_infinite():
    scheduler = DDPMPaperScheduler(rescale_betas_zero_snr=True)
    assert scheduler.alphas_cumprod[-1].item() == 0.0
    assert scheduler.sqrt_recip_alphas_cumprod[-1].item() == float("inf")
    assert 0 < scheduler.alphas_cumprod[-2].item() < 1e-4
