"""Stopping a run never loses it: signals under the documented launcher (`accelerate launch --config_file
accelerate_config.yaml`), a step slower than the launcher's grace period, a launcher that dies, and the resume after
an abandoned step, bit for bit. Real launcher, real signals, real training processes."""

import contextlib
import os
import signal
import subprocess
import sys
from pathlib import Path

import psutil
import pytest

from checkpoints.checkpointing import TRAINER_STATE_NAME, TrainerState

REPO = Path(__file__).resolve().parents[1]
TIMEOUT = 240
TINY = ["--cpu", "--model_preset", "tiny", "--train_batch_size", "8", "--ddpm_num_steps", "50", "--random_flip"]
TINY += ["--ddpm_num_inference_steps", "2", "--eval_batch_size", "2", "--checkpointing_steps", "1000"]

# train_ddpm.py with every top-level U-Net block {seconds} s slower, both ways: a 6-block tiny U-Net then takes
# ~12 * {seconds} s a step, longer than the 5 s the launcher waits after forwarding a signal. It prints "forward N"
# when step N's forward pass starts, so that the test knows when a step is under way without polling.
SLOW_STEPS = """
import sys, time
sys.path.insert(0, {repo!r})
import train_ddpm

build_model, forwards = train_ddpm.build_model, 0


def slow_build_model(args):
    unet, scheduler = build_model(args)

    def slow(module, inputs, output):
        global forwards
        if module is unet.down_blocks[0] and output[0].requires_grad:
            forwards += 1
            print("forward", forwards, flush=True)
        time.sleep({seconds})
        tensor = output[0] if isinstance(output, tuple) else output
        if tensor.requires_grad:
            tensor.register_hook(lambda grad: time.sleep({seconds}))

    for block in [*unet.down_blocks, unet.mid_block, *unet.up_blocks]:
        block.register_forward_hook(slow)
    return unet, scheduler


train_ddpm.build_model = slow_build_model
train_ddpm.main()
"""

# train_ddpm.py that sends itself SIGTERM between the forward and the backward pass of the {call}-th batch.
SIGNAL_IN_STEP = """
import os, signal, sys
sys.path.insert(0, {repo!r})
import train_ddpm

loss, calls = train_ddpm.diffusion_loss, 0


def signal_in_step(*args, **kwargs):
    global calls
    calls += 1
    if calls == {call}:
        os.kill(os.getpid(), signal.SIGTERM)
    return loss(*args, **kwargs)


train_ddpm.diffusion_loss = signal_in_step
train_ddpm.main()
"""


def environment(tmp_path: Path) -> dict[str, str]:
    return {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "HF_DATASETS_OFFLINE": "1",
        "HF_DATASETS_CACHE": str(tmp_path / "datasets-cache"),
        "PYTHONUNBUFFERED": "1",
        "CUDA_VISIBLE_DEVICES": "",
    }


def launch(script: Path, args: list[str], tmp_path: Path) -> subprocess.Popen:
    """The README's `accelerate launch --config_file accelerate_config.yaml`, in a process group of its own."""
    command = [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        "--config_file",
        str(REPO / "accelerate_config.yaml"),
    ]
    return subprocess.Popen(
        [*command, str(script), *args],
        cwd=tmp_path,
        env=environment(tmp_path),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )


def wait_for_line(process: subprocess.Popen, line: str) -> None:
    """Read the child's stdout until `line` (blocking on the pipe: no polling)."""
    for text in process.stdout:
        if text.strip() == line:
            return
    raise AssertionError(f"the run ended before printing {line!r}: {process.wait()} {process.stderr.read()[-3000:]}")


def complete_checkpoints(output: Path) -> list[int]:
    return sorted(int(path.parent.name.split("-")[1]) for path in output.glob(f"checkpoint-*/{TRAINER_STATE_NAME}"))


def slow_script(tmp_path: Path, seconds: float = 0.6) -> Path:
    script = tmp_path / "slow_steps.py"
    script.write_text(SLOW_STEPS.format(repo=str(REPO), seconds=seconds))
    return script


@pytest.mark.slow
@pytest.mark.parametrize("how", ["ctrl-c", "sigterm-to-launcher"])
def test_a_stop_under_the_launcher_with_a_step_slower_than_its_grace_ends_in_a_checkpoint(tmp_path, how):
    """
    Ctrl-C in a terminal (SIGINT to the launcher's whole process group: the child gets SIGINT, then the launcher's
    SIGTERM) or SIGTERM to the launcher (a cluster scheduler, `docker stop`), in the middle of a step that takes
    longer than the 5 s the launcher waits before SIGKILL: the step is abandoned at the next block, the checkpoint
    of the last whole step is written in time, and the run resumes from it.
    """
    output = tmp_path / "run"
    args = [*TINY, "--max_train_steps", "1000", "--output_dir", str(output)]
    process = launch(slow_script(tmp_path), args, tmp_path)
    try:
        wait_for_line(process, "forward 2")  # step 1 done, step 2 under way
        if how == "ctrl-c":
            os.killpg(process.pid, signal.SIGINT)
        else:
            process.send_signal(signal.SIGTERM)
        _, stderr = process.communicate(timeout=60)
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
    name = "SIGINT" if how == "ctrl-c" else "SIGTERM"
    # The launcher's own status: 143 after SIGTERM; after SIGINT 130, or 0 when its child ended before it handled it.
    assert process.returncode in ((0, 130) if how == "ctrl-c" else (143,)), stderr[-3000:]
    assert f"Stop asked ({name}) during a step: it is abandoned" in stderr, stderr[-3000:]
    assert f"Stopped by {name} at step 1" in stderr
    assert complete_checkpoints(output) == [1]
    assert not list(output.glob("checkpoint-*.tmp")) and not (output / "model_index.json").exists()
    assert TrainerState.load(str(output / "checkpoint-1" / TRAINER_STATE_NAME)).batches_in_epoch == 1


