"""Training speed of train_ddpm.py, measured side by side in one run.

Three loops train the same model at the same batch and resolution on the same images:

- ours: `train_ddpm.py` itself (in process), on the cached uint8 data, with its EMA, clipping and logging;
- floor: the model's forward + backward + optimizer step on a batch already on the device: the compute floor;
- peer: a loop in the style of diffusers' `examples/unconditional_image_generation/train_unconditional.py` (which has
  no compile or channels-last options: `--compile` and `--channels_last` apply to ours and the floor), written
  here from its documented behaviour: per-sample PIL transforms through `Dataset.set_transform` (resize, crop, flip,
  to tensor, normalise; PIL and numpy stand in for torchvision, which does not import beside the CPU torch here), a
  `DataLoader` with its default workers, `diffusers.training_utils.EMAModel`, `DDPMScheduler.add_noise`, gradient
  clipping and `loss.item()` every step.

Each repetition runs the three in turn; the figures are medians of images/s over repetitions, warm-up excluded.

It then times the two input pipelines alone, without a model, on the host: ours (whole uint8 batches from the
memory-mapped cache, then float conversion and random flip, as the loop does on the device) and the peer's (per-sample
PIL transforms in a `DataLoader` with its default `num_workers=0`). Their images/s bound what a loop can train at when
the model step is faster than its input, as on a GPU.

    python benchmarks/bench_train.py                                   # tiny preset, CPU
    python benchmarks/bench_train.py --preset ddpm-cifar10 --batch 16
    python benchmarks/bench_train.py --mixed_precision bf16 --peer_mixed_precision no    # ours in bf16, the peer as run
    python benchmarks/bench_train.py --device cuda --preset ddpm-cifar10 --batch 128 --mixed_precision bf16
"""

from __future__ import annotations

import argparse
import contextlib
import io
import logging
import os
import statistics
import sys
import tempfile
import time

import datasets
import numpy as np
import PIL.Image
import torch
import torch.nn.functional as F
from accelerate import Accelerator
from accelerate.state import AcceleratorState
from diffusers import DDPMScheduler
from diffusers.optimization import get_scheduler
from diffusers.training_utils import EMAModel

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import train_ddpm  # noqa: E402
from image_data.pixels import PixelBatches, collate_pixel_batch, images_to_model_input, load_pixels  # noqa: E402
from training.models import build_unet  # noqa: E402
from training.sync import adamw  # noqa: E402


def write_dataset(folder: str, num_images: int, resolution: int, channels: int) -> None:
    """Random PNG images in an image folder (what --train_data_dir takes)."""
    rng = np.random.default_rng(0)
    mode = "RGB" if channels == 3 else "L"
    shape = (resolution, resolution, 3) if channels == 3 else (resolution, resolution)
    os.makedirs(folder, exist_ok=True)
    for i in range(num_images):
        PIL.Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8), mode).save(os.path.join(folder, f"{i}.png"))


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def images_per_second(step, args, device: torch.device) -> float:
    """Run `step` --warmup times untimed, then --steps times timed; images/s of the timed steps."""
    for _ in range(args.warmup):
        step()
    synchronize(device)
    start = time.perf_counter()
    for _ in range(args.steps):
        step()
    synchronize(device)
    return args.steps * args.batch / (time.perf_counter() - start)


def batch_source(loader):
    """A function returning `loader`'s next batch, starting another epoch when one ends."""
    batches = iter(loader)

    def next_batch():
        nonlocal batches
        try:
            return next(batches)
        except StopIteration:
            batches = iter(loader)
            return next(batches)

    return next_batch


def autocast(device: torch.device, mixed_precision: str):
    if mixed_precision == "no":
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=torch.bfloat16 if mixed_precision == "bf16" else torch.float16)


