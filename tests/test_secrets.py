"""Credentials never leak, whatever carried them: tokens masked by value in logs, errors, configs and every file
written or published; published text holds no local paths. Also the image column, checked before any work."""

import dataclasses
import io
import json
import logging
from pathlib import Path

import pytest
from datasets import Dataset, Features, Value
from datasets import Image as ImageFeature
from helpers import FAST, SMALL_UNET, random_images, run_training
from hub_server import LocalHub

import evaluate_ddpm
import train_ddpm
from hub_access.secrets import mask_logs_and_errors, public_argv, register
from training.args import parse_args, public_config
from training.output_lock import LOCK_FILE_NAME

TOKEN = "hf_trustFlagToken0123456789abcdefgh"
ENV_TOKEN = "hf_trustEnvToken0123456789abcdefghi"
SHAPED_TOKEN = "hf_" + "Q" * 34  # the shape of a Hub token: masked even when unknown
SHORT_RUN = ["--model_config_name_or_path", "unet.json", "--max_train_steps", "2", "--checkpointing_steps", "1", *FAST]


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("trust")
    (folder / "unet.json").write_text(json.dumps(SMALL_UNET))
    return folder


@pytest.fixture(scope="module")
def images_elsewhere(tmp_path_factory) -> Path:
    """An image folder outside the runs' working folder: a card may name it by its base name only."""
    folder = tmp_path_factory.mktemp("elsewhere") / "my-images"
    folder.mkdir()
    for index, image in enumerate(random_images(8, (9, 9), seed=3)):
        image.save(folder / f"{index}.png")
    return folder


@pytest.fixture
def in_process(request, workdir, monkeypatch):
    """Run `train_ddpm.main` here, in `workdir`: in a test marked fresh_process (accelerate's state is process-wide)."""
    assert request.node.get_closest_marker("fresh_process"), "mark the test @pytest.mark.fresh_process"
    monkeypatch.chdir(workdir)
    return lambda *args: train_ddpm.main(["--cpu", "--cache_dir", str(workdir / "in-process-cache"), *args])


def files_holding(folder: Path, *needles: str) -> list[str]:
    """Every file under `folder` (logs, event files, checkpoints, card) whose bytes contain one of `needles`."""
    return [
        f"{path.relative_to(folder)}: {needle}"
        for path in sorted(folder.rglob("*"))
        if path.is_file()
        for needle in needles
        if needle.encode() in path.read_bytes()
    ]


# Credentials and local paths ----------------------------------------------------------------------------------------
@pytest.mark.slow
def test_abbreviated_token_flag_is_refused_without_showing_the_token(workdir):
    """The script itself once; every form through `train_ddpm.main` in the next test."""
    result = run_training(workdir, [*SHORT_RUN, "--output_dir", "abbreviated", "--hub_tok", TOKEN], processes=0,
                          check=False)  # fmt: skip
    assert result.returncode == 2, result.stderr[-2000:]
    assert "--hub_tok" in result.stderr and "did you mean --hub_token" in result.stderr
    assert TOKEN not in result.stdout + result.stderr
    assert not (workdir / "abbreviated").exists()


@pytest.mark.parametrize("argv", [["--hub_tok", TOKEN], [f"--hub_tok={TOKEN}"], ["--hub_to", TOKEN]])
def test_abbreviated_token_flag_is_refused_by_main_without_showing_the_token(tmp_path, monkeypatch, capsys, argv):
    import train_ddpm

    (tmp_path / "unet.json").write_text(json.dumps(SMALL_UNET))
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as exited:
        train_ddpm.main([*SHORT_RUN, "--output_dir", "abbreviated", *argv])
    assert exited.value.code == 2
    out, err = capsys.readouterr()
    assert "--hub_tok" in err and "did you mean --hub_token" in err
    assert TOKEN not in out + err
    assert not (tmp_path / "abbreviated").exists()
    with pytest.raises(SystemExit) as exit_info:
        evaluate_ddpm.parse_args(["--pipeline", "p", "--num_samp", "3"])
    assert exit_info.value.code == 2


def test_full_flags_work_in_both_forms():
    assert parse_args(["--hub_token", TOKEN]).hub_token == TOKEN
    assert parse_args([f"--hub_token={TOKEN}"]).hub_token == TOKEN
    assert parse_args(["--learning_rate=3e-4", "--adam_beta1", "0.9"]).learning_rate == 3e-4
    assert evaluate_ddpm.parse_args(["--pipeline=p", "--batch_size=8"]).batch_size == 8


