"""Resuming is explicit about every setting: the optimizer flags of the resuming run are applied (written into the
optimizer's param groups, the LR schedule rebuilt from them at the step reached), each change is named in one log
line, the seed is taken from the checkpoint, flags that cannot be applied are refused before the data, and the
records (trainer_state.json, the model card, the tracker's hparams) hold what the run used.

Real in-process runs of train_ddpm.py on the embedded digits with the small U-Net of test_train.py: one 4-step run
with checkpoints at steps 2 and 4, copied and resumed from checkpoint-2 by each test."""

import json
import re
import shutil
from pathlib import Path

import pytest
import torch
from diffusers.optimization import get_scheduler
from helpers import FAST, SMALL_UNET, one_thread, trainer_state

import train_ddpm
from checkpoints.verify import write_manifest

BASE = ["--model_config_name_or_path", "unet.json", "--train_batch_size", "8", "--checkpointing_steps", "2"]
BASE += ["--learning_rate", "1e-3", "--lr_scheduler", "cosine", "--lr_warmup_steps", "1", "--logging_steps", "1"]
BASE += ["--save_images_steps", "1000", *FAST]
BASE_STEPS = 4


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("resume-settings")
    (folder / "unet.json").write_text(json.dumps(SMALL_UNET))
    return folder


def run(workdir: Path, *args: str):
    """`train_ddpm.main` in this process (a test marked fresh_process: accelerate's state is process-wide)."""
    with one_thread():
        base = [str(workdir / "unet.json") if flag == "unet.json" else flag for flag in BASE]
        return train_ddpm.main(["--cpu", "--cache_dir", str(workdir / "cache"), *base, *args])


@pytest.fixture(scope="module")
def base_run(workdir) -> Path:
    output = workdir / "base"
    run(workdir, "--max_train_steps", str(BASE_STEPS), "--output_dir", str(output))
    return output


@pytest.fixture
def steps(monkeypatch) -> list[dict]:
    """What the optimizer holds at each optimizer step of the run (param group 0 and the clipping norm)."""
    seen = []
    clip_and_step = train_ddpm.clip_and_step

    def recorded(accelerator, unet, optimizer, max_grad_norm):
        group = optimizer.optimizer.param_groups[0]
        seen.append(
            {"max_grad_norm": max_grad_norm, **{key: group[key] for key in ("lr", "betas", "weight_decay", "eps")}}
        )
        return clip_and_step(accelerator, unet, optimizer, max_grad_norm)

    monkeypatch.setattr(train_ddpm, "clip_and_step", recorded)
    return seen


def resume(workdir: Path, base_run: Path, name: str, *args: str, checkpoint: str = "checkpoint-2") -> Path:
    """A copy of the base run with only `checkpoint`, resumed from it with `args`; returns the copy."""
    output = workdir / name
    shutil.copytree(base_run, output, ignore=shutil.ignore_patterns("logs", "checkpoint-*"))
    shutil.copytree(base_run / checkpoint, output / checkpoint)
    run(workdir, "--output_dir", str(output), "--resume_from_checkpoint", "latest", *args)
    return output


def schedule(name: str, lr: float, warmup: int, total: int, step: int) -> float:
    """The learning rate of a new schedule with these flags after `step` optimizer steps."""
    optimizer = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=lr)
    scheduler = get_scheduler(name, optimizer=optimizer, num_warmup_steps=warmup, num_training_steps=total)
    for _ in range(step):
        optimizer.step()
        scheduler.step()
    return scheduler.get_last_lr()[0]


def resume_line(caplog) -> str:
    lines = [record.getMessage() for record in caplog.records if "Resumed from" in record.getMessage()]
    assert len(lines) == 1, caplog.text[-3000:]
    return lines[0]


def lr_now(line: str) -> float:
    return float(re.search(r"lr now ([0-9.e+-]+)", line).group(1))


@pytest.mark.slow
@pytest.mark.fresh_process
def test_a_lower_learning_rate_is_applied_from_the_step_reached(workdir, base_run, steps, caplog):
    with caplog.at_level("INFO"):
        output = resume(workdir, base_run, "lower-lr", "--max_train_steps", "4", "--learning_rate", "1e-4")
    # The two resumed steps (3 and 4) run at the new schedule's values after 2 and 3 steps: no jump back to 1e-3.
    expected = [schedule("cosine", 1e-4, 1, 4, step) for step in (2, 3)]
    assert [step["lr"] for step in steps] == pytest.approx(expected, rel=1e-6)
    line = resume_line(caplog)
    assert ": step 2," in line and "learning_rate 0.001 -> 0.0001" in line
    assert lr_now(line) == pytest.approx(expected[0], rel=1e-3)
    assert trainer_state(output / "checkpoint-4").training_args["learning_rate"] == 1e-4


