"""Seconds to load a cached image folder: `image_data.sources.load_image_dataset(train_data_dir=...)` (one walk of the
folder, `plain_image_folder`) against `datasets.load_dataset("imagefolder", data_dir=...)` (its split detection
globs the folder once per pattern), both from their caches, alternating, medians of `--repeats`.

    python benchmarks/bench_load.py                    # 10,000 random 3x32x32 PNGs
    python benchmarks/bench_load.py --images 100000

Each side's cache is built once before the timed loads. Each load runs in a fresh process, which also reports the
growth of its anonymous memory (RssAnon) across the load.
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile

from bench_memory import write_images

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

LOAD = """
import json, sys, time
sys.path.insert(0, {root!r})
import datasets
from image_data.sources import load_image_dataset


def anonymous_mib():
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) / 1024 for line in status if line.startswith("RssAnon:"))


before, start = anonymous_mib(), time.perf_counter()
if {side!r} == "ours":
    dataset = load_image_dataset(train_data_dir={folder!r}, cache_dir={cache!r})
else:
    dataset = datasets.load_dataset("imagefolder", data_dir={folder!r}, cache_dir={cache!r}, split="train")
seconds = time.perf_counter() - start
print(json.dumps({{"seconds": seconds, "anonymous_mib": anonymous_mib() - before, "rows": len(dataset)}}))
"""


def load(side: str, folder: str, cache: str) -> dict[str, float]:
    code = LOAD.format(root=ROOT, side=side, folder=folder, cache=cache)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    output = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True).stdout
    return json.loads(output.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=10000)
    parser.add_argument("--resolution", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    sides = ("ours", "datasets")
    with tempfile.TemporaryDirectory() as tmp:
        folder = os.path.join(tmp, "images")
        write_images(folder, args.images, args.resolution)
        caches = {side: os.path.join(tmp, f"cache-{side}") for side in sides}
        for side in sides:
            load(side, folder, caches[side])  # builds the cache
        loads = {side: [] for side in sides}
        for repeat in range(args.repeats):
            for side in sides:
                loads[side].append(load(side, folder, caches[side]))
                print(f"  repetition {repeat} {side}: {loads[side][-1]}", flush=True)
    seconds = {side: statistics.median(run["seconds"] for run in loads[side]) for side in sides}
    anonymous = {side: statistics.median(run["anonymous_mib"] for run in loads[side]) for side in sides}
    print(f"{args.images} images of 3x{args.resolution}x{args.resolution}, cached; medians of {args.repeats}:")
    for side in sides:
        print(f"  {side:8s}: {seconds[side]:7.2f} s, anonymous memory +{anonymous[side]:.1f} MiB")
    print(f"datasets/ours {seconds['datasets'] / seconds['ours']:.1f}x")


if __name__ == "__main__":
    main()
