"""train_ddpm.py end to end: real runs on the CPU with a 45k-parameter U-Net on 8x8 images, T = 50 and 5 sampling
steps, so that each run takes seconds; through `accelerate launch` where the launcher is part of what a test pins
(the digits run, with the project's config, and the multi-process runs), else as plain `python train_ddpm.py`. Runs
shared by several tests are module-scoped fixtures."""

import json
import logging
import math
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from datasets import Dataset, Features, Value
from datasets import Image as ImageFeature
from helpers import (
    FAST,
    REPO,
    RUN_TIMEOUT,
    SMALL_UNET,
    assert_stock_pipeline_samples,
    launch_command,
    one_thread,
    random_images,
    read_until,
    run_env,
    run_training,
    trainer_state,
)
from hub_server import LocalHub
from huggingface_hub import ModelCard
from safetensors.torch import load_file
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

import train_ddpm
from checkpoints.checkpointing import TRAINER_STATE_NAME, TrainerState
from image_data.pixels import PixelBatches, preprocess_images
from image_data.sources import DatasetUnavailableError, ImageDataError, digits_dataset, split_held_out
from schedulers import DDPMPaperScheduler
from training.args import DIGITS_DEFAULTS, make_parser, parse_args, public_config
from training.output_lock import LOCK_FILE_NAME


# Runs shared by several tests ------------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    """The folder of the module's runs: the small U-Net config, the datasets, the `datasets` cache."""
    folder = tmp_path_factory.mktemp("train")
    (folder / "unet.json").write_text(json.dumps(SMALL_UNET))
    return folder


@pytest.fixture(scope="module")
def hub_layout_dataset(workdir) -> Path:
    """20 RGB 12x10 images in a folder laid out like a Hub dataset repo, image column named `img`."""
    folder = workdir / "hub-dataset"
    (folder / "data").mkdir(parents=True)
    features = Features({"img": ImageFeature(), "label": Value("int64")})
    dataset = Dataset.from_dict({"img": random_images(20, (12, 10), seed=0), "label": list(range(20))}, features)
    dataset.to_parquet(str(folder / "data" / "train-00000-of-00001.parquet"))
    return folder


@pytest.fixture(scope="module")
def image_folder(workdir) -> Path:
    folder = workdir / "images"
    for index, image in enumerate(random_images(12, (9, 9), seed=1)):
        (folder / f"class{index % 2}").mkdir(parents=True, exist_ok=True)
        image.save(folder / f"class{index % 2}" / f"{index}.png")
    return folder


# Shared runs --------------------------------------------------------------------------------------------------------
# The Hub-layout run: 20 images, batch 4 and 2 accumulation steps (3 optimizer steps per epoch), random flips and
# dropout; 4 steps with a checkpoint every 2, so that the resume tests can stop at step 2, mid-epoch 0.
HUB_RUN = ["--model_config_name_or_path", "unet.json", "--resolution", "8", "--train_batch_size", "4"]
HUB_RUN += ["--gradient_accumulation_steps", "2", "--random_flip", "--max_train_steps", "4"]
HUB_RUN += ["--checkpointing_steps", "2", "--lr_warmup_steps", "1", *FAST]


HUB_TOKEN = "hf_train_test_token_0123456789"


@pytest.fixture(scope="module")
def digits_run(workdir) -> tuple[Path, LocalHub]:
    """No dataset given: the embedded digits at their native 8x8, one channel; pushed to a loopback Hub."""
    args = ["--model_config_name_or_path", "unet.json", "--max_train_steps", "4", "--checkpointing_steps", "2"]
    args += ["--save_images_steps", "2", "--output_dir", "digits", *FAST]
    args += ["--push_to_hub", "--hub_model_id", "me/ddpm-digits", "--hub_private_repo", "--hub_token", HUB_TOKEN]
    with LocalHub(token=HUB_TOKEN) as hub:
        env = {**hub.env(), "HF_TOKEN": ""}  # the token comes from --hub_token only
        run_training(workdir, args, env=env)
    return workdir / "digits", hub


@pytest.fixture(scope="module")
def hub_run(workdir, hub_layout_dataset) -> Path:
    # Plain `python train_ddpm.py` (the launcher with the project config is digits_run's): the resume test that
    # compares with this run bit for bit runs the same way.
    run_training(workdir, ["--dataset_name", str(hub_layout_dataset), *HUB_RUN, "--output_dir", "hub"], processes=0)
    return workdir / "hub"


# The learning run, in this process: the digits default (the tiny preset, batch 64, lr 1e-3 after 200 warm-up steps)
# with T = 1000 for 150 steps (~15 s), a small evaluation every 60 steps and at the end (steps 60, 120, 150).
LEARNING_RUN = ["--model_preset", "tiny", "--train_batch_size", "64", "--learning_rate", "1e-3"]
LEARNING_RUN += ["--ddpm_num_steps", "1000", "--max_train_steps", "150", "--logging_steps", "10"]
LEARNING_RUN += ["--ddpm_num_inference_steps", "5", "--eval_batch_size", "4"]
SMALL_EVAL = ["--eval_num_images", "4", "--eval_bpd_timesteps", "5", "--eval_num_samples", "8"]
SMALL_EVAL += ["--eval_num_inference_steps", "5"]


