"""Beyond one machine: resumes on another number of processes (2 -> 1, 1 -> 2, 2 nodes -> 1 node) continue the epoch
with none of its images twice and none skipped, and the step, LR schedule and EMA go on. Real launchers, real
processes on the CPU (gloo over loopback), a 26-image folder whose images carry their index in their pixels."""

import collections
import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from checkpoints.checkpointing import TRAINER_STATE_NAME, TrainerState, latest_checkpoint
from checkpoints.verify import verify_checkpoint

pytestmark = [pytest.mark.slow, pytest.mark.long]  # minutes each: `python -m pytest -m long`

REPO = Path(__file__).resolve().parents[1]
TIMEOUT = 180
NUM_IMAGES = 26
SMALL_UNET = {
    "_class_name": "UNet2DModel",
    "block_out_channels": [8, 16],
    "down_block_types": ["DownBlock2D", "AttnDownBlock2D"],
    "up_block_types": ["AttnUpBlock2D", "UpBlock2D"],
    "layers_per_block": 1,
    "norm_num_groups": 4,
    "attention_head_dim": None,
}
RUN = ["--cpu", "--model_config_name_or_path", "unet.json", "--resolution", "8", "--train_batch_size", "2"]
RUN += ["--ddpm_num_steps", "50", "--ddpm_num_inference_steps", "2", "--eval_batch_size", "2", "--use_ema"]
RUN += ["--lr_scheduler", "linear", "--lr_warmup_steps", "0", "--num_epochs", "3", "--checkpointing_steps", "1000"]

# train_ddpm.py that records, on each process, the index of every image it trains on (image i has all its pixels
# equal to 3 + 9 i), one line per batch: "<epoch> <index> <index> ...".
RECORDING = """
import faulthandler, os, signal, sys
faulthandler.register(signal.SIGUSR1)  # a hung process says where: kill -USR1
sys.path.insert(0, {repo!r})
import train_ddpm
from accelerate import PartialState

to_input, epochs = train_ddpm.images_to_model_input, []


def recorded(pixels, *args, **kwargs):
    rank = PartialState().process_index
    indices = [(int(value) - 3) // 9 for value in pixels.reshape(pixels.shape[0], -1)[:, 0]]
    with open(os.path.join({seen!r}, f"seen-{{rank}}.txt"), "a") as file:
        file.write(" ".join(map(str, [train_ddpm_epoch(), *indices])) + "\\n")
    return to_input(pixels, *args, **kwargs)


def train_ddpm_epoch():
    frame = sys._getframe(2)  # train(): its `epoch`
    return frame.f_locals["epoch"]


train_ddpm.images_to_model_input = recorded
train_ddpm.main()
"""


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("multinode")
    (folder / "unet.json").write_text(json.dumps(SMALL_UNET))
    images = folder / "images"
    images.mkdir()
    for index in range(NUM_IMAGES):
        Image.new("L", (8, 8), 3 + 9 * index).save(images / f"{index:02d}.png")
    return folder


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def environment(workdir: Path) -> dict[str, str]:
    return {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "HF_DATASETS_OFFLINE": "1",
        "HF_DATASETS_CACHE": str(workdir / "datasets-cache"),
        "OMP_NUM_THREADS": "1",
        "CUDA_VISIBLE_DEVICES": "",
        "PYTHONUNBUFFERED": "1",
        "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]),
    }


def accelerate_command(script: Path, args: list[str], processes: int, nodes: int = 1, rank: int = 0, port=0):
    """`accelerate launch` of `processes` CPU processes in all, over `nodes` nodes (this one `rank`), or 1 process."""
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--mixed_precision", "no", "--dynamo_backend", "no"]
    if processes > 1:
        launch += ["--multi_gpu", "--num_processes", str(processes), "--num_machines", str(nodes)]
        launch += ["--machine_rank", str(rank), "--main_process_ip", "127.0.0.1", "--main_process_port", str(port)]
    else:
        launch += ["--num_processes", "1", "--num_machines", "1"]
    return [*launch, str(script), *args]


def start(command: list[str], workdir: Path, log: Path) -> subprocess.Popen:
    with open(log, "w") as out:
        return subprocess.Popen(command, cwd=workdir, env=environment(workdir), stdout=out, stderr=subprocess.STDOUT)


