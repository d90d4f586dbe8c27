import copy
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from benchmarks.check_syncs import cpu_host_reads, training_step
from training.sync import DeferredRead, adamw, step_unless_nonfinite

REPO = Path(__file__).resolve().parents[1]


def _model_and_optimizer(fused: bool):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.GroupNorm(2, 8), torch.nn.Linear(8, 3))
    if fused:  # train_ddpm.py's optimizer: fused on the CPU too
        optimizer = adamw(model.parameters(), lr=1e-2, weight_decay=0.1)
        assert all(group["fused"] for group in optimizer.param_groups)
    else:
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    return model, optimizer


def _backward(model, scale: float = 1.0):
    model.zero_grad(set_to_none=True)
    (model(torch.ones(2, 4)).square().sum() * scale).backward()


def _snapshot(model, optimizer):
    state = [tensor.clone() for s in optimizer.state.values() for tensor in s.values()]
    return [p.detach().clone() for p in model.parameters()], state


@pytest.mark.parametrize("fused", [True, False])
def test_a_non_finite_step_leaves_weights_and_adam_state_bitwise_alone(fused):
    model, optimizer = _model_and_optimizer(fused)
    _backward(model)
    step_unless_nonfinite(optimizer, torch.tensor(False))  # a real step first, so the Adam state exists
    before = _snapshot(model, optimizer)
    _backward(model, scale=float("nan"))
    step_unless_nonfinite(optimizer, torch.tensor(True))
    after = _snapshot(model, optimizer)
    for old, new in zip(before[0] + before[1], after[0] + after[1], strict=True):
        assert torch.equal(old, new)
    assert not hasattr(optimizer, "found_inf")  # the flag is not left behind for the next step
    assert all(float(s["step"]) == 1 for s in optimizer.state.values())


def test_a_finite_step_is_bitwise_a_plain_fused_step():
    model, optimizer = _model_and_optimizer(fused=True)
    reference, reference_optimizer = copy.deepcopy(model), None
    reference_optimizer = torch.optim.AdamW(reference.parameters(), lr=1e-2, weight_decay=0.1, fused=True)
    for _ in range(3):
        _backward(model)
        _backward(reference)
        step_unless_nonfinite(optimizer, torch.tensor(False))
        reference_optimizer.step()
    assert all(map(torch.equal, model.parameters(), reference.parameters()))


@pytest.mark.parametrize("prediction_type", ["epsilon", "sample", "v_prediction"])
def test_a_training_step_reads_nothing_back_from_the_device(prediction_type):
    """
    The ops of one optimizer step of train_ddpm.py (data to model input, noise, q(x_t|x_0), the loss, backward,
    clipping, the device-side skip, EMA, the report) under the profiler: none reads a tensor's value back to the host
    (which on a GPU would make the host wait for the device every step).
    """
    assert cpu_host_reads(training_step(torch.device("cpu"), prediction_type)) == []


def test_the_check_sees_a_read():
    step = training_step(torch.device("cpu"))
    reads = cpu_host_reads(lambda: float(step()))  # the loss read every step, as a per-step log line would
    assert len(reads) == 1 and reads[0].startswith("aten::_local_scalar_dense <- aten::item")


LOOP_READS = """
import json, sys
import torch
import train_ddpm
from benchmarks.check_syncs import host_reads

with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as profile:
    train_ddpm.main(sys.argv[2:])
json.dump(host_reads(profile), open(sys.argv[1], "w"))
"""


def loop_reads(argv: list[str], result: Path) -> list[str]:
    """The host reads of `train_ddpm.main(argv)` under the profiler, in a fresh process: each run builds its own
    Accelerator, and accelerate's state is process-wide."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    command = [sys.executable, "-c", LOOP_READS, str(result), *argv]
    completed = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert completed.returncode == 0, completed.stderr[-3000:]
    return json.loads(result.read_text())


@pytest.mark.slow
def test_the_training_loop_itself_reads_nothing_back_per_step(tmp_path):
    """
    The check above replays the step's ops; this one profiles train_ddpm.py's own loop (EMA, clipping, no logging
    step in between): a run of 12 steps reads back exactly as many values as one of 4 steps, so every read is in the
    set-up or the wrap-up (the final checkpoint and export), none in the steps.
    """
    flags = "--cpu --model_preset tiny --resolution 8 --train_batch_size 8 --logging_steps 100 --use_ema true".split()
    flags += "--checkpointing_steps 100 --save_images_epochs 0 --save_model_epochs 0".split()
    flags += "--ddpm_num_inference_steps 1 --eval_batch_size 1".split()
    reads = {}
    for steps in (4, 12):
        argv = [*flags, "--max_train_steps", str(steps), "--output_dir", str(tmp_path / str(steps))]
        reads[steps] = loop_reads(argv, tmp_path / f"reads-{steps}.json")
    assert len(reads[12]) == len(reads[4]), sorted(set(reads[12]) - set(reads[4]))


def test_deferred_read_hands_back_the_previous_step():
    deferred = DeferredRead(torch.device("cpu"))
    values = torch.tensor([1.0, 2.0])
    assert deferred.swap(1, values) is None
    values.add_(10)  # later changes to the tensor do not change what was read for step 1
    assert deferred.swap(2, torch.tensor([3.0])) == (1, [1.0, 2.0])
    assert deferred.flush() == (2, [3.0])
    assert deferred.flush() is None