@pytest.fixture(scope="module")
def token_runs(workdir, images_elsewhere) -> dict[str, tuple[Path, dict]]:
    """Three real runs: the token by `--hub_token TOKEN` (an image folder outside the working folder, absolute
    --output_dir, pushed to a loopback Hub), by `--hub_token=TOKEN`, and by HF_TOKEN (pushed)."""
    runs = {}
    with LocalHub(token=TOKEN) as hub:
        output = workdir / "by-flag"
        args = [
            *SHORT_RUN,
            "--train_data_dir",
            str(images_elsewhere),
            "--resolution",
            "8",
            "--output_dir",
            str(output),
        ]
        args += ["--push_to_hub", "--hub_model_id", "me/by-flag", "--hub_token", TOKEN]
        result = run_training(workdir, args, env={**hub.env(), "HF_TOKEN": ""}, processes=0)
        runs["flag"] = (output, hub.repos["me/by-flag"]["files"], result)
    output = workdir / "by-equals"
    result = run_training(workdir, [*SHORT_RUN, f"--hub_token={TOKEN}", "--output_dir", str(output)], processes=0)
    runs["equals"] = (output, {}, result)
    with LocalHub(token=ENV_TOKEN) as hub:
        output = workdir / "by-env"
        args = [*SHORT_RUN, "--output_dir", str(output), "--push_to_hub", "--hub_model_id", "me/by-env"]
        result = run_training(workdir, args, env={**hub.env(), "HF_TOKEN": ENV_TOKEN}, processes=0)
        runs["env"] = (output, hub.repos["me/by-env"]["files"], result)
    return runs


@pytest.mark.slow
@pytest.mark.parametrize("carrier", ["flag", "equals", "env"])
def test_no_token_and_no_absolute_path_in_any_file_written_or_published(
    token_runs, workdir, images_elsewhere, carrier
):
    output, published, result = token_runs[carrier]
    secrets = [TOKEN, ENV_TOKEN, str(workdir), str(images_elsewhere.parent)]
    assert files_holding(output, *secrets) == []
    assert list((output / "logs").rglob("events.out.tfevents.*")) and (output / "checkpoint-2").is_dir()
    assert not any(secret in result.stdout + result.stderr for secret in secrets[:2])
    card = (output / "README.md").read_text()
    assert f"--output_dir by-{carrier}" in card
    if published:
        assert {"README.md", "model_index.json"} <= set(published)
        assert not any(LOCK_FILE_NAME in name for name in published)
        assert [name for name, content in published.items() if any(s.encode() in content for s in secrets)] == []
    if carrier == "flag":
        assert "--hub_token '***'" in card or "--hub_token ***" in card
        assert "--train_data_dir my-images" in card  # outside the working folder: its base name only
        state = json.loads((output / "checkpoint-2" / "trainer_state.json").read_text())["training_args"]
        assert (state["train_data_dir"], state["output_dir"]) == ("my-images", "by-flag")


@pytest.mark.fresh_process
def test_tokens_are_masked_by_value_in_logs_errors_and_public_configs(workdir, in_process, monkeypatch):
    register(TOKEN)
    mask_logs_and_errors()
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    library = logging.getLogger("some.library")
    library.addHandler(handler)
    try:
        library.warning("request with %s failed", TOKEN)
        try:
            raise RuntimeError(f"bad token {TOKEN}")
        except RuntimeError:
            library.exception("failed")
    finally:
        library.removeHandler(handler)
    assert TOKEN not in stream.getvalue() and "request with *** failed" in stream.getvalue()
    assert "bad token ***" in stream.getvalue()

    monkeypatch.setenv("HUGGING_FACE_HUB_TOKEN", ENV_TOKEN)
    # A token in another flag is refused (tests/test_preflight.py); public configs mask one anyway.
    args = dataclasses.replace(parse_args(["--output_dir", str(workdir / "x")]), hub_model_id=f"me/{ENV_TOKEN}")
    assert ENV_TOKEN not in json.dumps(public_config(args)) and public_config(args)["output_dir"] == "x"
    assert public_argv([f"--hub-token={TOKEN}", "--seed", "1", f"--x={ENV_TOKEN}"], [TOKEN, ENV_TOKEN]) == [
        "--hub-token=***",
        "--seed",
        "1",
        "--x=***",
    ]
    # A token in a flag that is published (here a dataset name) is refused, naming the flag without the token.
    with pytest.raises(SystemExit) as exit_info:
        in_process("--hub_token", TOKEN, "--dataset_name", f"nobody/{TOKEN}", "--model_preset", "tiny")
    assert exit_info.value.code == 2


# The image column ---------------------------------------------------------------------------------------------------
@pytest.mark.fresh_process
def test_an_image_column_of_numbers_is_refused_naming_the_image_columns(workdir, in_process, monkeypatch):
    folder = workdir / "labelled" / "data"
    folder.mkdir(parents=True)
    features = Features({"img": ImageFeature(), "label": Value("int64")})
    dataset = Dataset.from_dict({"img": random_images(4, (8, 8), seed=4), "label": [0, 1, 2, 3]}, features)
    dataset.to_parquet(str(folder / "train-00000-of-00001.parquet"))
    message = r"--image_column 'label' holds values of type int64, not images; its image columns are \['img'\]"
    with pytest.raises(SystemExit, match=message):
        in_process("--dataset_name", str(folder.parent), "--image_column", "label", *SHORT_RUN, "--resolution", "8")