def run(workdir: Path, script: Path, args: list[str], processes: int, nodes: int = 1, name: str = "run") -> str:
    """Run to the end: `nodes` launchers (each with its share of `processes`) on loopback; all must exit 0."""
    port = free_port()
    logs = [workdir / f"{name}-node{rank}.log" for rank in range(nodes)]
    launched = [
        start(accelerate_command(script, args, processes, nodes, rank, port), workdir, log)
        for rank, log in enumerate(logs)
    ]
    codes = [process.wait(timeout=TIMEOUT) for process in launched]
    output = "\n".join(log.read_text() for log in logs)
    assert codes == [0] * nodes, f"{name}: exit statuses {codes}:\n{output[-6000:]}"
    return output


def recording_script(workdir: Path, seen: Path) -> Path:
    seen.mkdir()
    script = seen / "recording.py"
    script.write_text(RECORDING.format(repo=str(REPO), seen=str(seen)))
    return script


def seen_in_epoch(*folders: Path, epoch: int = 0) -> collections.Counter:
    """How often each image index was trained on in `epoch`, over every process of the runs that wrote `folders`."""
    seen = collections.Counter()
    for folder in folders:
        for file in folder.glob("seen-*.txt"):
            for line in file.read_text().splitlines():
                numbers = [int(word) for word in line.split()]
                if numbers[0] == epoch:
                    seen.update(numbers[1:])
    return seen


def trainer_state(path: Path) -> TrainerState:
    return TrainerState.load(str(path / TRAINER_STATE_NAME))


def check_continued(output: Path, step: int, first_step: int) -> None:
    """The checkpoint of `step` continues the run's counts: optimizer steps, LR schedule, EMA steps."""
    checkpoint = output / f"checkpoint-{step}"
    assert trainer_state(checkpoint).global_step == step
    schedule = json.loads((checkpoint / "lr_scheduler.json").read_text())
    assert schedule["last_epoch"] == step
    from safetensors import safe_open

    with safe_open(str(checkpoint / "ema.safetensors"), framework="pt") as file:
        ema = json.loads(file.metadata()["state"])
    assert ema["num_updates"] == step, ema


@pytest.mark.slow
@pytest.mark.parametrize(("before", "nodes", "after"), [(2, 1, 1), (1, 1, 2), (2, 2, 1)])
def test_a_resume_on_another_number_of_processes_sees_each_image_of_the_epoch_once(workdir, before, nodes, after):
    """
    A run on `before` processes (on `nodes` nodes) stops mid-epoch 0 (3 steps: 12 or 6 of the 26 images); its resume
    on `after` processes (one node) trains on exactly the rest of the epoch's order: over both runs, every image of
    epoch 0 once. 6 images are not a whole number of batches of the 2-process run (4 images): a skip of whole batches
    cannot express it.
    """
    name = f"{before}-on-{nodes}-to-{after}"
    output = workdir / name
    first, second = workdir / f"seen-{name}-first", workdir / f"seen-{name}-second"
    args = [*RUN, "--train_data_dir", str(workdir / "images"), "--output_dir", str(output)]
    run(workdir, recording_script(workdir, first), [*args, "--max_train_steps", "3"], before, nodes, f"{name}-first")
    consumed = 3 * 2 * before
    state = trainer_state(output / "checkpoint-3")
    assert (state.epoch, state.images_in_epoch, state.num_processes) == (0, consumed, before)
    assert sum(seen_in_epoch(first).values()) == consumed

    # The rest of epoch 0, then all of epoch 1, on `after` processes.
    steps_left = (NUM_IMAGES - consumed) // (2 * after)
    end = 3 + steps_left + 2
    log = run(workdir, recording_script(workdir, second), [*args, "--resume_from_checkpoint", "latest",
              "--max_train_steps", str(end)], after, name=f"{name}-second")  # fmt: skip
    line = f"Resuming on {after} process(es) from a checkpoint written by {before}"
    assert log.count(line) == 1, log[-4000:]
    assert seen_in_epoch(first, second) == collections.Counter(range(NUM_IMAGES))  # the epoch once
    assert sum(seen_in_epoch(second, epoch=1).values()) == 2 * 2 * after  # and the next epoch goes on from its start
    check_continued(output, end, 3)


