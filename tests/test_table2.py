"""benchmarks/table2.py with real training and evaluation processes (tiny sizes): its documented smoke run writes only
into its own folder, a row is trained, evaluated, tabled and then only read, a rerun with other settings refuses or
redoes the row and never reports the old numbers, a row whose training process is killed is retried and gets real
numbers, and a row that diverges is reported as diverged."""

import argparse
import hashlib
import json
import os
import shlex
import shutil
import signal
import threading
import time

import psutil
import pytest
from PIL import Image

from benchmarks import table2

pytestmark = pytest.mark.slow


def smoke_argv(output_dir) -> list[str]:
    """The smoke run of table2.py's docstring, with its --output_dir replaced."""
    line = next(line for line in table2.__doc__.splitlines() if line.rstrip().endswith("# a smoke run"))
    words = shlex.split(line.split("#")[0])
    assert words[:2] == ["python", "benchmarks/table2.py"]
    argv = words[2:]
    argv[argv.index("--output_dir") + 1] = str(output_dir)
    return argv


def repository_outputs() -> dict:
    """Every file under the repository's docs/, and benchmarks/RESULTS.md, as its bytes."""
    paths = [p for p in (table2.ROOT / "docs").rglob("*") if p.is_file()] + [table2.ROOT / "benchmarks" / "RESULTS.md"]
    return {path: path.read_bytes() for path in paths}


def digests(contents: dict) -> dict:
    return {str(path): hashlib.sha256(data).hexdigest() for path, data in contents.items()}


def record_of(folder):
    return json.loads((folder / table2.ROW_RECORD).read_text())


def row_line(table: str, key: str) -> list[str]:
    flags = " ".join(f"`{f}`" if f.startswith("--") else f for f in table2.ROWS_BY_KEY[key].flags)
    line = next(line for line in table.splitlines() if f"| {flags} |" in line)
    return [cell.strip() for cell in line.strip("|").split("|")]


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory):
    """The documented smoke run, once; the repository's docs/ and RESULTS.md are put back whatever it wrote."""
    runs = tmp_path_factory.mktemp("smoke") / "runs"
    before = repository_outputs()
    try:
        table2.main(smoke_argv(runs))
        after = repository_outputs()
    finally:
        for path in set(repository_outputs()) - set(before):
            path.unlink()
        for path, data in before.items():
            if not path.exists() or path.read_bytes() != data:
                path.write_bytes(data)
    return runs, digests(before), digests(after)


@pytest.mark.long
def test_smoke_run_leaves_docs_and_results_byte_identical_and_writes_its_own_folder(smoke_run):
    runs, before, after = smoke_run
    assert after == before
    record = record_of(runs / "eps-simple")
    assert record["train_status"] == 0 and record["eval_status"] == 0 and record["global_step"] == 6
    metrics = record["metrics"]
    assert 0 < metrics["bits_per_dim"] < 20 and metrics["fid"] > 0 and 1 <= metrics["inception_score"] <= 10
    cells = row_line((runs / "table2.md").read_text(), "eps-simple")
    assert cells[3] == f"{metrics['bits_per_dim']:.2f} ± {metrics['bits_per_dim_stderr']:.2f}"
    assert cells[4] == f"{metrics['fid']:.2f}" and cells[6] == "trained" and cells[-1] == "3.17"
    with Image.open(runs / "table2-samples.png") as figure:
        assert figure.width >= 32
    settings = json.loads((runs / "eps-simple" / table2.SETTINGS_FILE).read_text())
    assert settings["train"]["max_train_steps"] == 6 and settings["evaluate"]["num_samples"] == 8


@pytest.mark.long
def test_write_docs_fills_the_given_docs_and_results_and_a_rerun_only_reads(smoke_run, tmp_path):
    runs = tmp_path / "runs"
    shutil.copytree(smoke_run[0], runs)
    docs, results = tmp_path / "docs", tmp_path / "RESULTS.md"
    results.write_text("# Results\n\nbefore\n\n<!-- table2: start -->\nstale\n<!-- table2: end -->\n\nafter\n")
    argv = smoke_argv(runs) + ["--write_docs", "--docs_dir", str(docs), "--results", str(results)]
    logs = {path.name: path.stat().st_size for path in runs.glob("*.log")}
    table2.main(argv)  # every row recorded with these settings: nothing runs
    assert {path.name: path.stat().st_size for path in runs.glob("*.log")} == logs
    text = results.read_text()
    assert "stale" not in text and text.startswith("# Results\n\nbefore\n") and text.endswith("\nafter\n")
    assert (docs / "table2.md").read_text() == (runs / "table2.md").read_text()
    assert (docs / "table2-samples.png").exists()
    with pytest.raises(SystemExit):  # the repository's files are written only when asked
        table2.main(smoke_argv(runs) + ["--docs_dir", str(docs)])


