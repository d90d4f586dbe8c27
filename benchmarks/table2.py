"""The paper's Table 2 (Ho et al. 2020, Sec. 4.2) on the embedded 8x8 digits: every training objective it compares,
trained by `train_ddpm.py` and evaluated by `evaluate_ddpm.py`, one row after another, each in its own processes.

    python benchmarks/table2.py                                  # all six rows: about 45 minutes on a 2-core CPU
    python benchmarks/table2.py --rows eps-simple mean-vlb-fixed   # some rows
    python benchmarks/table2.py --max_train_steps 40 --num_samples 16 --num_images 8 --output_dir /tmp/t2  # a smoke run

Every row trains with the default run's recipe (the `tiny` net, batch 64, Adam 1e-3, EMA; 2,900 steps) and only its
objective's flags, then is evaluated the same way: the bound in bits/dim on the first `--num_images` digits (all
1,000 terms), and FID and Inception Score of `--num_samples` samples (1,000 sampling steps) in the digits
classifier's features. A row's folder under `--output_dir` is resumable: run the command again and a row whose
training was interrupted resumes from its newest checkpoint, a trained row is only evaluated, an evaluated row only
read. Rows whose training stopped on non-finite steps are reported as diverged, with the step and the count.

Writes `docs/table2.md` (the table), `docs/table2-samples.png` (each row's sample grid) and the same table between
the `table2` markers of `benchmarks/RESULTS.md`.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import re
import subprocess
import sys
import time
from pathlib import Path

from PIL import Image, ImageDraw

ROOT = Path(__file__).resolve().parent.parent
ROW_RECORD = "table2_row.json"  # what a finished row's training or evaluation left, in the row's folder
MARKERS = ("<!-- table2: start -->", "<!-- table2: end -->")


@dataclasses.dataclass(frozen=True)
class Row:
    """One row of Table 2: its objective as the paper names it, our flags for it, and the paper's CIFAR-10 figures."""

    key: str
    parameterization: str
    objective: str
    flags: tuple[str, ...]
    paper_is: str
    paper_fid: str


# Table 2 of arXiv:2006.11239 (unconditional CIFAR-10; "-": unstable to train, out-of-range scores). The paper's
# learned diagonal Sigma is the net's log-variance output; ours is `learned_range` (Nichol & Dhariwal 2021), the one
# learned variance that train_ddpm.py trains.
ROWS = (
    Row("mean-vlb-learned", "mu-tilde", "L, learned diagonal Sigma",
        ("--prediction_type", "mean", "--loss_type", "vlb", "--variance_type", "learned_range"), "7.28 ± 0.10", "23.69"),
    Row("mean-vlb-fixed", "mu-tilde", "L, fixed isotropic Sigma",
        ("--prediction_type", "mean", "--loss_type", "vlb"), "8.06 ± 0.09", "13.22"),
    Row("mean-mse", "mu-tilde", "‖mu-tilde − mu-tilde_θ‖²",
        ("--prediction_type", "mean", "--loss_type", "mse"), "–", "–"),
    Row("eps-vlb-learned", "epsilon", "L, learned diagonal Sigma",
        ("--prediction_type", "epsilon", "--loss_type", "vlb", "--variance_type", "learned_range"), "–", "–"),
    Row("eps-vlb-fixed", "epsilon", "L, fixed isotropic Sigma",
        ("--prediction_type", "epsilon", "--loss_type", "vlb"), "7.67 ± 0.13", "13.51"),
    Row("eps-simple", "epsilon", "‖ε − ε_θ‖² (L_simple)",
        ("--prediction_type", "epsilon", "--loss_type", "simple"), "9.46 ± 0.11", "3.17"),
)  # fmt: skip
ROWS_BY_KEY = {row.key: row for row in ROWS}


def read_record(folder: Path) -> dict:
    path = folder / ROW_RECORD
    return json.loads(path.read_text()) if path.exists() else {}


def write_record(folder: Path, record: dict) -> None:
    (folder / ROW_RECORD).write_text(json.dumps(record, indent=2, allow_nan=True) + "\n")