# train_ddpm.py with every batch 0.4 s slower (a sleep: the numbers are those of train_ddpm.py), so that a signal
# lands mid-training.
SLOW = """
import faulthandler, signal, sys, time
faulthandler.register(signal.SIGUSR1)
sys.path.insert(0, {repo!r})
import train_ddpm

to_input = train_ddpm.images_to_model_input


def slow(*args, **kwargs):
    time.sleep(0.4)
    return to_input(*args, **kwargs)


train_ddpm.images_to_model_input = slow
train_ddpm.main()
"""
STEPS = 8


def torchrun_command(script: Path, args: list[str], nodes: int, rank: int, port: int) -> list[str]:
    launch = [sys.executable, "-m", "torch.distributed.run", "--nnodes", str(nodes), "--node_rank", str(rank)]
    launch += ["--master_addr", "127.0.0.1", "--master_port", str(port), "--nproc_per_node", "1"]
    return [*launch, str(script), *args]


def launch_nodes(workdir: Path, launcher: str, script: Path, args: list[str], name: str) -> list[subprocess.Popen]:
    """Two nodes of one process each on loopback, each node's launcher in a process group of its own."""
    port, launched = free_port(), []
    for rank in range(2):
        if launcher == "accelerate":
            command = accelerate_command(script, args, 2, 2, rank, port)
        else:
            command = torchrun_command(script, args, 2, rank, port)
        with open(workdir / f"{name}-node{rank}.log", "w") as out:
            launched.append(
                subprocess.Popen(
                    command, cwd=workdir, env=environment(workdir), stdout=out, stderr=subprocess.STDOUT,
                    start_new_session=True,
                )
            )  # fmt: skip
    return launched


def logs(workdir: Path, name: str) -> str:
    return "\n".join((workdir / f"{name}-node{rank}.log").read_text() for rank in range(2))


def wait_for(path: Path, processes: list[subprocess.Popen], workdir: Path, name: str) -> None:
    """Until `path` exists (the run reached a point); fails if a node ended before."""
    deadline = time.monotonic() + TIMEOUT
    while not path.exists():
        assert all(process.poll() is None for process in processes), logs(workdir, name)[-6000:]
        assert time.monotonic() < deadline, logs(workdir, name)[-6000:]
        time.sleep(0.1)


def wait_all(processes: list[subprocess.Popen], workdir: Path, name: str, limit: float) -> tuple[list[int], float]:
    """The exit statuses of `processes` and the seconds until the last ended; fails after `limit` s (kills them)."""
    began = time.monotonic()
    try:
        codes = [process.wait(timeout=max(0.1, limit - (time.monotonic() - began))) for process in processes]
    except subprocess.TimeoutExpired:
        for process in processes:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGKILL)
        raise AssertionError(f"not every node ended within {limit} s:\n{logs(workdir, name)[-6000:]}") from None
    return codes, time.monotonic() - began


def final_weights(output: Path) -> dict:
    tensors = load_file(output / f"checkpoint-{STEPS}" / "model.safetensors")
    tensors.update({f"ema.{k}": v for k, v in load_file(output / f"checkpoint-{STEPS}" / "ema.safetensors").items()})
    return tensors


# The status of the launcher that got the SIGTERM: accelerate launch exits 143; torchrun lets its SignalException end
# it with a traceback, status 1 (its own behaviour, whatever its child does).
SIGNALLED_LAUNCHER_STATUS = {"accelerate": 143, "torchrun": 1}


