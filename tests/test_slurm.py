"""The Slurm script of docs/cluster.md on a real one-host Slurm cluster started by the test: the job trains past a
checkpoint, gets the SIGUSR1 that `#SBATCH --signal=B:USR1@...` sends before the time limit, writes a stop
checkpoint, requeues itself, and the requeued run resumes from that checkpoint and trains to the end; a job ended
with a plain `scancel` writes its checkpoint and stays cancelled.

Needs Debian's slurm-wlm (slurmctld, slurmd, munge) and root (slurmd starts jobs as their user)."""

import os
import re
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

import pytest

from checkpoints.checkpointing import TRAINER_STATE_NAME, TrainerState

pytestmark = [pytest.mark.slow, pytest.mark.long]  # minutes each: `python -m pytest -m long`

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "docs" / "slurm" / "train_ddpm.sbatch"
PAGE = REPO / "docs" / "cluster.md"
START_TIMEOUT = 60  # the daemons up, the node idle
RUN_TIMEOUT = 300  # each wait on the job
MAX_STEPS, EVERY = 200, 20
CRED_EXPIRE = 10  # s: how long a requeued job waits before it may start again (120 by default)
TRAIN = ["--cpu", "--model_preset", "tiny", "--train_batch_size", "8", "--ddpm_num_steps", "50"]
TRAIN += ["--ddpm_num_inference_steps", "2", "--eval_batch_size", "2"]
TRAIN += ["--checkpointing_steps", str(EVERY), "--max_train_steps", str(MAX_STEPS)]


def test_the_page_shows_the_script_that_is_tested():
    """docs/cluster.md holds docs/slurm/train_ddpm.sbatch word for word: the page cannot drift from the file."""
    blocks = re.findall(r"^```bash\n(.*?)^```", PAGE.read_text(), flags=re.M | re.S)
    assert SCRIPT.read_text() in blocks


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("", 0))
        return sock.getsockname()[1]


def _wait(what: str, done, timeout: float, why=lambda: "", ended=lambda: False):
    """Poll `done()` until it returns something true; fail naming `what` (and `why()`) after `timeout` s, or as soon
    as `ended()` says it never will."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        result = done()
        if result:
            return result
        if ended():
            raise AssertionError(f"the job ended before {what}\n{why()}")
        time.sleep(0.2)
    raise AssertionError(f"{timeout} s passed before {what}\n{why()}")


class Cluster:
    """munged, slurmctld and slurmd of one node (this host), with every file under `folder`."""

    def __init__(self, folder: Path):
        self.folder = folder
        self.node = socket.gethostname().split(".")[0]  # `hostname -s`: the name slurmd registers under
        self.partition = "test"
        self.conf = folder / "slurm.conf"
        self.env = {**os.environ, "SLURM_CONF": str(self.conf)}
        self.daemons: list[subprocess.Popen] = []
        self.munge_pid: int | None = None

    def start(self) -> None:
        folder, munge = self.folder, self.folder / "munge"
        for name in ("state", "spool", "log"):
            (folder / name).mkdir()
        munge.mkdir(mode=0o700)
        key = munge / "munge.key"
        key.write_bytes(os.urandom(1024))
        key.chmod(0o400)
        socket_path = munge / "socket"
        subprocess.run(
            ["munged", "--force", f"--socket={socket_path}", f"--key-file={key}", f"--pid-file={munge / 'pid'}",
             f"--log-file={munge / 'log'}", f"--seed-file={munge / 'seed'}"],
            check=True, timeout=30,
        )  # fmt: skip
        self.munge_pid = int(_wait("munged wrote its pid", lambda: _read(munge / "pid").strip(), 10))
        # A requeued job may start cred_expire s after the requeue, at the scheduler's next pass: sched_interval
        # (60 s by default) and bf_interval (30 s) make that 1 s.
        self.conf.write_text(
            f"""ClusterName=test
