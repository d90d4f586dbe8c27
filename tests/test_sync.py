import copy

import pytest
import torch

from training.ema import EMA
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


def test_ema_skip_on_the_device_is_bitwise_the_plain_update_or_nothing():
    parameter = torch.nn.Parameter(torch.randn(5))
    plain, masked = EMA([parameter]), EMA([parameter])
    for step in range(4):
        with torch.no_grad():
            parameter.add_(torch.randn(5))
        plain.update([parameter])
        masked.update([parameter], skip=torch.tensor(False))
        assert torch.equal(plain.shadow_params[0], masked.shadow_params[0]), step
    before = masked.shadow_params[0].clone()
    with torch.no_grad():
        parameter.add_(100.0)
    masked.update([parameter], skip=torch.tensor(True))
    assert torch.equal(masked.shadow_params[0], before)
    assert masked.num_updates == 5  # a skipped step still counts, as in diffusers' EMAModel.step


def test_deferred_read_hands_back_the_previous_step():
    deferred = DeferredRead(torch.device("cpu"))
    values = torch.tensor([1.0, 2.0])
    assert deferred.swap(1, values) is None
    values.add_(10)  # later changes to the tensor do not change what was read for step 1
    assert deferred.swap(2, torch.tensor([3.0])) == (1, [1.0, 2.0])
    assert deferred.flush() == (2, [3.0])
    assert deferred.flush() is None
