"""The paper's Table 2 (Ho et al. 2020, Sec. 4.2) on the embedded 8x8 digits: every training objective it compares,
trained by `train_ddpm.py` and evaluated by `evaluate_ddpm.py`, one row after another, each in its own processes.

    python benchmarks/table2.py                                  # all six rows: about 45 minutes on a 2-core CPU
    python benchmarks/table2.py --rows eps-simple mean-vlb-fixed   # some rows
    python benchmarks/table2.py --rows eps-simple --max_train_steps 6 --num_samples 8 --num_images 2 --num_inference_steps 4 --output_dir /tmp/t2  # a smoke run
    python benchmarks/table2.py --write_docs                     # also update docs/ and benchmarks/RESULTS.md

Every row trains with the default run's recipe (the `tiny` net, batch 64, Adam 1e-3, EMA; 2,900 steps) and only its
objective's flags, then is evaluated the same way: the bound in bits/dim on the first `--num_images` digits (all
1,000 terms), and FID and Inception Score of `--num_samples` samples in the digits classifier's features.

Each row has its own folder under `--output_dir`, which records the settings it ran with (`table2_settings.json`).
Run the command again and a row whose training was interrupted resumes from its newest checkpoint, a trained row is
only evaluated, an evaluated row only read. A row whose settings differ from the command's is never read as if they
were the same: the run refuses, naming the settings and the folder, or with `--redo_changed` retrains the row (a
training setting changed) or only re-evaluates it (an evaluation setting changed). A row whose training stopped with
the training script's own non-finite-loss error is recorded as diverged, with the step and the count; a row whose
training process died otherwise (a signal, another error, no final export) is not recorded as anything and is
retried by the next run, as is a failed evaluation. The command then exits with an error naming those rows.

Writes the table to `table2.md` and the rows' sample grids to `table2-samples.png` in `--output_dir`, and nothing else
outside it. `--write_docs` also writes `docs/table2.md`, `docs/table2-samples.png` and the same table between the
`table2` markers of `benchmarks/RESULTS.md` (`--docs_dir`, `--results` to write elsewhere), once every row finished.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

from PIL import Image, ImageDraw

ROOT = Path(__file__).resolve().parent.parent
ROW_RECORD = "table2_row.json"  # what a row's training attempts and evaluation left, in the row's folder
SETTINGS_FILE = "table2_settings.json"  # the settings a row runs with, in the row's folder, written before it starts
NONFINITE_EXIT = "train_ddpm.py: error:"  # how train_ddpm.py's one-line exit starts (its non-finite stop among them)
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


def run_logged(command: list[str], log: Path) -> tuple[int, float, str]:
    """
    Run a script of ours in a new process, its output appended to `log`; its exit status (negative: the signal that
    killed it), wall seconds, and what this run wrote to the log.
    """
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}
    log.parent.mkdir(parents=True, exist_ok=True)
    offset = log.stat().st_size if log.exists() else 0
    start = time.perf_counter()
    with log.open("a") as out:
        process = subprocess.Popen([sys.executable, *command], cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT)
        try:
            status = process.wait()
        except KeyboardInterrupt:
            process.wait()  # Ctrl-C reached the child too: let it write its checkpoint (subprocess.run would kill it)
            raise
    with log.open("rb") as written:
        written.seek(offset)
        output = written.read().decode(errors="replace")
    return status, time.perf_counter() - start, output


def newest_trainer_state(folder: Path) -> dict:
    """The trainer state of the row's newest checkpoint (its step and non-finite counts), or {}."""
    checkpoints = sorted(
        folder.glob("checkpoint-*/trainer_state.json"), key=lambda p: int(p.parent.name.split("-")[1])
    )
    return json.loads(checkpoints[-1].read_text()) if checkpoints else {}


def _exit_description(status: int) -> str:
    if status < 0:
        try:
            return f"killed by {signal.Signals(-status).name}"
        except ValueError:
            return f"killed by signal {-status}"
    return f"exit status {status}"