SlurmctldHost={self.node}
SlurmctldPort={_free_port()}
SlurmdPort={_free_port()}
SlurmUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket={socket_path},cred_expire={CRED_EXPIRE}
StateSaveLocation={folder / "state"}
SlurmdSpoolDir={folder / "spool"}
SlurmctldPidFile={folder / "slurmctld.pid"}
SlurmdPidFile={folder / "slurmd.pid"}
SlurmctldLogFile={folder / "log" / "slurmctld.log"}
SlurmdLogFile={folder / "log" / "slurmd.log"}
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
MpiDefault=none
SwitchType=switch/none
ReturnToService=2
MinJobAge=600
SchedulerParameters=bf_interval=1,sched_interval=1
NodeName={self.node} CPUs=2 State=UNKNOWN
PartitionName={self.partition} Nodes={self.node} Default=YES MaxTime=INFINITE State=UP
"""
        )
        for daemon in (["slurmctld", "-D"], ["slurmd", "-D", "-N", self.node]):
            out = (folder / "log" / f"{daemon[0]}.out").open("wb")
            self.daemons.append(subprocess.Popen(daemon, env=self.env, stdout=out, stderr=subprocess.STDOUT))
        _wait(
            "the node was idle",
            lambda: self.run("sinfo", "-h", "-o", "%T", check=False).stdout.strip() == "idle",
            START_TIMEOUT,
            self.logs,
        )

    def run(self, *command: str, check=True, env=None, cwd=None) -> subprocess.CompletedProcess:
        result = subprocess.run(command, env=env or self.env, cwd=cwd, capture_output=True, text=True, timeout=30)
        if check and result.returncode != 0:
            raise AssertionError(f"{command} failed ({result.returncode}): {result.stderr}\n{self.logs()}")
        return result

    def job(self, job_id: str) -> dict[str, str]:
        """`scontrol show job`'s fields (JobState, Restarts, ExitCode, ...)."""
        text = self.run("scontrol", "show", "job", job_id, check=False).stdout
        return dict(re.findall(r"(\w+)=(\S*)", text))

    def logs(self) -> str:
        return "\n".join(f"--- {path.name}\n{_read(path)[-2000:]}" for path in sorted((self.folder / "log").iterdir()))

    def stop(self) -> None:
        """Cancel every job (its processes end with it), then stop the daemons; each step bounded in time."""
        if self.daemons and self.daemons[0].poll() is None:
            self.run("scancel", "--partition", self.partition, check=False)
            try:
                _wait("the jobs ended", lambda: not self.run("squeue", "-h", check=False).stdout.strip(), 60)
            except AssertionError:
                pass
        for daemon in reversed(self.daemons):
            daemon.terminate()
            try:
                daemon.wait(15)
            except subprocess.TimeoutExpired:
                daemon.kill()
                daemon.wait(15)
        if self.munge_pid is not None:
            try:
                os.kill(self.munge_pid, signal.SIGTERM)
            except ProcessLookupError:
                pass


def _read(path: Path) -> str:
    try:
        return path.read_text(errors="replace")
    except FileNotFoundError:
        return ""


@pytest.fixture
def cluster(tmp_path):
    missing = [name for name in ("slurmctld", "slurmd", "munged", "sbatch") if shutil.which(name) is None]
    if "slurmctld" in missing:
        pytest.skip("slurmctld not installed: apt-get install slurm-wlm")
    if missing:
        pytest.skip(f"{', '.join(missing)} not installed: apt-get install slurm-wlm")
    if os.geteuid() != 0:
        pytest.skip("a test Slurm cluster needs root (slurmd)")
    cluster = Cluster(tmp_path / "slurm")
    cluster.folder.mkdir()
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.stop()


def _submit(cluster: Cluster, output: Path, log: Path) -> str:
    """sbatch the docs' script as it is; only what this cluster lacks is overridden on sbatch's command line."""
    env = {
        **cluster.env,
        "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]),
        "HF_HUB_OFFLINE": "1",
        "HF_DATASETS_OFFLINE": "1",
        "OMP_NUM_THREADS": "1",
        "CUDA_VISIBLE_DEVICES": "",
        "MAIN_PORT": str(_free_port()),
    }
    options = [f"--partition={cluster.partition}", "--nodes=1", "--gpus-per-node=0", "--cpus-per-task=2"]
    options += ["--time=30", f"--output={log}"]
    args = [*TRAIN, "--output_dir", str(output)]
    submitted = cluster.run("sbatch", "--parsable", *options, str(SCRIPT), *args, env=env, cwd=REPO)
    return submitted.stdout.strip().split(";")[0]


