"""The flags of train_ddpm.py (training/args.py): every flag of diffusers' train_unconditional.py keeps its name, type,
default and choices; `~` and variables are expanded in every path flag; an empty text flag is refused in one line."""

from __future__ import annotations

import dataclasses
import json

import pytest
from helpers import FAST, SMALL_UNET, last_line, one_thread, run_training

from training.args import PATH_FLAGS, RUN_DEFAULTS, TrainingArguments, make_parser, parse_args

TINY_RUN = ["--model_config_name_or_path", "unet.json", "--resolution", "8", "--train_batch_size", "4", *FAST]


def parse_error(capsys, argv) -> str:
    """The last line of `parse_args(argv)`'s error, which must exit with status 2."""
    with pytest.raises(SystemExit) as exited:
        parse_args(argv)
    assert exited.value.code == 2
    return capsys.readouterr().err.strip().splitlines()[-1]


# `~` and variables ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("source", ["yaml", "json", "command-line"])
def test_home_and_variables_in_every_path_flag_are_expanded(tmp_path, monkeypatch, source):
    """A `~` in a file of flags became a folder named `~` in the working folder (a shell expands it only on a command
    line); so did `$VARIABLE`."""
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.setenv("SCRATCH", str(tmp_path / "scratch"))
    monkeypatch.chdir(tmp_path)
    values = {name: f"~/{name}" if index % 2 else f"$SCRATCH/{name}" for index, name in enumerate(PATH_FLAGS)}
    values["dataset_name"] = "${SCRATCH}/dataset_name"  # one of the two; the other is given as --train_data_dir
    values.pop("train_data_dir")
    if source == "command-line":
        argv = [item for name, value in values.items() for item in (f"--{name}", value)]
    else:
        path = tmp_path / f"flags.{source}"
        path.write_text(json.dumps(values))  # JSON is YAML too
        argv = [str(path)]
    args = parse_args(argv)
    for name, value in values.items():
        expected = value.replace("~", str(tmp_path / "home")).replace("${SCRATCH}", str(tmp_path / "scratch"))
        assert getattr(args, name) == expected.replace("$SCRATCH", str(tmp_path / "scratch")), name
    assert parse_args(["--train_data_dir", "~/images"]).train_data_dir == str(tmp_path / "home" / "images")
    assert parse_args(["--resume_from_checkpoint", "latest"]).resume_from_checkpoint == "latest"
    assert parse_args(["--dataset_name", "uoft-cs/cifar10"]).dataset_name == "uoft-cs/cifar10"


@pytest.mark.parametrize(
    "flag, value, names",
    [
        ("--output_dir", "$NO_SUCH_VARIABLE_HERE/run", "$NO_SUCH_VARIABLE_HERE"),
        ("--cache_dir", "${NO_SUCH_VARIABLE_HERE}/cache", "${NO_SUCH_VARIABLE_HERE}"),
        ("--logging_dir", "~no-such-user-here/logs", "~no-such-user-here"),
    ],
)
def test_a_path_that_cannot_be_expanded_is_one_line_naming_it(capsys, flag, value, names):
    line = parse_error(capsys, [flag, value])
    assert flag in line and f"'{value}'" in line and names in line, line


@pytest.mark.slow
@pytest.mark.fresh_process
def test_a_file_of_flags_with_home_paths_trains_into_the_home_folder(tmp_path, monkeypatch):
    """The whole run (`train_ddpm.main`, in the fresh process): the run from a file of `~` paths writes under $HOME,
    and no folder named `~` appears."""
    import train_ddpm

    home = tmp_path / "home"
    home.mkdir()
    (home / "unet.json").write_text(json.dumps(SMALL_UNET))
    flags = {"model_config_name_or_path": "~/unet.json", "output_dir": "~/run", "logging_dir": "~/logs"}
    flags.update(resolution=8, train_batch_size=4, max_train_steps=1, ddpm_num_steps=50, ddpm_num_inference_steps=2)
    flags.update(eval_batch_size=2, cpu=True, cache_dir=str(tmp_path / "cache"))
    (tmp_path / "flags.json").write_text(json.dumps(flags))
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.chdir(tmp_path)
    with one_thread():  # as the script runs (OMP_NUM_THREADS=1)
        train_ddpm.main(["flags.json"])
    assert (home / "run" / "model_index.json").is_file() and any((home / "logs").iterdir())
    assert not (tmp_path / "~").exists()


# Empty text flags -------------------------------------------------------------------------------------------------
# (A flag with choices refuses '' as argparse does, already one line naming it.)
TEXT_FLAGS = [
    f.name
    for f in dataclasses.fields(TrainingArguments)
    if f.type in ("str | None", "str") and "choices" not in f.metadata
]


