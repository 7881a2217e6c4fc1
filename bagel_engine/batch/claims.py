"""Row claims: how two batch jobs on one output folder share its rows (``bagel batch --join``).

The job that holds the folder's lock claims each row before it runs it; a job started with
``--join`` on a folder another job holds works from the other end of the row list and claims rows
the same way. A claim is a file ``.bagel-claims/<tag>/<row>.json`` created with ``O_EXCL`` (one
winner), holding the claimer's pid, host and token; when the row's record is written, the claim is
marked done. A row is free when it has no claim, or a claim of a dead claimer that was never marked
done (a killed job's row goes back to the pool). The lock holder clears the claims of dead jobs
when it starts; a joiner never does.
"""

from __future__ import annotations

import hashlib
import json
import os
import secrets
import shutil
from pathlib import Path

from bagel_engine.batch.lock import HOST, holder_alive

CLAIMS_DIR = ".bagel-claims"
_RUNNING: set[str] = set()  # tokens of this process's jobs that have not finished


class RowClaims:
    def __init__(self, folder: Path, tag: str):
        self.dir = Path(folder) / CLAIMS_DIR / tag
        self.token = secrets.token_hex(4)  # two jobs of one process (threads) tell their claims apart
        self.mine: set[str] = set()
        _RUNNING.add(self.token)

    def _path(self, key: str) -> Path:
        return self.dir / (hashlib.sha1(key.encode()).hexdigest()[:20] + ".json")

    def _read(self, path: Path) -> dict | None:
        try:
            return json.loads(path.read_text())
        except (OSError, ValueError):
            return None

    def _mine(self, claim: dict | None) -> bool:
        return bool(claim) and claim.get("token") == self.token and claim.get("pid") == os.getpid()

    def claim(self, key: str) -> bool:
        """Take row ``key``; False when another live job has it or it was done in this round."""
        self.dir.mkdir(parents=True, exist_ok=True)
        path = self._path(key)
        record = json.dumps({"row": key, "pid": os.getpid(), "host": HOST, "token": self.token,
                             "done": False}).encode()
        for _ in range(3):
            try:
                fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                held = self._read(path)
                if self._mine(held):
                    return True
                if held is not None and (held.get("done") or self._live_other(held)):
                    return False
                try:  # a dead job's unfinished row (or a claim cut short): free again
                    if self._read(path) == held:
                        path.unlink()
                except FileNotFoundError:
                    pass
                continue
            with os.fdopen(fd, "wb") as f:
                f.write(record)
            self.mine.add(key)
            return True
        return False

    def done(self, key: str) -> None:
        """The row's record is written: nobody runs it again in this round."""
        path = self._path(key)
        claim = self._read(path) or {"row": key, "pid": os.getpid(), "host": HOST, "token": self.token}
        tmp = path.with_name(path.name + f".{os.getpid()}.{self.token}")
        tmp.write_text(json.dumps(claim | {"done": True}))
        os.replace(tmp, path)
        self.mine.discard(key)

    def release(self) -> None:
        """Give back the rows claimed and not done (an interrupted job's)."""
        for key in list(self.mine):
            path = self._path(key)
            if self._mine(self._read(path)):
                path.unlink(missing_ok=True)
        self.mine.clear()

    def _live_other(self, held: dict | None) -> bool:
        """A claim of another job that may still run (in this process: one not finished yet)."""
        if not held or held.get("token") == self.token:
            return False
        if held.get("pid") == os.getpid() and held.get("host") == HOST:
            return held.get("token") in _RUNNING
        return holder_alive(held.get("host", ""), int(held.get("pid", -1)))

    def finish(self) -> bool:
        """At the end of a job: remove every claim when no other live job has any (the rows all have
        records by then); else leave them for that job. Returns whether they were removed."""
        _RUNNING.discard(self.token)
        for path in self.dir.glob("*.json") if self.dir.is_dir() else ():
            if self._live_other(self._read(path)):
                return False
        shutil.rmtree(self.dir, ignore_errors=True)
        try:
            self.dir.parent.rmdir()  # .bagel-claims, when no other shard uses it
        except OSError:
            pass
        return True

    def clear_stale(self) -> int:
        """Forget the claims of dead jobs and the done ones (their rows have records): the lock holder, at
        its start. A live joiner's open claims stay. Returns how many were removed."""
        count = 0
        for path in self.dir.glob("*.json") if self.dir.is_dir() else ():
            held = self._read(path)
            if held is None or held.get("done") or not self._live_other(held):
                path.unlink(missing_ok=True)
                count += 1
        for tmp in self.dir.glob("*.json.*") if self.dir.is_dir() else ():
            tmp.unlink(missing_ok=True)
        return count