@pytest.mark.slow
def test_a_job_signalled_before_its_time_limit_checkpoints_requeues_itself_and_finishes_and_scancel_ends_one(
    cluster, tmp_path
):
    output, log = tmp_path / "ddpm", tmp_path / "job.log"
    job = _submit(cluster, output, log)

    def until(what: str, done, log=log, job=job):
        why = lambda: f"{_read(log)[-4000:]}\n{cluster.job(job)}\n{cluster.logs()}"  # noqa: E731
        ended = lambda: cluster.job(job).get("JobState") in ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT")  # noqa: E731
        return _wait(what, done, RUN_TIMEOUT, why, ended)

    until(f"checkpoint-{EVERY} was saved", lambda: f"Saved checkpoint {output / f'checkpoint-{EVERY}'}" in _read(log))
    # What `#SBATCH --signal=B:USR1@300` does 300 s before the time limit: SIGUSR1 to the batch shell only.
    signalled = time.monotonic()
    cluster.run("scancel", "--batch", "--signal=USR1", job)
    stop_step = int(until("the run stopped", lambda: re.search(r"Stopped by SIGTERM at step (\d+)", _read(log)))[1])
    assert EVERY <= stop_step < MAX_STEPS
    until("the script requeued the job", lambda: "after SIGUSR1; requeueing" in _read(log))
    stop_checkpoint = output / f"checkpoint-{stop_step}"
    assert TrainerState.load(str(stop_checkpoint / TRAINER_STATE_NAME)).global_step == stop_step
    assert not (output / "model_index.json").exists()  # no export: the run stopped, it did not finish
    assert cluster.job(job)["Restarts"] == "1"

    until("the requeued run resumed", lambda: f"Resumed from {stop_checkpoint}:" in _read(log))
    resume_seconds = time.monotonic() - signalled
    finished = lambda: cluster.job(job).get("JobState") in ("COMPLETED", "FAILED")  # noqa: E731
    _wait("the job ended", finished, RUN_TIMEOUT, lambda: _read(log))
    state, text = cluster.job(job), _read(log)
    assert (state["JobState"], state["ExitCode"], state["Restarts"]) == ("COMPLETED", "0:0", "1"), text[-4000:]
    assert "run 2:" in text and "run 3:" not in text
    assert f"Exported the pipeline (step {MAX_STEPS}," in text
    assert (output / "model_index.json").exists() and (output / "unet").is_dir()
    assert TrainerState.load(str(output / f"checkpoint-{MAX_STEPS}" / TRAINER_STATE_NAME)).global_step == MAX_STEPS
    print(f"from the signal to the resume of the requeued run: {resume_seconds:.1f} s")

    # `scancel <job>` (SIGTERM to the batch shell and the steps) stops the training with a checkpoint, and the job
    # stays cancelled: the script requeues on SIGUSR1 only.
    output, log = tmp_path / "cancelled", tmp_path / "cancelled.log"
    job = _submit(cluster, output, log)
    until(
        f"checkpoint-{EVERY} was saved", lambda: f"checkpoint {output / f'checkpoint-{EVERY}'}" in _read(log), log, job
    )
    cluster.run("scancel", job)
    stopped = lambda: re.search(r"Stopped by SIGTERM at step (\d+)", _read(log))  # noqa: E731
    stop_step = int(_wait("the run stopped", stopped, RUN_TIMEOUT, lambda: _read(log))[1])  # the job is CANCELLED now
    assert TrainerState.load(str(output / f"checkpoint-{stop_step}" / TRAINER_STATE_NAME)).global_step == stop_step
    _wait("the script ended", lambda: "training ended" in _read(log), RUN_TIMEOUT, lambda: _read(log))
    time.sleep(CRED_EXPIRE + 3)  # a requeued job would be running again by now
    state, text = cluster.job(job), _read(log)
    assert (state["JobState"], state["Restarts"]) == ("CANCELLED", "0"), text[-4000:]
    assert "requeueing" not in text and "run 2:" not in text
