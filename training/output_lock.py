"""One run per output folder: the main process holds an OS lock (`flock`) on a file inside it for the whole run, which
the OS releases however the run ends; a second run stops within seconds naming the PID and host that hold it. The
lock file is removed at the end and is never exported or pushed."""

from __future__ import annotations

import errno
import fcntl
import json
import os
import socket
import time
from datetime import datetime, timezone

LOCK_FILE_NAME = ".train_ddpm.lock"
_READ_HOLDER_SECONDS = 2.0  # how long to wait for the holder to write its PID and host after taking the lock


class OutputDirLockedError(RuntimeError):
    """Another run holds the output folder (or its lock cannot be taken)."""


def _describe_holder(path: str) -> str:
    """'PID 123 on host node-1 (since 12:00:00 UTC)' from the lock file, or what is known."""
    deadline = time.monotonic() + _READ_HOLDER_SECONDS
    while True:
        try:
            with open(path, encoding="utf-8") as file:
                holder = json.loads(file.read() or "null")
        except (OSError, ValueError):
            holder = None
        if isinstance(holder, dict) or time.monotonic() > deadline:
            break
        time.sleep(0.05)  # the holder has the lock but has not written who it is yet
    if not isinstance(holder, dict):
        return "a process whose PID and host could not be read"
    return f"PID {holder.get('pid')} on host {holder.get('host')} (since {holder.get('since')})"


class OutputDirLock:
    r"""
    An exclusive, non-blocking lock on `output_dir`, held through an open file description of `LOCK_FILE_NAME`.

    `acquire` creates the folder if needed; `release` unlinks the lock file (while still holding its lock, so that a
    process that opened the old file notices, see `acquire`) and removes the folder if `acquire` created it and it is
    empty.
    """

    def __init__(self, output_dir: str):
        self.output_dir = output_dir
        self.path = os.path.join(output_dir, LOCK_FILE_NAME)
        self._fd: int | None = None
        self._created: list[str] = []

    @property
    def held(self) -> bool:
        return self._fd is not None

    def _make_dirs(self) -> None:
        missing, folder = [], os.path.abspath(self.output_dir)
        while not os.path.isdir(folder):
            missing.append(folder)
            parent = os.path.dirname(folder)
            if parent == folder:
                break
            folder = parent
        os.makedirs(self.output_dir, exist_ok=True)
        self._created = self._created or missing  # innermost first

    def acquire(self) -> None:
        """
        Raises:
            `OutputDirLockedError`: another process holds the lock (the message names its PID and host), or the lock
            file cannot be created.
        """
        if self._fd is not None:
            return
        for _ in range(100):  # retries only while a releasing holder unlinks the file under us
            try:
                self._make_dirs()
                fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
            except FileNotFoundError:
                continue  # the folder was removed by a run that just ended
            except OSError as error:
                raise OutputDirLockedError(
                    f"Cannot create the lock file {self.path} of --output_dir: {error.strerror}."
                ) from None
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as error:
                os.close(fd)
                if error.errno not in (errno.EAGAIN, errno.EACCES, errno.EWOULDBLOCK):
                    raise OutputDirLockedError(
                        f"Cannot lock {self.path} (the file system of --output_dir may not support locks: "
                        f"{error.strerror})."
                    ) from None
                raise OutputDirLockedError(
                    f"Another training run holds the output folder '{self.output_dir}': "
                    f"{_describe_holder(self.path)}. Wait for it to end or stop it, or pass another --output_dir "
                    "(two runs in one folder would overwrite each other's checkpoints and exports)."
                ) from None
            try:
                same_file = os.fstat(fd).st_ino == os.stat(self.path).st_ino
            except FileNotFoundError:
                same_file = False
            if not same_file:  # the previous holder unlinked the file between our open and our lock: try again
                os.close(fd)
                continue
            holder = {
                "pid": os.getpid(),
                "host": socket.gethostname(),
                "since": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC"),
            }
            os.ftruncate(fd, 0)
            os.pwrite(fd, json.dumps(holder).encode() + b"\n", 0)
            self._fd = fd
            return
        raise OutputDirLockedError(f"Cannot take the lock {self.path}: it keeps being removed by other runs.")

    def release(self) -> None:
        if self._fd is None:
            return
        try:
            os.unlink(self.path)
        except OSError:
            pass
        os.close(self._fd)  # releases the lock
        self._fd = None
        for folder in self._created:  # only folders this run created, and only while empty
            try:
                os.rmdir(folder)
            except OSError:
                break
        self._created = []

    def __enter__(self) -> OutputDirLock:
        self.acquire()
        return self

    def __exit__(self, *exc_info) -> None:
        self.release()


_held: list[OutputDirLock] = []


def lock_output_dir(accelerator, output_dir: str) -> OutputDirLock | None:
    r"""
    Lock `output_dir` for this run. Every process calls it: the main process takes the lock, then tells the others
    whether it got it, so that every process of a refused run raises the same error (none goes on alone, none waits
    for the others at a later barrier).

    Returns the lock on the main process (`None` on the others); `release_output_locks` releases it.

    Raises:
        `OutputDirLockedError`: another run holds `output_dir`, on every process.
    """
    lock, error = None, None
    if accelerator.is_main_process:
        lock = OutputDirLock(output_dir)
        try:
            lock.acquire()
        except OutputDirLockedError as refused:
            lock, error = None, str(refused)
        except Exception as unexpected:  # the others must learn of any failure, or they would wait at the broadcast
            lock, error = None, f"Cannot lock --output_dir '{output_dir}': {type(unexpected).__name__}: {unexpected}"
    if accelerator.num_processes > 1:
        from accelerate.utils import broadcast_object_list

        message = broadcast_object_list([error], from_process=0)
        error = message[0]
    if error is not None:
        raise OutputDirLockedError(error)
    if lock is not None:
        _held.append(lock)
    return lock


def release_output_locks() -> None:
    """Release the locks `lock_output_dir` took in this process (the end of `train_ddpm.main`, however it ends)."""
    while _held:
        _held.pop().release()
