"""FID, KID and precision/recall (evaluation/) over the offline digits features, and the feature networks' errors."""

import sys

import pytest
import torch
from diffusers import UNet2DModel
from offline_inception import torch_fidelity_without_cached_weights

from evaluation import (
    DigitsFeatures,
    FeatureExtractorUnavailableError,
    evaluate,
    extract_features,
    extract_logits,
    frechet_distance,
    inception_score,
    kernel_distance,
    load_feature_extractor,
    precision_recall,
    reference_features,
    sample_quality_metrics,
    weights_digest,
)
from evaluation.features import DIGITS_CLASSIFIER_FILE, digits_pixels
from pipelines import DDPMPaperPipeline
from schedulers import DDPMPaperScheduler


@pytest.fixture(scope="module")
def digits_features(digits_cache):
    return load_feature_extractor("digits")


def add_noise(pixels: torch.Tensor, std: float, seed: int = 0) -> torch.Tensor:
    noise = torch.randn(pixels.shape, generator=torch.Generator().manual_seed(seed)) * std
    return (pixels.float() + noise).round().clamp(0, 255).to(torch.uint8)


def test_digits_classifier_is_cached_and_classifies_held_out_writers(digits_cache, digits_features):
    assert (digits_cache / DIGITS_CLASSIFIER_FILE).is_file()
    assert digits_features.held_out_accuracy > 0.9  # the last 297 digits, kept out of training
    pixels, labels = digits_pixels()
    accuracy = (digits_features.logits(pixels).argmax(dim=1) == labels).float().mean().item()
    assert accuracy > 0.95
    # Any size and RGB work: they are converted to 8x8 grayscale first.
    rgb_16 = torch.nn.functional.interpolate(pixels[:64].float(), scale_factor=2).round().byte().expand(-1, 3, -1, -1)
    assert extract_features(digits_features, rgb_16).shape == (64, DigitsFeatures.num_features)
    reloaded = DigitsFeatures.pretrained()
    torch.testing.assert_close(reloaded(pixels[:8]), digits_features(pixels[:8]), rtol=0, atol=0)


def test_fid_kid_precision_recall_against_noise(digits_features):
    pixels, _ = digits_pixels()
    real = extract_features(digits_features, pixels[:800])
    assert abs(frechet_distance(real, real)) < 1e-6
    assert precision_recall(real, real) == (1.0, 1.0)

    noise_levels = [8, 24, 48, 96]
    results = [
        sample_quality_metrics(real, extract_features(digits_features, add_noise(pixels[:800], std)), kid_subsets=10)
        for std in noise_levels
    ]
    fids = [r["fid"] for r in results]
    kids = [r["kid_mean"] for r in results]
    precisions = [r["precision"] for r in results]
    print("\nnoise", noise_levels, "FID", [f"{v:.3f}" for v in fids], "precision", [f"{v:.3f}" for v in precisions])
    assert fids == sorted(fids) and fids[0] > 0
    assert kids == sorted(kids)
    assert precisions == sorted(precisions, reverse=True) and precisions[-1] < 0.8 * precisions[0]
    assert all(r["kid_std"] >= 0 for r in results)


def test_fid_between_two_halves_of_the_data_is_small_and_kid_near_zero(digits_features):
    pixels, _ = digits_pixels()
    first, second = extract_features(digits_features, pixels[0::2]), extract_features(digits_features, pixels[1::2])
    noisy = extract_features(digits_features, add_noise(pixels[1::2], 96))
    assert frechet_distance(first, second) < 0.2 * frechet_distance(first, noisy)
    kid_mean, kid_std = kernel_distance(first, second, subsets=10, subset_size=500)
    assert abs(kid_mean) < 3 * kid_std + 1e-3 * kernel_distance(first, noisy, subsets=10, subset_size=500)[0]


def test_precision_recall_on_known_geometry():
    # Real points on a line 0..9; with k = 1 each radius is 1. Fakes: two inside the real balls, two far away.
    real = torch.arange(10.0)[:, None]
    fake = torch.tensor([[0.5], [9.9], [50.0], [60.0]])
    precision, recall = precision_recall(real, fake, k=1)
    assert precision == pytest.approx(0.5)
    # Fake radii (k = 1): 9.4, 9.4, 10, 10 -> balls around 0.5 and 9.9 cover every real point.
    assert recall == pytest.approx(1.0)
    precision, recall = precision_recall(real, torch.tensor([[100.0], [101.0], [102.0]]), k=1)
    assert (precision, recall) == (0.0, 0.0)
    with pytest.raises(ValueError, match="more than 3"):
        precision_recall(real, fake[:3], k=3)