def floor_loop(args, device: torch.device) -> float:
    """Images/s of forward + backward + AdamW on one batch that never leaves the device."""
    unet = build_unet(args.preset, None, args.resolution, args.channels).to(device).train()
    if args.channels_last:
        unet.to(memory_format=torch.channels_last)
    optimizer = adamw(unet.parameters(), lr=1e-4)  # the fastest AdamW for the device, as train_ddpm.py's
    x0 = torch.randn(args.batch, args.channels, args.resolution, args.resolution, device=device)
    noise = torch.randn_like(x0)
    t = torch.randint(0, 1000, (args.batch,), device=device)
    xt = 0.5 * x0 + 0.5 * noise
    if args.channels_last:
        xt = xt.contiguous(memory_format=torch.channels_last)
    model = torch.compile(unet, mode=args.compile_mode) if args.compile else unet

    def step() -> None:
        with autocast(device, args.mixed_precision):
            loss = F.mse_loss(model(xt, t).sample.float(), noise)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return images_per_second(step, args, device)


def peer_transform(resolution: int, channels: int):
    """Resize (bilinear, short side), centre crop, random flip, to tensor, normalise: per sample, in Python."""
    rng = np.random.default_rng(0)

    def transform(examples: dict) -> dict:
        tensors = []
        for image in examples["image"]:
            image = image.convert("RGB" if channels == 3 else "L")
            scale = resolution / min(image.size)
            image = image.resize(
                (max(resolution, round(image.width * scale)), max(resolution, round(image.height * scale))),
                PIL.Image.BILINEAR,
            )
            left, top = (image.width - resolution) // 2, (image.height - resolution) // 2
            image = image.crop((left, top, left + resolution, top + resolution))
            if rng.random() < 0.5:
                image = image.transpose(PIL.Image.FLIP_LEFT_RIGHT)
            array = np.asarray(image, dtype=np.float32) / 255.0
            tensor = torch.from_numpy(array).reshape(resolution, resolution, channels).permute(2, 0, 1)
            tensors.append((tensor - 0.5) / 0.5)
        return {"input": tensors}

    return transform


def peer_loop(args, device: torch.device, data_folder: str) -> float:
    """Images/s of a train_unconditional.py-style loop."""
    AcceleratorState._reset_state(reset_partial_state=True)  # ours ran in this process, maybe in another precision
    accelerator = Accelerator(cpu=device.type == "cpu", mixed_precision=args.peer_mixed_precision)
    unet = build_unet(args.preset, None, args.resolution, args.channels)  # the peer has no compile/channels-last
    ema = EMAModel(unet.parameters(), decay=0.9999, use_ema_warmup=True, inv_gamma=1.0, power=3 / 4)
    noise_scheduler = DDPMScheduler(num_train_timesteps=1000, beta_schedule="linear")
    optimizer = torch.optim.AdamW(unet.parameters(), lr=1e-4, betas=(0.95, 0.999), weight_decay=1e-6, eps=1e-8)
    dataset = datasets.load_dataset("imagefolder", data_dir=data_folder, split="train")
    dataset.set_transform(peer_transform(args.resolution, args.channels))
    loader = torch.utils.data.DataLoader(dataset, batch_size=args.batch, shuffle=True, num_workers=0)
    lr_scheduler = get_scheduler("cosine", optimizer=optimizer, num_warmup_steps=500, num_training_steps=10**6)
    unet, optimizer, loader, lr_scheduler = accelerator.prepare(unet, optimizer, loader, lr_scheduler)
    ema.to(accelerator.device)

    next_batch = batch_source(loader)

    def step() -> None:
        clean = next_batch()["input"].to(accelerator.device)
        noise = torch.randn(clean.shape, device=clean.device)
        timesteps = torch.randint(0, 1000, (clean.shape[0],), device=clean.device).long()
        noisy = noise_scheduler.add_noise(clean, noise, timesteps)
        with accelerator.accumulate(unet):
            loss = F.mse_loss(unet(noisy, timesteps).sample.float(), noise)
            accelerator.backward(loss)
            if accelerator.sync_gradients:
                accelerator.clip_grad_norm_(unet.parameters(), 1.0)
            optimizer.step()
            lr_scheduler.step()
            optimizer.zero_grad()
        if accelerator.sync_gradients:
            ema.step(unet.parameters())
        loss.detach().item()  # the peer logs the loss every step

    return images_per_second(step, args, device)


