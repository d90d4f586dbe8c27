"""configs/: the paper's experiments as flag files, and flags after a file overriding it."""

import re
from pathlib import Path

import numpy as np
import pytest
from datasets import Dataset, Features
from datasets import Image as ImageFeature
from PIL import Image

import evaluate_ddpm
from training.args import PAPER_RECIPES, make_parser, parse_args
from training.ema import EMA
from training.models import build_unet, count_parameters

REPO = Path(__file__).resolve().parents[1]
CONFIGS = REPO / "configs"

# Ho et al. 2020: Sec. 4 (T, betas) and Appendix B (the rest); warm-up and clipping are the authors' code's.
COMMON = {
    "ddpm_num_steps": 1000,
    "ddpm_beta_schedule": "linear",
    "prediction_type": "epsilon",
    "loss_type": "simple",
    "variance_type": "fixed_small",
    "lr_scheduler": "constant_with_warmup",
    "lr_warmup_steps": 5000,
    "adam_beta1": 0.9,
    "adam_beta2": 0.999,
    "adam_weight_decay": 0.0,
    "max_grad_norm": 1.0,
    "use_ema": True,
    "ema_max_decay": 0.9999,
}
# file: (resolved values, global batch on 8 processes, dropout, parameters in millions, tolerance in millions)
PAPER = {
    "ddpm-cifar10.yaml": (
        {"resolution": 32, "model_preset": "ddpm-cifar10", "learning_rate": 2e-4, "max_train_steps": 800_000,
         "random_flip": True, "dataset_name": "uoft-cs/cifar10"},
        128, 0.1, 35.7, 0.1,
    ),
    "ddpm-celebahq256.yaml": (
        {"resolution": 256, "model_preset": "ddpm-256", "learning_rate": 2e-5, "max_train_steps": 500_000,
         "random_flip": True},
        64, 0.0, 114, 0.5,
    ),
    "ddpm-lsun-church256.yaml": (
        {"resolution": 256, "model_preset": "ddpm-256", "learning_rate": 2e-5, "max_train_steps": 1_200_000,
         "random_flip": True},
        64, 0.0, 114, 0.5,
    ),
    "ddpm-lsun-bedroom256.yaml": (
        {"resolution": 256, "model_preset": "ddpm-256", "learning_rate": 2e-5, "max_train_steps": 2_400_000,
         "random_flip": False},
        64, 0.0, 114, 0.5,
    ),
}  # fmt: skip


def test_every_config_file_is_a_tested_recipe_and_named_in_the_help():
    files = {path.name for path in CONFIGS.glob("*.yaml")}
    assert files == {*PAPER, "digits.yaml", "eval-paper.yaml"}
    assert {Path(path).name for path in PAPER_RECIPES} == {*PAPER, "digits.yaml"}
    help_text = make_parser().format_help()
    for path in PAPER_RECIPES:
        assert path in help_text and (REPO / path).is_file()


@pytest.mark.parametrize("name", list(PAPER))
def test_paper_config_resolves_to_the_papers_values(name):
    values, global_batch, _, _, _ = PAPER[name]
    args = parse_args([str(CONFIGS / name)])
    for flag, expected in {**COMMON, **values}.items():
        assert getattr(args, flag) == expected, flag
    assert args.train_batch_size * 8 * args.gradient_accumulation_steps == global_batch
    # The paper's EMA is a constant 0.9999: from the second update on (the first copies the weights).
    ema = EMA([], max_decay=args.ema_max_decay, inv_gamma=args.ema_inv_gamma, power=args.ema_power)
    assert [ema.decay(n) for n in (2, 3, 1000)] == [0.9999] * 3


@pytest.mark.parametrize("name", list(PAPER))
def test_config_header_states_the_batch_mapping_of_its_values(name):
    """The header's "global batch N = train_batch_size B x P processes x gradient_accumulation_steps A" holds."""
    text = (CONFIGS / name).read_text()
    args = parse_args([str(CONFIGS / name)])
    mapping = re.search(
        r"global batch (\d+) = train_batch_size (\d+) x (\d+) processes x gradient_accumulation_steps (\d+)", text
    )
    assert mapping, name
    batch, per_process, processes, accumulation = map(int, mapping.groups())
    assert (batch, per_process, accumulation) == (
        PAPER[name][1],
        args.train_batch_size,
        args.gradient_accumulation_steps,
    )
    assert per_process * processes * accumulation == batch
    assert "Appendix B" in text and "Sec. 4" in text and "authors' code" in text


@pytest.mark.parametrize("name", list(PAPER))
def test_config_builds_its_preset_with_the_papers_size_and_dropout(name):
    _, _, dropout, millions, tolerance = PAPER[name]
    args = parse_args([str(CONFIGS / name)])
    unet = build_unet(args.model_preset, args.model_config_name_or_path, args.resolution, in_channels=3)
    assert abs(count_parameters(unet) / 1e6 - millions) <= tolerance
    assert unet.config.dropout == dropout and unet.config.sample_size == args.resolution


def test_digits_config_is_the_no_flag_default_run():
    assert parse_args([str(CONFIGS / "digits.yaml")]) == parse_args([])