@pytest.fixture(scope="module")
def learning_run(workdir, digits_cache) -> tuple[Path, train_ddpm.TrainingOutcome]:
    """In this process: its tests are marked fresh_process (accelerate's state is process-wide)."""
    assert "DDPM_TESTS_FRESH_PROCESS_REPORTS" in os.environ, "mark its tests @pytest.mark.fresh_process"
    output = workdir / "learning"
    with one_thread():
        outcome = train_ddpm.main(
            ["--cpu", *LEARNING_RUN, "--eval_steps", "60", *SMALL_EVAL, "--output_dir", str(output)]
        )
    return output, outcome


def logged_scalars(output: Path, tag: str) -> dict[int, float]:
    """The values of `tag` in the run's TensorBoard log, by step."""
    events = EventAccumulator(str(output / "logs" / "train_ddpm"))
    events.Reload()
    return {event.step: event.value for event in events.Scalars(tag)}


# End to end ---------------------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_embedded_digits_run_exports_a_pipeline_stock_diffusers_loads(digits_run):
    digits_run, _ = digits_run
    assert_stock_pipeline_samples(digits_run, channels=1)
    assert (digits_run / "samples.png").is_file()
    assert sorted(os.listdir(digits_run / "samples")) == ["step-2.png", "step-4.png"]
    card = (digits_run / "README.md").read_text()
    assert "library_name: diffusers" in card and "unconditional-image-generation" in card
    assert "--max_train_steps 4" in card
    assert [p.name for p in digits_run.glob("checkpoint-*")] and trainer_state(digits_run / "checkpoint-4").epoch == 0
    config = trainer_state(digits_run / "checkpoint-4").training_args
    assert config["resolution"] == 8 and config["train_batch_size"] == DIGITS_DEFAULTS["train_batch_size"]
    assert "hub_token" not in config
    assert list((digits_run / "logs").rglob("events.out.tfevents.*"))


@pytest.mark.slow
def test_push_to_hub_publishes_the_final_export_privately_without_the_token(digits_run):
    output, hub = digits_run
    repo = hub.repos["me/ddpm-digits"]
    assert repo["private"] is True
    assert [commit["summary"] for commit in repo["commits"]] == ["Step 4 (end of training)"]
    assert {"model_index.json", "unet/diffusion_pytorch_model.safetensors", "README.md", "samples.png"} <= set(
        repo["files"]
    )
    assert not any(name.startswith("checkpoint-") for name in repo["files"])  # the export only
    assert (
        repo["files"]["unet/diffusion_pytorch_model.safetensors"]
        == (output / "unet" / "diffusion_pytorch_model.safetensors").read_bytes()
    )
    assert f"Bearer {HUB_TOKEN}" in hub.authorizations()
    for path in [*output.rglob("*.json"), *output.rglob("*.md"), *output.rglob("*.yml")]:
        assert HUB_TOKEN not in path.read_text(), path
    assert all(HUB_TOKEN.encode() not in content for content in repo["files"].values())


@pytest.mark.slow
@pytest.mark.fresh_process
def test_training_learns_to_predict_the_noise_of_x_t(learning_run):
    """L_simple falls from ~1.1 to ~0.14 in 150 steps (measured); a loop that fed x_0 instead of x_t to the net, from
    which the noise cannot be predicted, stays at 1.0 (measured)."""
    loss = logged_scalars(learning_run[0], "loss")
    assert sorted(loss) == list(range(10, 151, 10))
    assert loss[10] > 0.8
    assert (loss[130] + loss[140] + loss[150]) / 3 < 0.3


@pytest.mark.slow
@pytest.mark.fresh_process
def test_evaluation_every_eval_steps_is_logged_and_written_into_the_model_card(learning_run):
    output, outcome = learning_run
    bits_per_dim = logged_scalars(output, "eval/bits_per_dim")
    assert sorted(bits_per_dim) == [60, 120, 150]  # every --eval_steps, and at the end of training
    assert bits_per_dim[150] < bits_per_dim[60]  # the same images and noise: the trained weights do better (8.6, 6.5)
    metrics = outcome.metrics
    assert {"bits_per_dim", "bits_per_dim_stderr", "prior_bpd", "fid", "kid_mean", "kid_std"} <= set(metrics)
    assert (metrics["num_images"], metrics["num_samples"]) == (4, 8)
    assert all(math.isfinite(value) for value in metrics.values())
    assert 0 <= metrics["precision"] <= 1 and 0 <= metrics["recall"] <= 1
    for name in ("bits_per_dim", "fid", "precision"):
        assert logged_scalars(output, f"eval/{name}")[150] == pytest.approx(metrics[name], rel=1e-6)
    card = ModelCard.load(output / "README.md")
    results = {result.metric_type: result.metric_value for result in card.data.eval_results}
    assert results == pytest.approx(metrics)  # the model-index holds the final evaluation
    assert "## Evaluation" in card.text


