"""``bagel serve`` (OpenAI-compatible HTTP server, web UI at /ui) and ``bagel ui`` (the web UI alone)."""

from __future__ import annotations

import atexit
import os
from enum import Enum
from pathlib import Path
from typing import Annotated, Optional

import typer

from bagel_engine.cli.load_options import refuse_parallel, with_load_options
from bagel_engine.cli.main import app
from bagel_engine.ui.strings import LANGS

ModelOpt = Annotated[str, typer.Option(
    "--model", "-m", envvar="BAGEL_MODEL", show_envvar=True,
    help="Model directory in the official layout, a hub id, or bagel-shapes (the demo model, any CPU).")]
DeviceOpt = Annotated[Optional[str], typer.Option(help="cuda, cuda:1, cpu... (default: the first GPU, else cpu).")]
DtypeOpt = Annotated[Optional[str], typer.Option(help="bfloat16 or float32 (default: the engine's choice).")]
ApiKeyOpt = Annotated[
    Optional[str],
    typer.Option("--api-key", envvar="BAGEL_API_KEY", show_envvar=True,
                 help="Require 'Authorization: Bearer KEY' on every endpoint but /health (the UI asks for it as "
                      "the password)."),
]
UiLang = Enum("UiLang", {lang: lang for lang in LANGS}, type=str)  # type: ignore[misc]
LangOpt = Annotated[UiLang, typer.Option("--lang", help="The web UI's language: en (English) or zh (Chinese).")]
QueueOpt = Annotated[int, typer.Option(min=0, help="Requests that may wait while --max-batch run; one more gets 429.")]
MaxBatchOpt = Annotated[int, typer.Option(
    "--max-batch", min=1, help="Requests run at once, batched step by step (1: one at a time).")]
MaxStepTokensOpt = Annotated[Optional[int], typer.Option(
    "--max-step-tokens", min=1,
    help="Rows one step's forward may hold (an image's guidance branches, an answer's token); a newcomer that "
         "would exceed it waits. \\[default: no limit but --max-batch]")]