def test_reference_features_are_cached_by_content(digits_cache, digits_features):
    calls = []

    class Counting(torch.nn.Module):
        num_features = DigitsFeatures.num_features

        def forward(self, images):
            calls.append(len(images))
            return digits_features(images)

    pixels, _ = digits_pixels()
    first = reference_features(Counting(), pixels[:100], extractor_name="counting", dataset_id="digits/train")
    again = reference_features(Counting(), pixels[:100], extractor_name="counting", dataset_id="digits/train")
    assert calls == [100] and torch.equal(first, again)
    other = reference_features(Counting(), pixels[100:200], extractor_name="counting", dataset_id="digits/train")
    assert calls == [100, 100] and not torch.equal(first, other)
    names = [path.name for path in (digits_cache / "reference").iterdir() if "-counting-" in path.name]
    assert len(names) == 2 and all(name.startswith("digits_train-1x8x8-counting-100-") for name in names)


def test_reference_features_of_a_changed_extractor_are_not_reused(digits_cache, digits_features):
    calls = []
    pixels, _ = digits_pixels()

    def copy_of_digits(change: float = 0.0) -> DigitsFeatures:
        network = DigitsFeatures()
        network.load_state_dict(digits_features.state_dict())
        with torch.no_grad():
            network.hidden[0].bias[0] += change
        network.register_forward_hook(lambda module, args, output: calls.append(len(args[0])))
        return network

    first = reference_features(copy_of_digits(), pixels[:50], extractor_name="digits", dataset_id="weights")
    same_weights = reference_features(copy_of_digits(), pixels[:50], extractor_name="digits", dataset_id="weights")
    assert calls == [50] and torch.equal(first, same_weights)  # another module object, the same weights: reused
    retrained = copy_of_digits(change=1e-3)  # one bias moved a little, under the same name
    changed = reference_features(retrained, pixels[:50], extractor_name="digits", dataset_id="weights")
    assert calls == [50, 50] and not torch.equal(first, changed)
    torch.testing.assert_close(changed, extract_features(retrained, pixels[:50]), rtol=0, atol=0)
    names = sorted(path.name for path in (digits_cache / "reference").glob("weights-1x8x8-digits-50-*"))
    assert len(names) == 2 and names[0].split("-")[:-1] == names[1].split("-")[:-1]  # only the weights' hash differs
    assert {name.split("-")[-1] for name in names} == {
        f"{weights_digest(network)}.safetensors" for network in (digits_features, retrained)
    }


def test_inception_without_torch_fidelity_fails_fast_and_points_to_digits(monkeypatch, connections):
    monkeypatch.setitem(sys.modules, "torch_fidelity", None)  # as on a machine without it
    with pytest.raises(FeatureExtractorUnavailableError, match="--feature_extractor digits"):
        load_feature_extractor("inception")
    assert connections == []  # fast: no download tried


def test_inception_weights_offline_fail_fast_and_point_to_digits(monkeypatch, tmp_path, connections):
    # torch-fidelity present (a stand-in module) but its weights neither cached nor downloadable: offline mode is on.
    torch_fidelity_without_cached_weights(monkeypatch, tmp_path)
    with pytest.raises(FeatureExtractorUnavailableError, match="not cached.*--feature_extractor digits"):
        load_feature_extractor("inception")
    assert connections == []  # fast: no download tried


def test_unknown_feature_extractor_lists_the_known_ones():
    with pytest.raises(ValueError, match="digits, inception"):
        load_feature_extractor("clip")


def test_digits_pixels_are_the_training_data_the_embedded_run_sees():
    # evaluation/ reads the digits from scikit-learn itself (it does not import training/): the same uint8 images and
    # labels as image_data.sources.digits_dataset.
    from image_data.sources import digits_dataset

    pixels, labels = digits_pixels()
    digits = digits_dataset().with_format("numpy")[:]
    assert pixels.dtype == torch.uint8 and pixels.shape == (1797, 1, 8, 8)
    assert torch.equal(pixels, torch.from_numpy(digits["image"]).unsqueeze(1))
    assert torch.equal(labels, torch.from_numpy(digits["label"]).long())


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
