"""A judge behind any OpenAI-compatible chat endpoint (OpenAI, Azure's OpenAI-compatible route, a local vLLM
serving Qwen2.5-VL, ...): one user message of text and pictures in, the verdict text out.

``--judge-url`` is the API base (``https://api.openai.com/v1``, ``http://127.0.0.1:8000/v1``); the key comes from the
environment (``--judge-key-env``, default ``OPENAI_API_KEY``; none is sent when it is unset), never from the command
line. Every verdict is cached in ``cache_file`` (JSONL, keyed by a digest of the model and the message), so a rerun
asks only what it has not asked; ``max_requests`` caps the new requests of one run (what is left is reported, and
a rerun goes on); a request that fails with a connection error, 408, 409, 429 or a 5xx is retried ``retries`` times
with a doubling pause; any other HTTP error is final for that item. The standard library does the HTTP.
"""

from __future__ import annotations

import base64
import hashlib
import http.client
import json
import mimetypes
import os
import threading
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from bagel_engine.params import BagelInputError

RETRIABLE = {408, 409, 429, 500, 502, 503, 504}


class JudgeError(RuntimeError):
    """The endpoint could not give a verdict for one item (after the retries)."""


class JudgeCapReached(RuntimeError):
    """``max_requests`` new requests were made: the rest waits for a rerun."""


@dataclass
class JudgeConfig:
    url: str
    model: str
    key_env: str = "OPENAI_API_KEY"
    max_requests: int | None = None
    retries: int = 3
    backoff_s: float = 1.0
    timeout_s: float = 120.0
    max_tokens: int | None = None
    temperature: float | None = None


def image_part(path: Path) -> dict:
    """A picture file as a chat content part (a base64 data URL, as the official judges send it)."""
    data = base64.b64encode(Path(path).read_bytes()).decode()
    mime = mimetypes.guess_type(str(path))[0] or "image/png"
    return {"type": "image_url", "image_url": {"url": f"data:{mime};base64,{data}"}}


class Judge:
    def __init__(self, cfg: JudgeConfig, cache_file: Path):
        if not cfg.url.startswith(("http://", "https://")):
            raise BagelInputError(f"--judge-url {cfg.url!r} must be an http(s) API base such as https://api.openai.com/v1")
        self.cfg = cfg
        self.cache_file = Path(cache_file)
        self.lock = threading.Lock()
        self.requests = 0
        self.cache: dict[str, str] = {}
        if self.cache_file.exists():
            for line in self.cache_file.read_text(encoding="utf-8").splitlines():
                try:
                    record = json.loads(line)
                    self.cache[record["digest"]] = record["verdict"]
                except (ValueError, KeyError, TypeError):
                    continue  # a line cut by a kill: asked again

    def _digest(self, content: list[dict], system: str | None, attempt: int = 0) -> str:
        key = {"url": self.cfg.url, "model": self.cfg.model, "content": content}
        if system is not None:  # (a judge without one keeps the digests it had)
            key["system"] = system
        if attempt:
            key["attempt"] = attempt
        return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()

    def ask(self, content: list[dict], system: str | None = None, attempt: int = 0) -> str:
        """The verdict for one user message (``content``: text and image_url parts), after the ``system`` message
        when given, from the cache or the endpoint. ``attempt`` > 0 asks the same again as a new question (a
        verdict that could not be read), cached under its own key."""
        digest = self._digest(content, system, attempt)
        with self.lock:
            if digest in self.cache:
                return self.cache[digest]
            if self.cfg.max_requests is not None and self.requests >= self.cfg.max_requests:
                raise JudgeCapReached(f"--judge-max-requests {self.cfg.max_requests} reached")
            self.requests += 1
        verdict = self._post(content, system)
        with self.lock:
            self.cache[digest] = verdict
            self.cache_file.parent.mkdir(parents=True, exist_ok=True)
            with open(self.cache_file, "a", encoding="utf-8") as f:
                f.write(json.dumps({"digest": digest, "verdict": verdict}, ensure_ascii=False) + "\n")
        return verdict

    def _post(self, content: list[dict], system: str | None = None) -> str:
        messages = [{"role": "user", "content": content}]
        if system is not None:
            messages.insert(0, {"role": "system", "content": [{"type": "text", "text": system}]})
        body = {"model": self.cfg.model, "stream": False, "messages": messages}
        if self.cfg.max_tokens is not None:
            body["max_tokens"] = self.cfg.max_tokens
        if self.cfg.temperature is not None:
            body["temperature"] = self.cfg.temperature
        headers = {"Content-Type": "application/json"}
        key = os.environ.get(self.cfg.key_env)
        if key:
            headers["Authorization"] = f"Bearer {key}"
        url = self.cfg.url.rstrip("/") + "/chat/completions"
        data = json.dumps(body).encode()
        pause, last = self.cfg.backoff_s, ""
        for attempt in range(self.cfg.retries + 1):
            try:
                req = urllib.request.Request(url, data=data, headers=headers, method="POST")
                with urllib.request.urlopen(req, timeout=self.cfg.timeout_s) as response:
                    answer = json.loads(response.read())
                text = answer["choices"][0]["message"]["content"]
                if not isinstance(text, str):
                    raise JudgeError(f"the judge's answer has no text: {str(answer)[:200]}")
                return text
            except urllib.error.HTTPError as e:
                last = f"HTTP {e.code}: {e.read()[:300].decode(errors='replace')}"
                if e.code not in RETRIABLE:
                    raise JudgeError(last) from None
            except (urllib.error.URLError, TimeoutError, ConnectionError, http.client.HTTPException) as e:
                last = f"cannot reach {url}: {e}"
            except (ValueError, KeyError, IndexError, TypeError) as e:
                raise JudgeError(f"the judge's answer is not a chat completion ({e})") from None
            if attempt < self.cfg.retries:
                time.sleep(pause)
                pause *= 2
        raise JudgeError(f"{last} (after {self.cfg.retries} retries)")
