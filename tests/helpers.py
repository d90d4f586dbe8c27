"""What the tests of several rooms share: real runs of train_ddpm.py (through `accelerate launch` on the CPU, with a
45k-parameter U-Net on 8x8 images, T = 50 and 5 sampling steps, so that a run takes seconds) and their outputs."""

import contextlib
import os
import selectors
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch
from diffusers import DDPMPipeline
from PIL import Image

from checkpoints.checkpointing import TRAINER_STATE_NAME, TrainerState

REPO = Path(__file__).resolve().parents[1]
SMALL_UNET = {
    "_class_name": "UNet2DModel",
    "block_out_channels": [8, 16],
    "down_block_types": ["DownBlock2D", "AttnDownBlock2D"],
    "up_block_types": ["AttnUpBlock2D", "UpBlock2D"],
    "layers_per_block": 1,
    "norm_num_groups": 4,
    "attention_head_dim": None,
    "dropout": 0.1,  # so that exact resume also covers the dropout RNG
}
FAST = ["--ddpm_num_steps", "50", "--ddpm_num_inference_steps", "5", "--eval_batch_size", "4", "--use_ema"]
RUN_TIMEOUT = 240


def run_env(workdir: Path) -> dict[str, str]:
    env = dict(os.environ)
    env.update(
        HF_HUB_OFFLINE="1",
        HF_DATASETS_OFFLINE="1",
        HF_HUB_DISABLE_TELEMETRY="1",
        HF_DATASETS_CACHE=str(workdir / "datasets-cache"),
        OMP_NUM_THREADS="1",
        CUDA_VISIBLE_DEVICES="",  # CPU runs on any machine: the bitwise-resume comparisons assume the same device
        PYTHONPATH=os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")]),
    )
    return env


def launch_command(script: str | Path, args: list[str], processes: int | None) -> list[str]:
    """`accelerate launch` with the project's config (`processes=None`), or on N CPU processes; or plain python (0)."""
    if processes == 0:
        return [sys.executable, str(script), *args]
    launch = [sys.executable, "-m", "accelerate.commands.launch"]
    if processes is None:
        launch += ["--config_file", str(REPO / "accelerate_config.yaml")]
    else:
        launch += ["--multi_gpu", "--num_processes", str(processes), "--num_machines", "1", "--mixed_precision", "no"]
        launch += ["--dynamo_backend", "no", "--main_process_port", "0"]  # 0: a free port, never a busy 29500
    return [*launch, str(script), *args]


def run_training(workdir: Path, args: list[str], processes: int | None = None, script=None, check=True, env=None):
    """Run train_ddpm.py (or a wrapper `script`) to completion; returns the CompletedProcess."""
    command = launch_command(script or REPO / "train_ddpm.py", args, processes)
    result = subprocess.run(
        command,
        cwd=workdir,
        env={**run_env(workdir), **(env or {})},
        capture_output=True,
        text=True,
        timeout=RUN_TIMEOUT,
    )
    if check and result.returncode != 0:
        raise AssertionError(
            f"{command} failed ({result.returncode}):\n{result.stdout[-3000:]}\n{result.stderr[-6000:]}"
        )
    return result


def read_until(stream, text: str, log: Path | None = None, timeout: float = RUN_TIMEOUT) -> str:
    """Block on a child's output pipe until `text` appears in it (the child's signal that it reached a point); the
    output read so far. `timeout` is a safety net against a hung run, not the wait itself."""
    read, deadline = b"", time.monotonic() + timeout
    with selectors.DefaultSelector() as selector:
        selector.register(stream, selectors.EVENT_READ)
        while text.encode() not in read:
            ready = selector.select(deadline - time.monotonic())
            chunk = os.read(stream.fileno(), 1 << 16) if ready else b""
            if not chunk:
                why = "the run ended" if ready else f"{timeout} s passed"
                output = (read + (log.read_bytes() if log else b"")).decode(errors="replace")
                raise AssertionError(f"{why} before it wrote {text!r}:\n{output[-3000:]}")
            read += chunk
    return read.decode(errors="replace")


@contextlib.contextmanager
def one_thread():
    """Sample in this process on one thread: two threads on a busy 2-core machine are many times slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def assert_stock_pipeline_samples(output_dir: Path, channels: int, resolution: int = 8) -> None:
    pipeline = DDPMPipeline.from_pretrained(output_dir)
    assert type(pipeline.scheduler).__name__ == "DDPMScheduler"
    assert pipeline.unet.config.in_channels == channels and pipeline.unet.config.sample_size == resolution
    pipeline.set_progress_bar_config(disable=True)
    with one_thread():
        images = pipeline(batch_size=2, num_inference_steps=5, generator=torch.manual_seed(0)).images
    assert len(images) == 2 and images[0].size == (resolution, resolution)
    assert images[0].mode == ("L" if channels == 1 else "RGB")


def trainer_state(checkpoint: Path) -> TrainerState:
    return TrainerState.load(str(checkpoint / TRAINER_STATE_NAME))


def random_images(count: int, size: tuple[int, int], seed: int) -> list[Image.Image]:
    rng = np.random.default_rng(seed)
    return [Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)) for _ in range(count)]


def last_line(result) -> str:
    """The last line a finished run wrote to stderr: where its one-line error is."""
    lines = result.stderr.strip().splitlines()
    return lines[-1] if lines else ""