def test_eval_paper_config_is_the_papers_evaluation():
    args = evaluate_ddpm.parse_args([str(CONFIGS / "eval-paper.yaml"), "--pipeline", "ddpm-cifar10"])
    assert (args.pipeline, args.split, args.num_samples, args.bpd_timesteps) == ("ddpm-cifar10", "test", 50_000, 0)
    assert (args.num_images, args.feature_extractor) == (10_000, "inception")
    assert evaluate_ddpm.parse_args(
        [str(CONFIGS / "eval-paper.yaml"), "--pipeline", "x", "--split", "train"]
    ).split == ("train")


# Flags after a file ---------------------------------------------------------------------------------------------------
def test_flags_after_the_file_win_and_the_rest_of_the_file_stays():
    cifar = str(CONFIGS / "ddpm-cifar10.yaml")
    args = parse_args([cifar, "--output_dir", "run1", "--mixed_precision", "bf16", "--learning-rate=1e-4"])
    assert (args.output_dir, args.mixed_precision, args.learning_rate) == ("run1", "bf16", 1e-4)
    assert (args.max_train_steps, args.lr_warmup_steps, args.train_batch_size) == (800_000, 5000, 16)
    assert parse_args([cifar, "--random_flip", "false"]).random_flip is False
    assert parse_args([cifar, "--no_allow_tf32"]).allow_tf32 is False


def _error(capsys, argv, parse=parse_args) -> str:
    with pytest.raises(SystemExit) as raised:
        parse(argv)
    assert raised.value.code == 2
    return capsys.readouterr().err.strip().splitlines()[-1]


def test_a_bad_value_in_the_file_is_an_error_naming_the_file_even_with_flags_after_it(tmp_path, capsys):
    config = tmp_path / "run.yaml"
    config.write_text("learning_rate: -1\nnum_channels: 3\n")
    for extra in ([], ["--output_dir", "run1"]):
        message = _error(capsys, [str(config), *extra])
        assert f"{config}: --learning_rate -1.0 is out of range" in message
    config.write_text("num_channels: 2\n")
    assert str(config) in _error(capsys, [str(config), "--output_dir", "run1"])
    # A flag after the file, out of range: the error is the command line's, not the file's.
    message = _error(capsys, [str(CONFIGS / "ddpm-cifar10.yaml"), "--learning_rate", "-2"])
    assert "--learning_rate -2.0 is out of range" in message and "ddpm-cifar10.yaml" not in message
    # The file's out-of-range value is not used when a flag after it replaces it.
    config.write_text("learning_rate: -1\n")
    assert parse_args([str(config), "--learning_rate", "3e-4"]).learning_rate == 3e-4


def test_only_whole_flags_after_one_file_are_accepted(tmp_path, capsys):
    cifar = str(CONFIGS / "ddpm-cifar10.yaml")
    assert "unrecognized flag(s): --output" in _error(capsys, [cifar, "--output", "run1"])  # no abbreviations
    assert "value(s) that no flag takes" in _error(capsys, [cifar, str(CONFIGS / "digits.yaml")])  # one file
    assert "value(s) that no flag takes" in _error(capsys, ["--output_dir", "x", cifar])  # the file comes first
    assert "--pipeline" in _error(capsys, [str(CONFIGS / "eval-paper.yaml")], evaluate_ddpm.parse_args)
    message = _error(capsys, [str(CONFIGS / "eval-paper.yaml"), "--pipeline", "x", "--num_samples", "-1"],
                     evaluate_ddpm.parse_args)  # fmt: skip
    assert "--num_samples" in message and "eval-paper.yaml" not in message


# The CIFAR-10 recipe runs ---------------------------------------------------------------------------------------------
@pytest.mark.slow
@pytest.mark.long
@pytest.mark.fresh_process  # train_ddpm.main, in this process, builds an Accelerator
def test_cifar10_recipe_trains_two_steps_on_a_local_hub_layout_folder(tmp_path, monkeypatch):
    """The file as shipped, with the dataset, steps, batch and sampling cut down by flags after it."""
    folder = tmp_path / "cifar-like"
    (folder / "data").mkdir(parents=True)
    rng = np.random.default_rng(0)
    images = [Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)) for _ in range(8)]
    Dataset.from_dict({"img": images}, Features({"img": ImageFeature()})).to_parquet(
        str(folder / "data" / "train-00000-of-00001.parquet")
    )
    overrides = ["--dataset_name", str(folder), "--max_train_steps", "2", "--train_batch_size", "2"]
    overrides += ["--ddpm_num_inference_steps", "2", "--eval_batch_size", "1", "--output_dir", "run", "--cpu"]
    import train_ddpm

    monkeypatch.chdir(tmp_path)
    train_ddpm.main([str(CONFIGS / "ddpm-cifar10.yaml"), *overrides, "--cache_dir", str(tmp_path / "c")])
    run = tmp_path / "run"
    assert (run / "checkpoint-2").is_dir() and (run / "model_index.json").is_file()
    config = (run / "unet" / "config.json").read_text()
    assert '"dropout": 0.1' in config and '"sample_size": 32' in config
