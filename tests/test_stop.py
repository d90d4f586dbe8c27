"""Stopping a run never loses it: signals under the documented launcher, a step slower than the launcher's grace,
a launcher that dies, a signal to the whole process group with data-loading workers, a signal during an accumulation
cycle, Ctrl-C during the final export or a two-process set-up, and the resume after each, bit for bit. Real launcher,
real signals, real training processes."""

import contextlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import psutil
import pytest
from datasets import Dataset, Features
from datasets import Image as ImageFeature
from PIL import Image

from checkpoints.checkpointing import TRAINER_STATE_NAME, TrainerState, verify_checkpoint

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


def restore_default_signals() -> None:
    """In the child, before exec: a background job of a non-interactive shell starts with SIGINT ignored."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)


def start(command: list[str], tmp_path: Path) -> subprocess.Popen:
    """`command` as a process group of its own (its PID is the group's), its output piped."""
    return subprocess.Popen(
        command,
        cwd=tmp_path,
        env={**environment(tmp_path), "OMP_NUM_THREADS": "1"},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
        preexec_fn=restore_default_signals,
    )


def finish(process: subprocess.Popen, timeout: float = 60) -> str:
    """Wait for the group's leader; its stderr. The group is killed if it outlives the test."""
    try:
        _, stderr = process.communicate(timeout=timeout)
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
    return stderr


def run(args: list[str], tmp_path: Path, script: Path = REPO / "train_ddpm.py") -> subprocess.CompletedProcess:
    env = {**environment(tmp_path), "OMP_NUM_THREADS": "1"}
    command = [sys.executable, str(script), *args]
    return subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=TIMEOUT)


def two_processes(script: Path | str = REPO / "train_ddpm.py") -> list[str]:
    """Two gloo processes on the CPU (DESIGN section 7): the launcher's --multi_gpu with the script's --cpu."""
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2"]
    launch += ["--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", "0"]
    return [*launch, str(script)]


def same_files(whole: Path, other: Path) -> None:
    """Every file of two checkpoints byte for byte, but the two that name the output folder."""
    names = sorted(path.name for path in whole.iterdir() if path.name not in (TRAINER_STATE_NAME, "manifest.json"))
    assert names
    for name in names:
        assert (whole / name).read_bytes() == (other / name).read_bytes(), name


@pytest.mark.slow
def test_sigterm_to_the_process_group_with_data_workers_ends_in_a_checkpoint_that_resumes(tmp_path):
    """`kill -TERM -<pgid>` (scancel, systemd) reaches the DataLoader workers too: they ignore it, the main process
    writes the checkpoint of the last whole step and exits 0, and a resume from it continues."""
    output = tmp_path / "run"
    args = [*TINY, "--max_train_steps", "1000", "--dataloader_num_workers", "2", "--output_dir", str(output)]
    process = start([sys.executable, str(slow_script(tmp_path, seconds=0.2)), *args], tmp_path)
    wait_for_line(process, "forward 2")
    os.killpg(process.pid, signal.SIGTERM)
    stderr = finish(process)
    assert process.returncode == 0, stderr[-3000:]
    assert "Stopped by SIGTERM at step 1" in stderr and "Traceback" not in stderr, stderr[-3000:]
    assert complete_checkpoints(output) == [1]
    verify_checkpoint(str(output / "checkpoint-1"))
    resumed = run([*TINY, "--max_train_steps", "2", "--dataloader_num_workers", "2", "--output_dir", str(output),
                   "--resume_from_checkpoint", "latest"], tmp_path)  # fmt: skip
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "step 1, epoch 0, batch 1" in resumed.stderr
    assert complete_checkpoints(output) == [1, 2] and (output / "model_index.json").exists()


