"""What the host learns of the optimizer steps, one step late, and the decision to stop: `StepMonitor` owns the loop's
counters, the deferred read of the device's numbers, the log lines and the progress bar; `StopSignal` turns SIGTERM and
SIGINT into a stop after a checkpoint (with one process, the step in flight is abandoned at the next U-Net block and
taken again on resume); `exit_on_signal` ends the set-up and the final export in one line; data-loading workers ignore
the stop signals (`ignore_stop_signals`). What each case needs of the launcher's grace: docs/checkpoints.md."""

from __future__ import annotations

import atexit
import contextlib
import functools
import logging
import multiprocessing
import os
import signal
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
from accelerate import Accelerator
from tqdm.auto import tqdm

from checkpoints.checkpointing import TrainerState
from training.sync import DeferredRead

logger = logging.getLogger(__name__)


def _absorb_first_sigterm(signum: int, frame: Any) -> None:
    signal.signal(signal.SIGTERM, signal.SIG_DFL)  # the next one ends the worker


def ignore_stop_signals(worker_id: int | None = None) -> None:
    """
    A DataLoader's `worker_init_fn`: the worker ignores SIGINT and its first SIGTERM, so that a signal to the whole
    process group leaves the stop (and the checkpoint) to the main process. A second SIGTERM ends it: the one that
    `multiprocessing` sends its daemon workers when the main process exits (ignored, the exit would wait forever).
    """
    signal.signal(signal.SIGTERM, _absorb_first_sigterm)
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def _end_workers() -> None:
    """At the main process's exit, before `multiprocessing` terminates its daemon children with a SIGTERM that a
    worker may absorb: the DataLoader's check of its workers is put off, and each daemon child is ended at once."""
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)  # a worker's end is no error now
    for child in multiprocessing.active_children():
        if child.daemon:
            child.kill()
            child.join(timeout=5)


_workers_ended_at_exit: list[bool] = [False]


def end_workers_at_exit() -> None:
    """In the main process, when it builds a DataLoader with workers that run `ignore_stop_signals` (once)."""
    if not _workers_ended_at_exit[0]:
        atexit.register(_end_workers)  # atexit runs last-registered first: before multiprocessing's own
        _workers_ended_at_exit[0] = True


_exit_message: list[str] = ["before the first step: nothing to save yet; run the same command again"]


def _exit_handler(signum: int, frame: Any) -> None:
    if _exit_message[0] == "":  # a later signal while the first one unwinds (the launcher's forwarded SIGTERM)
        return
    what, _exit_message[0] = _exit_message[0], ""
    if os.environ.get("RANK", "0") == "0":
        logger.warning("Stopped by %s %s.", signal.Signals(signum).name, what)
    raise SystemExit(128 + signum)


def exit_on_signal(what: str) -> None:
    """
    From now on (outside `StopSignal` blocks, which put these handlers back when they end) the first SIGTERM or SIGINT
    logs "Stopped by SIG... {what}." (rank 0) and exits with status 128 + the signal; later ones are absorbed, so a
    second signal cannot print a traceback while the first unwinds. `what` says where the run is and what to do.
    """
    _exit_message[0] = what
    if threading.current_thread() is threading.main_thread():
        for signum in (signal.SIGTERM, signal.SIGINT):
            signal.signal(signum, _exit_handler)


def restores_signals(function):
    """Decorate a function that calls `exit_on_signal`: the SIGTERM and SIGINT handlers are put back when it ends."""

    @functools.wraps(function)
    def wrapper(*args, **kwargs):
        if threading.current_thread() is not threading.main_thread():
            return function(*args, **kwargs)
        previous = {signum: signal.getsignal(signum) for signum in (signal.SIGTERM, signal.SIGINT)}
        try:
            return function(*args, **kwargs)
        finally:
            for signum, handler in previous.items():
                signal.signal(signum, handler)

    return wrapper


class StepInterrupted(Exception):
    """Raised inside an interruptible step after a stop signal: the step is abandoned."""