def train_argv(args, data_folder: str, output_dir: str, device: torch.device, steps: int) -> list[str]:
    """train_ddpm.py's flags for `steps` optimizer steps of the benchmark's model and data (EMA, flips, crops)."""
    argv = [
        "--train_data_dir", data_folder,
        "--resolution", str(args.resolution),
        "--model_preset", args.preset,
        "--train_batch_size", str(args.batch),
        "--max_train_steps", str(steps),
        "--logging_steps", str(args.warmup),
        "--mixed_precision", args.mixed_precision,
        "--output_dir", output_dir,
        "--use_ema",
        "--random_flip",
        "--center_crop",
        "--checkpointing_steps", str(10**9),
        "--save_images_epochs", "0",
        "--save_model_epochs", "0",
        "--eval_batch_size", "1",
        "--ddpm_num_inference_steps", "1",
        "--dataloader_num_workers", "0",
    ]  # fmt: skip
    if device.type == "cpu":
        argv.append("--cpu")
    if args.compile:
        argv.append("--compile")
        if args.compile_mode:
            argv += ["--compile_mode", args.compile_mode]
    if args.channels_last:
        argv.append("--channels_last")
    return argv


def our_loop(args, device: torch.device, data_folder: str, output_dir: str) -> float:
    """Images/s of train_ddpm.py's loop, as it reports after its warm-up steps."""
    argv = train_argv(args, data_folder, output_dir, device, args.warmup + args.steps)
    AcceleratorState._reset_state(reset_partial_state=True)
    with contextlib.redirect_stderr(io.StringIO()):
        train_ddpm.main(argv)
    # The loop logs images/s over each interval of --logging_steps (= warm-up) steps; the first interval is the
    # warm-up. Equal intervals: the rate over the rest is the harmonic mean of their rates.
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(os.path.join(output_dir, "logs", "train_ddpm"))
    events.Reload()
    rates = [event.value for event in events.Scalars("images_per_second")][1:]
    assert len(rates) == args.steps // args.warmup, rates
    return len(rates) / sum(1 / rate for rate in rates)


def flops_per_image(args, device: torch.device) -> float:
    """Model FLOPs of one training image (forward + backward of the UNet), counted once by torch's FLOP counter."""
    from torch.utils.flop_counter import FlopCounterMode

    unet = build_unet(args.preset, None, args.resolution, args.channels).to(device).train()
    batch = 2
    xt = torch.randn(batch, args.channels, args.resolution, args.resolution, device=device)
    t = torch.randint(0, 1000, (batch,), device=device)
    with FlopCounterMode(display=False) as counter:
        with autocast(device, args.mixed_precision):
            loss = unet(xt, t).sample.float().square().mean()
        loss.backward()
    return counter.get_total_flops() / batch