def run_logged(command: list[str], log: Path) -> tuple[int, float]:
    """Run a script of ours in a new process, its output into `log`; its exit status and wall seconds."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}
    start = time.perf_counter()
    with log.open("a") as out:
        process = subprocess.Popen([sys.executable, *command], cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT)
        try:
            status = process.wait()
        except KeyboardInterrupt:
            process.wait()  # Ctrl-C reached the child too: let it write its checkpoint (subprocess.run would kill it)
            raise
    return status, time.perf_counter() - start


def newest_trainer_state(folder: Path) -> dict:
    """The trainer state of the row's newest checkpoint (its step and non-finite counts), or {}."""
    checkpoints = sorted(
        folder.glob("checkpoint-*/trainer_state.json"), key=lambda p: int(p.parent.name.split("-")[1])
    )
    return json.loads(checkpoints[-1].read_text()) if checkpoints else {}


def train_row(row: Row, folder: Path, args: argparse.Namespace) -> dict:
    """1. Train (or resume) the row; what it ended with: steps, non-finite steps, seconds, and an error if any."""
    record = read_record(folder)
    if "train_status" in record:
        return record
    command = ["train_ddpm.py", "--output_dir", str(folder), *row.flags, "--seed", str(args.seed)]
    command += ["--max_train_steps", str(args.max_train_steps)]
    if any(folder.glob("checkpoint-*")):
        command += ["--resume_from_checkpoint", "latest"]
    elif folder.exists():  # stopped before its first checkpoint: nothing to keep
        command += ["--overwrite_output_dir"]
    log = folder.parent / f"{row.key}-train.log"
    status, seconds = run_logged(command, log)
    state = newest_trainer_state(folder)
    finished = state.get("global_step", -1) >= args.max_train_steps
    if status == 0 and not (finished and (folder / "model_index.json").exists()):
        raise SystemExit(f"{row.key} stopped at step {state.get('global_step')}: run the command again to resume it.")
    lines = re.split(r"[\r\n]+", log.read_text(errors="replace"))
    errors = [line for line in lines if "Error" in line or "error:" in line]  # a traceback's, or our one-line exit
    record = {
        "train_status": status,
        "train_seconds": seconds + record.get("train_seconds", 0.0),
        "global_step": state.get("global_step"),
        "skipped_nonfinite_steps": state.get("skipped_nonfinite_steps"),
        "error": errors[-1].strip() if status != 0 and errors else None,
    }
    write_record(folder, record)
    return record


def evaluate_row(row: Row, folder: Path, record: dict, args: argparse.Namespace) -> dict:
    """2. Evaluate a trained row's export with evaluate_ddpm.py: bits/dim, FID, IS (what metrics.json holds)."""
    if "metrics" in record or record["train_status"] != 0:
        return record
    evaluation = folder / "evaluation"
    command = [
        "evaluate_ddpm.py", "--pipeline", str(folder), "--output_dir", str(evaluation),
        "--num_images", str(args.num_images), "--num_samples", str(args.num_samples),
        "--rate_distortion_images", "2", "--seed", str(args.seed),
    ]  # fmt: skip
    if args.num_inference_steps is not None:
        command += ["--num_inference_steps", str(args.num_inference_steps)]
    status, seconds = run_logged(command, folder.parent / f"{row.key}-evaluate.log")
    metrics = json.loads((evaluation / "metrics.json").read_text()) if status == 0 else {}
    keys = ("bits_per_dim", "bits_per_dim_stderr", "fid", "inception_score", "inception_score_std")
    record = {**record, "eval_status": status, "eval_seconds": seconds}
    record["metrics"] = {key: metrics.get(key) for key in keys}
    write_record(folder, record)
    return record


def _number(value, digits: int) -> str:
    return "n/a" if value is None or not math.isfinite(value) else f"{value:.{digits}f}"


def outcome(record: dict) -> str:
    """How the row's training ended, as the table says it."""
    skipped = record.get("skipped_nonfinite_steps") or 0
    if record.get("train_status") != 0:
        return f"**diverged**: stopped at step {record.get('global_step')}, {skipped} non-finite steps skipped"
    if record.get("eval_status", 0) != 0:
        return "trained; evaluation failed (see its log)"
    metrics = record.get("metrics", {})
    if any(metrics.get(key) is None for key in ("bits_per_dim", "fid")):
        return f"trained ({skipped} non-finite steps skipped); **samples or bound not finite**"
    return f"trained, {skipped} non-finite steps skipped" if skipped else "trained"