def train_row(row: Row, folder: Path, args: argparse.Namespace) -> dict:
    """
    1. Train (or resume) the row. A finished training (trained, or diverged: train_ddpm.py's own non-finite-loss
    exit) is recorded with its steps, non-finite steps, seconds and error; a process that died otherwise is recorded
    only as an attempt (no `train_status`), so that the next run retries it.
    """
    record = read_record(folder)
    if "train_status" in record:
        return record
    command = ["train_ddpm.py", "--output_dir", str(folder), *row.flags, "--seed", str(args.seed)]
    command += ["--max_train_steps", str(args.max_train_steps)]
    if getattr(args, "num_inference_steps", None) is not None:  # the export's sample grid, the figure's source
        command += ["--ddpm_num_inference_steps", str(args.num_inference_steps)]
    if any(folder.glob("checkpoint-*")):
        command += ["--resume_from_checkpoint", "latest"]
    elif folder.exists():  # stopped before its first checkpoint: nothing to keep
        command += ["--overwrite_output_dir"]
    log = folder.parent / f"{row.key}-train.log"
    status, seconds, output = run_logged(command, log)
    state = newest_trainer_state(folder)
    finished = state.get("global_step", -1) >= args.max_train_steps
    exported = (folder / "model_index.json").exists()
    lines = [line.strip() for line in re.split(r"[\r\n]+", output)]
    own_errors = [line for line in lines if line.startswith(NONFINITE_EXIT)]  # train_ddpm.py's one-line exit
    errors = own_errors or [line for line in lines if "Error" in line or "error:" in line]  # or a traceback's
    diverged = status == 1 and bool(own_errors) and "non-finite" in own_errors[-1]
    spent = seconds + sum(attempt["seconds"] for attempt in record.get("attempts", []))
    if (status == 0 and finished and exported) or diverged:
        record = {
            **record,
            "train_status": status,
            "train_seconds": spent,
            "global_step": state.get("global_step"),
            "skipped_nonfinite_steps": state.get("skipped_nonfinite_steps"),
            "error": errors[-1] if diverged else None,
        }
        write_record(folder, record)
        return record
    # Not an outcome of the objective: the process was stopped or killed, failed for another reason, or did not
    # export. Kept as an attempt, never as the row's result.
    if status == 0:
        reason = f"stopped at step {state.get('global_step')}" if not finished else "ended without its final export"
    else:
        reason = _exit_description(status) + (f" ({errors[-1]})" if status > 0 and errors else "")
    attempt = {"status": status, "seconds": seconds, "global_step": state.get("global_step"), "reason": reason}
    folder.mkdir(parents=True, exist_ok=True)
    record = {**record, "attempts": [*record.get("attempts", []), attempt]}
    write_record(folder, record)
    if status == 0 and not finished:  # stopped by a signal of its own (Ctrl-C): stop here as well
        raise SystemExit(f"{row.key} stopped at step {state.get('global_step')}: run the command again to resume it.")
    return record


def evaluate_row(row: Row, folder: Path, record: dict, args: argparse.Namespace) -> dict:
    """
    2. Evaluate a trained row's export with evaluate_ddpm.py: bits/dim, FID, IS (what metrics.json holds). A failed
    evaluation records its status without metrics, and the next run evaluates again.
    """
    if "metrics" in record or record.get("train_status") != 0:
        return record
    evaluation = folder / "evaluation"
    command = [
        "evaluate_ddpm.py", "--pipeline", str(folder), "--output_dir", str(evaluation),
        "--num_images", str(args.num_images), "--num_samples", str(args.num_samples),
        "--rate_distortion_images", "2", "--seed", str(args.seed),
    ]  # fmt: skip
    if args.num_inference_steps is not None:
        command += ["--num_inference_steps", str(args.num_inference_steps)]
    metrics_file = evaluation / "metrics.json"
    metrics_file.unlink(missing_ok=True)  # only this evaluation's figures count
    status, seconds, _ = run_logged(command, folder.parent / f"{row.key}-evaluate.log")
    record = {**record, "eval_status": status, "eval_seconds": seconds}
    if status == 0 and metrics_file.exists():
        metrics = json.loads(metrics_file.read_text())
        keys = ("bits_per_dim", "bits_per_dim_stderr", "fid", "inception_score", "inception_score_std")
        record["metrics"] = {key: metrics.get(key) for key in keys}
    write_record(folder, record)
    return record


def is_finished(record: dict) -> bool:
    """Whether the row has its result: diverged, or trained and evaluated. Anything else is retried by a rerun."""
    return record.get("train_status", 0) != 0 or "metrics" in record


def row_settings(row: Row, args: argparse.Namespace) -> dict:
    """The settings a row's numbers depend on: its training (flags, seed, steps) and its evaluation."""
    return {
        "train": {
            "flags": list(row.flags),
            "seed": args.seed,
            "max_train_steps": args.max_train_steps,
            "num_inference_steps": args.num_inference_steps,  # also the sampling steps of the export's grid
        },
        "evaluate": {"num_images": args.num_images, "num_samples": args.num_samples},
    }


def changed_settings(saved: dict, wanted: dict, section: str) -> list[str]:
    """What differs in `section` ("train" or "evaluate") between a row folder's settings and the command's."""
    before, now = saved.get(section, {}), wanted[section]
    changes = []
    for name, value in now.items():
        if name not in before or before[name] != value:
            label = "the row's training flags" if name == "flags" else f"--{name}"
            changes.append(f"{label} {before.get(name, '(not recorded)')} -> {value}")
    return changes