@pytest.mark.parametrize("source", ["command-line", "file"])
@pytest.mark.parametrize("name", TEXT_FLAGS)
def test_an_empty_text_flag_is_one_line_naming_it(tmp_path, capsys, name, source):
    """An empty text flag (`--output_dir ""`, `--dataset_name ""`, ...) was taken as given, to fail later with a message
    that did not name it, or not at all; now it is refused at once, naming it."""
    argv = [f"--{name}", ""]
    if source == "file":
        (tmp_path / "flags.yaml").write_text(f'{name}: ""\n')
        argv = [str(tmp_path / "flags.yaml")]
    line = parse_error(capsys, argv)
    assert f"--{name} '' is empty" in line, line


@pytest.mark.slow
def test_the_script_refuses_an_empty_path_at_once(tmp_path):
    """The script itself: exit status 2, one line naming the flag, no traceback, nothing written."""
    (tmp_path / "unet.json").write_text(json.dumps(SMALL_UNET))
    result = run_training(
        tmp_path, [*TINY_RUN, "--max_train_steps", "1", "--output_dir", ""], processes=0, check=False
    )
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr[-3000:]
    assert "--output_dir '' is empty" in last_line(result)
    assert sorted(path.name for path in tmp_path.iterdir()) == ["unet.json"]


@pytest.mark.parametrize("flag", ["--output_dir", "--dataset_name"])
def test_main_refuses_an_empty_path_before_anything_else(tmp_path, monkeypatch, capsys, flag):
    """`train_ddpm.main` (what the script runs) stops in the parsing, before any Accelerator or file: in this process."""
    import train_ddpm

    monkeypatch.chdir(tmp_path)
    (tmp_path / "unet.json").write_text(json.dumps(SMALL_UNET))
    with pytest.raises(SystemExit) as exited:
        train_ddpm.main([*TINY_RUN, "--max_train_steps", "1", flag, ""])
    assert exited.value.code == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and f"{flag} '' is empty" in err.strip().splitlines()[-1]
    assert sorted(path.name for path in tmp_path.iterdir()) == ["unet.json"]


# The argument table of diffusers' examples/unconditional_image_generation/train_unconditional.py, `parse_args()`, at
# huggingface/diffusers main 58eb52c0803ea9af3abec60841c2a093bdf1f951 (2026-08-23, version 0.40.0.dev0; the file last
# changed in c56add8081be60b7e8794e011f1790d0e37aeced, "post release v0.39.0"). Read from the source with `ast`, in
# its order: (flag, type, default, choices, action). A store_true flag defaults to False.
PEER_FLAGS = [
    ("--dataset_name", str, None, None, None),
    ("--dataset_config_name", str, None, None, None),
    ("--model_config_name_or_path", str, None, None, None),
    ("--train_data_dir", str, None, None, None),
    ("--output_dir", str, "ddpm-model-64", None, None),
    ("--overwrite_output_dir", None, False, None, "store_true"),
    ("--cache_dir", str, None, None, None),
    ("--resolution", int, 64, None, None),
    ("--center_crop", None, False, None, "store_true"),
    ("--random_flip", None, False, None, "store_true"),
    ("--train_batch_size", int, 16, None, None),
    ("--eval_batch_size", int, 16, None, None),
    ("--dataloader_num_workers", int, 0, None, None),
    ("--num_epochs", int, 100, None, None),
    ("--save_images_epochs", int, 10, None, None),
    ("--save_model_epochs", int, 10, None, None),
    ("--gradient_accumulation_steps", int, 1, None, None),
    ("--learning_rate", float, 1e-4, None, None),
    ("--lr_scheduler", str, "cosine", None, None),
    ("--lr_warmup_steps", int, 500, None, None),
    ("--adam_beta1", float, 0.95, None, None),
    ("--adam_beta2", float, 0.999, None, None),
    ("--adam_weight_decay", float, 1e-6, None, None),
    ("--adam_epsilon", float, 1e-8, None, None),
    ("--use_ema", None, False, None, "store_true"),
    ("--ema_inv_gamma", float, 1.0, None, None),
    ("--ema_power", float, 0.75, None, None),
    ("--ema_max_decay", float, 0.9999, None, None),
    ("--push_to_hub", None, False, None, "store_true"),
    ("--hub_token", str, None, None, None),
    ("--hub_model_id", str, None, None, None),
    ("--hub_private_repo", None, False, None, "store_true"),
    ("--logger", str, "tensorboard", ("tensorboard", "wandb"), None),
    ("--logging_dir", str, "logs", None, None),
    ("--local_rank", int, -1, None, None),
    ("--mixed_precision", str, "no", ("no", "fp16", "bf16"), None),
    ("--prediction_type", str, "epsilon", ("epsilon", "sample"), None),
    ("--ddpm_num_steps", int, 1000, None, None),
    ("--ddpm_num_inference_steps", int, 1000, None, None),
    ("--ddpm_beta_schedule", str, "linear", None, None),
    ("--checkpointing_steps", int, 500, None, None),
    ("--checkpoints_total_limit", int, None, None, None),
    ("--resume_from_checkpoint", str, None, None, None),
    ("--enable_xformers_memory_efficient_attention", None, False, None, "store_true"),
    ("--preserve_input_precision", None, False, None, "store_true"),
]

