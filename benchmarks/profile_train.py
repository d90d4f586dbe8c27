"""Where does a training step of train_ddpm.py spend its time? A torch.profiler trace of the loop.

Runs `train_ddpm.py` in process for --warmup + --steps optimizer steps on random images (as `bench_train.py` does)
with the profiler recording the last --steps of them, then writes under --out:

- `ops_cpu.txt`, `ops_device.txt`: the top operators by self CPU time and by self device time;
- `summary.txt`: wall time of the profiled steps, device busy time (kernels, merged over overlaps) and their ratio:
  well under 1 means the device waits for the host;
- `trace.json.gz`: the Chrome trace (chrome://tracing, Perfetto).

    python benchmarks/profile_train.py --device cuda --preset ddpm-cifar10 --batch 128 --mixed_precision bf16 --out /tmp
"""

from __future__ import annotations

import argparse
import contextlib
import gzip
import io
import logging
import os
import shutil
import sys
import tempfile
import time

import datasets
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from bench_train import add_run_options, train_argv, write_dataset  # noqa: E402

import train_ddpm  # noqa: E402


class ProfiledSteps:
    """A learning-rate schedule wrapper's stand-in: counts optimizer steps and drives the profiler's schedule."""

    def __init__(self, profiler: torch.profiler.profile, first: int, last: int):
        self.profiler, self.first, self.last, self.count = profiler, first, last, 0
        self.start = self.end = None

    def step(self) -> None:
        self.count += 1
        if self.count == self.first:
            torch.cuda.synchronize() if torch.cuda.is_available() else None
            self.start = time.perf_counter()
        if self.count == self.last:
            torch.cuda.synchronize() if torch.cuda.is_available() else None
            self.end = time.perf_counter()
        self.profiler.step()


def busy_seconds(profiler: torch.profiler.profile) -> float:
    """Seconds in which at least one device kernel or copy ran (intervals merged)."""
    intervals = sorted(
        (event.time_range.start, event.time_range.end)
        for event in profiler.events()
        # Kernels and copies; not the profiler's own step annotations, which span whole steps on the device too.
        if event.device_type != torch.autograd.DeviceType.CPU
        and not getattr(event, "is_user_annotation", False)
        and not event.name.startswith("ProfilerStep")
    )
    total, current_start, current_end = 0, None, None
    for start, end in intervals:
        if current_end is None or start > current_end:
            if current_end is not None:
                total += current_end - current_start
            current_start, current_end = start, end
        else:
            current_end = max(current_end, end)
    if current_end is not None:
        total += current_end - current_start
    return total / 1e6  # microseconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_run_options(parser)
    parser.add_argument("--steps", type=int, default=20, help="profiled optimizer steps")
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--num_images", type=int, default=1024)
    parser.add_argument("--extra", default="", help="more train_ddpm.py flags, e.g. '--compile --channels_last'")
    parser.add_argument("--out", default=os.environ.get("OUT", "."))
    args = parser.parse_args()
    logging.disable(logging.WARNING)
    datasets.disable_progress_bars()
    device = torch.device(args.device)
    activities = [torch.profiler.ProfilerActivity.CPU]
    if device.type == "cuda":
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    os.makedirs(args.out, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        data = os.path.join(tmp, "data")
        write_dataset(data, args.num_images, args.resolution, 3)
        options = argparse.Namespace(**vars(args), compile=False, compile_mode=None, channels_last=False)
        argv = train_argv(options, data, os.path.join(tmp, "run"), device, args.warmup + args.steps + 1)
        argv += args.extra.split()
        schedule = torch.profiler.schedule(wait=args.warmup, warmup=1, active=args.steps - 1, repeat=1)
        with torch.profiler.profile(activities=activities, schedule=schedule) as profiler:
            steps = ProfiledSteps(profiler, args.warmup + 1, args.warmup + args.steps)
            # Each optimizer step calls the learning-rate schedule's step() once: count steps there.
            original = torch.optim.lr_scheduler.LRScheduler.step

            def counted(self, *a, **k):
                original(self, *a, **k)
                if getattr(self, "_profiled", False):
                    steps.step()

            torch.optim.lr_scheduler.LRScheduler.step = counted
            original_init = torch.optim.lr_scheduler.LambdaLR.__init__

            def init(self, *a, **k):
                original_init(self, *a, **k)
                self._profiled = True

            torch.optim.lr_scheduler.LambdaLR.__init__ = init
            try:
                with contextlib.redirect_stderr(io.StringIO()):
                    train_ddpm.main(argv)
            finally:
                torch.optim.lr_scheduler.LRScheduler.step = original
                torch.optim.lr_scheduler.LambdaLR.__init__ = original_init
    averages = profiler.key_averages()
    with open(os.path.join(args.out, "ops_cpu.txt"), "w") as f:
        f.write(averages.table(sort_by="self_cpu_time_total", row_limit=40, max_name_column_width=60))
    if device.type == "cuda":
        with open(os.path.join(args.out, "ops_device.txt"), "w") as f:
            f.write(averages.table(sort_by="self_device_time_total", row_limit=40, max_name_column_width=60))
    wall = steps.end - steps.start
    profiled = args.steps - 1
    lines = [
        f"argv: {' '.join(argv)}",
        f"{profiled} profiled steps of {args.batch} images: {wall:.3f} s wall, {profiled * args.batch / wall:.1f} img/s",
    ]
    if device.type == "cuda":
        busy = busy_seconds(profiler)
        lines.append(f"device busy {busy:.3f} s, busy/wall {busy / wall:.3f}")
    summary = "\n".join(lines)
    print(summary)
    with open(os.path.join(args.out, "summary.txt"), "w") as f:
        f.write(summary + "\n")
    trace = os.path.join(args.out, "trace.json")
    profiler.export_chrome_trace(trace)
    with open(trace, "rb") as source, gzip.open(trace + ".gz", "wb") as target:
        shutil.copyfileobj(source, target)
    os.remove(trace)


if __name__ == "__main__":
    main()