def prepare_rows(rows: list[Row], args: argparse.Namespace) -> None:
    """
    Check every row's folder against the command's settings before anything runs: refuse (one line naming each
    folder and what differs) unless `--redo_changed`, which removes the row (training settings changed) or only its
    evaluation (evaluation settings changed). Then record the settings in each row's folder.
    """
    conflicts, redo = [], []
    for row in rows:
        folder = args.output_dir / row.key
        wanted = row_settings(row, args)
        path = folder / SETTINGS_FILE
        if not path.exists():
            if folder.exists() and any(folder.iterdir()):
                conflicts.append(f"{folder} holds files but no record of the settings they ran with ({SETTINGS_FILE})")
            continue
        try:
            saved = json.loads(path.read_text())
        except (OSError, ValueError):
            saved = {}
        train, evaluate = changed_settings(saved, wanted, "train"), changed_settings(saved, wanted, "evaluate")
        if train or evaluate:
            conflicts.append(f"{folder} ran with other settings: {', '.join(train + evaluate)}")
            redo.append((row, folder, bool(train)))
    unredoable = [c for c in conflicts if "no record of the settings" in c]
    if conflicts and (not args.redo_changed or unredoable):
        advice = (
            "move them away or choose another --output_dir"
            if unredoable
            else "pass --redo_changed to redo those rows, or choose another --output_dir"
        )
        raise SystemExit(f"table2.py: error: {'; '.join(unredoable or conflicts)}: {advice}.")
    for row, folder, retrain in redo:
        print(f"{row.key}: settings changed, {'retraining' if retrain else 're-evaluating'} it (--redo_changed)")
        logs = [f"{row.key}-evaluate.log"] + ([f"{row.key}-train.log"] if retrain else [])
        for name in logs:
            (folder.parent / name).unlink(missing_ok=True)
        if retrain:
            shutil.rmtree(folder)
        else:
            shutil.rmtree(folder / "evaluation", ignore_errors=True)
            record = read_record(folder)
            for key in ("eval_status", "eval_seconds", "metrics"):
                record.pop(key, None)
            write_record(folder, record)
    for row in rows:
        folder = args.output_dir / row.key
        folder.mkdir(parents=True, exist_ok=True)
        (folder / SETTINGS_FILE).write_text(json.dumps(row_settings(row, args), indent=2) + "\n")


def _number(value, digits: int) -> str:
    return "n/a" if value is None or not math.isfinite(value) else f"{value:.{digits}f}"


def outcome(record: dict) -> str:
    """How the row's training ended, as the table says it."""
    skipped = record.get("skipped_nonfinite_steps") or 0
    if "train_status" not in record:
        attempts = record.get("attempts", [])
        if not attempts:
            return "**not trained**"
        last = attempts[-1]
        return f"**not finished**: training {last['reason']} at step {last['global_step']}; the next run retries it"
    if record["train_status"] != 0:
        return f"**diverged**: stopped at step {record.get('global_step')}, {skipped} non-finite steps skipped"
    if "metrics" not in record:
        return f"trained; **evaluation failed** ({_exit_description(record.get('eval_status', 1))}, see its log)"
    metrics = record["metrics"]
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
    parser.add_argument(
        "--num_inference_steps", type=int, default=None,
        help="Sampling steps of the evaluation's samples and of each row's sample grid. Default: all 1,000.",
    )  # fmt: skip
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--redo_changed", action="store_true",
        help="Redo the rows whose folder ran with other settings (else the run refuses): retrain them, or only "
        "re-evaluate them when only evaluation settings changed.",
    )  # fmt: skip
    parser.add_argument(
        "--write_docs", action="store_true",
        help="Also write the table and figure into the repository (docs/table2.md, docs/table2-samples.png, the "
        "table2 block of benchmarks/RESULTS.md), once every row finished. Without it only --output_dir is written.",
    )  # fmt: skip
    parser.add_argument("--docs_dir", type=Path, default=None, help="With --write_docs; default: the repo's docs/.")
    parser.add_argument(
        "--results", type=Path, default=None, help="With --write_docs; default: benchmarks/RESULTS.md."
    )
    args = parser.parse_args(argv)
    if not args.write_docs and (args.docs_dir is not None or args.results is not None):
        parser.error("--docs_dir and --results are written only with --write_docs")
    args.docs_dir = args.docs_dir or ROOT / "docs"
    args.results = args.results or ROOT / "benchmarks" / "RESULTS.md"
    args.output_dir = args.output_dir.resolve()
    args.output_dir.mkdir(parents=True, exist_ok=True)

    rows = [ROWS_BY_KEY[key] for key in args.rows]
    prepare_rows(rows, args)
    records = {}
    for row in rows:
        folder = args.output_dir / row.key
        record = evaluate_row(row, folder, train_row(row, folder, args), args)
        records[row.key] = record
        print(f"{row.key}: {outcome(record)}; {json.dumps(record.get('metrics', {}))}", flush=True)

    table = markdown_table(rows, records, args)
    (args.output_dir / "table2.md").write_text("# Table 2 on the digits\n\n" + table + "\n![](table2-samples.png)\n")
    sample_figure(rows, args.output_dir, args.output_dir / "table2-samples.png")
    print(table)
    unfinished = [row.key for row in rows if not is_finished(records[row.key])]
    if unfinished:
        docs = " (docs not written)" if args.write_docs else ""
        raise SystemExit(
            f"table2.py: error: {', '.join(unfinished)} did not finish{docs}: run the same command again to retry "
            f"{'it' if len(unfinished) == 1 else 'them'} (logs in {args.output_dir})."
        )
    if args.write_docs:
        args.docs_dir.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(args.output_dir / "table2.md", args.docs_dir / "table2.md")
        sample_figure(rows, args.output_dir, args.docs_dir / "table2-samples.png")
        replace_between_markers(args.results, table)


if __name__ == "__main__":
    main()
