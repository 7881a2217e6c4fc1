"""A real uvicorn server for an in-process app on a loopback port, in a background thread (benchmarks
and tests talk to it over HTTP exactly as clients do)."""

from __future__ import annotations

import threading
import time
from typing import Any, Callable


def in_fresh_thread(fn: Callable[[], Any]) -> Any:
    """``fn()`` run in a short-lived thread (its result returned, its error raised here). Load a model this way
    when other threads will compute with it: on the CPU, torch in a thread other than the first that ran
    OpenMP work was measured 2.2-2.7x slower on the small ops of bagel-shapes and the tiny model (two
    OpenMP teams contend); the main thread, which then only runs the HTTP loop, must not be the first."""
    box: dict = {}

    def run() -> None:
        try:
            box["value"] = fn()
        except BaseException as e:  # noqa: BLE001 - raised again in the caller's thread
            box["error"] = e

    thread = threading.Thread(target=run, name="bagel-load")
    thread.start()
    thread.join()
    if "error" in box:
        raise box["error"]
    return box["value"]


class ThreadedServer:
    def __init__(self, app, host: str = "127.0.0.1", port: int = 0, start_timeout: float = 30.0) -> None:
        import uvicorn

        self.server = uvicorn.Server(uvicorn.Config(app, host=host, port=port, log_level="warning", lifespan="on"))
        self.thread = threading.Thread(target=self.server.run, name="bagel-uvicorn", daemon=True)
        self.thread.start()
        deadline = time.monotonic() + start_timeout
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("uvicorn did not start")
            time.sleep(0.02)
        self.port = self.server.servers[0].sockets[0].getsockname()[1]
        self.base_url = f"http://{host}:{self.port}"

    def stop(self, timeout: float = 15.0) -> None:
        self.server.should_exit = True
        self.thread.join(timeout)

    def __enter__(self) -> "ThreadedServer":
        return self

    def __exit__(self, *exc) -> None:
        self.stop()