class StopSignal:
    r"""
    Turns SIGTERM and SIGINT into a request to stop, for as long as the block runs: the first signal sets `received`
    (the loop reads it at the next U-Net block or step); later ones are counted in `absorbed` and change nothing,
    so a checkpoint being written is never cut short by a second signal. Outside the main thread, where Python cannot
    install handlers, it does nothing.
    """

    def __init__(self, signals: tuple[int, ...] = (signal.SIGTERM, signal.SIGINT), on_first=None):
        self.signals, self.on_first = signals, on_first
        self.received: int | None = None
        self.absorbed = 0
        self._previous: dict[int, Any] = {}

    @property
    def name(self) -> str | None:
        return signal.Signals(self.received).name if self.received is not None else None

    def _handle(self, signum: int, frame: Any) -> None:
        if self.received is None:
            self.received = signum
            if self.on_first is not None:
                self.on_first()
        else:
            self.absorbed += 1

    def __enter__(self) -> StopSignal:
        if threading.current_thread() is threading.main_thread():
            self._previous = {signum: signal.signal(signum, self._handle) for signum in self.signals}
        return self

    def __exit__(self, *exc_info: Any) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous = {}


def launcher_pid() -> int | None:
    """The PID of the `accelerate launch` process that started this one (it sets ACCELERATE_MIXED_PRECISION for its
    children, one process or several), or None when started otherwise (`python train_ddpm.py`, nohup, ...)."""
    return os.getppid() if "ACCELERATE_MIXED_PRECISION" in os.environ else None


@dataclass
class StepReport:
    """What the device says of one optimizer step, read by the host one step later (reduced over processes)."""

    step: int
    nonfinite: bool
    nonfinite_in_a_row: int
    nonfinite_in_all: int
    loss: float
    stop_asked: bool
    mean_loss: float | None = None  # on logging steps: the mean loss since the last log line, and the grad norm
    grad_norm: float | None = None


