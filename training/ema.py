"""Exponential moving average (EMA) of the weights: the paper samples from an EMA with decay 0.9999 (Ho et al. 2020,
Appendix B).

The decay follows diffusers' `EMAModel(use_ema_warmup=True)`, which train_unconditional.py uses, so its flags
`--ema_inv_gamma`, `--ema_power` and `--ema_max_decay` mean the same here: after `n` updates the decay is
`1 - (1 + (n - 1) / inv_gamma) ** -power`, clamped to `[min_decay, max_decay]`; the first update copies the weights.
An update is one fused `torch._foreach_lerp_` over all parameters, after every optimizer step, as the peer's
`EMAModel.step`: after a step skipped for a non-finite gradient it averages in the unchanged weights.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch


class EMA:
    r"""
    Shadow copies of a model's parameters, moved towards them after every optimizer step.

    Args:
        parameters (`Iterable[torch.nn.Parameter]`):
            The parameters to average (the shadow copies live on the same devices, in the same dtypes).
        max_decay (`float`, defaults to 0.9999):
            The largest decay (the paper's constant decay).
        inv_gamma (`float`, defaults to 1.0):
            Warm-up time scale, in optimizer steps.
        power (`float`, defaults to 3/4):
            Warm-up power: 3/4 reaches 0.999 after ~10k steps and 0.9999 after ~215k steps; 1 reaches 0.9999 after
            10k steps.
        min_decay (`float`, defaults to 0.0):
            The smallest decay after the first update.

    The object has `state_dict` / `load_state_dict`, so `checkpoints.checkpointing.register_checkpoint_state` saves it
    (as safetensors) and restores it with the rest of the training state.
    """

    def __init__(
        self,
        parameters: Iterable[torch.nn.Parameter],
        max_decay: float = 0.9999,
        inv_gamma: float = 1.0,
        power: float = 3 / 4,
        min_decay: float = 0.0,
    ):
        self.shadow_params = [parameter.detach().clone() for parameter in parameters]
        self.max_decay = max_decay
        self.inv_gamma = inv_gamma
        self.power = power
        self.min_decay = min_decay
        self.num_updates = 0

    def decay(self, num_updates: int | None = None) -> float:
        """The decay applied by the `num_updates`-th update (by default the last one); 0 for the first."""
        step = (self.num_updates if num_updates is None else num_updates) - 1
        if step <= 0:
            return 0.0
        value = 1.0 - (1.0 + step / self.inv_gamma) ** -self.power
        return max(min(value, self.max_decay), self.min_decay)

    @torch.no_grad()
    def update(self, parameters: Iterable[torch.nn.Parameter]) -> None:
        """shadow <- decay * shadow + (1 - decay) * parameter, after an optimizer step."""
        self.num_updates += 1
        params = [parameter.detach() for parameter in parameters]
        if len(params) != len(self.shadow_params):
            raise ValueError(f"EMA holds {len(self.shadow_params)} parameters, got {len(params)}.")
        torch._foreach_lerp_(self.shadow_params, params, 1.0 - self.decay())  # a Python float: no host sync

    @torch.no_grad()
    def copy_to(self, parameters: Iterable[torch.nn.Parameter]) -> None:
        """Write the averaged weights into `parameters` (e.g. of a copy of the model, for sampling or export)."""
        params = [parameter.data for parameter in parameters]
        if len(params) != len(self.shadow_params):
            raise ValueError(f"EMA holds {len(self.shadow_params)} parameters, got {len(params)}.")
        torch._foreach_copy_(params, self.shadow_params)

    def state_dict(self) -> dict[str, Any]:
        return {
            "shadow_params": self.shadow_params,
            "num_updates": self.num_updates,
            "max_decay": self.max_decay,
            "inv_gamma": self.inv_gamma,
            "power": self.power,
            "min_decay": self.min_decay,
        }

    @torch.no_grad()
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore the averaged weights and the update count; the shadow copies keep their devices."""
        shadow = state_dict["shadow_params"]
        if len(shadow) != len(self.shadow_params):
            raise ValueError(f"The EMA state has {len(shadow)} parameters; this model has {len(self.shadow_params)}.")
        for current, saved in zip(self.shadow_params, shadow, strict=True):
            if current.shape != saved.shape:
                raise ValueError(
                    f"EMA parameter of shape {tuple(saved.shape)} cannot load into {tuple(current.shape)}."
                )
            current.copy_(saved)
        # The decay settings stay those of this run: a resumed run may change them on purpose.
        self.num_updates = int(state_dict["num_updates"])
