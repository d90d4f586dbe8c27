"""A full disk anywhere in a run (a checkpoint, the export, the datasets cache, the evaluation's output), on a real
small tmpfs: the run ends in one line naming the disk, the room needed and the newest checkpoint that still verifies,
and leaves nothing half-written."""

import errno
import json
import os
import re
from pathlib import Path

import pytest
from helpers import FAST, REPO, SMALL_UNET, last_line, one_thread, random_images, run_training

import evaluate_ddpm
import evaluation.inputs
from checkpoints.checkpointing import verify_checkpoint
from hub_access.atomic_folder import STAGING_NAME
from hub_access.disk_space import is_disk_full

TINY_RUN = ["--model_config_name_or_path", "unet.json", "--resolution", "8", "--train_batch_size", "4", *FAST]


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("errors")
    (folder / "unet.json").write_text(json.dumps(SMALL_UNET))
    return folder


def save_images(folder: Path, count: int = 3, seed: int = 0) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for index, image in enumerate(random_images(count, (8, 8), seed=seed)):
        image.save(folder / f"{index}.png")


# 1. A full disk ------------------------------------------------------------------------------------------------
CHECKPOINTED_RUN = [*TINY_RUN, "--checkpointing_steps", "2"]


@pytest.fixture
def small_disk(mount_tmpfs):
    """A real tmpfs of the size asked (`mount_tmpfs` of tests/conftest.py)."""
    return mount_tmpfs


def train_here(workdir: Path, *args: str):
    """`train_ddpm.main` in this process, in `workdir` (tests marked fresh_process: accelerate's state is
    process-wide)."""
    import train_ddpm

    cwd = os.getcwd()
    os.chdir(workdir)
    try:
        with one_thread():  # as the script runs (OMP_NUM_THREADS=1)
            return train_ddpm.main(["--cpu", "--cache_dir", str(workdir / "in-process-cache"), *args])
    finally:
        os.chdir(cwd)


def refused_here(workdir: Path, *args: str) -> str:
    """The one line a run in this process ends in (a SystemExit with a message: exit status 1, as the script run of
    test_a_full_disk_under_the_datasets_cache_names_it_and_its_free_space pins)."""
    with pytest.raises(SystemExit) as exited:
        train_here(workdir, *args)
    assert isinstance(exited.value.code, str) and "\n" not in exited.value.code, exited.value.code
    return exited.value.code


@pytest.fixture(scope="module")
def one_channel_run(workdir) -> Path:
    """Checkpoint-2 of a 1-channel run on the embedded digits (in the fresh process, as its tests' runs)."""
    assert "DDPM_TESTS_FRESH_PROCESS_REPORTS" in os.environ, "mark its tests @pytest.mark.fresh_process"
    train_here(workdir, *CHECKPOINTED_RUN, "--max_train_steps", "2", "--output_dir", "one-channel")
    return workdir / "one-channel"


def kilobytes(folder: Path) -> int:
    return sum(path.stat().st_size for path in folder.rglob("*") if path.is_file()) // 1024


@pytest.fixture(scope="module")
def sizes(one_channel_run) -> tuple[int, int]:
    """The KB of one checkpoint and of one export of these runs (about 870 and 200 with torch 2.13)."""
    return kilobytes(one_channel_run / "checkpoint-2"), kilobytes(one_channel_run / "unet")


def remains(folder: Path) -> list[str]:
    return sorted(str(path.relative_to(folder)) for path in folder.rglob("*") if ".tmp" in path.name)