def parse_error(capsys, parse, argv) -> str:
    """The one-line error of `parse(argv)`, which must exit with status 2 (argparse's convention)."""
    with pytest.raises(SystemExit) as exited:
        parse(argv)
    assert exited.value.code == 2
    return capsys.readouterr().err.strip().splitlines()[-1]


@pytest.mark.parametrize("script", ["train", "evaluate"])
@pytest.mark.parametrize(
    "argv, content",
    [
        (["--resolution", SHAPED_TOKEN], None),
        (["--num_channels", SHAPED_TOKEN], None),
        (None, f"resolution: {SHAPED_TOKEN}\n"),
        (None, f"{SHAPED_TOKEN}: 1\n"),
    ],
    ids=["int-flag", "choice-flag", "int-in-a-file", "a-key"],
)
def test_a_token_shaped_value_is_never_echoed_by_an_error(tmp_path, capsys, script, argv, content):
    """argparse echoes the value it refuses: a token there (not otherwise known to this process) was printed."""
    if content is not None:
        (tmp_path / "flags.yaml").write_text(content)
        argv = [str(tmp_path / "flags.yaml")]
    parse = parse_args if script == "train" else evaluate_ddpm.parse_args
    line = parse_error(capsys, parse, argv)
    assert "***" in line and SHAPED_TOKEN not in line + capsys.readouterr().err


def test_a_long_name_that_starts_like_a_token_is_not_one():
    for name in ("runs/hf_cifar10baselinelr2e4batch128ema9999", "xhf_" + "a" * 34, "hf_" + "a" * 33):
        assert parse_args(["--output_dir", name]).output_dir == name


def test_a_token_in_a_file_of_flags_never_reaches_an_error(tmp_path, capsys):
    path = tmp_path / "flags.yaml"
    path.write_text(f"hub_token: {SHAPED_TOKEN}\nnum_epochs: many\n")
    line = parse_error(capsys, parse_args, [str(path)])
    assert "invalid int value: 'many'" in line and SHAPED_TOKEN not in capsys.readouterr().err


# Tokens in the wrong flag ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "flags",
    [
        ["--hub_model_id", f"me/{SHAPED_TOKEN}"],
        ["--hub_model_id", SHAPED_TOKEN],
        ["--output_dir", f"runs/{SHAPED_TOKEN}"],
        ["--dataset_name", SHAPED_TOKEN, "--hub_token", SHAPED_TOKEN],
    ],
    ids=["in-a-repo-id", "as-a-repo-id", "in-a-path", "also-given-as-token"],
)
def test_a_token_in_a_flag_that_is_published_is_refused_without_showing_it(capsys, flags):
    """A repo id is a public name, and paths and settings go into the card: a token there is refused, naming the
    flag, never the value (was pushed to a repo named by it, and masked only in some places)."""
    line = parse_error(capsys, parse_args, flags)
    assert f"{flags[0]} holds what looks like a Hub access token (not shown)" in line
    assert SHAPED_TOKEN not in capsys.readouterr().err + line


def test_a_known_token_in_another_flag_is_refused(monkeypatch, capsys):
    monkeypatch.setenv("HF_TOKEN", "my-own-secret-value")
    line = parse_error(capsys, parse_args, ["--hub_model_id", "me/my-own-secret-value"])
    assert "--hub_model_id holds what looks like a Hub access token" in line and "my-own-secret" not in line
    assert parse_args(["--hub_model_id", "me/model", "--hub_token", SHAPED_TOKEN]).hub_model_id == "me/model"


# The output folder -----------------------------------------------------------------------------------------------------
def test_an_absolute_logging_dir_is_published_by_its_base_name(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    elsewhere = tmp_path.parent / "elsewhere-logs"
    config = public_config(parse_args(["--logging_dir", str(elsewhere)]))
    assert config["logging_dir"] == "elsewhere-logs"
    assert public_config(parse_args(["--logging_dir", str(tmp_path / "a" / "logs")]))["logging_dir"] == "a/logs"
    assert public_config(parse_args([]))["logging_dir"] == "logs"


def test_evaluate_refuses_a_token_in_its_flags(capsys):
    """metrics.json's settings hold every flag of evaluate_ddpm.py: a token there is refused, never shown."""
    line = parse_error(capsys, evaluate_ddpm.parse_args, ["--pipeline", f"me/{SHAPED_TOKEN}"])
    assert "evaluate_ddpm.py: error: --pipeline holds what looks like a Hub access token (not shown)" in line
    assert SHAPED_TOKEN not in line
