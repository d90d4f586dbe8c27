"""Peak resident memory of train_ddpm.py on a dataset and on one 10 times larger.

The uint8 cache is memory-mapped Arrow, so the peak should grow by far less than the larger dataset's uint8 size
(issue 6's target: by less than that size). Each run is a fresh `python train_ddpm.py` process; its peak RSS is
read from `resource.getrusage(RUSAGE_CHILDREN)` after it exits.

    python benchmarks/bench_memory.py                      # 1,000 and 10,000 images of 3x32x32
"""

import argparse
import os
import resource
import subprocess
import sys
import tempfile

import numpy as np
import PIL.Image

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def write_images(folder: str, count: int, resolution: int) -> None:
    rng = np.random.default_rng(0)
    os.makedirs(folder, exist_ok=True)
    for i in range(count):
        array = rng.integers(0, 256, (resolution, resolution, 3), dtype=np.uint8)
        PIL.Image.fromarray(array).save(os.path.join(folder, f"{i:06d}.png"))


def peak_rss_mib(data_dir: str, output_dir: str, args) -> float:
    """Run one training process; its peak resident memory in MiB (Linux reports ru_maxrss in KiB)."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    command = [
        sys.executable, os.path.join(ROOT, "train_ddpm.py"), "--cpu",
        "--train_data_dir", data_dir, "--resolution", str(args.resolution), "--model_preset", "tiny",
        "--train_batch_size", "64", "--max_train_steps", str(args.steps), "--output_dir", output_dir,
        "--checkpointing_steps", str(10**9), "--save_images_epochs", "0", "--save_model_epochs", "0",
        "--eval_batch_size", "1", "--ddpm_num_inference_steps", "1", "--use_ema", "false",
    ]  # fmt: skip
    env = {**os.environ, "HF_DATASETS_CACHE": os.path.join(output_dir, "hf-cache"), "HF_HUB_OFFLINE": "1"}
    subprocess.run(command, check=True, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    after = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    if after <= before:
        raise RuntimeError("ru_maxrss of children did not grow: run the sizes from the smallest up")
    return after / 1024


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
        small_mib = peak_rss_mib(small, os.path.join(tmp, "run-small"), args)
        large_mib = peak_rss_mib(large, os.path.join(tmp, "run-large"), args)
    uint8_mib = 10 * args.images * 3 * args.resolution**2 / 2**20
    growth = large_mib - small_mib
    print(f"peak RSS: {args.images} images {small_mib:.0f} MiB, {10 * args.images} images {large_mib:.0f} MiB")
    print(
        f"growth {growth:.0f} MiB against the larger dataset's uint8 size {uint8_mib:.0f} MiB "
        f"(growth/size {growth / uint8_mib:.2f}, target < 1)"
    )


if __name__ == "__main__":
    main()
