"""Helpers for the server and UI tests: a real `bagel serve` in a subprocess, tiny images.

(No tests here; the module name only keeps it among the files of the serving tests.)"""

from __future__ import annotations

import base64
import io
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "tests" / "data" / "tiny-v1" / "model"
INPUT_IMAGE = ROOT / "tests" / "data" / "tiny-v1" / "inputs" / "image_a.png"
_LISTEN = re.compile(r"listening on http://127\.0\.0\.1:(\d+)|Running on local URL:\s+http://127\.0\.0\.1:(\d+)")


def png_bytes(width: int = 40, height: int = 48, color=(200, 30, 30)) -> bytes:
    buf = io.BytesIO()
    img = Image.new("RGB", (width, height), color)
    for x in range(0, width, 4):  # a little structure
        img.putpixel((x, x % height), (0, 0, 255))
    img.save(buf, "PNG")
    return buf.getvalue()


def data_url(raw: bytes, mime: str = "image/png") -> str:
    return f"data:{mime};base64,{base64.b64encode(raw).decode()}"


def decode_b64_image(b64: str) -> Image.Image:
    img = Image.open(io.BytesIO(base64.b64decode(b64)))
    img.load()
    return img


class ServerProcess:
    """``python -m bagel_engine.cli.main <command> ...`` on a free loopback port (``--port 0``)."""

    def __init__(self, *args: str, command: str = "serve", env: dict[str, str] | None = None,
                 startup_timeout: float = 90.0) -> None:
        self.log_path = Path(tempfile.mkstemp(prefix="bagel-serve-", suffix=".log")[1])
        self._log = open(self.log_path, "wb")
        full_env = {**os.environ, "PYTHONUNBUFFERED": "1", "GRADIO_ANALYTICS_ENABLED": "False",
                    "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "2"), **(env or {})}
        cmd = [sys.executable, "-m", "bagel_engine.cli.main", command, "--model", str(TINY), "--port", "0", *args]
        self.proc = subprocess.Popen(cmd, cwd=ROOT, stdout=self._log, stderr=subprocess.STDOUT, env=full_env)
        self.pid = self.proc.pid
        self.port = self._wait_for_port(startup_timeout)
        self.base_url = f"http://127.0.0.1:{self.port}"

    def _wait_for_port(self, timeout: float) -> int:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                log = self.log()
                self.stop()
                raise RuntimeError(f"server exited with {self.proc.returncode}:\n{log}")
            m = _LISTEN.search(self.log())
            if m:
                return int(m.group(1) or m.group(2))
            time.sleep(0.05)
        log = self.log()
        self.stop()
        raise RuntimeError(f"server did not start within {timeout} s:\n{log}")

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:  # stopped
            return ""

    def rss_bytes(self) -> int:
        with open(f"/proc/{self.pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
        raise RuntimeError("no VmRSS")

    def cpu_seconds(self) -> float:
        """User + system CPU time of the server process so far (less sensitive to noisy neighbours than
        wall-clock time)."""
        with open(f"/proc/{self.pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        self._log.close()
        self.log_path.unlink(missing_ok=True)

    def client(self, api_key: str | None = None, timeout: float = 60.0) -> httpx.Client:
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        return httpx.Client(base_url=self.base_url, headers=headers, timeout=timeout)


from bagel_engine.serve.threaded import ThreadedServer  # noqa: E402,F401 - re-exported for the tests