# A value the peer takes for each flag without choices (its free-form strings: values its code accepts).
SAMPLE_VALUES = {
    "--dataset_name": "user/other-images",
    "--dataset_config_name": "default",
    "--model_config_name_or_path": "unet.json",
    "--train_data_dir": "other-images",
    "--output_dir": "out",
    "--cache_dir": "cache",
    "--resolution": "32",
    "--train_batch_size": "8",
    "--eval_batch_size": "4",
    "--dataloader_num_workers": "2",
    "--num_epochs": "3",
    "--save_images_epochs": "2",
    "--save_model_epochs": "2",
    "--gradient_accumulation_steps": "2",
    "--learning_rate": "2e-4",
    "--lr_scheduler": "constant_with_warmup",
    "--lr_warmup_steps": "5000",
    "--adam_beta1": "0.9",
    "--adam_beta2": "0.99",
    "--adam_weight_decay": "0",
    "--adam_epsilon": "1e-6",
    "--ema_inv_gamma": "2.0",
    "--ema_power": "0.5",
    "--ema_max_decay": "0.999",
    "--hub_token": "hf_notarealtoken",
    "--hub_model_id": "me/ddpm",
    "--logging_dir": "tb",
    "--local_rank": "0",
    "--ddpm_num_steps": "4000",
    "--ddpm_num_inference_steps": "250",
    "--ddpm_beta_schedule": "squaredcos_cap_v2",
    "--checkpointing_steps": "100",
    "--checkpoints_total_limit": "3",
    "--resume_from_checkpoint": "latest",
}

DATASETS = [["--dataset_name", "user/images"], ["--train_data_dir", "images"]]


def _dest(flag: str) -> str:
    return flag[2:]


@pytest.mark.parametrize("dataset", DATASETS, ids=["dataset_name", "train_data_dir"])
def test_every_peer_flag_has_the_peer_default_when_a_dataset_is_given(dataset):
    args = parse_args(dataset)
    ours = {flag: getattr(args, _dest(flag)) for flag, *_ in PEER_FLAGS if flag != dataset[0]}
    differ = [
        (flag, ours[flag], default)
        for flag, _, default, _, _ in PEER_FLAGS
        if flag in ours and (ours[flag] != default or type(ours[flag]) is not type(default))
    ]
    assert differ == []


def test_every_peer_flag_exists_with_the_peer_action_type_and_choices():
    parser = make_parser()
    actions = parser._option_string_actions
    missing = [flag for flag, *_ in PEER_FLAGS if flag not in actions]
    assert missing == []
    for flag, type_, _, choices, action in PEER_FLAGS:
        if action == "store_true":
            # The bare switch turns it on, as the peer's store_true does.
            assert getattr(parse_args([*DATASETS[0], flag]), _dest(flag)) is True, flag
            continue
        values = choices or (SAMPLE_VALUES[flag],)
        if choices:  # ours may take more (marked "(new)" in --help), never fewer
            assert set(choices) <= set(actions[flag].choices), flag
        for value in values:
            given = [flag, value] if flag in ("--dataset_name", "--train_data_dir") else [*DATASETS[0], flag, value]
            parsed = getattr(parse_args(given), _dest(flag))
            assert type(parsed) is type_ and parsed == type_(value), (flag, value, parsed)


def test_only_the_run_with_no_dataset_has_other_defaults_and_help_says_which():
    # With no dataset (the embedded digits) exactly the flags of RUN_DEFAULTS take their second value, and among the
    # peer's flags nothing else changes.
    digits, peer = parse_args([]), parse_args(DATASETS[0])
    peer_dests = {_dest(flag) for flag, *_ in PEER_FLAGS} - {"dataset_name"}
    changed = {name for name in peer_dests if getattr(digits, name) != getattr(peer, name)}
    assert changed == peer_dests & set(RUN_DEFAULTS)
    assert (digits.use_ema, peer.use_ema, digits.mixed_precision) == (True, False, "no")
    help_text = " ".join(make_parser().format_help().split())
    for name, (with_dataset, without) in RUN_DEFAULTS.items():
        assert f"(default: {with_dataset}; with no dataset, the embedded digits: {without})" in help_text, name
