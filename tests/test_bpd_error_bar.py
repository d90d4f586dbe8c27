"""The error bar of the K-timestep bits/dim estimate is honest: the standard error one evaluation reports is about the
spread the estimate really has across independent evaluations, and their mean is the bound summed over all T terms."""

import math

import pytest
import torch
from test_likelihood import GaussianDataNoisePredictor, one_image

from evaluation.pipeline_metrics import model_range_and_bits
from pipelines.likelihood import bits_per_dim
from schedulers import DDPMPaperScheduler

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