@pytest.mark.slow
@pytest.mark.fresh_process
def test_the_held_out_digits_are_not_trained_on(learning_run):
    # 1797 - 256 = 1541 digits in batches of 64 are 25 batches an epoch (all 1797 would be 29): step 150 ends epoch 5.
    state = trainer_state(learning_run[0] / "checkpoint-150")
    assert (state.global_step, state.epoch, state.batches_in_epoch) == (150, 5, 25)


def test_split_held_out_keeps_the_last_images_out_of_training():
    pixels = preprocess_images(digits_dataset(), "image", 8, 1)
    train, held_out = split_held_out(pixels, 256)
    assert (len(train), len(held_out)) == (1541, 256)
    assert torch.equal(train[:]["pixels"], pixels[:1541]["pixels"])
    assert torch.equal(held_out[:]["pixels"], pixels[1541:]["pixels"])
    # The training loop and the evaluation read the views through PixelBatches.
    assert torch.equal(PixelBatches(train).__getitems__([0, 1540]), pixels[[0, 1540]]["pixels"])
    assert torch.equal(PixelBatches(held_out).__getitems__([0, 255]), pixels[[1541, 1796]]["pixels"])
    with pytest.raises(ImageDataError, match="leaves no images to train on"):
        split_held_out(pixels, 1797)


@pytest.mark.slow
def test_hub_layout_parquet_dataset_run_exports_a_pipeline(hub_run):
    assert_stock_pipeline_samples(hub_run, channels=3)
    assert sorted(p.name for p in hub_run.glob("checkpoint-*")) == ["checkpoint-2", "checkpoint-4"]
    state = trainer_state(hub_run / "checkpoint-4")
    # 20 images / batch 4 = 5 batches, 3 optimizer steps per epoch (2 + 2 + the last one): step 4 is epoch 1.
    assert (state.global_step, state.epoch, state.batches_in_epoch) == (4, 1, 2)


@pytest.mark.slow
def test_image_folder_streaming_with_v_prediction_and_learned_variance(workdir, image_folder):
    args = ["--train_data_dir", str(image_folder), "--streaming", "--max_train_steps", "3", "--resolution", "8"]
    args += ["--model_config_name_or_path", "unet.json", "--train_batch_size", "4", "--center_crop"]
    args += ["--prediction_type", "v_prediction", "--variance_type", "learned_range", "--output_dir", "folder"]
    # Bits/dim on an --eval_split (a stream has no end to hold out), loaded without streaming, the first 6 images.
    args += ["--eval_steps", "2", "--eval_split", "train", "--eval_holdout_images", "6", "--eval_num_images", "4"]
    args += ["--eval_bpd_timesteps", "5", "--eval_num_samples", "0"]
    result = run_training(workdir, [*args, *FAST], processes=0)
    assert "Evaluation every 2 steps on 6 held-out images (split 'train')" in result.stderr
    output = workdir / "folder"
    bits_per_dim = logged_scalars(output, "eval/bits_per_dim")
    assert sorted(bits_per_dim) == [2, 3] and all(math.isfinite(value) for value in bits_per_dim.values())
    assert "eval/fid" not in EventAccumulator(str(output / "logs" / "train_ddpm")).Reload().Tags()["scalars"]
    assert_stock_pipeline_samples(output, channels=3)
    config = json.loads((output / "unet" / "config.json").read_text())
    assert config["out_channels"] == 6  # mean and variance
    scheduler = json.loads((output / "scheduler" / "scheduler_config.json").read_text())
    assert scheduler["variance_type"] == "learned_range" and scheduler["prediction_type"] == "v_prediction"


WRAPPER = """
import json, os, sys
sys.path.insert(0, {repo!r})
import torch
import train_ddpm
from accelerate import PartialState

outcome = train_ddpm.main()
rank = PartialState().process_index
tensors = {{f"unet.{{name}}": p.detach() for name, p in outcome.unet.named_parameters()}}
tensors.update({{f"ema.{{i}}": p for i, p in enumerate(outcome.ema.shadow_params)}})
torch.save(tensors, os.path.join({dump!r}, f"rank{{rank}}.pt"))
with open(os.path.join({dump!r}, f"metrics{{rank}}.json"), "w") as file:
    json.dump(outcome.metrics, file)
"""


