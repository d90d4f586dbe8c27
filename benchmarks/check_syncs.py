"""Does one optimizer step of train_ddpm.py make the host wait for the device? Run the step's operations and report
every read of a device value by the host.

On CUDA, `torch.cuda.set_sync_debug_mode("error")` turns each synchronising call into an error; on the CPU, where
nothing waits, the profiler lists the reads (`aten::_local_scalar_dense`, behind `.item()`, `bool(tensor)`, ...)
that would. `tests/test_sync.py` runs the CPU check; `benchmarks/gpu_check.sh` runs the CUDA one.

    python benchmarks/check_syncs.py [--device cuda]
"""

from __future__ import annotations

import argparse
import os
import sys

import torch
from accelerate import Accelerator

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import train_ddpm  # noqa: E402
from checkpoints.checkpointing import TrainerState  # noqa: E402
from image_data.pixels import images_to_model_input  # noqa: E402
from schedulers import DDPMPaperScheduler  # noqa: E402
from training.ema import EMA  # noqa: E402
from training.models import build_unet  # noqa: E402
from training.monitor import StepMonitor  # noqa: E402
from training.sync import adamw  # noqa: E402


def training_step(device: torch.device, prediction_type: str = "epsilon"):
    """
    A function running one optimizer step of train_ddpm.py (tiny UNet, 8x8) with its own pieces: the lines of
    Algorithm 1, `train_ddpm.clip_and_step`, the EMA and `StepMonitor.end_step` (logging every step).
    """
    accelerator = Accelerator(cpu=device.type == "cpu")
    scheduler = DDPMPaperScheduler(num_train_timesteps=50, prediction_type=prediction_type)
    unet = build_unet("tiny", None, 8, 1).to(device)
    optimizer = adamw(unet.parameters())
    ema = EMA(unet.parameters())
    pixels = torch.randint(0, 256, (4, 1, 8, 8), dtype=torch.uint8).to(device)
    state = TrainerState()
    monitor = StepMonitor(accelerator, state, max_train_steps=10**9, logging_steps=1, max_nonfinite_steps=100)
    monitor.progress.disable = True

    def step() -> torch.Tensor:
        x0 = images_to_model_input(pixels, random_flip=True)
        noise = torch.randn_like(x0)
        timesteps = torch.randint(0, 50, (x0.shape[0],), device=device)
        xt = scheduler.add_noise(x0, noise, timesteps)
        loss = train_ddpm.diffusion_loss(scheduler, unet(xt, timesteps).sample, x0, noise, xt, timesteps)
        accelerator.backward(loss)
        grad_norm, nonfinite = train_ddpm.clip_and_step(accelerator, unet, optimizer, 1.0)
        monitor.count_batch(loss, x0.shape[0])
        state.global_step += 1
        ema.update(unet.parameters())
        monitor.end_step(nonfinite, loss, grad_norm, {"lr": 1e-4, "epoch": 0})
        return loss

    return step


def host_reads(profile: torch.profiler.profile) -> list[str]:
    """The reads of a value back to the host in a CPU profile, outside the fused AdamW kernel (whose CPU version
    reads its step counts from host memory; the CUDA one reads them on the device), each with its callers."""
    reads = []
    for event in profile.events():
        if event.name != "aten::_local_scalar_dense":
            continue
        callers, parent = [], event.cpu_parent
        while parent is not None:
            callers.append(parent.name)
            parent = parent.cpu_parent
        if "aten::_fused_adamw_" not in callers:
            reads.append(" <- ".join([event.name, *callers[:4]]))
    return reads


def cpu_host_reads(step) -> list[str]:
    """The reads of a value back to the host during one call of `step` (from `training_step` on the CPU)."""
    step()  # the first step creates the optimizer state
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as profile:
        step()
    return host_reads(profile)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()
    for prediction_type in ("epsilon", "sample", "v_prediction"):
        if args.device == "cpu":
            reads = cpu_host_reads(training_step(torch.device("cpu"), prediction_type))
        else:
            step = training_step(torch.device(args.device), prediction_type)
            step()
            torch.cuda.synchronize()
            torch.cuda.set_sync_debug_mode("error")
            try:
                for _ in range(3):
                    step()
                reads = []
            except RuntimeError as error:
                reads = [str(error).splitlines()[0]]
            finally:
                torch.cuda.set_sync_debug_mode("default")
        print(f"{args.device}, {prediction_type}: " + ("no host syncs in the step" if not reads else f"{reads}"))


if __name__ == "__main__":
    main()
