"""One run per output folder: a second run into a held folder stops at once on every process, naming the holder;
a killed run leaves no lock behind."""

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from helpers import FAST, REPO, SMALL_UNET, run_env, run_training

import train_ddpm
from training.output_lock import LOCK_FILE_NAME, OutputDirLock

SHORT_RUN = ["--model_config_name_or_path", "unet.json", "--max_train_steps", "2", "--checkpointing_steps", "1", *FAST]


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("trust")
    (folder / "unet.json").write_text(json.dumps(SMALL_UNET))
    return folder


@pytest.fixture
def in_process(request, workdir, monkeypatch):
    """Run `train_ddpm.main` here, in `workdir`: in a test marked fresh_process (accelerate's state is process-wide)."""
    assert request.node.get_closest_marker("fresh_process"), "mark the test @pytest.mark.fresh_process"
    monkeypatch.chdir(workdir)
    return lambda *args: train_ddpm.main(["--cpu", "--cache_dir", str(workdir / "in-process-cache"), *args])


def _no_data(*args, **kwargs):
    raise AssertionError("the run reached the data")


# One run per output folder ------------------------------------------------------------------------------------
PAUSE_BEFORE_DATA = """
import sys, time
sys.path.insert(0, {repo!r})
import train_ddpm


def paused(*args, **kwargs):  # the run holds its output folder and waits here, before reading any data
    open({marker!r}, "w").close()
    time.sleep(600)


train_ddpm.load_pixels = paused
train_ddpm.main()
"""


@pytest.mark.slow
def test_a_second_run_into_a_held_folder_fails_at_once_on_every_process_and_a_killed_run_leaves_no_lock(workdir):
    output = workdir / "held"
    marker = workdir / "holding"
    script = workdir / "pause_before_data.py"
    script.write_text(PAUSE_BEFORE_DATA.format(repo=str(REPO), marker=str(marker)))
    first = subprocess.Popen(
        [sys.executable, str(script), *SHORT_RUN, "--cpu", "--output_dir", "held"],
        cwd=workdir,
        env=run_env(workdir),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    try:
        deadline = time.monotonic() + 180
        while not marker.exists():
            assert first.poll() is None, first.stderr.read().decode()[-3000:]
            assert time.monotonic() < deadline, "the first run never reached its data"
            time.sleep(0.2)
        assert (output / LOCK_FILE_NAME).is_file()

        # A second run of two processes: the main one is refused the lock, and the other one learns it (no hang).
        start = time.monotonic()
        second = run_training(workdir, [*SHORT_RUN, "--cpu", "--output_dir", "held"], processes=2, check=False)
        elapsed = time.monotonic() - start
        assert second.returncode == 1, second.stderr[-3000:]
        assert "train_ddpm.py: error: Another training run holds the output folder 'held'" in second.stderr
        assert f"PID {first.pid} on host {socket.gethostname()}" in second.stderr
        assert "Data:" not in second.stderr  # it stopped before the data
        assert elapsed < 150, elapsed  # launcher and two imports of torch on a busy machine; no timeout waited out
        assert first.poll() is None  # the first run is untouched
        assert sorted(path.name for path in output.iterdir()) == [LOCK_FILE_NAME]
    finally:
        first.send_signal(signal.SIGKILL)  # the OS releases the lock; the file stays, the lock does not
        first.wait(timeout=30)
    assert (output / LOCK_FILE_NAME).is_file()

    run_training(workdir, [*SHORT_RUN, "--output_dir", "held"], processes=0)
    assert (output / "model_index.json").is_file() and (output / "checkpoint-2").is_dir()
    assert not (output / LOCK_FILE_NAME).exists()  # a run that ends removes its lock file: never exported


@pytest.mark.fresh_process
def test_a_run_into_a_folder_another_process_holds_names_it_and_leaves_it_alone(workdir, in_process, monkeypatch):
    output = workdir / "held-in-process"
    monkeypatch.setattr(train_ddpm, "load_pixels", _no_data)
    with OutputDirLock(str(output)):  # another open file description: flock refuses it even in this process
        before = sorted(output.rglob("*"))
        message = rf"error: Another training run holds the output folder .*PID {os.getpid()} on host "
        with pytest.raises(SystemExit, match=message + re.escape(socket.gethostname())):
            in_process(*SHORT_RUN, "--output_dir", str(output), "--overwrite_output_dir")
        assert sorted(output.rglob("*")) == before
    assert not output.exists()  # the holder created the folder and removed it, empty, on release