def _setup_logging(level: str) -> None:
    import logging

    logging.basicConfig(level=level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")


def _load(model: str, device: str | None, dtype: str | None, options: dict | None = None, *,
          parallel_ok: bool = False):
    """Load in a short-lived thread, never in the main one (``serve.threaded.in_fresh_thread`` says why)."""
    from bagel_engine.serve._engine import load_pipeline
    from bagel_engine.serve.threaded import in_fresh_thread

    if not parallel_ok:
        refuse_parallel(options or {}, "the web UI alone", "serve it with bagel serve (rank 0 serves, the others "
                            "follow)")
    typer.echo(f"loading {model} ...", err=True)
    try:
        return in_fresh_thread(lambda: load_pipeline(model, device=device, dtype=dtype, **(options or {})))
    except (ValueError, OSError) as e:
        typer.echo(f"error: could not load {model}: {e}", err=True)
        raise typer.Exit(2) from None


def _quiet_gradio() -> None:
    # No phoning home from a server: no analytics, no update check.
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    os.environ.setdefault("GRADIO_TELEMETRY_ENABLED", "False")


@app.command(
    "serve",
    epilog=(
        "Examples:\n\n"
        "  bagel serve --model ByteDance-Seed/BAGEL-7B-MoT\n\n"
        "  BAGEL_API_KEY=secret bagel serve -m ./BAGEL-7B-MoT --host 0.0.0.0 --queue-size 4\n\n"
        "Then: OpenAI(base_url='http://127.0.0.1:8000/v1', api_key='secret').images.generate(prompt='a cat', "
        "size='1024x1024', extra_body={'seed': 42, 'num_timesteps': 50})"
    ),
)
@with_load_options
def serve_command(
    model: ModelOpt,
    host: Annotated[str, typer.Option(help="Address to listen on (0.0.0.0 for every interface).")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="Port to listen on.")] = 8000,
    device: DeviceOpt = None,
    dtype: DtypeOpt = None,
    load_options: Optional[dict] = None,
    api_key: ApiKeyOpt = None,
    served_model_name: Annotated[
        Optional[list[str]],
        typer.Option("--served-model-name", help="Name(s) accepted in the 'model' field (default: the model's name)."),
    ] = None,
    queue_size: QueueOpt = 8,
    max_batch: MaxBatchOpt = 8,
    max_step_tokens: MaxStepTokensOpt = None,
    max_body_mb: Annotated[float, typer.Option(min=0.01, help="Largest request body, in MiB.")] = 50.0,
    max_image_pixels: Annotated[int, typer.Option(min=1, help="Largest input image, in pixels (width x height).")] = 4096 * 4096,
    max_images: Annotated[int, typer.Option(min=1, help="Most input images per request, and the largest n.")] = 8,
    max_timesteps: Annotated[int, typer.Option(min=2, help="Most num_timesteps per request.")] = 250,
    max_model_len: Annotated[Optional[int], typer.Option(
        min=16, help="Most tokens per request: prompt, images, think text and answer together. "
                     "\\[default: the model's context length]")] = None,
    allow_local_paths: Annotated[
        Optional[list[Path]],
        typer.Option("--allow-local-paths", exists=True, file_okay=False, dir_okay=True, resolve_path=True,
                     help="Let requests name image files under this directory (repeatable). "
                     "Off by default: images come as data: URLs or uploads."),
    ] = None,
    allow_remote_urls: Annotated[
        bool, typer.Option("--allow-remote-urls", help="Let requests give http(s) image URLs the server fetches.")
    ] = False,
    strict: Annotated[bool, typer.Option(
        "--strict", help="Refuse (400) the OpenAI fields that do not change the result (quality, style, user, "
                         "background, moderation, reasoning_effort) instead of ignoring them with a Warning header.")] = False,
    url_ttl: Annotated[float, typer.Option(
        "--url-ttl", min=1.0, help="Seconds an image answered as response_format 'url' stays available.")] = 3600.0,
    ui: Annotated[bool, typer.Option("--ui/--no-ui", help="Mount the web UI at /ui (needs the 'ui' extra).")] = True,
    lang: LangOpt = UiLang.en,
    log_level: Annotated[str, typer.Option(help="debug, info, warning, error.")] = "info",
    replicas: Annotated[int, typer.Option(
        "--replicas", min=0, help="Run the model as N replicas on Ray (Ray actors, each its own process and GPU(s)) "
                                  "behind this one server; a replica that dies fails its requests with 503 and is "
                                  "restarted (needs the 'ray' extra). 0: the model in this process.")] = 0,
    ray_address: Annotated[Optional[str], typer.Option(
        "--ray-address", envvar="RAY_ADDRESS", show_envvar=True,
        help="With --replicas: the Ray cluster to use (auto, HOST:6379, ray://HOST:10001). \\[default: start a "
             "local one]")] = None,
    gpus_per_replica: Annotated[Optional[float], typer.Option(
        "--gpus-per-replica", min=0, help="With --replicas: GPUs per replica (Ray sets each one's "
                                           "CUDA_VISIBLE_DEVICES; above 1 add --devices to split the layers). "
                                           "\\[default: 1 where CUDA is present, else 0]")] = None,
    cpus_per_replica: Annotated[float, typer.Option(
        "--cpus-per-replica", min=0, help="With --replicas: CPUs Ray reserves per replica.")] = 1.0,
) -> None:
    """Serve MODEL over an OpenAI-compatible HTTP API: /v1/images/generations, /v1/images/edits,
    /v1/chat/completions, /v1/models, plus /health, /metrics (Prometheus) and the web UI at /ui.
    Up to --max-batch requests run at once, batched step by step (a newcomer joins within one step);
    up to --queue-size more wait, the next gets 429. With --replicas N the model runs as N Ray actors, each
    running --max-batch requests, requests going to the least busy."""
    try:
        import uvicorn

        from bagel_engine.serve import ServeSettings, create_app
    except ImportError as e:
        typer.echo(f"error: {e.name} is missing; install the server with: pip install 'bagel-engine[serve]'", err=True)
        raise typer.Exit(2) from None
    _setup_logging(log_level)
    build_ui = None
    if ui:
        _quiet_gradio()
        try:
            from bagel_engine.ui import build_ui
        except ImportError as e:
            typer.echo(f"warning: no web UI ({e.name} is missing; pip install 'bagel-engine[ui]'); serving the API only",
                       err=True)
    settings = ServeSettings(
        queue_size=queue_size, max_batch=max_batch, max_step_tokens=max_step_tokens, api_key=api_key, max_body_bytes=int(max_body_mb * 1024 * 1024),
        max_image_pixels=max_image_pixels, max_images=max_images, max_timesteps=max_timesteps,
        max_model_len=max_model_len, allow_local_paths=list(allow_local_paths or []),
        allow_remote_urls=allow_remote_urls, served_model_names=list(served_model_name or []),
        mount_ui=build_ui is not None, strict=strict, url_ttl_s=url_ttl, ui_lang=lang.value,
    )
    pool = None
    if replicas:
        refuse_parallel(load_options or {}, "--replicas", "each replica is one process (run the model over several "
                        "processes with torchrun and no --replicas)")
        pipe = pool = _replica_pool(model, device, dtype, load_options, replicas, ray_address, gpus_per_replica,
                                    cpus_per_replica, settings)
        atexit.register(pool.close)  # also when the server cannot start (a port in use)
    else:
        pipe = _load(model, device, dtype, load_options, parallel_ok=True)
    lockstep = None
    if pool is None and getattr(getattr(pipe, "engine", None), "lockstep", None) is not None:  # one model over several processes
        import torch.distributed as dist

        from bagel_engine.serve.lockstep import LockstepPipeline, follow

        if dist.get_rank() != 0:
            calls = follow(pipe)  # until rank 0 stops serving
            typer.echo(f"rank {dist.get_rank()}: rank 0 stopped serving after {calls} calls", err=True)
            return
        if settings.max_batch > 1:
            typer.echo("note: --max-batch 1: a model over several processes runs one request at a time", err=True)
        settings.max_batch = 1
        pipe = lockstep = LockstepPipeline(pipe)
    application = create_app(pipe, settings, ui=build_ui)
    # Bind first, so that --port 0 (any free port) can be reported before serving.
    sock = _bind(host, port)
    port = sock.getsockname()[1]
    shown = "127.0.0.1" if host in ("0.0.0.0", "::") else (f"[{host}]" if ":" in host else host)
    typer.echo(f"BAGEL server listening on http://{shown}:{port} (OpenAI base_url: http://{shown}:{port}/v1"
               + (f"; web UI: http://{shown}:{port}/ui/" if build_ui is not None else "")
               + ("; API key required" if settings.api_key else "") + ")", err=True)
    if host not in ("127.0.0.1", "localhost", "::1") and not settings.api_key:
        typer.echo(f"warning: listening on {host} without an API key: anyone who can reach this port can use "
                   "the model (set --api-key or BAGEL_API_KEY)", err=True)
    config = uvicorn.Config(application, log_level=log_level.lower(), timeout_graceful_shutdown=5)
    try:
        uvicorn.Server(config).run(sockets=[sock])
    finally:
        if lockstep is not None:
            lockstep.stop_followers()
        if pool is not None:
            pool.close()