@pytest.mark.slow
def test_two_cpu_processes_end_identical_and_only_rank_0_writes(workdir, digits_cache):
    dump = workdir / "ranks"
    dump.mkdir()
    script = workdir / "two_ranks.py"
    script.write_text(WRAPPER.format(repo=str(REPO), dump=str(dump)))
    # 1797 - 256 held-out digits in batches of 300: 6 batches, 3 per process, so 2 optimizer steps per epoch with 2
    # accumulation steps: 4 steps in 2 epochs, where a linear schedule must reach 0 exactly. An evaluation at steps
    # 2 and 4, its images and samples split across the two processes.
    args = ["--cpu", "--model_config_name_or_path", "unet.json", "--num_epochs", "2", "--train_batch_size", "300"]
    args += ["--gradient_accumulation_steps", "2", "--lr_scheduler", "linear", "--lr_warmup_steps", "0"]
    args += ["--eval_steps", "2", *SMALL_EVAL]
    run_training(workdir, [*args, "--checkpointing_steps", "2", "--output_dir", "two", *FAST], 2, script)
    output = workdir / "two"

    rank0, rank1 = torch.load(dump / "rank0.pt"), torch.load(dump / "rank1.pt")
    assert rank0.keys() == rank1.keys() and any(key.startswith("ema.") for key in rank0)
    for key in rank0:
        assert torch.equal(rank0[key], rank1[key]), key
    assert not torch.equal(rank0["ema.0"], rank0["unet.conv_in.weight"])  # the EMA is not the raw weights
    metrics = json.loads((dump / "metrics0.json").read_text())
    assert json.loads((dump / "metrics1.json").read_text()) == metrics  # every process gets the same numbers
    assert (metrics["num_images"], metrics["num_samples"]) == (4, 8) and math.isfinite(metrics["fid"])
    assert sorted(logged_scalars(output, "eval/bits_per_dim")) == [2, 4]

    state = trainer_state(output / "checkpoint-4")
    assert (state.global_step, state.epoch) == (4, 1)
    schedule = json.loads((output / "checkpoint-4" / "lr_scheduler.json").read_text())  # JSON: nothing pickled
    assert schedule["last_epoch"] == 4 and schedule["_last_lr"] == [0.0]
    # Every file once: rank 1 wrote only its own RNG state.
    files = sorted(str(p.relative_to(output)) for p in output.rglob("*") if p.is_file())
    checkpoint_files = ["ema.safetensors", "lr_scheduler.json", "manifest.json", "model.safetensors", "optimizer.bin"]
    checkpoint_files += ["random_states_0.pkl", "random_states_1.pkl", TRAINER_STATE_NAME]
    expected = [f"checkpoint-{step}/{name}" for step in (2, 4) for name in checkpoint_files]
    expected += [
        "README.md",
        "model_index.json",
        "samples.png",
        "samples/step-4.png",
        "scheduler/scheduler_config.json",
        "training_data.json",
    ]
    expected += ["unet/config.json", "unet/diffusion_pytorch_model.safetensors"]
    assert [f for f in files if not f.startswith("logs/")] == sorted(expected)
    assert len([f for f in files if "tfevents" in f]) == 2  # one writer: scalars and hparams
    assert_stock_pipeline_samples(output, channels=1)


@pytest.mark.slow
def test_two_cpu_processes_stream_an_image_folder(workdir, image_folder):
    dump = workdir / "streamed-ranks"
    dump.mkdir()
    script = workdir / "streamed_ranks.py"
    script.write_text(WRAPPER.format(repo=str(REPO), dump=str(dump)))
    # 12 images, 2 per process and step: the stream is read by the main process and its batches split between the two.
    args = ["--cpu", "--train_data_dir", str(image_folder), "--streaming", "--resolution", "8", "--random_flip"]
    args += ["--model_config_name_or_path", "unet.json", "--train_batch_size", "2", "--max_train_steps", "4"]
    result = run_training(workdir, [*args, "--output_dir", "streamed-two", *FAST], 2, script)
    assert "MULTI_CPU: 2 process(es)" in result.stderr and "Training 4 optimizer steps (? epochs)" in result.stderr
    rank0, rank1 = torch.load(dump / "rank0.pt"), torch.load(dump / "rank1.pt")
    for key in rank0:
        assert torch.equal(rank0[key], rank1[key]), key
    assert trainer_state(workdir / "streamed-two" / "checkpoint-4").global_step == 4
    assert_stock_pipeline_samples(workdir / "streamed-two", channels=3)


@pytest.mark.slow
@pytest.mark.skipif(torch.cuda.is_available(), reason="with a GPU, --multi_gpu forms a job of GPU processes")
def test_multi_process_launch_without_gpus_needs_cpu_and_says_so(workdir):
    args = ["--model_config_name_or_path", "unet.json", "--max_train_steps", "2", "--output_dir", "alone", *FAST]
    result = run_training(workdir, args, processes=2, check=False)
    assert result.returncode != 0
    assert "2 processes were launched but each one runs alone" in result.stderr and "add --cpu" in result.stderr
    assert not (workdir / "alone").exists()


PAUSE_IN_CHECKPOINT = """
import os, sys
sys.path.insert(0, {repo!r})
from accelerate import Accelerator

save_state = Accelerator.save_state


def paused_save_state(self, output_dir=None, **kwargs):
    result = save_state(self, output_dir, **kwargs)
    if os.path.basename(output_dir) == {pause_in!r}:  # files written, trainer_state.json and the rename not yet
        print("paused in", output_dir, flush=True)  # the test kills the run when it reads this line
        sys.stdin.read()  # wait for the kill; should the test die first, its end of the pipe closes and so do we
        raise SystemExit("the test that paused this run is gone")
    return result


Accelerator.save_state = paused_save_state
import train_ddpm

train_ddpm.main()
"""