@pytest.mark.slow
@pytest.mark.parametrize("launcher", ["accelerate", "torchrun"])
def test_two_nodes_stopped_by_sigterm_to_one_node_resume_bit_for_bit(workdir, launcher):
    """
    Two nodes (one process each) on loopback; SIGTERM to node 1's launcher after the checkpoint of step 2: both nodes
    stop at the same step with a checkpoint that verifies, every launcher ends within 60 s (node 0's with status 0,
    node 1's with its launcher's status for a signal), each node's log says why it stopped, and the resume on two
    nodes ends with the weights (and EMA) of the uninterrupted two-node run, bit for bit.
    """
    script = workdir / "slow.py"
    script.write_text(SLOW.format(repo=str(REPO)))
    args = [*RUN, "--train_data_dir", str(workdir / "images"), "--max_train_steps", str(STEPS)]
    args += ["--checkpointing_steps", "2", "--save_images_epochs", "100", "--save_model_epochs", "100"]
    whole, stopped = workdir / f"{launcher}-whole", workdir / f"{launcher}-stopped"

    nodes = launch_nodes(workdir, launcher, script, [*args, "--output_dir", str(whole)], f"{launcher}-whole")
    codes, _ = wait_all(nodes, workdir, f"{launcher}-whole", TIMEOUT)
    assert codes == [0, 0], logs(workdir, f"{launcher}-whole")[-6000:]

    name = f"{launcher}-stopped"
    nodes = launch_nodes(workdir, launcher, script, [*args, "--output_dir", str(stopped)], name)
    wait_for(stopped / "checkpoint-2" / TRAINER_STATE_NAME, nodes, workdir, name)
    nodes[1].send_signal(signal.SIGTERM)  # node 1's launcher only (a scheduler stopping one node)
    codes, seconds = wait_all(nodes, workdir, name, 60)
    print(f"{launcher}: SIGTERM to node 1's launcher: exit statuses {codes}, all ended after {seconds:.1f} s")
    output = logs(workdir, name)
    assert codes == [0, SIGNALLED_LAUNCHER_STATUS[launcher]], output[-6000:]
    newest = latest_checkpoint(str(stopped))
    step = trainer_state(Path(newest)).global_step
    node0, node1 = ((workdir / f"{name}-node{rank}.log").read_text() for rank in range(2))
    assert 2 <= step < STEPS, output[-6000:]
    assert f"Stopped by a signal to another process at step {step}" in node0, node0[-4000:]
    assert f"Stopped by SIGTERM at step {step}" in node1, node1[-4000:]
    verify_checkpoint(newest)  # intact: every file as its manifest says

    nodes = launch_nodes(workdir, launcher, script, [*args, "--output_dir", str(stopped), "--resume_from_checkpoint",
                         "latest"], f"{launcher}-resumed")  # fmt: skip
    codes, _ = wait_all(nodes, workdir, f"{launcher}-resumed", TIMEOUT)
    assert codes == [0, 0], logs(workdir, f"{launcher}-resumed")[-6000:]
    expected, got = final_weights(whole), final_weights(stopped)
    assert expected.keys() == got.keys()
    for key in expected:
        assert torch.equal(expected[key], got[key]), key


@pytest.mark.slow
@pytest.mark.parametrize("launcher", ["accelerate", "torchrun"])
def test_a_process_killed_on_one_node_ends_the_job_on_every_node(workdir, launcher):
    """
    SIGKILL to node 1's training process after the checkpoint of step 2: every node's launcher ends, with an error,
    within 60 s (not the hour of the distributed timeout), and the newest checkpoint verifies.
    """
    script = workdir / "slow.py"
    script.write_text(SLOW.format(repo=str(REPO)))
    name, output = f"{launcher}-killed", workdir / f"{launcher}-killed"
    args = [*RUN, "--train_data_dir", str(workdir / "images"), "--max_train_steps", str(STEPS)]
    args += ["--checkpointing_steps", "2", "--output_dir", str(output)]
    nodes = launch_nodes(workdir, launcher, script, args, name)
    wait_for(output / "checkpoint-2" / TRAINER_STATE_NAME, nodes, workdir, name)
    child = psutil.Process(nodes[1].pid).children(recursive=True)
    workers = [process for process in child if "slow.py" in " ".join(process.cmdline())]
    assert len(workers) == 1, child
    workers[0].kill()
    codes, seconds = wait_all(nodes, workdir, name, 60)
    print(f"{launcher}: SIGKILL to node 1's process: exit statuses {codes}, all ended after {seconds:.1f} s")
    assert all(code != 0 for code in codes), logs(workdir, name)[-6000:]
    verify_checkpoint(latest_checkpoint(str(output)))
