"""evaluate_ddpm.py end to end on a tiny exported pipeline, and its `evaluate` function."""

import json
import math
import time

import PIL.Image
import pytest
import torch
from diffusers import DDPMPipeline, DDPMScheduler, UNet2DModel

import evaluate_ddpm
from evaluation import FeatureExtractorUnavailableError
from pipelines import DDPMPaperPipeline

T = 20
PLOTS = ["rate_distortion.png", "bpd_terms.png", "progressive.png", "interpolation.png"]


@pytest.fixture(scope="module")
def pipeline_folder(tmp_path_factory):
    """A tiny model exported as train_ddpm.py exports: a stock DDPMPipeline folder."""
    torch.manual_seed(0)
    unet = UNet2DModel(
        sample_size=8,
        in_channels=1,
        out_channels=1,
        block_out_channels=(4, 8),
        norm_num_groups=4,
        layers_per_block=1,
        down_block_types=("DownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "UpBlock2D"),
    )
    folder = tmp_path_factory.mktemp("tiny-ddpm")
    DDPMPipeline(unet=unet, scheduler=DDPMScheduler(num_train_timesteps=T)).save_pretrained(folder)
    return folder


def test_cli_writes_metrics_and_plots(tmp_path, pipeline_folder, digits_cache):
    output_dir = tmp_path / "evaluation"
    report = evaluate_ddpm.main(
        [
            *("--pipeline", str(pipeline_folder), "--output_dir", str(output_dir)),
            *("--num_images", "6", "--bpd_timesteps", "5", "--num_samples", "12", "--rate_distortion_images", "3"),
            *("--batch_size", "8", "--device", "cpu"),
        ]
    )
    metrics = json.loads((output_dir / "metrics.json").read_text())
    assert metrics == json.loads(json.dumps(report))
    scalars = ["bits_per_dim", "bits_per_dim_stderr", "prior_bpd", "fid", "kid_mean", "kid_std", "precision", "recall"]
    for name in scalars:
        assert math.isfinite(metrics[name]), name
    assert metrics["bits_per_dim"] > metrics["prior_bpd"] > 0
    assert 0 <= metrics["precision"] <= 1 and 0 <= metrics["recall"] <= 1
    assert (metrics["num_images"], metrics["num_samples"]) == (6, 12)
    settings = metrics["settings"]
    assert settings["feature_extractor"] == "digits"  # the default for the embedded dataset
    assert (settings["num_train_timesteps"], settings["bpd_timesteps"], settings["resolution"]) == (T, 5, 8)
    curve = metrics["rate_distortion"]
    assert curve["timesteps"] == list(range(T - 1, -1, -1))
    assert len(curve["rate_bits_per_dim"]) == len(curve["distortion_rmse"]) == T
    assert len(metrics["bpd_terms"]["bits_per_dim"]) == T
    for name in PLOTS:
        path = output_dir / name
        assert path.stat().st_size > 0, name
        with PIL.Image.open(path) as image:
            assert min(image.size) >= 64, name
    # progressive.png: 4 chains (rows) of 11 snapshots; interpolation.png: t = 0, 4, 9 (rows) of source, 11 lambdas,
    # source.
    with PIL.Image.open(output_dir / "progressive.png") as image:
        assert image.size == (11 * 66 - 2, 4 * 66 - 2)
    with PIL.Image.open(output_dir / "interpolation.png") as image:
        assert image.size == (13 * 66 - 2, 3 * 66 - 2)
    assert metrics["interpolation_timesteps"] == [0, 4, 9]


def test_inception_features_offline_fail_before_any_work(tmp_path, pipeline_folder):
    images = tmp_path / "images"
    images.mkdir()
    PIL.Image.new("L", (8, 8)).save(images / "0.png")
    start = time.monotonic()
    with pytest.raises(FeatureExtractorUnavailableError, match="--feature_extractor digits"):
        evaluate_ddpm.main(["--pipeline", str(pipeline_folder), "--train_data_dir", str(images)])
    assert time.monotonic() - start < 10


def test_evaluate_takes_a_uint8_tensor_and_skips_what_is_not_asked(pipeline_folder, digits_cache):
    pipeline = DDPMPaperPipeline.from_pretrained(pipeline_folder)
    pixels = torch.randint(0, 256, (5, 1, 8, 8), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    only_bpd = evaluate_ddpm.evaluate(pipeline, pixels, num_images=4, bpd_timesteps=3, num_samples=0)
    assert set(only_bpd) == {"bits_per_dim", "bits_per_dim_stderr", "prior_bpd", "num_images"}
    assert only_bpd["num_images"] == 4
    # The same seed gives the same numbers: every image has its own random stream.
    assert evaluate_ddpm.evaluate(pipeline, pixels, num_images=4, bpd_timesteps=3, num_samples=0) == only_bpd
    only_samples = evaluate_ddpm.evaluate(pipeline, pixels, num_images=0, num_samples=6, num_inference_steps=5)
    assert set(only_samples) == {"fid", "kid_mean", "kid_std", "precision", "recall", "num_samples"}