@pytest.mark.slow
def test_resume_after_sigkill_mid_checkpoint_is_bitwise_exact(workdir, hub_layout_dataset, hub_run):
    """Killed while writing checkpoint-4, then resumed with `latest`: the broken checkpoint is skipped and removed,
    training resumes from checkpoint-2, and steps 3-4 give the same weights, EMA and optimizer state bit for bit as
    the uninterrupted `hub_run` (4 steps, crossing an epoch, with accumulation, flips and dropout)."""
    output, log = workdir / "killed", workdir / "killed-stderr.txt"
    script = workdir / "pause_in_checkpoint.py"
    script.write_text(PAUSE_IN_CHECKPOINT.format(repo=str(REPO), pause_in="checkpoint-4.tmp"))
    args = ["--dataset_name", str(hub_layout_dataset), *HUB_RUN, "--output_dir", str(output)]
    with open(log, "w") as stderr:
        process = subprocess.Popen(
            launch_command(script, args, processes=0),  # as hub_run, which it is compared with
            cwd=workdir,
            env=run_env(workdir),
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=stderr,
            start_new_session=True,
        )
    try:
        read_until(process.stdout, "paused in", log)  # the run says when it is inside checkpoint-4's save_state
    finally:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()
        process.stdin.close()
        process.stdout.close()
    assert (output / "checkpoint-4.tmp" / "model.safetensors").is_file()
    assert not (output / "checkpoint-4").exists()

    result = run_training(workdir, [*args, "--resume_from_checkpoint", "latest"], processes=0)
    assert "Skipping" in result.stderr and "checkpoint-4.tmp" in result.stderr
    assert "Resumed from" in result.stderr and "checkpoint-2: step 2" in result.stderr
    assert sorted(p.name for p in output.glob("checkpoint-*")) == ["checkpoint-2", "checkpoint-4"]
    resumed, uninterrupted = output / "checkpoint-4", hub_run / "checkpoint-4"
    for name in ("model.safetensors", "optimizer.bin", "ema.safetensors", "random_states_0.pkl"):
        assert (resumed / name).read_bytes() == (uninterrupted / name).read_bytes(), name  # weights, Adam, EMA, RNG
    export = Path("unet") / "diffusion_pytorch_model.safetensors"
    assert (output / export).read_bytes() == (hub_run / export).read_bytes()  # the exported EMA weights
    a, b = trainer_state(resumed), trainer_state(uninterrupted)
    assert (a.global_step, a.epoch, a.batches_in_epoch) == (b.global_step, b.epoch, b.batches_in_epoch) == (4, 1, 2)


