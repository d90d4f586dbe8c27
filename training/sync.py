"""An optimizer step without host syncs: `step_unless_nonfinite` skips a non-finite step inside a fused optimizer's
kernel (its `found_inf` flag), and `DeferredRead` hands the host step n's numbers while the device runs step n + 1."""

from __future__ import annotations

import torch


def adamw(parameters, **kwargs) -> torch.optim.AdamW:
    """AdamW with the fused kernel where torch has one for the device (CUDA, CPU, MPS, XPU): it skips a non-finite
    step on the device (`step_unless_nonfinite`). Elsewhere the multi-tensor one, and a host read of the skip flag."""
    parameters = list(parameters)
    try:
        return torch.optim.AdamW(parameters, fused=True, **kwargs)
    except RuntimeError:
        return torch.optim.AdamW(parameters, **kwargs)


def step_unless_nonfinite(optimizer, nonfinite: torch.Tensor, scaler: torch.amp.GradScaler | None = None) -> None:
    """
    Apply the optimizer step unless `nonfinite` (a boolean 0-dim tensor) is true.

    `optimizer` may be Accelerate's wrapper. With a fused optimizer the decision is taken on the device; with a
    `GradScaler` (fp16) the scaler passes its own `found_inf`, which is set by the same non-finite gradients.
    """
    inner = getattr(optimizer, "optimizer", optimizer)
    fused = all(group.get("fused") for group in inner.param_groups)
    if scaler is not None:
        optimizer.step()  # the scaler skips steps with non-finite gradients itself (without a sync if fused)
    elif fused:
        inner.found_inf = nonfinite.to(torch.float32)
        try:
            optimizer.step()
        finally:
            del inner.found_inf
    elif not bool(nonfinite):  # the one host sync, for optimizers without a fused kernel
        optimizer.step()


class DeferredRead:
    """
    Read small device tensors one step late: `swap(step, values)` starts copying `values` to the host and returns the
    `(step, list)` given to the previous call (or None); `flush()` returns the pending one. On a CPU the values are
    already on the host and nothing waits either way.
    """

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        self._pending: tuple[int, torch.Tensor, torch.cuda.Event | None] | None = None

    def swap(self, step: int, values: torch.Tensor) -> tuple[int, list[float]] | None:
        previous = self.flush()
        if self.cuda:
            host = values.detach().to("cpu", non_blocking=True)  # into pinned memory, so the copy is asynchronous
            event = torch.cuda.Event()
            event.record()
            self._pending = (step, host, event)
        else:
            self._pending = (step, values.detach().clone(), None)
        return previous

    def flush(self) -> tuple[int, list[float]] | None:
        if self._pending is None:
            return None
        step, host, event = self._pending
        self._pending = None
        if event is not None:
            event.synchronize()  # the copy was queued a whole step ago: this returns at once unless the host is ahead
        return step, host.tolist()
