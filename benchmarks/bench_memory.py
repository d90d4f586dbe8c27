"""Peak resident memory of train_ddpm.py on a dataset and on one 10 times larger.

The uint8 cache is memory-mapped Arrow, so the peak should grow by far less than the larger dataset's uint8 size
(the target: by less than that size). Each run is a fresh `python train_ddpm.py` process; its peak memory is
polled from /proc while it runs, with its anonymous and file-backed parts apart: pages of the memory-mapped
cache count in RSS once read, but they are clean file pages the kernel can drop, not memory the process holds.

    python benchmarks/bench_memory.py                      # 1,000 and 10,000 images of 3x32x32
    python benchmarks/bench_memory.py --images 10000       # 10,000 and 100,000
    python benchmarks/bench_memory.py --repeats 3          # 3 runs from the cache per dataset; medians

Each dataset is trained on `--repeats` + 1 times: the first run also decodes the images into the uint8 cache; the
others train from that cache, which is the memory of training itself.
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


def peak_memory_mib(data_dir: str, output_dir: str, cache_dir: str, args) -> dict[str, float]:
    """
    Run one training process and poll its /proc status: peak RSS, and its parts RssAnon (memory the process owns)
    and RssFile (file pages mapped in, such as the memory-mapped Arrow cache: clean pages the kernel can drop); and
    the run's wall time in seconds ("seconds").
    """
    command = [
        sys.executable, os.path.join(ROOT, "train_ddpm.py"), "--cpu",
        "--train_data_dir", data_dir, "--resolution", str(args.resolution), "--model_preset", "tiny",
        "--train_batch_size", "64", "--max_train_steps", str(args.steps), "--output_dir", output_dir,
        "--checkpointing_steps", str(10**9), "--save_images_epochs", "0", "--save_model_epochs", "0",
        "--eval_batch_size", "1", "--ddpm_num_inference_steps", "1", "--use_ema", "false",
    ]  # fmt: skip
    env = {**os.environ, "HF_DATASETS_CACHE": cache_dir, "HF_HUB_OFFLINE": "1"}
    start = time.perf_counter()
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
    return {**peaks, "seconds": time.perf_counter() - start}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=1000)
    parser.add_argument("--resolution", type=int, default=32)
    parser.add_argument("--steps", type=int, default=200, help="enough steps to read the larger dataset several times")
    parser.add_argument("--repeats", type=int, default=1, help="runs from the cache per dataset, alternating")
    args = parser.parse_args()
    sizes = {"small": args.images, "large": 10 * args.images}
    runs = {}  # (dataset, "first run" | "from the cache") -> list of the runs' peaks
    with tempfile.TemporaryDirectory() as tmp:
        folders = {name: (os.path.join(tmp, name), os.path.join(tmp, f"cache-{name}")) for name in sizes}
        for name, count in sizes.items():
            write_images(folders[name][0], count, args.resolution)
            # The first run decodes the images into the uint8 cache, then trains; the later ones train from it.
            data, cache = folders[name]
            runs[name, "first run"] = [peak_memory_mib(data, os.path.join(tmp, f"run-{name}-0"), cache, args)]
        for repeat in range(args.repeats):
            for name in sizes:
                data, cache = folders[name]
                peaks = peak_memory_mib(data, os.path.join(tmp, f"run-{name}-{repeat + 1}"), cache, args)
                runs.setdefault((name, "from the cache"), []).append(peaks)
    uint8_mib = 10 * args.images * 3 * args.resolution**2 / 2**20
    print(f"larger dataset's uint8 size: {uint8_mib:.1f} MiB")
    for run in ("first run", "from the cache"):
        print(f"{run}" + (f" (medians of {args.repeats} alternating runs each):" if run != "first run" else ":"))
        for name in ("VmRSS", "RssAnon", "RssFile"):
            small, large = (float(np.median([peaks[name] for peaks in runs[size, run]])) for size in sizes)
            pairs = zip(runs["small", run], runs["large", run], strict=True)
            growths = [on_large[name] - on_small[name] for on_small, on_large in pairs]
            each = f"; each: {', '.join(f'{growth:.1f}' for growth in growths)}" if len(growths) > 1 else ""
            print(
                f"  peak {name:8s}: {args.images} images {small:7.1f} MiB, {10 * args.images} images "
                f"{large:7.1f} MiB, growth {large - small:6.1f} MiB ({(large - small) / uint8_mib:.2f} of the uint8 size)"
                + each
            )
        small, large = (float(np.median([peaks["seconds"] for peaks in runs[size, run]])) for size in sizes)
        print(f"  wall time    : {args.images} images {small:7.1f} s,   {10 * args.images} images {large:7.1f} s")


if __name__ == "__main__":
    main()
