"""Errors answered in OpenAI's error format: ``{"error": {"message", "type", "param", "code"}}``."""

from __future__ import annotations

import re
import uuid
from typing import Any

_OBJECT_REPR = re.compile(r"<[^<>]*? at 0x[0-9a-fA-F]+>")
_ADDRESS = re.compile(r"\b0x[0-9a-fA-F]{6,}\b")
_SERVER_PATH = re.compile(r"(?<![\w.:/])(?:/[\w.+-]+){2,}/?")

_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    404: "not_found_error",
    405: "invalid_request_error",
    413: "invalid_request_error",
    415: "invalid_request_error",
    429: "rate_limit_error",
    499: "cancelled",
    500: "server_error",
    503: "server_error",
}


class APIError(Exception):
    """An error the server answers with ``status`` and an OpenAI-style JSON body."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        param: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.code = code
        self.headers = headers or {}

    def body(self) -> dict[str, Any]:
        return error_body(self.status, self.message, param=self.param, code=self.code)


def error_body(status: int, message: str, *, param: str | None = None, code: str | None = None) -> dict[str, Any]:
    return {
        "error": {
            "message": message,
            "type": _TYPES.get(status, "server_error" if status >= 500 else "invalid_request_error"),
            "param": param,
            "code": code,
        }
    }


def public_text(text: str, paths: bool = False) -> str:
    """``text`` as a client may read it: no object reprs or memory addresses; with ``paths`` (text that
    came from an exception, not from the request) no absolute paths either."""
    text = _ADDRESS.sub("0x…", _OBJECT_REPR.sub("<data>", text))
    return _SERVER_PATH.sub("<path>", text) if paths else text


def is_out_of_memory(e: BaseException) -> bool:
    text = str(e).lower()
    return isinstance(e, MemoryError) or type(e).__name__ == "OutOfMemoryError" or (
        isinstance(e, RuntimeError) and ("out of memory" in text or "can't allocate memory" in text
                                         or "tried to allocate" in text))


def internal_error(e: BaseException) -> tuple[APIError, str]:
    """The 500 a failed job answers, and the incident id that the server log files the detail under:
    the client learns the kind of failure, never the allocator's text, addresses or paths."""
    incident = uuid.uuid4().hex[:12]
    if is_out_of_memory(e):
        message = (f"the request needed more memory than this server has (incident {incident}); ask for fewer or "
                   "smaller images, fewer tokens or fewer steps")
        return APIError(500, message, code="out_of_memory"), incident
    message = f"the model failed on this request ({type(e).__name__}); the server log has the details (incident {incident})"
    return APIError(500, message, code="internal_error"), incident


def bad_request(message: str, param: str | None = None, code: str | None = "invalid_value") -> APIError:
    return APIError(400, message, param=param, code=code)


def describe_validation_errors(errors: list[dict[str, Any]]) -> tuple[str, str | None]:
    """Turn pydantic's error list into one message that names every offending parameter.

    Returns (message, first parameter name)."""
    unknown: list[str] = []
    missing: list[str] = []
    other: list[str] = []
    first: str | None = None
    for err in errors:
        loc = _clean_loc(err.get("loc", ()))
        kind = err.get("type", "")
        if first is None:
            first = loc or None
        if kind == "extra_forbidden":
            unknown.append(loc)
        elif kind == "missing":
            missing.append(loc)
        elif kind == "json_invalid":
            other.append(f"the request body is not valid JSON ({err.get('ctx', {}).get('error', err.get('msg'))})")
        elif kind in ("model_type", "model_attributes_type", "dict_type") and not loc:
            other.append("the request body must be a JSON object")
        else:
            msg = str(err.get("msg", "invalid value"))
            if msg.startswith("Value error, "):
                msg = msg[len("Value error, ") :]
            other.append(f"invalid value for '{loc}': {msg}" if loc else msg)
    parts: list[str] = []
    if unknown:
        parts.append(
            "unknown parameter(s): "
            + ", ".join(f"'{u}'" for u in dict.fromkeys(unknown))
            + " (this server rejects parameters it does not use instead of ignoring them)"
        )
    if missing:
        parts.append("missing required parameter(s): " + ", ".join(f"'{m}'" for m in dict.fromkeys(missing)))
    parts.extend(dict.fromkeys(other))
    return "; ".join(parts) or "invalid request", first


def _clean_loc(loc: tuple | list) -> str:
    return ".".join(str(p) for p in loc if p != "body")
