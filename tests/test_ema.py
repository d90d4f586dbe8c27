import copy

import pytest
import torch
from diffusers.training_utils import EMAModel

from training.ema import EMA


def _model(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.GroupNorm(2, 8), torch.nn.Linear(8, 3))


def _perturb(model: torch.nn.Module, seed: int) -> None:
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(torch.randn(parameter.shape, generator=generator))


def test_updates_match_diffusers_ema_model_with_warmup():
    model = _model()
    ours = EMA(model.parameters(), max_decay=0.999, inv_gamma=2.0, power=0.75)
    theirs = EMAModel(copy.deepcopy(model).parameters(), decay=0.999, use_ema_warmup=True, inv_gamma=2.0, power=0.75)
    for step in range(1, 8):
        _perturb(model, seed=step)
        ours.update(model.parameters())
        theirs.step(model.parameters())
        assert ours.decay() == pytest.approx(theirs.cur_decay_value, abs=0, rel=1e-15)
        for mine, reference in zip(ours.shadow_params, theirs.shadow_params, strict=True):
            torch.testing.assert_close(mine, reference, rtol=1e-6, atol=1e-7)
    assert ours.num_updates == theirs.optimization_step == 7


def test_decay_schedule_is_the_peer_warmup_clamped_to_max_decay():
    ema = EMA([torch.nn.Parameter(torch.zeros(1))], max_decay=0.9999, inv_gamma=1.0, power=0.75)
    assert ema.decay(1) == 0.0  # the first update copies the weights
    assert ema.decay(2) == pytest.approx(1 - 2**-0.75)
    assert ema.decay(11) == pytest.approx(1 - 11**-0.75)
    assert ema.decay(10**9) == 0.9999


def test_first_update_copies_and_later_updates_interpolate():
    parameter = torch.nn.Parameter(torch.tensor([0.0, 2.0]))
    ema = EMA([parameter], max_decay=0.5, inv_gamma=1.0, power=1.0)
    with torch.no_grad():
        parameter.copy_(torch.tensor([4.0, 4.0]))
    ema.update([parameter])
    torch.testing.assert_close(ema.shadow_params[0], torch.tensor([4.0, 4.0]))
    with torch.no_grad():
        parameter.copy_(torch.tensor([0.0, 8.0]))
    ema.update([parameter])  # decay min(1 - 1/2, 0.5) = 0.5
    torch.testing.assert_close(ema.shadow_params[0], torch.tensor([2.0, 6.0]))


def test_copy_to_writes_the_average_into_another_model_only():
    model = _model()
    ema = EMA(model.parameters())
    original = [p.detach().clone() for p in model.parameters()]
    _perturb(model, seed=1)
    ema.update(model.parameters())
    ema.update(model.parameters())
    target = _model(seed=5)
    ema.copy_to(target.parameters())
    for shadow, written in zip(ema.shadow_params, target.parameters(), strict=True):
        torch.testing.assert_close(written, shadow)
    assert not torch.equal(ema.shadow_params[0], original[0])


def test_state_dict_round_trip_restores_weights_and_step_but_keeps_this_runs_decay():
    model = _model()
    ema = EMA(model.parameters(), max_decay=0.99)
    for step in range(3):
        _perturb(model, seed=step)
        ema.update(model.parameters())
    state = ema.state_dict()
    restored = EMA(_model(seed=9).parameters(), max_decay=0.5)
    restored.load_state_dict(copy.deepcopy(state))
    assert restored.num_updates == 3
    assert restored.max_decay == 0.5
    for a, b in zip(restored.shadow_params, ema.shadow_params, strict=True):
        assert torch.equal(a, b)


def test_load_state_dict_rejects_another_architecture():
    ema = EMA(_model().parameters())
    other = EMA([torch.nn.Parameter(torch.zeros(3))])
    with pytest.raises(ValueError, match="parameters"):
        ema.load_state_dict(other.state_dict())
