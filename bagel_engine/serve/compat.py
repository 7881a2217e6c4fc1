"""What other clients send, read with judgement before a body is validated.

- OpenAI clients (LangChain, LibreChat, the ``openai`` package) send fields that do not change what
  BAGEL makes (``quality``, ``style``, ``user``, ``background``, ``moderation``, ``reasoning_effort``):
  they are accepted and ignored, named in a ``Warning`` response header and a log line. ``bagel serve
  --strict`` refuses them instead (a 400 naming the field), as the server did before.
- vllm-omni's documented request form nests engine fields in ``"extra_body": {...}``: its keys are read
  like top-level fields (one given in both places is a 400).
- diffusers' names of the knobs (``guidance_scale``, ``image_guidance_scale``, ``num_inference_steps``,
  ``num_images_per_prompt``) become the official ones through the one table of names
  (``bagel_engine.knobs``); a knob given under two names is a 400.
"""

from __future__ import annotations

import json
import logging
from typing import Any

from bagel_engine import knobs as knob_table
from bagel_engine.params import BagelInputError

from .errors import bad_request

log = logging.getLogger("bagel_engine.serve")

# Fields that do not change the result, and why (the log line says it).
IGNORED = {
    "quality": "BAGEL has one quality; the knobs are num_timesteps and the cfg scales",
    "style": "BAGEL has no style switch; say the style in the prompt",
    "user": "an end-user id, for the caller's records",
    "background": "BAGEL draws opaque pictures",
    "moderation": "this server does not moderate",
    "reasoning_effort": "BAGEL's reasoning is on or off: the 'think' field",
}
# The knob names a server body may carry under an alias (the text knobs keep OpenAI's own meanings).
SERVED_KNOBS = ("cfg_text_scale", "cfg_img_scale", "cfg_interval", "cfg_renorm_type", "cfg_renorm_min",
                "timestep_shift", "num_timesteps", "max_think_token_n")


def normalize(raw: bytes, strict: bool = False) -> tuple[bytes, list[str]]:
    """The body as the schemas read it, and the names of the fields ignored. Bodies that are not JSON
    objects pass through untouched (the schema's errors describe them)."""
    if not raw or raw.lstrip()[:1] != b"{":
        return raw, []
    try:
        body = json.loads(raw)
    except ValueError:
        return raw, []
    if not isinstance(body, dict):
        return raw, []
    fields, ignored = normalize_fields(body, strict)
    if fields is body and not ignored:
        return raw, []
    return json.dumps(fields).encode(), ignored


def normalize_fields(body: dict[str, Any], strict: bool = False) -> tuple[dict[str, Any], list[str]]:
    """``normalize`` on fields already read (a JSON object, or a multipart form's text fields)."""
    changed = False
    out = dict(body)
    if "extra_body" in out:
        extra = out.pop("extra_body")
        if not isinstance(extra, dict):
            raise bad_request("'extra_body' must be an object of request fields", "extra_body")
        for key, value in extra.items():
            if key in out:
                raise bad_request(f"{key!r} is given both at the top level and in extra_body: give it once", key)
            out[key] = value
        changed = True
    ignored = []
    if not strict:
        for name in IGNORED:
            if name in out:
                out.pop(name)
                ignored.append(name)
    renamed = _aliases(out)
    if renamed is not out:
        out, changed = renamed, True
    return (out if changed or ignored else body), ignored


def _aliases(body: dict[str, Any]) -> dict[str, Any]:
    if "num_images_per_prompt" in body:
        if "n" in body:
            raise bad_request("give 'n' or its alias 'num_images_per_prompt', not both", "num_images_per_prompt")
        body = dict(body)
        body["n"] = body.pop("num_images_per_prompt")
    names = [k for k in body if k in knob_table.NAMES and knob_table.NAMES[k][1] is not None
             and knob_table.NAMES[k][0].name in SERVED_KNOBS]
    if not names:
        return body
    picked = {k: body[k] for k in names} | {k: body[k] for k in SERVED_KNOBS if k in body}
    try:
        resolved = knob_table.canonical(picked)
    except BagelInputError as e:
        raise bad_request(str(e), names[0]) from None
    return {k: v for k, v in body.items() if k not in picked} | resolved


def warning_headers(ignored: list[str]) -> dict[str, str]:
    """``Warning: 299 - "..."`` naming the ignored fields (RFC 7234's miscellaneous persistent warning)."""
    if not ignored:
        return {}
    log.info("ignored request field(s) %s: %s", ", ".join(ignored), "; ".join(f"{k}: {IGNORED[k]}" for k in ignored))
    return {"Warning": f'299 bagel-engine "ignored field(s) that do not change the result: {", ".join(ignored)}"'}
