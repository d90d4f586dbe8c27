"""The Inception Score (evaluation/sample_quality.py) against closed forms, on the digits classifier's own training
images, and in the dict `evaluate()` returns (which metrics.json, the model card and the --eval_steps logs print)."""

import pytest
import torch
from diffusers import UNet2DModel

from evaluation import DigitsFeatures, evaluate, extract_logits, inception_score
from evaluation.features import digits_pixels
from pipelines import DDPMPaperPipeline
from schedulers import DDPMPaperScheduler


def confident_logits(classes: list[int], num_classes: int = 10) -> torch.Tensor:
    """Logits of a classifier sure of each image's class (p(y|x) one-hot up to e^-50)."""
    return torch.nn.functional.one_hot(torch.tensor(classes), num_classes).double() * 50.0


def test_confident_even_predictions_score_the_number_of_classes_and_splits_give_mean_and_std():
    # Part one: 10 images over 10 classes (IS 10); part two: 10 images over 5 classes (IS 5).
    logits = confident_logits(list(range(10)) + [0, 1, 2, 3, 4] * 2)
    mean, std = inception_score(logits, splits=2)
    assert mean == pytest.approx(7.5, rel=1e-9)
    assert std == pytest.approx(2.5, rel=1e-9)  # the population std over splits, as the original code's np.std
    assert inception_score(confident_logits(list(range(10)) * 10))[0] == pytest.approx(10.0, rel=1e-9)


def test_a_single_prediction_or_uninformative_logits_score_one():
    assert inception_score(confident_logits([3] * 50)) == pytest.approx((1.0, 0.0), abs=1e-9)
    assert inception_score(torch.zeros(40, 10)) == pytest.approx((1.0, 0.0), abs=1e-12)
    # Noise logits of scale 0.1: p(y|x) within ~10% of uniform, so the score is within 1% of 1.
    noise = 0.1 * torch.randn(1000, 10, generator=torch.Generator().manual_seed(0))
    mean, _ = inception_score(noise)
    assert 1.0 < mean < 1.01


def test_digits_classifier_scores_its_own_training_images_near_ten(digits_cache):
    classifier = DigitsFeatures.pretrained()
    images, labels = digits_pixels()
    mean, std = inception_score(extract_logits(classifier, images))
    assert 8.0 < mean <= 10.0
    assert 0.0 < std < 0.5
    # Each digit class alone: one class, a score near 1.
    ones = images[labels == 1]
    assert inception_score(extract_logits(classifier, ones), splits=1)[0] < 1.5


def test_extractors_without_a_classifier_head_have_no_logits():
    assert extract_logits(torch.nn.Flatten(), torch.zeros(2, 1, 8, 8, dtype=torch.uint8)) is None


def test_evaluate_reports_the_inception_score_of_the_samples(digits_cache):
    unet = UNet2DModel(
        sample_size=8, in_channels=1, out_channels=1, block_out_channels=(4, 8), norm_num_groups=4, layers_per_block=1,
        down_block_types=("DownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "UpBlock2D"),
    )  # fmt: skip
    pipeline = DDPMPaperPipeline(unet=unet, scheduler=DDPMPaperScheduler(num_train_timesteps=10))
    pipeline.set_progress_bar_config(disable=True)
    images, _ = digits_pixels()
    metrics = evaluate(pipeline, images[:64], num_images=0, num_samples=20, num_inference_steps=2)
    assert 1.0 <= metrics["inception_score"] <= 10.0
    assert metrics["inception_score_std"] >= 0.0
