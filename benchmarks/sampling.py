"""Which sampler at which step count: FID, IS, precision/recall and seconds per image of each sampler at 1,000 down to
10 steps, and the bits/dim bound of the respaced DDPM chain, on one trained model, side by side.

    python benchmarks/sampling.py                               # the default digits model (trained first if absent)
    OMP_NUM_THREADS=1 python benchmarks/sampling.py --pipeline ddpm-output --write_docs   # behind docs/sampling.md
    python benchmarks/sampling.py --samplers ddpm ddim --steps 100 10 --num_samples 64 --bpd_steps 20  # a smoke run

Every sampler draws the same `--num_samples` samples (the same per-sample seeds as evaluate_ddpm.py) and is scored
as evaluate_ddpm.py scores them (`evaluation.evaluate`): against all training digits in the digits classifier's
features. The bound of the K-step respaced chain (`pipelines.likelihood.respaced_bits_per_dim`) is a valid bound on
the model that ddpm-respaced samples from at K steps. Writes `sampling.md`, `sampling-fid.png` and `results.json`
into `--output_dir`; with `--write_docs` also the table into `docs/sampling.md`, the plot into
`docs/sampling-fid.png` and the table into `benchmarks/RESULTS.md` (between the `sampling` markers).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from evaluation import evaluate, load_feature_extractor, reference_features, reference_id  # noqa: E402
from evaluation.pipeline_metrics import BPD_STREAM, as_pixels, model_range_and_bits, stream_generators  # noqa: E402
from image_data.pixels import load_pixels  # noqa: E402
from pipelines import DDPMPaperPipeline  # noqa: E402
from pipelines.likelihood import respaced_bits_per_dim  # noqa: E402
from pipelines.samplers import SAMPLERS, make_sampler  # noqa: E402

MARKERS = ("<!-- sampling: start -->", "<!-- sampling: end -->")
DEFAULT_SAMPLERS = ["ddpm", "ddpm-respaced", "ddim", "dpmsolver++", "pndm", "euler", "unipc"]
WITHIN = 1.10  # a few-step sampler is recommended when its FID is within 10% of 1,000-step DDPM's


def export_or_train(pipeline: str | None) -> str:
    """The export to measure: `--pipeline`, else ddpm-output/ (the default run's), trained first when absent."""
    if pipeline is not None:
        return pipeline
    folder = ROOT / "ddpm-output"
    if not (folder / "model_index.json").exists():
        print("No export in ddpm-output/: training the default digits model (python train_ddpm.py)", flush=True)
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
        subprocess.run([sys.executable, "train_ddpm.py", "--output_dir", str(folder)], cwd=ROOT, env=env, check=True)
    return str(folder)


def measure_samplers(pipeline, pixels, extractor, args) -> list[dict]:
    """FID, IS, precision/recall, model calls and seconds per image of each sampler at each step count."""
    rows = []
    for name in args.samplers:
        for steps in args.steps:
            if steps >= 1000 and name not in args.full_chain_samplers:
                continue
            sampler = make_sampler(name, pipeline.scheduler.config)
            start = time.perf_counter()
            metrics = evaluate(
                pipeline,
                pixels,
                num_images=0,
                num_samples=args.num_samples,
                num_inference_steps=steps,
                feature_extractor=extractor,
                dataset_id=reference_id(None, None, None, "train"),
                batch_size=args.batch_size,
                seed=args.seed,
                sampler=sampler,
                eta=args.ddim_eta,
            )
            seconds = time.perf_counter() - start
            row = {"sampler": name, "steps": steps, "model_calls": len(sampler.timesteps), **metrics}
            row["seconds_per_image"] = seconds / args.num_samples
            rows.append(row)
            print(json.dumps(row), flush=True)
    return rows


def measure_bounds(pipeline, pixels, args) -> list[dict]:
    """The bound in bits/dim of the K-step respaced DDPM on the first `--num_images` digits, with its standard error."""
    rows = []
    x0, bits = model_range_and_bits(as_pixels(pixels, args.num_images))
    for steps in args.bpd_steps:
        start = time.perf_counter()
        total = respaced_bits_per_dim(
            pipeline.unet,
            pipeline.scheduler,
            x0,
            steps,
            generator=stream_generators(args.seed, BPD_STREAM, range(x0.shape[0])),
            batch_size=args.batch_size,
            bits=bits,
        ).double()
        stderr = total.std().item() / math.sqrt(total.numel())
        row = {"steps": steps, "bits_per_dim": total.mean().item(), "bits_per_dim_stderr": stderr}
        row["seconds"] = time.perf_counter() - start
        rows.append(row)
        print(json.dumps(row), flush=True)
    return rows


def recommend(rows: list[dict]) -> dict | None:
    """The fewest steps (then the lowest FID) whose FID is within `WITHIN` of 1,000-step DDPM's; None without it."""
    reference = next((r for r in rows if r["sampler"] == "ddpm" and r["steps"] == 1000), None)
    if reference is None:
        return None
    good = [r for r in rows if r["steps"] < 1000 and r["fid"] <= WITHIN * reference["fid"]]
    return min(good, key=lambda r: (r["steps"], r["fid"]), default=None)


def markdown(rows: list[dict], bounds: list[dict], args, wall_seconds: float, load: str) -> str:
    reference = next((r for r in rows if r["sampler"] == "ddpm" and r["steps"] == 1000), None)
    lines = [
        "| sampler | steps | model calls | FID | FID / DDPM-1000 | IS | precision | recall | s / image |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in rows:
        ratio = f"{r['fid'] / reference['fid']:.2f}" if reference else "n/a"
        lines.append(
            f"| {r['sampler']} | {r['steps']} | {r['model_calls']} | {r['fid']:.2f} | {ratio} | "
            f"{r.get('inception_score', float('nan')):.2f} | {r['precision']:.3f} | {r['recall']:.3f} | "
            f"{r['seconds_per_image']:.4f} |"
        )
    if bounds:
        lines += ["", "| respaced DDPM, K steps | bound (bits/dim) |", "| ---: | ---: |"]
        lines += [f"| {b['steps']} | {b['bits_per_dim']:.3f} ± {b['bits_per_dim_stderr']:.3f} |" for b in bounds]
    best = recommend(rows)
    lines.append("")
    if best is not None:
        lines.append(
            f"Recommended: **{best['sampler']} with {best['steps']} steps** (FID {best['fid']:.2f} against "
            f"{reference['fid']:.2f} for 1,000-step DDPM: no more than {100 * (WITHIN - 1):.0f}% above it, "
            f"{reference['seconds_per_image'] / best['seconds_per_image']:.0f}x faster)."
        )
    else:
        lines.append(f"No sampler below 1,000 steps came within {100 * (WITHIN - 1):.0f}% of 1,000-step DDPM's FID.")
    command = "python benchmarks/sampling.py " + " ".join(args.argv)
    lines += [
        "",
        f"{args.num_samples} samples per row (the same seeds for every row) against the {args.num_reference} training "
        f"digits in the digits classifier's features (IS at most 10); bound on the first {args.num_images} digits. "
        f"FID of a few hundred samples carries a bias and a spread of its own: compare rows, and read differences "
        f"of a few percent as noise. `{command.strip()}`: {wall_seconds / 60:.1f} min wall on this machine "
        f"({load}); seconds per image include the feature network and share the machine with that load.",
    ]
    return "\n".join(lines) + "\n"


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(7, 4.5))
    for name in dict.fromkeys(r["sampler"] for r in rows):
        points = sorted((r["steps"], r["fid"]) for r in rows if r["sampler"] == name)
        axis.plot(*zip(*points, strict=True), marker="o", label=name)
    reference = next((r for r in rows if r["sampler"] == "ddpm" and r["steps"] == 1000), None)
    if reference is not None:
        axis.axhline(WITHIN * reference["fid"], color="grey", linestyle=":", label="DDPM-1000 FID + 10%")
    axis.set_xscale("log")
    axis.set_yscale("log")
    axis.set_xlabel("sampling steps")
    axis.set_ylabel("FID (digits features)")
    axis.set_title("FID against sampling steps")
    axis.legend(fontsize=8)
    axis.grid(True, which="both", alpha=0.3)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def replace_between_markers(path: Path, text: str) -> None:
    """Put `text` between the sampling markers of `path` (appended with them when absent)."""
    content = path.read_text() if path.exists() else ""
    block = f"{MARKERS[0]}\n{text}{MARKERS[1]}"
    if MARKERS[0] in content and MARKERS[1] in content:
        before, rest = content.split(MARKERS[0], 1)
        content = before + block + rest.split(MARKERS[1], 1)[1]
    else:
        content = content.rstrip("\n") + "\n\n" + block + "\n"
    path.write_text(content)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pipeline", default=None, help="An export; default ddpm-output/, trained if absent.")
    parser.add_argument("--samplers", nargs="+", choices=list(SAMPLERS), default=DEFAULT_SAMPLERS)
    parser.add_argument("--steps", nargs="+", type=int, default=[1000, 250, 100, 50, 20, 10])
    parser.add_argument(
        "--full_chain_samplers",
        nargs="*",
        default=["ddpm", "ddim"],
        help="The samplers also run at 1,000 steps (the others' 250-step figures are already their limit; the "
        "30-minute budget of a shared 2-core CPU leaves no room for them).",
    )
    parser.add_argument("--bpd_steps", nargs="*", type=int, default=[1000, 250, 100, 50])
    parser.add_argument("--num_samples", type=int, default=400, help="Samples per sampler and step count.")
    parser.add_argument("--num_images", type=int, default=32, help="Digits whose respaced bound is computed.")
    parser.add_argument("--ddim_eta", type=float, default=0.0)
    parser.add_argument("--batch_size", type=int, default=400)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--output_dir", type=Path, default=Path("sampling-benchmark"))
    parser.add_argument("--write_docs", action="store_true", help="Also write docs/sampling.md, its plot, RESULTS.md.")
    args = parser.parse_args(argv)
    args.argv = sys.argv[1:] if argv is None else argv
    start = time.perf_counter()
    load_before = os.getloadavg()[1]

    folder = export_or_train(args.pipeline)
    pipeline = DDPMPaperPipeline.from_pretrained(folder)
    pipeline.set_progress_bar_config(disable=True)
    size = pipeline.unet.config.sample_size
    channels = pipeline.unet.config.in_channels
    pixels, _ = load_pixels(None, None, None, resolution=size, channels=channels, center_crop=False, seed=args.seed)
    args.num_reference = len(pixels)
    extractor = load_feature_extractor("digits")
    # The reference features once, before any timing.
    reference_features(extractor, as_pixels(pixels, None), extractor_name="digits", dataset_id=reference_id(
        None, None, None, "train"), batch_size=args.batch_size)  # fmt: skip

    with torch.no_grad():
        rows = measure_samplers(pipeline, pixels, extractor, args)
        bounds = measure_bounds(pipeline, pixels, args)
    wall = time.perf_counter() - start
    load = f"load average {load_before:.1f} at the start, {os.getloadavg()[1]:.1f} at the end (5-min, 2 cores)"
    table = markdown(rows, bounds, args, wall, load)

    args.output_dir.mkdir(parents=True, exist_ok=True)
    (args.output_dir / "sampling.md").write_text(table)
    plot(rows, args.output_dir / "sampling-fid.png")
    results = {"samplers": rows, "bounds": bounds, "wall_seconds": wall, "load": load, "recommended": recommend(rows)}
    (args.output_dir / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    if args.write_docs:
        replace_between_markers(ROOT / "docs" / "sampling.md", table)
        plot(rows, ROOT / "docs" / "sampling-fid.png")
        replace_between_markers(ROOT / "benchmarks" / "RESULTS.md", "## Samplers against steps\n\n" + table)
    print(table)


if __name__ == "__main__":
    main()