@pytest.mark.slow
def test_a_child_whose_launcher_died_stops_by_itself_after_a_checkpoint(tmp_path):
    output = tmp_path / "run"
    args = [*TINY, "--max_train_steps", "1000", "--output_dir", str(output)]
    process = launch(slow_script(tmp_path, seconds=0.3), args, tmp_path)
    try:
        wait_for_line(process, "forward 2")
        child = psutil.Process(process.pid).children()[0]
        process.kill()  # SIGKILL to the launcher alone: it cannot forward anything
        process.wait()
        child.wait(timeout=60)  # the orphan stops by itself (not our child: its status cannot be read)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
    assert complete_checkpoints(output) == [1]
    assert not (output / "model_index.json").exists()


@pytest.mark.slow
def test_a_step_abandoned_by_a_signal_resumes_bit_for_bit(tmp_path):
    """SIGTERM between the forward and the backward pass of step 4 of 6: the checkpoint is of step 3 and, resumed,
    the run ends with the weights, optimizer, EMA and random states of the uninterrupted run, byte for byte."""
    script = tmp_path / "signal_in_step.py"
    script.write_text(SIGNAL_IN_STEP.format(repo=str(REPO), call=4))
    env = environment(tmp_path)

    def run(command_script: Path, output: str, *extra: str) -> subprocess.CompletedProcess:
        command = [
            sys.executable,
            str(command_script),
            *TINY,
            "--max_train_steps",
            "6",
            "--output_dir",
            output,
            *extra,
        ]
        return subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=TIMEOUT)

    uninterrupted = run(REPO / "train_ddpm.py", "whole")
    assert uninterrupted.returncode == 0, uninterrupted.stderr[-3000:]
    stopped = run(script, "stopped")
    assert stopped.returncode == 0, stopped.stderr[-3000:]
    assert "Stop asked (SIGTERM) during a step" in stopped.stderr and "Stopped by SIGTERM at step 3" in stopped.stderr
    assert complete_checkpoints(tmp_path / "stopped") == [3]
    resumed = run(REPO / "train_ddpm.py", "stopped", "--resume_from_checkpoint", "latest")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "Resumed from stopped/checkpoint-3: step 3, epoch 0, batch 3" in resumed.stderr
    whole, after = tmp_path / "whole" / "checkpoint-6", tmp_path / "stopped" / "checkpoint-6"
    # Every file but the two that name the output folder (trainer_state.json, and manifest.json with its hash).
    for name in sorted(
        path.name for path in whole.iterdir() if path.name not in (TRAINER_STATE_NAME, "manifest.json")
    ):
        assert (whole / name).read_bytes() == (after / name).read_bytes(), name


def test_stop_signal_takes_the_first_signal_and_absorbs_the_rest():
    from training.monitor import StopSignal

    before = signal.getsignal(signal.SIGTERM)
    with StopSignal() as stop:
        assert stop.received is None
        os.kill(os.getpid(), signal.SIGINT)
        os.kill(os.getpid(), signal.SIGTERM)  # e.g. the launcher forwarding a Ctrl-C: absorbed, not fatal
        os.kill(os.getpid(), signal.SIGINT)
        assert (stop.name, stop.absorbed) == ("SIGINT", 2)
    assert signal.getsignal(signal.SIGTERM) is before


def test_the_launcher_is_recognised_by_its_environment(monkeypatch):
    from training.monitor import launcher_pid

    monkeypatch.delenv("ACCELERATE_MIXED_PRECISION", raising=False)
    assert launcher_pid() is None  # python train_ddpm.py (or nohup): a re-parented process keeps training
    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "no")
    assert launcher_pid() == os.getppid()


ABANDONED_STEP = """
import os, signal, sys
sys.path.insert(0, {repo!r})
import torch
from accelerate import Accelerator
from checkpoints.checkpointing import TrainerState
from training.models import build_unet
from training.monitor import StepMonitor

accelerator = Accelerator(cpu=True)
unet = build_unet("tiny", None, 8, 1)
optimizer = torch.optim.AdamW(unet.parameters())
monitor = StepMonitor(accelerator, TrainerState(), max_train_steps=10, logging_steps=1, max_nonfinite_steps=3)
monitor.interrupt_steps_of(unet)
unet.mid_block.register_forward_pre_hook(lambda *_: os.kill(os.getpid(), signal.SIGTERM))
before, step = torch.get_rng_state(), accelerator.step
with monitor:
    with monitor.interruptible(optimizer), accelerator.accumulate(unet):
        x = torch.randn(2, 1, 8, 8)  # draws from the global RNG; then the signal comes in the middle of the forward
        unet(x, torch.tensor([1, 2])).sample.sum().backward()
        raise AssertionError("the step was not interrupted")
assert monitor.abandoned and monitor.stopped_by == "SIGTERM"
assert torch.equal(torch.get_rng_state(), before) and accelerator.step == step
assert all(parameter.grad is None for parameter in unet.parameters())
print("abandoned cleanly")
"""


@pytest.mark.slow
def test_an_abandoned_step_puts_the_random_states_back(tmp_path):
    """`StepMonitor.interruptible` with a real signal in the middle of a real U-Net's forward pass (own process)."""
    script = tmp_path / "abandoned_step.py"
    script.write_text(ABANDONED_STEP.format(repo=str(REPO)))
    result = subprocess.run([sys.executable, str(script)], env=environment(tmp_path), capture_output=True, text=True)
    assert result.returncode == 0 and result.stdout.strip() == "abandoned cleanly", result.stderr[-3000:]