def _replica_pool(model: str, device: str | None, dtype: str | None, options: dict | None, replicas: int,
                  ray_address: str | None, gpus: float | None, cpus: float, settings):
    """Start the replicas on Ray; the server's worker then runs --max-batch jobs per replica."""
    try:
        from bagel_engine.serve.replicas import ReplicaPool
    except ImportError as e:
        typer.echo(f"error: {e}", err=True)
        raise typer.Exit(2) from None
    if gpus is None:
        import torch

        gpus = 1.0 if torch.cuda.is_available() and (device is None or device.startswith("cuda")) else 0.0
        if options and options.get("devices"):  # the layers split over the cards of each replica
            gpus = float(len(str(options["devices"]).split(",")))
    if not gpus and device is None:
        device = "cpu"  # a replica without a GPU of its own must not take the first card outside Ray's count
    typer.echo(f"starting {replicas} replica(s) of {model} on Ray ({gpus:g} GPU, {cpus:g} CPU each) ...", err=True)
    try:
        pool = ReplicaPool(model, replicas, {"device": device, "dtype": dtype, **(options or {})},
                           ray_address=ray_address, gpus_per_replica=gpus, cpus_per_replica=cpus,
                           max_batch=settings.max_batch, max_step_tokens=settings.max_step_tokens)
    except (ImportError, ValueError, ConnectionError) as e:
        typer.echo(f"error: {e}", err=True)
        raise typer.Exit(2) from None
    except Exception as e:  # Ray's: a replica that could not load the model, a start that timed out
        typer.echo(f"error: the replicas did not start: {type(e).__name__}: {e}", err=True)
        raise typer.Exit(2) from None
    settings.max_batch *= replicas  # the front runs each replica's share at once
    return pool