class StepMonitor:
    r"""
    The host's view of training, one step late, and the decision to stop. Use as a context manager around the loop
    (it catches SIGTERM and SIGINT for its duration).

    Args:
        accelerator (`Accelerator`): For the device, the number of processes, the reductions and the tracker.
        state (`TrainerState`): The run's state; its non-finite counts start the device's counters.
        max_train_steps (`int`): For the progress bar and the last log line.
        logging_steps (`int`): Log every this many optimizer steps.
        max_nonfinite_steps (`int`): Stop after this many non-finite steps in a row.
    """

    def __init__(
        self,
        accelerator: Accelerator,
        state: TrainerState,
        max_train_steps: int,
        logging_steps: int,
        max_nonfinite_steps: int,
    ):
        device = accelerator.device
        self.accelerator, self.state = accelerator, state
        self.max_train_steps, self.logging_steps, self.max_nonfinite_steps = (
            max_train_steps, logging_steps, max_nonfinite_steps,
        )  # fmt: skip
        # Kept on the device and read one step late.
        self.in_a_row = torch.tensor(float(state.consecutive_nonfinite_steps), device=device)
        self.in_all = torch.tensor(float(state.skipped_nonfinite_steps), device=device)
        self.stop_flag = torch.zeros((), device=device)
        self.loss_sum = torch.zeros((), device=device)
        self.loss_count, self.images_seen, self.last_log_time = 0, 0, time.perf_counter()
        self.deferred = DeferredRead(device)
        self.pending_logs: dict[int, dict[str, float]] = {}  # the host half of log lines whose device half is coming
        self.signal = StopSignal(on_first=self.warn_if_late)
        self.launcher, self.orphaned = launcher_pid(), False
        self.interruptible_steps = False  # set by `interrupt_steps_of`
        self.armed, self.abandoned, self._cycle_start = False, False, None
        # For the estimate of the time a stop takes (`warn_if_late`): micro-batches of the current optimizer step so
        # far, the time between the last two micro-batches, and the last checkpoint's write time.
        self.batches_in_cycle, self.batch_seconds, self.checkpoint_seconds = 0, None, None
        self._batch_start = None
        self.stopped_by: str | None = None
        self.nonfinite_error: str | None = None  # why to stop with an error, once too many steps in a row failed
        self.progress = tqdm(
            total=max_train_steps,
            initial=state.global_step,
            desc="Training",
            disable=not accelerator.is_local_main_process,
            dynamic_ncols=True,
        )

    def __enter__(self) -> StepMonitor:
        self.signal.__enter__()
        return self

    def __exit__(self, *exc_info) -> None:
        self.signal.__exit__(*exc_info)
        self.progress.close()

    def interrupt_steps_of(self, model: torch.nn.Module) -> None:
        """
        Let a stop signal abandon a step in the middle of `model`'s forward or backward pass: a check at every
        top-level block of the U-Net, both ways. For one process without compile only (with any accumulation; see the
        module docstring); call it once.
        """
        blocks = [getattr(model, name) for name in ("down_blocks", "mid_block", "up_blocks") if hasattr(model, name)]
        blocks = [
            block for group in blocks for block in (group if isinstance(group, torch.nn.ModuleList) else [group])
        ]

        def check(*_) -> None:
            if self.armed and (self.signal.received is not None or self._launcher_died()):
                raise StepInterrupted

        def on_forward(module, inputs, output):
            check()
            tensor = output[0] if isinstance(output, tuple) else output
            if isinstance(tensor, torch.Tensor) and tensor.requires_grad:
                tensor.register_hook(check)  # runs in the backward pass, as the gradient reaches this block

        for block in blocks:
            block.register_forward_hook(on_forward)
        self.interruptible_steps = bool(blocks)

    @contextlib.contextmanager
    def interruptible(self, optimizer, state: TrainerState | None = None) -> Iterator[None]:
        """
        The forward and backward pass of one micro-batch. With `interrupt_steps_of`, a stop signal inside abandons
        the whole optimizer step it belongs to (every micro-batch of its accumulation cycle): the random states,
        Accelerate's batch count and the data position in `state` are put back as they were when its first micro-batch
        began, the gradients are dropped, and `abandoned` is set (a resumed run reads the cycle's batches again).
        """
        self._batch_start = time.perf_counter()
        if not self.interruptible_steps:
            yield
            return
        if self._cycle_start is None:  # the first micro-batch of an optimizer step
            cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None
            position = (state.batches_in_epoch, state.images_in_epoch) if state is not None else None
            # step: Accelerate's batch count, which decides when the accumulated gradients are applied
            self._cycle_start = (torch.get_rng_state(), cuda, self.accelerator.step, position)
        self.armed = True
        try:
            yield
        except StepInterrupted:
            cpu, cuda, self.accelerator.step, position = self._cycle_start
            torch.set_rng_state(cpu)
            if cuda is not None:
                torch.cuda.set_rng_state_all(cuda)
            if state is not None:
                state.batches_in_epoch, state.images_in_epoch = position
            optimizer.zero_grad(set_to_none=True)
            self.abandoned = True
            self.stopped_by = self._stop_reason()
            logger.warning("Stop asked (%s) during a step: it is abandoned, to be taken on resume.", self.stopped_by)
        finally:
            self.armed = False

    def warn_if_late(self) -> None:
        """
        On the first stop signal, under `accelerate launch`: when the checkpoint is expected later than the launcher
        kills this process, one warning line saying so. The estimate: the micro-batches the stop still waits for
        (none when steps are abandoned; else the rest of this optimizer step and, the report being read one step
        late, one more) x the last micro-batch's time + the last checkpoint's write time.
        """
        if self.launcher is None or not self.accelerator.is_local_main_process:
            return
        processes, accumulation = self.accelerator.num_processes, self.accelerator.gradient_accumulation_steps
        grace = 5.0 if processes == 1 else 30.0
        batches = 0 if self.interruptible_steps else 2 * accumulation - self.batches_in_cycle
        seconds = self.batch_seconds or 0.0
        if self._batch_start is not None:  # the micro-batch under way has taken at least this long
            seconds = max(seconds, time.perf_counter() - self._batch_start)
        expected = batches * seconds + (self.checkpoint_seconds or 0.0)
        if expected <= grace:
            return
        logger.warning(
            "Stop asked: the checkpoint is expected in about %.0f s (%d micro-batches of %.1f s, a checkpoint of %.1f "
            "s) but accelerate launch kills this run %.0f s after a signal (%d process(es), %d accumulation steps): "
            "it will end without this checkpoint and resume from the previous one. Give the job a longer grace "
            "(send the signal that long before the kill), fewer --gradient_accumulation_steps, or one process "
            "without --compile (whose steps are abandoned at once).",
            expected, batches, seconds, self.checkpoint_seconds or 0.0, grace, processes,
            accumulation,
        )  # fmt: skip

    def count_batch(self, loss: torch.Tensor, batch_size: int) -> None:
        """After each backward pass: the batch's loss (kept on the device) and images."""
        self.loss_sum += loss.detach()
        self.loss_count += 1
        self.batches_in_cycle += 1
        if self._batch_start is not None:
            self.batch_seconds = time.perf_counter() - self._batch_start
        self.images_seen += batch_size * self.accelerator.num_processes

    def end_step(
        self,
        nonfinite: torch.Tensor,
        loss: torch.Tensor,
        grad_norm: torch.Tensor,
        log: dict[str, float],
    ) -> None:
        r"""
        After each optimizer step (`state.global_step` already counts it): update the device's counters, send this
        step's report on its way and act on the previous step's.

        Args:
            nonfinite (`torch.Tensor`): Boolean 0-dim: the step was skipped for a non-finite gradient.
            loss (`torch.Tensor`): The last batch's loss.
            grad_norm (`torch.Tensor`): The gradient norm before clipping.
            log (`dict`): Host values for this step's log line (learning rate, epoch, ...), used on logging steps.
        """
        step = self.state.global_step
        self._cycle_start, self.batches_in_cycle = None, 0  # the next micro-batch begins the next optimizer step
        self.progress.update(1)
        self.in_a_row.add_(1).mul_(nonfinite)
        self.in_all.add_(nonfinite)
        if self.signal.received is not None or self._launcher_died():
            self.stop_flag.fill_(1.0)
        values = [nonfinite.float(), self.in_a_row, self.in_all, loss.detach().float(), self.stop_flag]
        if step % self.logging_steps == 0 or step == self.max_train_steps:
            values += [self.loss_sum / max(self.loss_count, 1), grad_norm.float()]
            now = time.perf_counter()
            self.pending_logs[step] = {**log, "images_per_second": self.images_seen / (now - self.last_log_time)}
            self.loss_sum.zero_()
            self.loss_count, self.images_seen, self.last_log_time = 0, 0, now
        # The mean over processes: a flag is set on any process when its mean is above 0 (a signal to one process
        # stops them all); the counters and the grad norm are equal on every process.
        report = self.accelerator.reduce(torch.stack(values), "mean")
        self._act(self.deferred.swap(step, report))

    def finish(self) -> None:
        """After the loop: act on the last step's report."""
        self._act(self.deferred.flush())

    def sync_state(self) -> None:
        """Bring the device's non-finite counts into `state` (a host sync: at checkpoints only)."""
        in_a_row, in_all = torch.stack([self.in_a_row, self.in_all]).tolist()
        self.state.consecutive_nonfinite_steps, self.state.skipped_nonfinite_steps = round(in_a_row), round(in_all)

    def _act(self, read: tuple[int, list[float]] | None) -> None:
        """Warn of a skipped step, write its log line, and decide to stop."""
        if read is None:
            return
        step, values = read
        report = StepReport(step, values[0] > 0, round(values[1]), round(values[2]), values[3], values[4] > 0)
        if len(values) > 5:
            report.mean_loss, report.grad_norm = values[5], values[6]
        if report.nonfinite:
            logger.warning(
                "Step %d: non-finite gradient (loss %s); step skipped (%d in a row, %d in all).",
                step, report.loss, report.nonfinite_in_a_row, report.nonfinite_in_all,
            )  # fmt: skip
        if step in self.pending_logs:
            logs = self.pending_logs.pop(step)
            logs.update(
                loss=report.mean_loss, grad_norm=report.grad_norm, skipped_nonfinite_steps=report.nonfinite_in_all
            )
            self.accelerator.log(logs, step=step)
            self.progress.set_postfix(
                loss=f"{logs['loss']:.4f}", lr=f"{logs['lr']:.2e}", img_s=f"{logs['images_per_second']:.0f}"
            )
        if report.nonfinite_in_a_row >= self.max_nonfinite_steps and self.nonfinite_error is None:
            self.nonfinite_error = (
                f"{report.nonfinite_in_a_row} optimizer steps in a row had a non-finite loss or gradient (up to step "
                f"{step}); stopping at step {self.state.global_step} (--max_nonfinite_steps {self.max_nonfinite_steps})."
            )
        if report.stop_asked and self.stopped_by is None:
            self.stopped_by = self._stop_reason()

    def _launcher_died(self) -> bool:
        """Whether this process was re-parented: the launcher that started it died, and nobody waits for this run."""
        self.orphaned = self.orphaned or (self.launcher is not None and os.getppid() != self.launcher)
        return self.orphaned

    def _stop_reason(self) -> str:
        if self.signal.received is not None:
            return self.signal.name
        return "the death of the accelerate launch process" if self.orphaned else "a signal to another process"

    def stop_after_checkpoint(self) -> str | None:
        """
        After the last checkpoint: why to stop before the final evaluation and export (a signal that came during the
        last step or the checkpoint), or None. Every process gets the same answer (one reduction: a host sync).
        """
        if self.stopped_by is None:
            asked = torch.tensor(
                float(self.signal.received is not None or self._launcher_died()), device=self.accelerator.device
            )
            if self.accelerator.reduce(asked, "mean").item() > 0:
                self.stopped_by = self._stop_reason()
        return self.stopped_by
