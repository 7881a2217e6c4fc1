"""An advisory lock on a batch job's output folder: one job (one shard of one) writes there at a time.

The lock is a file, ``.bagel-lock-<shard>.json``, holding the holder's pid, host and start time, created
with ``O_EXCL`` so two starts cannot both win. A second job on the same folder and shard stops with a
message naming the holder. A lock whose holder is dead (same host, pid gone) is stale and taken over;
a lock from another host (a shared file system) is trusted until someone removes it. ``--shard`` jobs
take one lock per shard, so the shards of a job may share a folder as designed.
"""

from __future__ import annotations

import json
import os
import socket
import time
from pathlib import Path

from bagel_engine.params import BagelInputError

HOST = socket.gethostname()


def pid_alive(pid: int) -> bool:
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # somebody else's live process
        return True
    return True


def holder_alive(host: str, pid: int) -> bool:
    """Whether a process named by host and pid may still run (another host's cannot be checked: yes)."""
    return host != HOST or pid == os.getpid() or pid_alive(pid)


class FolderInUse(BagelInputError):
    """The folder is locked by a live job; ``holder`` says who (pid, host, started, claims)."""

    def __init__(self, message: str, holder: dict):
        super().__init__(message)
        self.holder = holder


class FolderLock:
    def __init__(self, folder: Path, tag: str = "all"):
        self.path = Path(folder) / f".bagel-lock-{tag}.json"
        self.held = False

    def acquire(self, claims_rows: bool = True) -> None:
        """Take the lock or raise :class:`FolderInUse` naming the live holder. ``claims_rows``: this job
        claims each row before running it (``batch.claims``), so another may join it (``--join``)."""
        me = json.dumps({"pid": os.getpid(), "host": HOST, "started": time.time(), "claims": claims_rows}).encode()
        for _ in range(3):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                holder = self._holder()
                if holder is None or not holder_alive(holder.get("host", ""), int(holder.get("pid", -1))):
                    self._remove_stale(holder)
                    continue
                since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(float(holder.get("started", 0))))
                raise FolderInUse(
                    f"{self.path.parent} is in use by another batch job (pid {holder.get('pid')} on "
                    f"{holder.get('host')}, since {since}): wait for it to finish, share its rows with --join, or "
                    f"choose another --output-dir (if that job is gone, delete {self.path})", holder) from None
            with os.fdopen(fd, "wb") as f:
                f.write(me)
                f.flush()
                os.fsync(f.fileno())
            self.held = True
            return
        raise BagelInputError(f"could not take the lock {self.path}: it keeps changing hands")

    def _holder(self) -> dict | None:
        try:
            return json.loads(self.path.read_text())
        except (OSError, ValueError):
            return None  # unreadable (half-written by a killed start): stale

    def _remove_stale(self, holder: dict | None) -> None:
        try:
            if self._holder() == holder:  # nobody took it over in between
                self.path.unlink()
        except FileNotFoundError:
            pass

    def release(self) -> None:
        if self.held:
            try:
                self.path.unlink()
            except FileNotFoundError:
                pass
            self.held = False

    def __enter__(self) -> "FolderLock":
        self.acquire()
        return self

    def __exit__(self, *exc) -> None:
        self.release()