@pytest.mark.slow
@pytest.mark.fresh_process
def test_a_full_disk_at_a_checkpoint_names_the_disk_the_need_and_the_intact_checkpoint(workdir, small_disk, sizes):
    output = small_disk(int(1.55 * sizes[0]) + 40) / "run"  # room for checkpoint-2 and the logs, not checkpoint-4
    line = refused_here(workdir, *CHECKPOINTED_RUN, "--max_train_steps", "6", "--output_dir", str(output))
    assert line.startswith(f"train_ddpm.py: error: The disk holding '{output}' is full: writing checkpoint-4 failed")
    assert re.search(r"a checkpoint needs about \d+ KB \(the size of checkpoint-2\)", line)
    assert f"{output / 'checkpoint-2'} is the newest intact checkpoint (it verifies)" in line
    assert remains(output) == [] and sorted(path.name for path in output.glob("checkpoint-*")) == ["checkpoint-2"]
    verify_checkpoint(str(output / "checkpoint-2"))


@pytest.mark.slow
def test_a_full_disk_under_the_datasets_cache_names_it_and_its_free_space(workdir, small_disk):
    cache = small_disk(128)  # 300 images of 3x16x16 need 230 KB in the pixel cache
    save_images(workdir / "many", count=300, seed=3)
    output = workdir / "cache-full-out"
    result = run_training(workdir, [*TINY_RUN, "--resolution", "16", "--train_data_dir", "many", "--output_dir",
                                    str(output)], processes=0, check=False, env={"HF_DATASETS_CACHE": str(cache)})  # fmt: skip
    assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr[-3000:]
    line = last_line(result)
    assert line.startswith("train_ddpm.py: error: A disk is full: OSError: [Errno 28] No space left on device")
    assert f"Free now: the datasets cache '{cache}' 0 bytes, --output_dir '{output}' " in line
    assert line.endswith(f"No intact checkpoint is in '{output}': the run must start again.")
    # The image listing, complete (written to a staging folder, then renamed); no half-written pixel cache: the failed
    # `.map` left its temporary file (`tmp` and 8 characters), which is removed.
    left = sorted(str(path.relative_to(cache)) for path in cache.rglob("*") if path.is_file())
    assert [re.sub(r"/[0-9a-f]{32}/", "/LISTING/", path) for path in left] == [
        f"ddpm_imagefolder/LISTING/{name}" for name in ("data-00000-of-00001.arrow", "dataset_info.json", "state.json")
    ]


@pytest.mark.fresh_process  # evaluate_ddpm.main builds an Accelerator
def test_a_full_disk_under_the_evaluation_output_names_it(tmp_path, small_disk, monkeypatch):
    from test_eval_metadata import SMALL_EVAL, export

    pipeline = export(tmp_path / "export", channels=1)
    output = small_disk(16) / "evaluation"  # the plots need more than 16 KB
    monkeypatch.setattr(evaluation.inputs, "OUTPUT_MIN_BYTES", 0)  # past the early check (tests/test_eval_early.py)
    with pytest.raises(SystemExit) as exit_info:
        evaluate_ddpm.main(["--pipeline", str(pipeline), "--output_dir", str(output), *SMALL_EVAL])
    message = str(exit_info.value)
    assert message.startswith("evaluate_ddpm.py: error: A disk is full: ") and "No space left on device" in message
    assert f"Free now: --output_dir '{output}' " in message and message.endswith("Free space there, then run again.")


