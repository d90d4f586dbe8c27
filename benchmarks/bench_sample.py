"""Sampling speed, measured side by side in one run.

1. `DDPMPaperScheduler.step` against `diffusers.DDPMScheduler.step` (microseconds a call), same inputs.
2. `DDPMPaperPipeline` images/s against a bare loop of the same number of UNet calls (the compute floor of sampling).

Both sides alternate within each repetition; the figures are medians over repetitions.

    python benchmarks/bench_sample.py                       # CPU, batch 16x3x32x32
    python benchmarks/bench_sample.py --device cuda --preset ddpm-cifar10
"""

import argparse
import statistics
import time

import torch
from diffusers import DDPMScheduler
from diffusers.utils.torch_utils import randn_tensor

from pipelines import DDPMPaperPipeline
from schedulers import DDPMPaperScheduler
from training.models import build_unet


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_scheduler_step(scheduler, model_output, sample, generator, timesteps, device) -> float:
    """Seconds per `step` call over `timesteps`."""
    synchronize(device)
    start = time.perf_counter()
    for t in timesteps:
        scheduler.step(model_output, t, sample, generator=generator)
    synchronize(device)
    return (time.perf_counter() - start) / len(timesteps)


def time_noise_draw(shape, dtype, generator, timesteps, device) -> float:
    """Seconds per draw of the noise both schedulers' `step` draws (the same `randn_tensor` call)."""
    synchronize(device)
    start = time.perf_counter()
    for _ in timesteps:
        randn_tensor(shape, generator=generator, device=device, dtype=dtype)
    synchronize(device)
    return (time.perf_counter() - start) / len(timesteps)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--resolution", type=int, default=32)
    parser.add_argument("--channels", type=int, default=3)
    parser.add_argument("--preset", default="tiny", help="UNet preset of the pipeline benchmark")
    parser.add_argument("--sampling_steps", type=int, default=20, help="sampling steps timed per repetition")
    parser.add_argument("--step_calls", type=int, default=200, help="scheduler.step calls timed per repetition")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    args = parser.parse_args()
    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype)
    shape = (args.batch, args.channels, args.resolution, args.resolution)
    print(
        f"device {device} ({torch.cuda.get_device_name(device) if device.type == 'cuda' else 'CPU'}), "
        f"torch {torch.__version__}, threads {torch.get_num_threads()}, batch {shape}, {args.dtype}"
    )

    # 1. scheduler.step ------------------------------------------------------------------------------------------
    gen = torch.Generator(device=device).manual_seed(0)
    sample = torch.randn(shape, generator=gen, device=device, dtype=dtype)
    model_output = torch.randn(shape, generator=gen, device=device, dtype=dtype)
    ours, theirs = DDPMPaperScheduler(), DDPMScheduler()
    for scheduler in (ours, theirs):  # as a pipeline does before sampling
        scheduler.set_timesteps(1000, device=device)
    timesteps = theirs.timesteps[: args.step_calls]  # t > 0: every call draws noise, as in sampling
    for scheduler in (ours, theirs):  # warm-up: one untimed pass each
        time_scheduler_step(scheduler, model_output, sample, gen, timesteps, device)
    ours_times, theirs_times, draw_times = [], [], []
    for _ in range(args.repeats):
        ours_times.append(time_scheduler_step(ours, model_output, sample, gen, timesteps, device))
        theirs_times.append(time_scheduler_step(theirs, model_output, sample, gen, timesteps, device))
        draw_times.append(time_noise_draw(shape, dtype, gen, timesteps, device))
    ours_us, theirs_us, draw_us = (statistics.median(times) * 1e6 for times in (ours_times, theirs_times, draw_times))
    print(
        f"scheduler.step ({len(timesteps)} calls, randn included): ours {ours_us:.1f} us, DDPMScheduler "
        f"{theirs_us:.1f} us, ours/DDPMScheduler {ours_us / theirs_us:.3f} (target <= 0.5)"
    )
    print(
        f"  of which the noise draw both make: {draw_us:.1f} us; the rest: ours {ours_us - draw_us:.1f} us, "
        f"DDPMScheduler {theirs_us - draw_us:.1f} us, ratio {(ours_us - draw_us) / (theirs_us - draw_us):.3f}"
    )

    # 2. pipeline against a bare loop of UNet calls ------------------------------------------------------------------
    unet = build_unet(args.preset, None, args.resolution, args.channels).to(device=device, dtype=dtype).eval()
    pipe = DDPMPaperPipeline(unet=unet, scheduler=DDPMPaperScheduler())
    pipe.set_progress_bar_config(disable=True)
    pipe.scheduler.set_timesteps(args.sampling_steps)
    chain = pipe.scheduler.timesteps.tolist()

    @torch.no_grad()
    def bare_loop() -> None:
        # The same UNet calls on a fixed input (feeding the raw output back would drift into denormal floats).
        x = torch.randn(shape, generator=gen, device=device, dtype=dtype)
        for t in chain:
            unet(x, t)

    def pipeline() -> None:
        pipe(batch_size=args.batch, generator=gen, num_inference_steps=args.sampling_steps, output_type="pt")

    def timed(fn) -> float:
        synchronize(device)
        start = time.perf_counter()
        fn()
        synchronize(device)
        return time.perf_counter() - start

    timed(bare_loop), timed(pipeline)  # warm-up
    bare_times, pipe_times = [], []
    for _ in range(args.repeats):
        bare_times.append(timed(bare_loop))
        pipe_times.append(timed(pipeline))
    bare_ips = args.batch / statistics.median(bare_times)
    pipe_ips = args.batch / statistics.median(pipe_times)
    print(
        f"sampling ({args.preset}, {args.sampling_steps} steps): pipeline {pipe_ips:.2f} img/s, bare UNet loop "
        f"{bare_ips:.2f} img/s, pipeline/bare {pipe_ips / bare_ips:.3f} (target >= 0.98)"
    )


if __name__ == "__main__":
    main()
