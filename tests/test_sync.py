import copy

import pytest
import torch

import train_ddpm
from schedulers import DDPMPaperScheduler
from training.data import images_to_model_input
from training.ema import EMA
from training.models import build_unet
from training.sync import DeferredRead, step_unless_nonfinite


def _model_and_optimizer(fused: bool):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.GroupNorm(2, 8), torch.nn.Linear(8, 3))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1, fused=fused or None)
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
    clipping, the device-side skip, EMA, the report) on the CPU under the profiler: none is a read of a tensor's value
    by the host (`aten::_local_scalar_dense`, behind `.item()`, `bool(tensor)`, a tensor used as a Python number),
    which on a GPU would make the host wait for the device every step.
    """
    scheduler = DDPMPaperScheduler(num_train_timesteps=50, prediction_type=prediction_type)
    unet = build_unet("tiny", None, 8, 1)
    optimizer = torch.optim.AdamW(unet.parameters(), fused=True)
    ema = EMA(unet.parameters())
    pixels = torch.randint(0, 256, (4, 1, 8, 8), dtype=torch.uint8)
    consecutive, skipped, stop_flag = torch.zeros(()), torch.zeros(()), torch.zeros(())

    def step():
        x0 = images_to_model_input(pixels, random_flip=True)
        noise = torch.randn_like(x0)
        timesteps = torch.randint(0, 50, (x0.shape[0],))
        xt = scheduler.add_noise(x0, noise, timesteps)
        loss = train_ddpm.diffusion_loss(scheduler, unet(xt, timesteps).sample, x0, noise, xt, timesteps)
        loss.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(unet.parameters(), 1.0)
        nonfinite = ~torch.isfinite(grad_norm)
        step_unless_nonfinite(optimizer, nonfinite)
        optimizer.zero_grad(set_to_none=True)
        consecutive.add_(1).mul_(nonfinite)
        skipped.add_(nonfinite)
        ema.update(unet.parameters())
        return torch.stack([nonfinite.float(), consecutive, skipped, loss.detach().float(), stop_flag])

    step()  # the first step creates the optimizer state
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as profile:
        step()

    def callers(event):
        while event.cpu_parent is not None:
            event = event.cpu_parent
            yield event.name

    reads = [event for event in profile.events() if event.name == "aten::_local_scalar_dense"]
    # The CPU kernel of fused AdamW reads its step counts with `.item()` from host memory; the CUDA kernel reads them
    # on the device. Nothing else may read.
    assert reads and all("aten::_fused_adamw_" in callers(event) for event in reads)


def test_deferred_read_hands_back_the_previous_step():
    deferred = DeferredRead(torch.device("cpu"))
    values = torch.tensor([1.0, 2.0])
    assert deferred.swap(1, values) is None
    values.add_(10)  # later changes to the tensor do not change what was read for step 1
    assert deferred.swap(2, torch.tensor([3.0])) == (1, [1.0, 2.0])
    assert deferred.flush() == (2, [3.0])
    assert deferred.flush() is None