def input_rate(loader, to_input, args) -> float:
    """Images/s of `to_input` over batches of `loader`: 2 untimed, then 8192 images' worth, cycling through epochs."""
    next_batch = batch_source(loader)
    timing = argparse.Namespace(warmup=2, steps=max(1, 8192 // args.batch), batch=args.batch)
    return images_per_second(lambda: to_input(next_batch()), timing, torch.device("cpu"))


def input_pipelines(args, data_folder: str, repeats: int) -> tuple[float, float]:
    """Median images/s of our input pipeline and the peer's, alternating, on the host."""
    pixels, _ = load_pixels(None, None, data_folder, resolution=args.resolution, channels=args.channels)  # cached
    ours = torch.utils.data.DataLoader(
        PixelBatches(pixels), batch_size=args.batch, shuffle=True, collate_fn=collate_pixel_batch
    )
    dataset = datasets.load_dataset("imagefolder", data_dir=data_folder, split="train")
    dataset.set_transform(peer_transform(args.resolution, args.channels))
    peer = torch.utils.data.DataLoader(dataset, batch_size=args.batch, shuffle=True, num_workers=0)
    rates = {"ours": [], "peer": []}
    for _ in range(repeats):
        rates["ours"].append(input_rate(ours, lambda batch: images_to_model_input(batch, random_flip=True), args))
        rates["peer"].append(input_rate(peer, lambda batch: batch["input"], args))
    return statistics.median(rates["ours"]), statistics.median(rates["peer"])


def add_run_options(parser: argparse.ArgumentParser) -> None:
    """The options of the measured run: device, model preset, batch, resolution, precision (also profile_train.py)."""
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--preset", default="tiny", choices=["tiny", "ddpm-cifar10", "ddpm-256"])
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--resolution", type=int, default=32)
    parser.add_argument("--mixed_precision", default="no", choices=["no", "fp16", "bf16"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_run_options(parser)
    parser.add_argument(
        "--peer_mixed_precision",
        choices=["no", "fp16", "bf16"],
        help="the peer's --mixed_precision (default: the same as ours; 'no' is the peer script's default)",
    )
    parser.add_argument("--compile", action="store_true")
    parser.add_argument(
        "--compile_mode",
        choices=["default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs"],
        help="torch.compile's mode for ours and the floor (with --compile)",
    )
    parser.add_argument("--channels_last", action="store_true")
    parser.add_argument(
        "--peak_tflops",
        type=float,
        help="the device's peak in the training precision, for the achieved fraction (default on an H100/H200: 989, "
        "the datasheet's dense bf16; no fraction is printed without one)",
    )
    parser.add_argument("--steps", type=int, default=20, help="timed optimizer steps per loop and repetition")
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--num_images", type=int, default=2048)
    args = parser.parse_args()
    args.peer_mixed_precision = args.peer_mixed_precision or args.mixed_precision
    args.channels = 3  # train_ddpm.py trains RGB on every dataset but the embedded digits
    args.steps = -(-args.steps // args.warmup) * args.warmup  # whole logging intervals (see our_loop)
    device = torch.device(args.device)
    if args.peak_tflops is None and device.type == "cuda" and args.mixed_precision != "no":
        if any(chip in torch.cuda.get_device_name(device) for chip in ("H100", "H200")):
            args.peak_tflops = 989.0
    logging.disable(logging.WARNING)
    datasets.disable_progress_bars()
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    print(
        f"device {device} ({name}), torch {torch.__version__}; preset {args.preset}, batch {args.batch}, "
        f"{args.channels}x{args.resolution}x{args.resolution}, mixed precision {args.mixed_precision} (peer "
        f"{args.peer_mixed_precision}), "
        f"compile {args.compile} (mode {args.compile_mode or 'default'}), channels_last {args.channels_last}"
    )

    with tempfile.TemporaryDirectory() as tmp:
        data_folder = os.path.join(tmp, "data")
        write_dataset(data_folder, args.num_images, args.resolution, args.channels)
        figures = {"ours": [], "floor": [], "peer": []}
        for repeat in range(args.repeats):
            figures["ours"].append(our_loop(args, device, data_folder, os.path.join(tmp, f"run-{repeat}")))
            figures["floor"].append(floor_loop(args, device))
            figures["peer"].append(peer_loop(args, device, data_folder))
            print("  repetition", repeat, {k: round(v[-1], 2) for k, v in figures.items()})
        inputs = input_pipelines(args, data_folder, args.repeats)
    ours, floor, peer = (statistics.median(figures[k]) for k in ("ours", "floor", "peer"))
    print(f"images/s (median of {args.repeats}): ours {ours:.2f}, floor {floor:.2f}, peer {peer:.2f}")
    print(f"ours/floor {ours / floor:.3f}   ours/peer {ours / peer:.3f}")
    flops = flops_per_image(args, device)
    achieved = ", ".join(f"{name} {rate * flops / 1e12:.1f}" for name, rate in (("ours", ours), ("floor", floor)))
    line = f"model FLOPs per training image (forward + backward) {flops / 1e9:.2f} GFLOP; TFLOP/s: {achieved}"
    if args.peak_tflops:
        line += f"; ours at {100 * ours * flops / 1e12 / args.peak_tflops:.1f}% of a {args.peak_tflops:g} TFLOP/s peak"
    print(line)
    print(
        f"input pipelines alone, host, no model (median of {args.repeats}): ours {inputs[0]:.0f} img/s, "
        f"peer {inputs[1]:.0f} img/s, ours/peer {inputs[0] / inputs[1]:.1f}"
    )


if __name__ == "__main__":
    # Run from the module, not __main__: `datasets` fingerprints functions with dill, which pickles __main__'s
    # globals by value (and fails on pyarrow types under Python 3.12).
    import bench_train

    bench_train.main()
