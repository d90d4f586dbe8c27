"""Peak resident memory of train_ddpm.py on a dataset and on one 10 times larger.

The uint8 cache is memory-mapped Arrow, so the peak should grow by far less than the larger dataset's uint8 size
(issue 6's target: by less than that size). Each run is a fresh `python train_ddpm.py` process; its peak memory is
polled from /proc while it runs, with its anonymous and file-backed parts apart: pages of the memory-mapped
cache count in RSS once read, but they are clean file pages the kernel can drop, not memory the process holds.

    python benchmarks/bench_memory.py                      # 1,000 and 10,000 images of 3x32x32
"""

import argparse
import os
import subprocess
import sys
import tempfile
import time

import numpy as np
import PIL.Image

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def write_images(folder: str, count: int, resolution: int) -> None:
    rng = np.random.default_rng(0)
    os.makedirs(folder, exist_ok=True)
    for i in range(count):
        array = rng.integers(0, 256, (resolution, resolution, 3), dtype=np.uint8)
        PIL.Image.fromarray(array).save(os.path.join(folder, f"{i:06d}.png"))


def peak_memory_mib(data_dir: str, output_dir: str, args) -> dict[str, float]:
    """
    Run one training process and poll its /proc status: peak RSS, and its parts RssAnon (memory the process owns)
    and RssFile (file pages mapped in, such as the memory-mapped Arrow cache: clean pages the kernel can drop).
    """
    command = [
        sys.executable, os.path.join(ROOT, "train_ddpm.py"), "--cpu",
        "--train_data_dir", data_dir, "--resolution", str(args.resolution), "--model_preset", "tiny",
        "--train_batch_size", "64", "--max_train_steps", str(args.steps), "--output_dir", output_dir,
        "--checkpointing_steps", str(10**9), "--save_images_epochs", "0", "--save_model_epochs", "0",
        "--eval_batch_size", "1", "--ddpm_num_inference_steps", "1", "--use_ema", "false",
    ]  # fmt: skip
    env = {**os.environ, "HF_DATASETS_CACHE": os.path.join(output_dir, "hf-cache"), "HF_HUB_OFFLINE": "1"}
    process = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    peaks = {"VmRSS": 0.0, "RssAnon": 0.0, "RssFile": 0.0}
    while process.poll() is None:
        try:
            with open(f"/proc/{process.pid}/status") as status:
                for line in status:
                    name, _, value = line.partition(":")
                    if name in peaks:
                        peaks[name] = max(peaks[name], int(value.split()[0]) / 1024)
        except FileNotFoundError:
            break
        time.sleep(0.1)
    if process.wait() != 0:
        raise RuntimeError(f"train_ddpm.py failed on {data_dir}")
    return peaks


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=1000)
    parser.add_argument("--resolution", type=int, default=32)
    parser.add_argument("--steps", type=int, default=200, help="enough steps to read the larger dataset several times")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        small, large = os.path.join(tmp, "small"), os.path.join(tmp, "large")
        write_images(small, args.images, args.resolution)
        write_images(large, 10 * args.images, args.resolution)
        small = peak_memory_mib(small, os.path.join(tmp, "run-small"), args)
        large = peak_memory_mib(large, os.path.join(tmp, "run-large"), args)
    uint8_mib = 10 * args.images * 3 * args.resolution**2 / 2**20
    print(f"larger dataset's uint8 size: {uint8_mib:.1f} MiB")
    for name in ("VmRSS", "RssAnon", "RssFile"):
        growth = large[name] - small[name]
        print(
            f"peak {name:8s}: {args.images} images {small[name]:7.1f} MiB, {10 * args.images} images "
            f"{large[name]:7.1f} MiB, growth {growth:6.1f} MiB ({growth / uint8_mib:.2f} of the uint8 size)"
        )


if __name__ == "__main__":
    main()