@pytest.mark.slow
@pytest.mark.fresh_process
def test_changed_adam_flags_and_max_grad_norm_land_in_the_optimizer(workdir, base_run, steps, caplog):
    flags = ["--adam_beta1", "0.9", "--adam_beta2", "0.99", "--adam_weight_decay", "0.01", "--adam_epsilon", "1e-6"]
    with caplog.at_level("INFO"):
        output = resume(workdir, base_run, "adam", "--max_train_steps", "4", *flags, "--max_grad_norm", "0.5")
    assert len(steps) == 2
    for step in steps:
        assert step["betas"] == (0.9, 0.99) and step["weight_decay"] == 0.01 and step["eps"] == 1e-6
        assert step["max_grad_norm"] == 0.5
    line = resume_line(caplog)
    for change in ("adam_beta1 0.95 -> 0.9", "adam_beta2 0.999 -> 0.99", "adam_weight_decay 1e-06 -> 0.01"):
        assert change in line
    assert "adam_epsilon 1e-08 -> 1e-06" in line and "max_grad_norm 1.0 -> 0.5" in line
    recorded = trainer_state(output / "checkpoint-4").training_args
    assert (recorded["adam_beta1"], recorded["adam_beta2"], recorded["adam_weight_decay"]) == (0.9, 0.99, 0.01)
    assert (recorded["adam_epsilon"], recorded["max_grad_norm"]) == (1e-6, 0.5)


@pytest.mark.slow
@pytest.mark.fresh_process
@pytest.mark.parametrize(
    "flags, name, warmup",
    [
        (["--max_train_steps", "6"], "cosine", 1),
        (["--max_train_steps", "6", "--lr_scheduler", "linear", "--lr_warmup_steps", "0"], "linear", 0),
    ],
)
def test_a_longer_run_continues_the_new_schedule_from_the_step_reached(workdir, base_run, steps, caplog, flags, name,
                                                                       warmup):  # fmt: skip
    with caplog.at_level("INFO"):
        output = resume(workdir, base_run, f"longer-{name}", *flags)
    expected = [schedule(name, 1e-3, warmup, 6, step) for step in (2, 3, 4, 5)]
    assert [step["lr"] for step in steps] == pytest.approx(expected, rel=1e-6)
    line = resume_line(caplog)
    assert ": step 2," in line and "max_train_steps 4 -> 6" in line and "6 steps" in line
    assert lr_now(line) == pytest.approx(expected[0], rel=1e-3)
    if name == "linear":
        assert "lr_scheduler cosine -> linear" in line and "lr_warmup_steps 1 -> 0" in line
    state = trainer_state(output / "checkpoint-6")
    assert state.global_step == 6 and state.training_args["max_train_steps"] == 6
    assert state.training_args["lr_scheduler"] == name


@pytest.mark.slow
@pytest.mark.fresh_process
def test_the_seed_is_taken_from_the_checkpoint_and_every_record_shows_it(workdir, base_run, monkeypatch, caplog):
    hparams = []
    tracker_config = train_ddpm.tracker_config
    monkeypatch.setattr(train_ddpm, "tracker_config", lambda args: hparams.append(tracker_config(args)) or hparams[-1])
    with caplog.at_level("INFO"):
        output = resume(workdir, base_run, "seed", "--max_train_steps", "4", "--seed", "7")
    warning = [record.getMessage() for record in caplog.records if "--seed 7" in record.getMessage()]
    assert warning and "--seed 0" in warning[0]
    assert trainer_state(output / "checkpoint-4").training_args["seed"] == 0
    assert "| `seed` | `0` |" in (output / "README.md").read_text()  # the model card's training args
    assert [config["seed"] for config in hparams] == [0]


@pytest.mark.slow
@pytest.mark.fresh_process
def test_resuming_with_the_same_flags_names_no_change_and_continues_the_schedule(workdir, base_run, steps, caplog):
    with caplog.at_level("INFO"):
        resume(workdir, base_run, "same", "--max_train_steps", "4")
    expected = [schedule("cosine", 1e-3, 1, 4, step) for step in (2, 3)]
    assert [step["lr"] for step in steps] == pytest.approx(expected, rel=1e-6)
    line = resume_line(caplog)
    assert "->" not in line and "checkpoint's optimizer settings" in line


def _no_data(*args, **kwargs):
    raise AssertionError("the run reached the data")


@pytest.mark.fresh_process
def test_max_train_steps_below_the_step_reached_is_refused_before_the_data(workdir, base_run, monkeypatch):
    monkeypatch.setattr(train_ddpm, "load_pixels", _no_data)
    with pytest.raises(SystemExit) as refused:
        resume(workdir, base_run, "fewer", "--max_train_steps", "3", checkpoint="checkpoint-4")
    message = str(refused.value)
    assert "--max_train_steps 3" in message and "step 4" in message and "checkpoint-4" in message


@pytest.mark.fresh_process
def test_use_ema_for_a_checkpoint_without_ema_is_refused_before_the_data(workdir, base_run, monkeypatch):
    output = workdir / "no-ema"
    shutil.copytree(base_run / "checkpoint-2", output / "checkpoint-2")
    (output / "checkpoint-2" / "ema.safetensors").unlink()
    write_manifest(str(output / "checkpoint-2"))  # a checkpoint as a run without --use_ema writes it
    monkeypatch.setattr(train_ddpm, "load_pixels", _no_data)
    with pytest.raises(SystemExit) as refused:
        run(workdir, "--output_dir", str(output), "--resume_from_checkpoint", "latest", "--max_train_steps", "4")
    message = str(refused.value)
    assert "--use_ema" in message and "checkpoint-2" in message
    assert "\n" not in message  # one line
