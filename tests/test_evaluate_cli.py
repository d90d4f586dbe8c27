"""evaluate_ddpm.py end to end on a tiny exported pipeline, and `evaluation.evaluate`, which it calls."""

import json
import math
import sys

import PIL.Image
import pytest
import torch
from diffusers import DDPMPipeline, DDPMScheduler, UNet2DModel
from offline_inception import torch_fidelity_without_cached_weights

import evaluate_ddpm
from command_line.fields import FEATURE_EXTRACTOR_NAMES, default_feature_extractor
from evaluation import FEATURE_EXTRACTORS, FeatureExtractorUnavailableError, evaluate
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


@pytest.mark.fresh_process  # evaluate_ddpm.main builds an Accelerator
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
    # source. Both are upscaled (nearest, integer factor) to at least 256 px a side.
    with PIL.Image.open(output_dir / "progressive.png") as image:
        scale = math.ceil(256 / (4 * 8))
        assert image.size == (11 * 8 * scale, 4 * 8 * scale)
    with PIL.Image.open(output_dir / "interpolation.png") as image:
        scale = math.ceil(256 / (3 * 8))
        assert image.size == (13 * 8 * scale, 3 * 8 * scale)
    assert metrics["interpolation_timesteps"] == [0, 4, 9]


def without_torch_fidelity(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "torch_fidelity", None)  # as on a machine without it


def with_torch_fidelity_but_no_cached_weights(monkeypatch, tmp_path):
    torch_fidelity_without_cached_weights(monkeypatch, tmp_path / "torch-hub")


@pytest.mark.fresh_process  # evaluate_ddpm.main builds an Accelerator
@pytest.mark.parametrize("machine", [without_torch_fidelity, with_torch_fidelity_but_no_cached_weights])
def test_inception_features_offline_fail_before_any_work(tmp_path, pipeline_folder, monkeypatch, machine, connections):
    machine(monkeypatch, tmp_path)  # whatever this machine has installed or cached
    images = tmp_path / "images"
    images.mkdir()
    PIL.Image.new("L", (8, 8)).save(images / "0.png")
    with pytest.raises(
        SystemExit, match=r"^evaluate_ddpm.py: error: The Inception .*--feature_extractor digits"
    ) as exit:
        evaluate_ddpm.main(["--pipeline", str(pipeline_folder), "--train_data_dir", str(images)])
    assert isinstance(exit.value.__cause__, FeatureExtractorUnavailableError)  # one line, not its traceback
    assert connections == []  # fast: no download tried


def test_evaluate_takes_a_uint8_tensor_and_skips_what_is_not_asked(pipeline_folder, digits_cache):
    pipeline = DDPMPaperPipeline.from_pretrained(pipeline_folder)
    pixels = torch.randint(0, 256, (5, 1, 8, 8), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    only_bpd = evaluate(pipeline, pixels, num_images=4, bpd_timesteps=3, num_samples=0)
    assert set(only_bpd) == {"bits_per_dim", "bits_per_dim_stderr", "prior_bpd", "num_images"}
    assert only_bpd["num_images"] == 4
    # The same seed gives the same numbers: every image has its own random stream.
    assert evaluate(pipeline, pixels, num_images=4, bpd_timesteps=3, num_samples=0) == only_bpd
    only_samples = evaluate(pipeline, pixels, num_images=0, num_samples=6, num_inference_steps=5)
    assert set(only_samples) == {
        "fid",
        "kid_mean",
        "kid_std",
        "precision",
        "recall",
        "num_samples",
        "inception_score",
    } | {"inception_score_std"}


@pytest.mark.fresh_process  # evaluate_ddpm.main builds an Accelerator
def test_multi_process_launch_seen_as_one_process_fails_before_any_work(tmp_path, pipeline_folder, monkeypatch):
    # `accelerate launch --multi_gpu --num_processes 2` on a machine without GPUs: WORLD_SIZE is 2, yet each process
    # runs alone (DistributedType.NO) and would believe it is the main one.
    monkeypatch.setenv("WORLD_SIZE", "2")
    output_dir = tmp_path / "evaluation"
    with pytest.raises(SystemExit, match="error: 2 processes were launched but each one runs alone.*--device cpu"):
        evaluate_ddpm.main(["--pipeline", str(pipeline_folder), "--output_dir", str(output_dir)])
    assert not output_dir.exists()


@pytest.mark.parametrize("suffix", [".json", ".yaml"])
def test_a_single_config_file_argument_is_parsed_from_argv(tmp_path, monkeypatch, suffix):
    settings = {"pipeline": "some/pipeline", "num_samples": 7, "interpolation_timesteps": [1, 5], "center_crop": True}
    path = tmp_path / f"evaluation{suffix}"
    path.write_text(json.dumps(settings))  # JSON is also YAML
    monkeypatch.setattr(sys, "argv", ["evaluate_ddpm.py", "--pipeline", "from/sys-argv"])  # must not be read
    args = evaluate_ddpm.parse_args([str(path)])
    assert (args.pipeline, args.num_samples, args.interpolation_timesteps) == ("some/pipeline", 7, [1, 5])
    assert args.center_crop is True
    assert evaluate_ddpm.parse_args(["--pipeline", "flags/too"]).pipeline == "flags/too"


def test_training_flags_offer_every_feature_extractor_and_the_same_default():
    # training/ does not import evaluation/: its argparse choices are plain names, kept equal to the registry here.
    assert sorted(FEATURE_EXTRACTOR_NAMES) == sorted(FEATURE_EXTRACTORS)
    assert default_feature_extractor(None, None) == "digits"  # the embedded digits
    assert (
        default_feature_extractor("uoft-cs/cifar10", None) == default_feature_extractor(None, "images") == "inception"
    )
