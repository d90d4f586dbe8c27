"""A check both scripts run right after building their `Accelerator`, and the last act of a run whose node's launcher
got a stop signal (`arrive_for_stopped_launcher`)."""

import datetime
import logging
import os

from accelerate import Accelerator

logger = logging.getLogger(__name__)


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


def arrive_for_stopped_launcher() -> bool:
    """
    On the node whose launcher got the stop signal, after this process's stop checkpoint and teardown: check in at
    the torch elastic agents' exit barrier in place of this node's agent (`accelerate launch` and `torchrun` with
    `--master_addr/--master_port`: the static rendezvous). That agent exits on the signal without checking in, and the
    agent of every other node, its own processes done, would otherwise wait the barrier's 300 s before it exits (0).
    Local rank 0 only; whatever fails (another rendezvous, the store gone, a torch without these helpers) is logged
    and ignored. A signal to this process alone (its agent checks in too) lets the barrier count one node more: the
    agents pass it as soon as the others' processes are done, as they are after an agreed stop. Returns whether it
    checked in.
    """
    if "TORCHELASTIC_RUN_ID" not in os.environ or os.environ.get("LOCAL_RANK", "0") != "0":
        return False
    try:
        from torch.distributed import PrefixStore, TCPStore
        from torch.distributed.elastic.agent.server.api import _TERMINAL_STATE_SYNC_ID
        from torch.distributed.elastic.utils.store import _barrier_nonblocking

        store = TCPStore(
            os.environ["MASTER_ADDR"],
            int(os.environ["MASTER_PORT"]),
            is_master=False,
            timeout=datetime.timedelta(seconds=5),
            wait_for_workers=False,
        )
        store = PrefixStore(os.environ["TORCHELASTIC_RUN_ID"], store)  # the static rendezvous's agent store
        _barrier_nonblocking(store, int(os.environ["GROUP_WORLD_SIZE"]), _TERMINAL_STATE_SYNC_ID)
    except Exception as error:  # noqa: BLE001 - at the very end of a stopped run: never a reason to fail it
        logger.info("Could not check in at the launchers' exit barrier for this node's launcher: %s", error)
        return False
    return True