@pytest.mark.slow
def test_a_signal_in_an_accumulation_cycle_abandons_it_whole_and_resumes_bit_for_bit(tmp_path):
    """2 accumulation steps; SIGTERM between the forward and backward pass of the 8th micro-batch (the second of step
    4, the first already accumulated): the checkpoint is of step 3 at batch 6, and the resumed run ends with the
    weights, optimizer, EMA and random states of the uninterrupted run, byte for byte."""
    script = tmp_path / "signal_in_step.py"
    script.write_text(SIGNAL_IN_STEP.format(repo=str(REPO), call=8))
    args = [*TINY, "--max_train_steps", "5", "--gradient_accumulation_steps", "2", "--use_ema"]
    whole = run([*args, "--output_dir", "whole"], tmp_path)
    assert whole.returncode == 0, whole.stderr[-3000:]
    stopped = run([*args, "--output_dir", "stopped"], tmp_path, script)
    assert stopped.returncode == 0, stopped.stderr[-3000:]
    assert "Stop asked (SIGTERM) during a step" in stopped.stderr and "Stopped by SIGTERM at step 3" in stopped.stderr
    assert complete_checkpoints(tmp_path / "stopped") == [3]
    assert TrainerState.load(str(tmp_path / "stopped" / "checkpoint-3" / TRAINER_STATE_NAME)).batches_in_epoch == 6
    resumed = run([*args, "--output_dir", "stopped", "--resume_from_checkpoint", "latest"], tmp_path)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "step 3, epoch 0, batch 6" in resumed.stderr
    same_files(tmp_path / "whole" / "checkpoint-5", tmp_path / "stopped" / "checkpoint-5")


LATE_STOP = """
import os, signal, sys
sys.path.insert(0, {repo!r})
from accelerate import Accelerator
from checkpoints.checkpointing import TrainerState
from training.monitor import StepMonitor

accelerator = Accelerator(cpu=True, gradient_accumulation_steps=4)
monitor = StepMonitor(accelerator, TrainerState(), max_train_steps=10, logging_steps=1, max_nonfinite_steps=3)
monitor.launcher = os.getppid()  # as under accelerate launch, one process; steps not abandoned (e.g. --compile)
monitor.batch_seconds, monitor.checkpoint_seconds, monitor.batches_in_cycle = {seconds}, 0.5, 1
with monitor:
    os.kill(os.getpid(), signal.SIGTERM)
    os.kill(os.getpid(), signal.SIGTERM)
print("stopped by", monitor.signal.name)
"""


@pytest.mark.slow
@pytest.mark.parametrize("seconds", [2.0, 0.1])
def test_a_stop_that_cannot_fit_the_launchers_grace_is_warned_once(tmp_path, seconds):
    """7 micro-batches still to run (3 of this step, 4 of the next, the report being read one step late) of 2.0 s and
    a 0.5 s checkpoint: 14.5 s against the launcher's 5 s, one warning; of 0.1 s: 1.2 s, none."""
    script = tmp_path / "late_stop.py"
    script.write_text(LATE_STOP.format(repo=str(REPO), seconds=seconds))
    result = run([], tmp_path, script)
    assert result.returncode == 0 and result.stdout.strip() == "stopped by SIGTERM", result.stderr[-3000:]
    warnings = [line for line in result.stderr.splitlines() if "kills this run" in line]
    if seconds > 1:
        assert len(warnings) == 1, result.stderr[-3000:]
        for part in ("14 s", "7 micro-batches", "2.0 s", "5 s after a signal", "--gradient_accumulation_steps"):
            assert part in warnings[0], warnings[0]
    else:
        assert warnings == [], warnings


@pytest.mark.slow
def test_ctrl_c_during_the_final_sampling_ends_in_one_line_and_a_resume_finishes_the_export(tmp_path):
    """SIGINT while the final sample grid is drawn (1,000 sampling steps): one line naming the checkpoint of the
    trained weights and how to finish, status 130, no traceback; the resume takes no step and exports."""
    output = tmp_path / "run"
    args = [*TINY, "--ddpm_num_steps", "1000", "--max_train_steps", "2", "--output_dir", str(output)]
    slow = [*args, "--ddpm_num_inference_steps", "1000", "--eval_batch_size", "64"]  # the last value of a flag counts
    process = start([sys.executable, str(REPO / "train_ddpm.py"), *slow], tmp_path)
    for line in process.stderr:
        if "Saved checkpoint" in line:
            break
    time.sleep(1.0)  # into the sampling of 1,000 steps
    os.killpg(process.pid, signal.SIGINT)
    stderr = finish(process)
    assert process.returncode == 130, stderr[-3000:]
    assert "Traceback" not in stderr, stderr[-3000:]
    lines = [line for line in stderr.splitlines() if "Stopped by SIGINT" in line]
    assert len(lines) == 1 and "checkpoint-2" in lines[0] and "--resume_from_checkpoint latest" in lines[0], stderr
    assert not (output / "model_index.json").exists()
    resumed = run([*args, "--resume_from_checkpoint", "latest"], tmp_path)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert complete_checkpoints(output) == [2] and (output / "model_index.json").exists()
    assert "Exported the pipeline (step 2" in resumed.stderr