@pytest.mark.long
def test_rerun_with_other_settings_refuses_then_redoes_and_never_reports_the_old_numbers(smoke_run, tmp_path):
    runs = tmp_path / "runs"
    shutil.copytree(smoke_run[0], runs)
    folder = runs / "eps-simple"
    old = record_of(folder)
    table_before = (runs / "table2.md").read_bytes()
    logs = {path.name: path.stat().st_size for path in runs.glob("*.log")}

    def argv_with(flag, value):
        argv = smoke_argv(runs)
        argv[argv.index(flag) + 1] = value
        return argv

    with pytest.raises(SystemExit) as refused:
        table2.main(argv_with("--num_samples", "6"))
    message = str(refused.value)
    assert "\n" not in message and str(folder) in message and "--num_samples 8 -> 6" in message
    with pytest.raises(SystemExit) as refused:
        table2.main(argv_with("--max_train_steps", "7"))
    assert str(folder) in str(refused.value) and "--max_train_steps 6 -> 7" in str(refused.value)
    # Refusing touched nothing: no process ran, the table and the row are as they were.
    assert {path.name: path.stat().st_size for path in runs.glob("*.log")} == logs
    assert (runs / "table2.md").read_bytes() == table_before and record_of(folder) == old

    # --redo_changed with an evaluation setting changed: evaluated again, not trained again.
    table2.main(argv_with("--num_samples", "6") + ["--redo_changed"])
    new = record_of(folder)
    assert (runs / "eps-simple-train.log").stat().st_size == logs["eps-simple-train.log"]
    assert new["train_seconds"] == old["train_seconds"] and new["metrics"]["fid"] != old["metrics"]["fid"]
    table = (runs / "table2.md").read_text()
    cells = row_line(table, "eps-simple")
    assert cells[4] == f"{new['metrics']['fid']:.2f}" != f"{old['metrics']['fid']:.2f}"
    assert "FID and IS of 6 samples" in table
    assert json.loads((folder / table2.SETTINGS_FILE).read_text())["evaluate"]["num_samples"] == 6


def kill_training_when_it_steps(folder, log, killed: list, stop: threading.Event) -> None:
    """SIGKILL this test's train_ddpm.py child for `folder` once its log shows an optimizer step after a checkpoint."""
    me = psutil.Process()
    while not stop.is_set():
        text = log.read_text(errors="replace") if log.exists() else ""
        if any(folder.glob("checkpoint-*")) and "Training:" in text:
            for child in me.children(recursive=True):
                try:
                    cmdline = child.cmdline()
                except psutil.Error:
                    continue
                if any(part.endswith("train_ddpm.py") for part in cmdline) and str(folder) in cmdline:
                    os.kill(child.pid, signal.SIGKILL)
                    killed.append(child.pid)
                    return
        time.sleep(0.05)


@pytest.mark.long
def test_a_killed_row_is_retried_by_the_next_run_and_gets_real_numbers(tmp_path, monkeypatch):
    row = table2.Row(
        "eps-simple-ckpt", "epsilon", "L_simple, a checkpoint every 2 steps",
        ("--prediction_type", "epsilon", "--loss_type", "simple", "--checkpointing_steps", "2"), "–", "–",
    )  # fmt: skip
    monkeypatch.setitem(table2.ROWS_BY_KEY, row.key, row)
    runs = tmp_path / "runs"
    argv = smoke_argv(runs)
    argv[argv.index("--rows") + 1] = row.key
    argv[argv.index("--max_train_steps") + 1] = "12"
    folder = runs / row.key
    killed, stop = [], threading.Event()
    killer = threading.Thread(
        target=kill_training_when_it_steps, args=(folder, runs / f"{row.key}-train.log", killed, stop)
    )
    killer.start()
    try:
        with pytest.raises(SystemExit) as unfinished:
            table2.main(argv)
    finally:
        stop.set()
        killer.join()
    assert killed, "the training process was not found"
    assert row.key in str(unfinished.value) and "run the same command again" in str(unfinished.value)
    record = record_of(folder)
    assert "train_status" not in record and "metrics" not in record  # not recorded as diverged, nor evaluated
    assert record["attempts"][-1]["status"] == -signal.SIGKILL
    assert record["attempts"][-1]["reason"] == "killed by SIGKILL"
    table = (runs / "table2.md").read_text()
    assert "diverged" not in table and "killed by SIGKILL" in table

    table2.main(argv)  # the next run retries it
    record = record_of(folder)
    assert record["train_status"] == 0 and record["global_step"] == 12 and record["eval_status"] == 0
    assert record["metrics"]["bits_per_dim"] > 0 and record["metrics"]["fid"] > 0
    assert row_line((runs / "table2.md").read_text(), row.key)[6] == "trained"


def test_a_diverging_row_is_reported_as_diverged(tmp_path):
    row = table2.Row(
        "eps-lr1e8", "epsilon", "L_simple at lr 1e8",
        ("--learning_rate", "1e8", "--max_nonfinite_steps", "2", "--checkpointing_steps", "1000"), "–", "–",
    )  # fmt: skip
    args = argparse.Namespace(seed=0, max_train_steps=40, num_inference_steps=4)
    record = table2.train_row(row, tmp_path / row.key, args)

    assert record["train_status"] == 1, record
    assert record["global_step"] < 40 and record["skipped_nonfinite_steps"] >= 2
    assert "non-finite" in record["error"]
    assert table2.outcome(record).startswith(f"**diverged**: stopped at step {record['global_step']}, ")
    # Not evaluated, and a rerun does not train it again.
    assert table2.evaluate_row(row, tmp_path / row.key, record, args) is record
    assert table2.train_row(row, tmp_path / row.key, args) == record