def markdown_table(rows: list[Row], records: dict[str, dict], args: argparse.Namespace) -> str:
    """3. Our digits figures beside the paper's CIFAR-10 ones, each column saying which data it is."""
    lines = [
        "| parameterisation | objective (Table 2) | our flags | digits: NLL bits/dim | digits: FID | digits: IS "
        "(of 10 classes) | outcome | CIFAR-10 (paper): IS | CIFAR-10 (paper): FID |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for row in rows:
        record = records[row.key]
        metrics = record.get("metrics", {})
        nll = _number(metrics.get("bits_per_dim"), 2)
        if metrics.get("bits_per_dim_stderr") is not None and nll != "n/a":
            nll += f" ± {metrics['bits_per_dim_stderr']:.2f}"
        inception = _number(metrics.get("inception_score"), 2)
        if metrics.get("inception_score_std") is not None and inception != "n/a":
            inception += f" ± {metrics['inception_score_std']:.2f}"
        flags = " ".join(f"`{flag}`" if flag.startswith("--") else flag for flag in row.flags)
        lines.append(
            f"| {row.parameterization} | {row.objective} | {flags} | {nll} | {_number(metrics.get('fid'), 2)} | "
            f"{inception} | {outcome(record)} | {row.paper_is} | {row.paper_fid} |"
        )
    total = sum(r.get("train_seconds", 0.0) + r.get("eval_seconds", 0.0) for r in records.values())
    steps = f"{args.max_train_steps:,} steps"
    lines += [
        "",
        f"Digits: the embedded 8x8 digits, the `tiny` net, {steps} per row; NLL on the first {args.num_images} digits "
        f"(all 1,000 terms), FID and IS of {args.num_samples} samples in the digits classifier's features (IS at most "
        f"10, its number of classes). CIFAR-10: the paper's Table 2 (35.7M net, 800K steps, Inception features; "
        f'"–": unstable to train). Different data and networks: compare the rows, not the columns. Learned Sigma is '
        f"`learned_range` here, the log-variance itself in the paper. "
        f"`python benchmarks/table2.py`: {total / 60:.0f} min on this machine for the rows above.",
    ]
    return "\n".join(lines) + "\n"


def sample_figure(rows: list[Row], output_dir: Path, path: Path) -> None:
    """4. The rows' final sample grids (each export's samples.png) side by side, labelled."""
    grids = [(row, output_dir / row.key / "samples.png") for row in rows]
    grids = [(row, Image.open(p).convert("RGB")) for row, p in grids if p.exists()]
    if not grids:
        return
    width, height = max(g.width for _, g in grids), max(g.height for _, g in grids)
    label = 28
    figure = Image.new("RGB", (width * len(grids), height + label), "white")
    draw = ImageDraw.Draw(figure)
    for i, (row, grid) in enumerate(grids):
        figure.paste(grid, (i * width, label))
        draw.text((i * width + 4, 8), row.key, fill="black")
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.save(path)


def replace_between_markers(path: Path, text: str) -> None:
    """Put `text` between the table2 markers of `path` (appended with them when absent)."""
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
    parser.add_argument("--rows", nargs="+", choices=list(ROWS_BY_KEY), default=list(ROWS_BY_KEY))
    parser.add_argument("--output_dir", type=Path, default=Path("table2-runs"), help="One resumable folder per row.")
    parser.add_argument("--max_train_steps", type=int, default=2900, help="Steps per row (the default run's).")
    parser.add_argument("--num_images", type=int, default=128, help="Digits whose bound (all terms) is computed.")
    parser.add_argument("--num_samples", type=int, default=500, help="Samples for FID and IS.")
    parser.add_argument("--num_inference_steps", type=int, default=None, help="Default: all 1,000.")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--docs_dir", type=Path, default=ROOT / "docs")
    parser.add_argument("--results", type=Path, default=ROOT / "benchmarks" / "RESULTS.md")
    args = parser.parse_args(argv)
    args.output_dir = args.output_dir.resolve()
    args.output_dir.mkdir(parents=True, exist_ok=True)

    rows = [ROWS_BY_KEY[key] for key in args.rows]
    records = {}
    for row in rows:
        folder = args.output_dir / row.key
        record = evaluate_row(row, folder, train_row(row, folder, args), args)
        records[row.key] = record
        print(f"{row.key}: {outcome(record)}; {json.dumps(record.get('metrics', {}))}", flush=True)

    table = markdown_table(rows, records, args)
    args.docs_dir.mkdir(parents=True, exist_ok=True)
    (args.docs_dir / "table2.md").write_text("# Table 2 on the digits\n\n" + table + "\n![](table2-samples.png)\n")
    sample_figure(rows, args.output_dir, args.docs_dir / "table2-samples.png")
    replace_between_markers(args.results, table)
    print(table)


if __name__ == "__main__":
    main()