def _bind(host: str, port: int):
    import socket

    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    # proto=IPPROTO_TCP matters: asyncio turns Nagle off (TCP_NODELAY) only on sockets that say they are
    # TCP; without it every small response waits for a delayed ACK (~40 ms on loopback).
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as e:
        sock.close()
        typer.echo(f"error: cannot listen on {host}:{port}: {e.strerror or e}", err=True)
        raise typer.Exit(2) from None
    # listening now, before the address is announced: a client that connects while the server is still starting
    # waits in the backlog instead of being refused
    sock.listen(2048)
    sock.set_inheritable(True)
    return sock


@app.command(
    "ui",
    epilog="Examples:\n\n  bagel ui --model ByteDance-Seed/BAGEL-7B-MoT --port 7860\n\n"
           "  bagel ui --model bagel-shapes --lang zh   [dim]# the UI in Chinese[/dim]",
)
@with_load_options
def ui_command(
    model: ModelOpt,
    host: Annotated[str, typer.Option(help="Address to listen on.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="Port to listen on.")] = 7860,
    device: DeviceOpt = None,
    dtype: DtypeOpt = None,
    load_options: Optional[dict] = None,
    api_key: ApiKeyOpt = None,
    queue_size: QueueOpt = 8,
    max_batch: MaxBatchOpt = 8,
    max_step_tokens: MaxStepTokensOpt = None,
    lang: LangOpt = UiLang.en,
    log_level: Annotated[str, typer.Option(help="debug, info, warning, error.")] = "warning",
    share: Annotated[bool, typer.Option(
        "--share", help="Also publish a temporary public link through Gradio's share servers (*.gradio.live, 72 "
                        "hours; needs internet access). Anyone with the link can use the model: set --api-key.")] = False,
) -> None:
    """The web UI alone (no HTTP API): text to image, editing, understanding and chat, every knob
    with the official defaults, think text, seed and step progress."""
    _quiet_gradio()
    try:
        from bagel_engine.serve import ModelWorker, ServeSettings
        from bagel_engine.ui import launch_ui
    except ImportError as e:
        typer.echo(f"error: {e.name} is missing; install the UI with: pip install 'bagel-engine[ui]'", err=True)
        raise typer.Exit(2) from None
    _setup_logging(log_level)
    if share and not api_key:
        typer.echo("warning: --share without --api-key: anyone with the public link can use the model", err=True)
    settings = ServeSettings(queue_size=queue_size, max_batch=max_batch, max_step_tokens=max_step_tokens,
                             api_key=api_key, ui_lang=lang.value)
    pipe = _load(model, device, dtype, load_options)
    worker = ModelWorker(pipe, queue_size=settings.queue_size, max_batch=settings.max_batch,
                         max_step_tokens=settings.max_step_tokens).start()
    try:
        launch_ui(worker, pipe, settings, host=host, port=port or None, share=share)
    finally:
        worker.stop(5.0)