SLOW_SETUP = """
import sys, time
sys.path.insert(0, {repo!r})
import train_ddpm

load_data = train_ddpm.load_data


def slow_load_data(args, accelerator):
    print("loading", accelerator.process_index, flush=True)
    time.sleep(60)
    return load_data(args, accelerator)


train_ddpm.load_data = slow_load_data
train_ddpm.main()
"""


@pytest.mark.slow
def test_ctrl_c_during_a_two_process_set_up_ends_in_one_line(tmp_path):
    """Ctrl-C (SIGINT to the whole group: launcher and both processes) while the data is being prepared: one line
    from rank 0, no traceback from anyone, the signal's status."""
    script = tmp_path / "slow_setup.py"
    script.write_text(SLOW_SETUP.format(repo=str(REPO)))
    args = [*TINY, "--max_train_steps", "2", "--output_dir", str(tmp_path / "run")]
    process = start([*two_processes(script), *args], tmp_path)
    ranks = set()
    for line in process.stdout:
        if line.startswith("loading"):
            ranks.add(line.split()[1])
        if len(ranks) == 2:
            break
    os.killpg(process.pid, signal.SIGINT)
    stderr = finish(process)
    assert process.returncode in (130, 1), stderr[-3000:]
    assert "Traceback" not in stderr, stderr[-6000:]
    lines = [line for line in stderr.splitlines() if "Stopped by SIGINT" in line]
    assert len(lines) == 1 and "set-up" in lines[0] and "nothing to save" in lines[0], stderr[-3000:]


@pytest.mark.slow
def test_a_finished_two_process_run_with_workers_exits_0_in_bounded_time(tmp_path):
    """A tiny two-process gloo job with data-loading workers, twice: each ends with status 0 within the bound."""
    args = [*TINY, "--max_train_steps", "2", "--dataloader_num_workers", "2"]
    for attempt in range(2):
        output = tmp_path / f"run{attempt}"
        started = time.monotonic()
        process = start([*two_processes(), *args, "--output_dir", str(output)], tmp_path)
        stderr = finish(process, timeout=60)
        assert process.returncode == 0, stderr[-3000:]
        assert (output / "model_index.json").exists() and time.monotonic() - started < 60


def hub_layout(folder: Path, count: int = 24) -> Path:
    """A dataset folder laid out like a Hub repo (`data/train-*.parquet`), image column `image`, random 8x8 RGB."""
    (folder / "data").mkdir(parents=True)
    rng = np.random.default_rng(0)
    images = [Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)) for _ in range(count)]
    dataset = Dataset.from_dict({"image": images}, Features({"image": ImageFeature()}))
    dataset.to_parquet(str(folder / "data" / "train-00000-of-00001.parquet"))
    return folder


@pytest.mark.slow
def test_a_streamed_run_resumed_from_a_checkpoint_ends_with_the_uninterrupted_weights(tmp_path):
    data = hub_layout(tmp_path / "hub-dataset")
    args = ["--cpu", "--model_preset", "tiny", "--resolution", "8", "--train_batch_size", "4", "--random_flip"]
    args += ["--dataset_name", str(data), "--streaming", "--max_train_steps", "4", "--checkpointing_steps", "2"]
    args += ["--ddpm_num_steps", "50", "--ddpm_num_inference_steps", "2", "--eval_batch_size", "2", "--use_ema"]
    whole = run([*args, "--output_dir", "whole"], tmp_path)
    assert whole.returncode == 0, whole.stderr[-3000:]
    resumed = run([*args, "--output_dir", "resumed", "--resume_from_checkpoint", "whole/checkpoint-2"], tmp_path)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "step 2, epoch 0, batch 2" in resumed.stderr
    same_files(tmp_path / "whole" / "checkpoint-4", tmp_path / "resumed" / "checkpoint-4")
