"""benchmarks/table2.py: one row trained, evaluated and tabled for real (tiny sizes), a rerun that only reads it, and
a row that diverges reported as diverged with its step and non-finite count."""

import argparse
import json

import pytest
from PIL import Image

from benchmarks import table2

pytestmark = pytest.mark.slow


def test_one_row_is_trained_evaluated_tabled_and_not_retrained(tmp_path):
    runs, docs, results = tmp_path / "runs", tmp_path / "docs", tmp_path / "RESULTS.md"
    results.write_text("# Results\n\nbefore\n\n<!-- table2: start -->\nstale\n<!-- table2: end -->\n\nafter\n")
    argv = [
        "--rows", "eps-simple", "--output_dir", str(runs), "--max_train_steps", "12", "--num_images", "4",
        "--num_samples", "20", "--num_inference_steps", "10", "--docs_dir", str(docs), "--results", str(results),
    ]  # fmt: skip
    table2.main(argv)

    record = json.loads((runs / "eps-simple" / table2.ROW_RECORD).read_text())
    assert record["train_status"] == 0 and record["eval_status"] == 0
    assert record["global_step"] == 12 and record["skipped_nonfinite_steps"] == 0
    metrics = record["metrics"]
    assert 0 < metrics["bits_per_dim"] < 20 and metrics["fid"] > 0 and 1 <= metrics["inception_score"] <= 10

    text = results.read_text()
    assert "stale" not in text and text.startswith("# Results\n\nbefore\n") and text.endswith("\nafter\n")
    row_line = next(line for line in text.splitlines() if line.startswith("| epsilon | ‖ε − ε_θ‖²"))
    cells = [cell.strip() for cell in row_line.strip("|").split("|")]
    assert cells[3] == f"{metrics['bits_per_dim']:.2f} ± {metrics['bits_per_dim_stderr']:.2f}"
    assert cells[4] == f"{metrics['fid']:.2f}" and cells[6] == "trained" and cells[-1] == "3.17"
    assert (docs / "table2.md").read_text().count(row_line) == 1
    with Image.open(docs / "table2-samples.png") as figure:
        assert figure.width >= 256

    # A second run only reads the recorded row: no new checkpoint, no new log lines, the same table.
    logs = {path.name: path.stat().st_size for path in runs.glob("*.log")}
    table2.main(argv)
    assert {path.name: path.stat().st_size for path in runs.glob("*.log")} == logs
    assert results.read_text() == text


def test_a_diverging_row_is_reported_as_diverged(tmp_path):
    row = table2.Row(
        "eps-lr1e8", "epsilon", "L_simple at lr 1e8",
        ("--learning_rate", "1e8", "--max_nonfinite_steps", "2", "--checkpointing_steps", "1000"), "–", "–",
    )  # fmt: skip
    args = argparse.Namespace(seed=0, max_train_steps=40)
    record = table2.train_row(row, tmp_path / row.key, args)

    assert record["train_status"] == 1, record
    assert record["global_step"] < 40 and record["skipped_nonfinite_steps"] >= 2
    assert "non-finite" in record["error"]
    assert table2.outcome(record).startswith(f"**diverged**: stopped at step {record['global_step']}, ")
    # Not evaluated, and a rerun does not train it again.
    assert table2.evaluate_row(row, tmp_path / row.key, record, args) is record
    assert table2.train_row(row, tmp_path / row.key, args) == record