@pytest.mark.slow
def test_sigterm_writes_a_checkpoint_and_exits_0(workdir):
    output = workdir / "terminated"
    args = ["--model_config_name_or_path", "unet.json", "--max_train_steps", "100000", "--checkpointing_steps", "3"]
    args += ["--train_batch_size", "8", "--output_dir", str(output), *FAST]
    process = subprocess.Popen(
        launch_command(REPO / "train_ddpm.py", args, processes=0),
        cwd=workdir,
        env=run_env(workdir),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    try:
        # The run's own log line says that checkpoint-3 is complete (written after the rename into place).
        stderr = read_until(process.stderr, f"Saved checkpoint {output / 'checkpoint-3'}")
        assert (output / "checkpoint-3" / TRAINER_STATE_NAME).is_file()
        process.send_signal(signal.SIGTERM)
        _, rest = process.communicate(timeout=RUN_TIMEOUT)  # a safety net: it exits after one more checkpoint
    finally:
        process.kill()
    stderr += rest.decode(errors="replace")
    assert process.returncode == 0, stderr[-3000:]
    assert "Stopped by SIGTERM" in stderr
    checkpoints = sorted(int(p.name.split("-")[1]) for p in output.glob("checkpoint-*"))
    last = output / f"checkpoint-{checkpoints[-1]}"
    assert checkpoints[-1] >= 3 and trainer_state(last).global_step == checkpoints[-1]
    assert not list(output.glob("*.tmp")) and not (output / "model_index.json").exists()


@pytest.mark.slow
@pytest.mark.fresh_process  # train_ddpm.main, in this process, builds an Accelerator
def test_non_finite_steps_are_skipped_and_counted_and_too_many_stop_the_run(workdir, monkeypatch, caplog):
    caplog.set_level(logging.INFO)
    output = workdir / "nan"
    loss, calls = train_ddpm.diffusion_loss, []

    def sometimes_nan(*args, **kwargs):
        calls.append(None)
        value = loss(*args, **kwargs)
        return value * float("nan") if len(calls) in (2, 3) or len(calls) >= 6 else value

    monkeypatch.setattr(train_ddpm, "diffusion_loss", sometimes_nan)
    monkeypatch.chdir(workdir)
    args = ["--model_config_name_or_path", "unet.json", "--max_train_steps", "20", "--checkpointing_steps", "4"]
    args += ["--max_nonfinite_steps", "3", "--train_batch_size", "8", "--output_dir", str(output), *FAST]
    with pytest.raises(SystemExit) as exited, one_thread():  # one thread, as the script runs (OMP_NUM_THREADS=1)
        train_ddpm.main(["--cpu", "--cache_dir", str(workdir / "in-process-cache"), *args])
    # Steps 2 and 3 skipped, 4 and 5 fine, 6 onwards skipped. The host learns of a step one step late (it never waits for
    # the device): the third in a row (step 8) stops the run after step 9, after a checkpoint of the weights of step 5
    # (the skipped steps never touched them), so that no work is lost. A SystemExit with a message: exit status 1.
    said = f"{caplog.text}\n{exited.value.code}"
    assert isinstance(exited.value.code, str)
    assert "Step 3: non-finite gradient (loss nan); step skipped (2 in a row, 2 in all)" in said
    assert "3 optimizer steps in a row had a non-finite loss or gradient (up to step 8); stopping at step 9" in said
    assert f"Resume with --resume_from_checkpoint {output / 'checkpoint-9'}" in said
    assert sorted(p.name for p in output.glob("checkpoint-*")) == ["checkpoint-4", "checkpoint-8", "checkpoint-9"]
    assert trainer_state(output / "checkpoint-4").skipped_nonfinite_steps == 2
    state = trainer_state(output / "checkpoint-9")
    assert (state.global_step, state.skipped_nonfinite_steps, state.consecutive_nonfinite_steps) == (9, 6, 4)
    eight, nine = (load_file(output / f"checkpoint-{step}" / "model.safetensors") for step in (8, 9))
    assert all(torch.equal(eight[name], nine[name]) for name in eight)  # steps 6-9 left the weights alone
    for step in (4, 8, 9):
        weights = load_file(output / f"checkpoint-{step}" / "model.safetensors")
        assert all(torch.isfinite(tensor).all() for tensor in weights.values())
        ema = load_file(output / f"checkpoint-{step}" / "ema.safetensors")
        assert ema and all(torch.isfinite(tensor).all() for tensor in ema.values())
    assert not (output / "model_index.json").exists()


# Clear errors (in this process: they happen before training starts) ------------------------------------------------
@pytest.fixture
def in_process(request, workdir, monkeypatch):
    """Run `train_ddpm.main` here, in `workdir`: in a test marked fresh_process (accelerate's state is process-wide)."""
    assert request.node.get_closest_marker("fresh_process"), "mark the test @pytest.mark.fresh_process"
    monkeypatch.chdir(workdir)
    return lambda *args: train_ddpm.main(["--cpu", "--cache_dir", str(workdir / "in-process-cache"), *args])


@pytest.mark.fresh_process
def test_error_names_the_corrupt_image(workdir, image_folder, in_process):
    broken = workdir / "broken-images"
    (broken / "a").mkdir(parents=True)
    for index, image in enumerate(random_images(3, (8, 8), seed=2)):
        image.save(broken / "a" / f"{index}.png")
    (broken / "a" / "truncated.png").write_bytes((broken / "a" / "0.png").read_bytes()[:40])
    with pytest.raises(SystemExit, match=r"Cannot decode the image .*truncated\.png"):
        in_process("--train_data_dir", str(broken), "--model_config_name_or_path", "unet.json", "--resolution", "8")


@pytest.mark.fresh_process
def test_error_lists_the_columns_when_the_image_column_is_missing(hub_layout_dataset, in_process):
    with pytest.raises(SystemExit, match=r"--image_column 'picture' is not a column.*\['img', 'label'\]"):
        in_process("--dataset_name", str(hub_layout_dataset), "--image_column", "picture", "--model_preset", "tiny")


@pytest.mark.fresh_process
def test_error_says_which_resolutions_the_model_takes(in_process):
    with pytest.raises(SystemExit, match=r"--resolution 6 does not fit 'tiny'.*multiple of 4.*4 and 8"):
        in_process("--model_preset", "tiny", "--resolution", "6")


def test_error_for_an_unknown_preset_lists_the_presets(capsys):
    with pytest.raises(SystemExit) as exit_info:
        parse_args(["--model_preset", "ddpm-huge"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "invalid choice: 'ddpm-huge'" in err and "ddpm-cifar10" in err and "tiny" in err


@pytest.mark.fresh_process
def test_error_for_an_unreachable_dataset_is_fast_and_says_what_to_do(in_process, connections):
    with pytest.raises(SystemExit, match=r"Dataset 'nobody/no-such-dataset' is not available.*--train_data_dir"):
        in_process("--dataset_name", "nobody/no-such-dataset", "--model_preset", "tiny", "--resolution", "8")
    assert connections == []  # fast: offline, not one connection attempted, so none retried


def _no_data(*args, **kwargs):
    raise AssertionError("the run reached the data")


def _earlier_run(output: Path) -> None:
    """An output folder as an earlier run leaves it: two complete checkpoints, a broken one, samples, an export."""
    for step in (500, 1000):
        (output / f"checkpoint-{step}").mkdir(parents=True)
        TrainerState(global_step=step).save(str(output / f"checkpoint-{step}" / TRAINER_STATE_NAME))
    (output / "checkpoint-1500.tmp").mkdir()
    (output / "samples").mkdir()
    (output / "samples" / "step-1000.png").write_bytes(b"png")
    (output / "model_index.json").write_text("{}")


@pytest.mark.fresh_process
def test_a_new_run_into_a_folder_with_checkpoints_stops_at_once_and_says_what_to_do(workdir, in_process, monkeypatch):
    output = workdir / "earlier"
    _earlier_run(output)
    before = sorted(output.rglob("*"))
    monkeypatch.setattr(train_ddpm, "load_pixels", _no_data)  # it stops before the data
    message = rf"'{output}' already holds 2 checkpoints .*checkpoint-1000.*--resume_from_checkpoint latest.*"
    with pytest.raises(SystemExit, match=message + "--overwrite_output_dir"):
        in_process("--model_config_name_or_path", "unet.json", "--output_dir", str(output), *FAST)
    assert sorted(output.rglob("*")) == before  # nothing written, nothing removed


@pytest.mark.fresh_process
def test_overwrite_output_dir_removes_the_old_checkpoints_before_training(workdir, in_process, monkeypatch):
    output = workdir / "overwritten"
    _earlier_run(output)
    seen = []

    def data_after_the_removal(*args, **kwargs):
        seen.append(sorted(path.name for path in output.iterdir() if path.name != LOCK_FILE_NAME))  # held by the run
        raise DatasetUnavailableError("stop here")

    monkeypatch.setattr(train_ddpm, "load_pixels", data_after_the_removal)
    with pytest.raises(SystemExit, match="stop here"):
        in_process("--model_config_name_or_path", "unet.json", "--output_dir", str(output), "--overwrite_output_dir")
    assert seen == [["model_index.json", "samples"]]  # only the checkpoint-* folders went, before the data


@pytest.mark.fresh_process
def test_an_unavailable_inception_network_fails_before_training(hub_layout_dataset, in_process, monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "no-weights"))
    monkeypatch.setattr(train_ddpm, "load_pixels", _no_data)
    args = ["--dataset_name", str(hub_layout_dataset), "--model_config_name_or_path", "unet.json", "--resolution", "8"]
    # Either message of evaluation.features: torch-fidelity does not import (here), or the weights are not cached.
    with pytest.raises(SystemExit, match=r"error: The Inception (feature extractor needs|weights are not cached)"):
        in_process(*args, "--eval_steps", "1000", "--output_dir", str(tmp_path / "out"))
    assert not (tmp_path / "out").exists()


# Flags -----------------------------------------------------------------------------------------------------------
def test_defaults_keep_the_peer_script_meanings_and_the_digits_run_has_its_own():
    peer = parse_args(["--dataset_name", "uoft-cs/cifar10"])
    assert (peer.resolution, peer.train_batch_size, peer.learning_rate, peer.lr_warmup_steps) == (64, 16, 1e-4, 500)
    assert (peer.lr_scheduler, peer.num_epochs, peer.adam_beta1, peer.adam_weight_decay) == ("cosine", 100, 0.95, 1e-6)
    assert (peer.save_images_epochs, peer.save_model_epochs, peer.checkpointing_steps) == (10, 10, 500)
    assert (peer.output_dir, peer.mixed_precision, peer.center_crop, peer.random_flip) == (
        "ddpm-model-64",
        "no",
        False,
        False,
    )
    assert (peer.ema_max_decay, peer.ema_power, peer.ema_inv_gamma) == (0.9999, 0.75, 1.0)
    assert (peer.seed, peer.max_grad_norm, peer.model_preset, peer.use_ema) == (0, 1.0, "ddpm-256", False)
    digits = parse_args([])
    assert (digits.model_preset, digits.resolution, digits.output_dir, digits.use_ema) == (
        "tiny",
        8,
        "ddpm-output",
        True,
    )
    assert digits.learning_rate == DIGITS_DEFAULTS["learning_rate"]
    assert parse_args(["--learning_rate", "3e-4"]).learning_rate == 3e-4  # a given flag always wins
    # The peer's --use_ema is a switch, off by default with a dataset (tests/test_peer_flags.py); on for the digits.
    assert parse_args(["--train_data_dir", "d", "--model_config_name_or_path", "c.json"]).use_ema is False
    assert parse_args(["--train_data_dir", "d", "--use_ema"]).use_ema is True
    assert parse_args(["--model_config_name_or_path", "c.json"]).use_ema is True
    assert parse_args(["--use_ema", "false"]).use_ema is False
    # Evaluation during training is off by default; its feature network follows the dataset.
    assert (digits.eval_steps, digits.eval_feature_extractor, peer.eval_feature_extractor) == (
        None,
        "digits",
        "inception",
    )
    assert (digits.eval_holdout_images, digits.eval_num_images, digits.eval_bpd_timesteps) == (256, 64, 50)
    assert digits.eval_num_samples == 256 and digits.eval_num_inference_steps == digits.ddpm_num_inference_steps
    assert parse_args(["--eval_steps", "0"]).eval_steps is None
    # The peer's --overwrite_output_dir does nothing; here it says what it removes.
    assert "its checkpoint-* folders are removed" in " ".join(make_parser().format_help().split())


def test_flags_come_from_a_yaml_file_and_the_token_is_never_saved(tmp_path):
    config = tmp_path / "run.yaml"
    config.write_text(
        textwrap.dedent("""
        dataset_name: uoft-cs/cifar10
        resolution: 32
        model_preset: ddpm-cifar10
        hub_token: hf_secret
    """)
    )
    args = parse_args([str(config)])
    assert (args.resolution, args.model_preset, args.hub_token) == (32, "ddpm-cifar10", "hf_secret")
    assert "hub_token" not in public_config(args) and "hf_secret" not in json.dumps(public_config(args))


def test_command_line_in_the_model_card_masks_the_token(monkeypatch):
    monkeypatch.setattr(
        sys, "argv", ["train_ddpm.py", "--hub_token", "hf_secret", "--hub-token=hf_other", "--seed", "1"]
    )
    line = train_ddpm.command_line()
    assert "hf_secret" not in line and "hf_other" not in line and "--seed 1" in line


def test_flag_conflicts_are_argument_errors(capsys):
    conflicts = [["--streaming"], ["--dataset_name", "a", "--train_data_dir", "b"], ["--train_batch_size", "0"]]
    conflicts += [["--eval_steps", "10", "--eval_split", "test"]]  # the embedded digits have no test split
    conflicts += [["--dataset_name", "a", "--streaming", "--max_train_steps", "9", "--eval_steps", "10"]]
    conflicts += [["--overwrite_output_dir", "--resume_from_checkpoint", "latest"]]
    for argv in conflicts:
        with pytest.raises(SystemExit) as exit_info:
            parse_args(argv)
        assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert (
        "--streaming needs --max_train_steps" in err
        and "not both" in err
        and "--train_batch_size 0 is out of range: it must be > 0." in err
    )
    assert "only a train split" in err and "--eval_steps with --streaming needs --eval_split" in err
    assert "--overwrite_output_dir removes the checkpoints" in err


# The loss ----------------------------------------------------------------------------------------------------------
def test_loss_targets_of_each_prediction_type():
    torch.manual_seed(0)
    x0, noise = torch.randn(4, 1, 8, 8), torch.randn(4, 1, 8, 8)
    t = torch.tensor([0, 10, 20, 49])
    for prediction_type in ("epsilon", "sample", "v_prediction"):
        scheduler = DDPMPaperScheduler(num_train_timesteps=50, prediction_type=prediction_type)
        xt = scheduler.add_noise(x0, noise, t)
        exact = {"epsilon": noise, "sample": x0, "v_prediction": scheduler.get_velocity(x0, noise, t)}[prediction_type]
        assert train_ddpm.diffusion_loss(scheduler, exact, x0, noise, xt, t).item() == pytest.approx(0, abs=1e-10)
    # x0 prediction is weighted by SNR(t): its loss equals the epsilon loss of the equivalent prediction.
    scheduler = DDPMPaperScheduler(num_train_timesteps=50, prediction_type="sample")
    xt = scheduler.add_noise(x0, noise, t)
    x0_guess = x0 + 0.1 * torch.randn_like(x0)
    eps_guess = scheduler.predict_eps_from_x0(xt, t, x0_guess)
    expected = torch.nn.functional.mse_loss(eps_guess, noise)
    assert train_ddpm.diffusion_loss(scheduler, x0_guess, x0, noise, xt, t).item() == pytest.approx(
        expected.item(), rel=1e-3
    )


def test_hybrid_loss_trains_the_variance_through_l_vlb_only():
    scheduler = DDPMPaperScheduler(num_train_timesteps=50, variance_type="learned_range")
    torch.manual_seed(0)
    x0, noise = torch.randn(4, 1, 8, 8).clamp(-1, 1), torch.randn(4, 1, 8, 8)
    t = torch.tensor([0, 10, 20, 49])
    xt = scheduler.add_noise(x0, noise, t)
    output = torch.randn(4, 2, 8, 8, requires_grad=True)
    train_ddpm.diffusion_loss(scheduler, output, x0, noise, xt, t).backward()
    mean_only = torch.autograd.grad(torch.nn.functional.mse_loss(output[:, :1], noise), output)[0]
    torch.testing.assert_close(output.grad[:, :1], mean_only[:, :1])  # stop-gradient: L_vlb leaves the mean alone
    assert output.grad[:, 1:].abs().sum() > 0
