"""Models on the Hugging Face Hub: ids with a revision (``org/name@rev``), the cache, tokens, and what can be
known without downloading the weights (the small files, the file list, safetensors headers).

Everything goes through ``huggingface_hub``, so its environment holds too: ``HF_ENDPOINT`` (a mirror),
``HF_HUB_CACHE`` / ``HF_HOME``, ``HF_TOKEN`` (or ``hf auth login``), ``HF_HUB_OFFLINE=1``.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bagel_engine.params import ConfigError

log = logging.getLogger(__name__)

SMALL_PATTERNS = ["*.json", "*.txt", "*.model"]  # configs, tokenizer, safetensors indexes
ALL_PATTERNS = [*SMALL_PATTERNS, "*.safetensors"]


@dataclass(frozen=True)
class HubOptions:
    """How to reach a hub model: ``revision`` (branch, tag or commit; default main), ``cache_dir`` (default
    the hub client's, ``HF_HUB_CACHE``), ``token`` (default ``HF_TOKEN`` or the saved login)."""

    revision: str | None = None
    cache_dir: str | None = None
    token: str | None = None


def looks_like_hub_id(text: str) -> bool:
    repo = text.partition("@")[0]
    return repo.count("/") == 1 and not repo.startswith((".", "/", "~")) and all(repo.split("/"))


def split_id(text: str, hub: HubOptions | None = None) -> tuple[str, HubOptions]:
    """``org/name@rev`` -> ``("org/name", options with revision rev)``; a revision given both ways must agree."""
    hub = hub or HubOptions()
    repo, at, revision = text.partition("@")
    if not at:
        return repo, hub
    if not revision:
        raise ConfigError(f"model {text!r}: nothing after '@' (write org/name@REVISION: a branch, tag or commit)")
    if hub.revision is not None and hub.revision != revision:
        raise ConfigError(f"model {text!r} names revision {revision!r} but --revision says {hub.revision!r}")
    return repo, HubOptions(revision=revision, cache_dir=hub.cache_dir, token=hub.token)


def _explain(repo: str, hub: HubOptions, e: Exception) -> str:
    from huggingface_hub.errors import (EntryNotFoundError, GatedRepoError, LocalEntryNotFoundError,
                                        RepositoryNotFoundError, RevisionNotFoundError)

    where = f"{repo!r}" + (f" at revision {hub.revision!r}" if hub.revision else "")
    if isinstance(e, GatedRepoError):
        return f"{where} is gated: accept its terms on the hub, then give a token (--token or HF_TOKEN)"
    if isinstance(e, RevisionNotFoundError):
        return f"{where}: the hub has no such revision (a branch, tag or commit of {repo})"
    if isinstance(e, RepositoryNotFoundError):
        return (f"could not get {where}: no such model on the hub, or it is private and needs a token "
                "(--token, HF_TOKEN or `hf auth login`)")
    if isinstance(e, LocalEntryNotFoundError):  # before EntryNotFoundError: a subclass of it in recent clients
        return f"could not get {where} from the hub or its cache (offline, and not in the cache): {e}"
    if isinstance(e, EntryNotFoundError):
        return f"{where}: {e}"
    first = str(e).splitlines()[0] if str(e) else type(e).__name__
    if "401" in first:
        return f"could not get {where}: the hub refused the token (401): give a valid one (--token or HF_TOKEN)"
    return f"could not get {where} from the hub or its cache: {first}"


def snapshot(repo: str, hub: HubOptions, patterns: list[str]) -> Path:
    """The local folder of ``repo`` at ``hub.revision`` holding (at least) the files matching ``patterns``."""
    from huggingface_hub import snapshot_download

    log.info("fetching %s%s (%s) from the hub or its cache", repo, f"@{hub.revision}" if hub.revision else "",
             ", ".join(patterns))
    try:
        return Path(snapshot_download(repo_id=repo, revision=hub.revision, cache_dir=hub.cache_dir,
                                      token=hub.token, allow_patterns=patterns))
    except Exception as e:  # noqa: BLE001 - the hub client raises many kinds; each gets its explanation
        raise ConfigError(_explain(repo, hub, e)) from e


def list_files(repo: str, hub: HubOptions) -> list[str] | None:
    """The repo's file names at the revision; ``None`` when the hub cannot be reached (offline)."""
    from huggingface_hub import HfApi, constants

    if constants.HF_HUB_OFFLINE:
        return None
    try:
        return list(HfApi().list_repo_files(repo, revision=hub.revision, token=hub.token))
    except Exception as e:  # noqa: BLE001
        log.warning("could not list the files of %s: %s", repo, _explain(repo, hub, e))
        return None


@dataclass(frozen=True)
class RemoteHeader:
    """A safetensors file's header read over HTTP (a byte range: no weight is downloaded)."""

    tensors: dict[str, tuple[tuple[int, ...], str]]  # name -> (shape, dtype as safetensors names it)
    metadata: dict[str, str]
    data_bytes: int  # the size of the tensors' data


def read_header(repo: str, filename: str, hub: HubOptions) -> RemoteHeader:
    from huggingface_hub import HfApi

    try:
        meta = HfApi().parse_safetensors_file_metadata(repo, filename, revision=hub.revision, token=hub.token)
    except Exception as e:  # noqa: BLE001
        raise ConfigError(f"{filename}: {_explain(repo, hub, e)}") from e
    tensors = {name: (tuple(int(d) for d in info.shape), str(info.dtype)) for name, info in meta.tensors.items()}
    end = max((info.data_offsets[1] for info in meta.tensors.values()), default=0)
    return RemoteHeader(tensors, dict(meta.metadata or {}), int(end))


def describe(repo: str, hub: HubOptions) -> dict[str, Any]:
    return {"repo_id": repo, "revision": hub.revision or "main"}
