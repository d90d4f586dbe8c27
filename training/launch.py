"""A check both scripts run right after building their `Accelerator`."""

import os

from accelerate import Accelerator


class LaunchError(RuntimeError):
    """The processes `accelerate launch` started do not form one job."""


def ensure_one_job(accelerator: Accelerator, script: str, cpu_flag: str) -> None:
    """
    `accelerate launch --multi_gpu --num_processes N` on a machine without GPUs starts N processes that each run
    alone (no process group), so each would do all the work and write the same files: stop them with what to add.
    """
    launched = int(os.environ.get("WORLD_SIZE", "1"))
    if launched > accelerator.num_processes:
        raise LaunchError(
            f"{launched} processes were launched but each one runs alone ({accelerator.distributed_type}), so they "
            f"would all do the same work and write the same files. On a machine without GPUs, add {cpu_flag} to run "
            f"them as one job (gloo): accelerate launch --multi_gpu --num_processes N {script} {cpu_flag} ..."
        )