@pytest.mark.slow
@pytest.mark.fresh_process
def test_a_full_disk_at_the_first_checkpoint_estimates_the_need_and_says_none_is_intact(workdir, small_disk, sizes):
    output = small_disk(sizes[0] // 2) / "run"
    line = refused_here(workdir, *CHECKPOINTED_RUN, "--max_train_steps", "2", "--output_dir", str(output))
    assert "is full: writing checkpoint-2 failed" in line
    assert re.search(r"needs about \d+ KB \(the model, optimizer and EMA states it holds\)", line)
    assert line.endswith(f"No intact checkpoint is in '{output}': the run must start again.")
    assert remains(output) == [] and list(output.glob("checkpoint-*")) == []


@pytest.mark.slow
@pytest.mark.fresh_process
def test_a_full_disk_at_the_export_keeps_the_checkpoint_and_leaves_no_partial_export(workdir, small_disk, sizes):
    output = small_disk(sizes[0] + sizes[1] // 2 + 60) / "run"  # room for checkpoint-2 and a grid, not the export
    line = refused_here(workdir, *CHECKPOINTED_RUN, "--max_train_steps", "2", "--output_dir", str(output))
    assert line.startswith(f"train_ddpm.py: error: The disk holding '{output}' is full: exporting the pipeline failed")
    assert "an export needs about" in line and "There was no export there before." in line
    assert f"{output / 'checkpoint-2'} is the newest intact checkpoint (it verifies)" in line
    assert not (output / STAGING_NAME).exists() and not (output / "model_index.json").exists()
    verify_checkpoint(str(output / "checkpoint-2"))


def test_torchs_short_write_counts_as_a_full_disk_only_when_the_disk_lacks_room(tmp_path):
    short_write = RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 319104 vs 318996")
    assert not is_disk_full(short_write, tmp_path, needed=1)
    assert is_disk_full(short_write, tmp_path, needed=10**18)
    assert is_disk_full(OSError(errno.ENOSPC, "No space left on device"))
    assert is_disk_full(
        RuntimeError(
            'Error while serializing: IoError(Os { code: 28, kind: StorageFull, message: "No space left on device" })'
        )
    )
    assert not is_disk_full(OSError(errno.EACCES, "Permission denied"), tmp_path, needed=10**18)


# A folder that stops taking writes during the run -----------------------------------------------------------------
# The output folder is made immutable (`chattr +i`, which stops root too) right after checkpoint-2 is written, in the
# training process: a real EPERM on the next file created there, at a known point of the run. (`mount -o remount,ro`
# cannot serve mid-run: the kernel refuses it, busy, while the run holds its lock file and event log open for writing.)
IMMUTABLE_AFTER_FIRST_CHECKPOINT = """
import subprocess, sys
sys.path.insert(0, {repo!r})
import train_ddpm

save = train_ddpm.save


def save_then_freeze(accelerator, args, *rest):
    path = save(accelerator, args, *rest)
    subprocess.run(["chattr", "+i", args.output_dir], check=True)
    return path


train_ddpm.save = save_then_freeze
train_ddpm.main()
"""


@pytest.mark.slow
@pytest.mark.parametrize("what", ["checkpoint", "sample-grid"])
def test_an_output_folder_that_stops_taking_files_names_the_newest_good_checkpoint(tmp_path, mount_tmpfs, what):
    """A write refused under --output_dir during the run was a traceback that named no checkpoint to resume; it is
    now one line naming the folder, the error and the checkpoint that verifies, which is kept intact."""
    (tmp_path / "unet.json").write_text(json.dumps(SMALL_UNET))
    output = mount_tmpfs(8192) / "run"  # a tmpfs: `chattr +i` works there, and the unmount undoes it
    script = tmp_path / "immutable_after_checkpoint.py"
    script.write_text(IMMUTABLE_AFTER_FIRST_CHECKPOINT.format(repo=str(REPO)))
    args = [*TINY_RUN, "--checkpointing_steps", "2", "--max_train_steps", "6", "--output_dir", str(output)]
    if what == "sample-grid":  # the next write is the grid of step 3, not checkpoint-4
        args += ["--save_images_steps", "3"]
    result = run_training(tmp_path, args, processes=0, script=script, check=False)
    assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr[-3000:]
    line = last_line(result)
    assert line.startswith(f"train_ddpm.py: error: Cannot write under --output_dir '{output}'"), line
    assert "Operation not permitted" in line and "may not create files in" in line
    assert f"{output / 'checkpoint-2'} is the newest intact checkpoint (it verifies)" in line
    assert sorted(path.name for path in output.glob("checkpoint-*")) == ["checkpoint-2"]
    verify_checkpoint(str(output / "checkpoint-2"))
