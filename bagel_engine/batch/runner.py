"""Running a batch job: the loop every process runs, resume, and the summary.

For each row of its share a process builds the call (:mod:`bagel_engine.batch.request`), calls
the public API, writes the image atomically and then appends the row's record to its part file.
A kill between the two leaves an image without a record: the row is redone (same seed, same
image) and the file replaced atomically. At the end rank 0 merges the manifest.
"""

from __future__ import annotations

import secrets
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping

from bagel_engine.batch import dist as data_parallel
from bagel_engine import knobs as knob_table
from bagel_engine.image_metadata import describe
from bagel_engine.batch import manifest as manifests
from bagel_engine.batch.claims import RowClaims
from bagel_engine.batch.lock import FolderInUse, FolderLock
from bagel_engine.batch.reader import read_rows
from bagel_engine.batch.request import Plan, build_call, knob_cells, plan_rows, unknown_knob_columns
from bagel_engine.params import BagelInputError, DiskFull, disk_full, is_disk_full
from bagel_engine.think_text import split_think

DEFAULT_BASE_SEED = 0
POLL_S = 0.5


@dataclass
class BatchJob:
    input: Path
    task: str
    output_dir: Path
    model: str | None = None
    knobs: dict[str, Any] = field(default_factory=dict)  # command-line knobs by API name; "seed" is the base seed
    device: str | None = None
    dtype: str | None = None
    overwrite: bool = False
    retry_failed: bool = False
    shard: tuple[int, int] | None = None
    rows: str | None = None
    prompt_column: str | None = None
    id_column: str | None = None
    output_column: str | None = None  # a column naming each row's output file (sub-folders, .png/.jpg/.webp)
    preset: str = "auto"  # defaults under the variables and flags: official, diffgentor, or auto (see knobs.PRESETS)
    progress: bool = True
    environ: Mapping[str, str] | None = None  # for DG_BAGEL_*; default os.environ
    batch_size: int = 1  # t2i: rows with the same size and knobs denoised together (pipe.generate(list))
    load_options: dict[str, Any] = field(default_factory=dict)  # quantize, offload, compile... for load()
    join: bool = False  # the folder is another job's: share its rows (claims) instead of stopping


@dataclass
class Summary:
    task: str
    rows: int  # rows in this job (after --rows and --shard)
    ok: int
    failed: int
    unfinished: int
    processed: int  # rows this run did
    skipped: int  # rows finished by an earlier run
    processes: int
    elapsed_s: float
    output_dir: str
    manifest: str | None
    manifest_csv: str | None
    failures: list[dict[str, str]] = field(default_factory=list)  # the first few: id, error

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _stderr(message: str) -> None:
    try:
        from tqdm import tqdm

        tqdm.write(message, file=sys.stderr)
    except Exception:  # noqa: BLE001
        print(message, file=sys.stderr, flush=True)


def _error_text(exc: BaseException) -> str:
    if isinstance(exc, (BagelInputError, ValueError, TypeError)):
        return str(exc) or type(exc).__name__
    return f"{type(exc).__name__}: {exc}"


def _plain(value: Any) -> Any:
    """JSON-friendly copy of API params (tuples to lists, tensors and dtypes to text)."""
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    return str(value)


class _Progress:
    """Rank 0's bar over the whole job: its own rows, plus the other ranks' records counted by
    tailing their part files (new bytes only)."""

    def __init__(self, total: int, enabled: bool, desc: str, others: list[Path]):
        from tqdm import tqdm

        self.bar = tqdm(total=total, disable=not enabled or total == 0, unit="row", desc=desc, dynamic_ncols=True,
                        file=sys.stderr, smoothing=0.1)
        self.others = {p: (p.stat().st_size if p.exists() else 0) for p in others}
        self.done = 0
        self.ok = 0
        self.failed = 0
        self.total = total

    def _tail(self) -> None:
        for path, offset in list(self.others.items()):
            try:
                with open(path, "rb") as f:
                    f.seek(offset)
                    data = f.read()
            except FileNotFoundError:
                continue
            end = data.rfind(b"\n") + 1
            if end:
                chunk = data[:end]
                lines = chunk.count(b"\n")
                self.failed += chunk.count(b'"status": "failed"')
                self.ok += lines - chunk.count(b'"status": "failed"')
                self.done += lines
                self.others[path] = offset + end

    def row_done(self, ok: bool) -> None:
        self.done += 1
        self.ok += ok
        self.failed += not ok
        self._tail()
        self._refresh()

    def step(self, step: int, total: int) -> None:
        self.bar.set_postfix_str(f"ok={self.ok} failed={self.failed} step {step}/{total}", refresh=False)

    def _refresh(self) -> None:
        self.bar.n = min(self.done, self.total)
        self.bar.set_postfix_str(f"ok={self.ok} failed={self.failed}", refresh=False)
        self.bar.refresh()

    def wait_for_others(self) -> None:
        """Keep the bar moving while the other ranks finish (they write one record per row)."""
        while self.others and self.done < self.total:
            time.sleep(POLL_S)
            before = self.done
            self._tail()
            if self.done != before:
                self._refresh()

    def close(self) -> None:
        self.bar.close()


def _needs_run(plan: Plan, record: dict | None, job: BatchJob) -> bool:
    if job.overwrite or record is None:
        return True
    status = record.get("status")
    if status == "ok":
        if job.task in knob_table.IMAGE_TASKS:
            return not (Path(job.output_dir) / (record.get("output") or plan.output or "")).is_file()
        return False
    if status == "failed":
        return job.retry_failed
    return True


def run_batch(job: BatchJob, load: Callable[..., Any] | None = None) -> Summary:
    """Run ``job`` in this process (one rank of a torchrun job, or alone). ``load`` defaults to
    :func:`bagel_engine.load`. Raises :class:`BagelInputError` for a job that cannot start (no input,
    bad flag, bad ``DG_BAGEL_*`` value); a bad row never raises, it becomes a failed record."""
    t_start = time.perf_counter()
    knob_table.check_task(job.task)
    out_dir = Path(job.output_dir)
    dist = data_parallel.setup(job.device)
    model_ranks = dist.world if job.load_options.get("shard_weights") else model_parallel_size(job)
    if model_ranks > 1 and dist.world != model_ranks:
        dist.close()
        raise BagelInputError(
            f"--cfg-parallel-size x --tensor-parallel-size (or --vae-patch-parallel-size) = {model_ranks} processes run "
            "one model over the whole job: "
            f"start it with torchrun --nproc-per-node {model_ranks} (running {dist.world}); several such models "
            "sharing the rows (data parallel over model-parallel groups) are not built yet")
    lock = FolderLock(out_dir, manifests.shard_tag(job.shard))
    try:
        refusal, joined = None, None
        if job.join and dist.world > 1:
            refusal = "--join works for a job of one process (not under torchrun)"
        elif dist.is_main:  # one job per folder (and shard); the ranks of this one share it
            try:
                out_dir.mkdir(parents=True, exist_ok=True)
                lock.acquire(claims_rows=dist.world == 1)
            except FolderInUse as e:
                if not job.join:
                    refusal = str(e)
                elif not e.holder.get("claims"):
                    refusal = (f"{out_dir} is in use by a batch job of several processes (pid {e.holder.get('pid')}), "
                               "which does not share its rows: --join works with a job of one process")
                else:
                    joined = e.holder
            except BagelInputError as e:
                refusal = str(e)
        refusal = dist.broadcast(refusal)
        if refusal:
            raise BagelInputError(refusal)
        return _run(job, load, dist, out_dir, t_start, joined)
    finally:
        lock.release()
        dist.close()


def _run(job: BatchJob, load, dist: data_parallel.Dist, out_dir: Path, t_start: float,
         joined: dict | None = None) -> Summary:
    """``joined``: the holder of the folder's lock this job joined (``--join``): the two share the rows
    through claims, this one from the end of the list."""
    task = job.task
    preset = knob_table.resolve_preset(job.preset, job.environ)
    base = {**knob_table.preset_knobs(preset, task), **knob_table.env_knobs(task, job.environ),
            **knob_table.cli_knobs(job.knobs, task)}
    base_seed = base.pop("seed", None)
    base_seed = DEFAULT_BASE_SEED if base_seed is None else int(base_seed)

    rows = read_rows(Path(job.input), exclude=out_dir)
    if dist.is_main:
        for warning in [*knob_table.env_warnings(job.environ), *unknown_knob_columns(rows, task)]:
            _stderr(f"bagel batch {task}: warning: {warning}")
        if preset != "official" and knob_table.preset_knobs(preset, task):
            why = " (DG_BAGEL_* variables are set; --preset official keeps the official defaults)" if (
                job.preset == "auto") else ""
            shown = ", ".join(f"{k}={v}" for k, v in knob_table.preset_knobs(preset, task).items())
            _stderr(f"bagel batch {task}: {preset}'s defaults{why}: {shown}")
    plans = plan_rows(rows, task, job.id_column, job.output_column)
    chosen = [plans[i] for i in data_parallel.parse_rows(job.rows, len(plans))]
    # model parallel (CFG-parallel, tensor parallel): every rank runs every row in step, rank 0 alone writes
    lockstep = model_parallel_size(job) > 1 or (bool(job.load_options.get("shard_weights")) and dist.world > 1)
    share = data_parallel.Dist() if lockstep else dist
    selected, mine = data_parallel.take_share(chosen, job.shard, share)
    out_dir.mkdir(parents=True, exist_ok=True)

    state = manifests.latest_records(out_dir)
    todo_all = [p for p in selected if _needs_run(p, state.get(p.key), job)]
    todo_keys = {p.key for p in todo_all}
    if lockstep:  # rank 0's view of what is left, the same on every rank
        todo_keys = set(dist.broadcast(sorted(todo_keys)))
        todo_all = [p for p in selected if p.key in todo_keys]
    todo = [p for p in mine if p.key in todo_keys]
    writes = dist.is_main or not lockstep
    claims = RowClaims(out_dir, manifests.shard_tag(job.shard)) if share.world == 1 and writes else None
    if lockstep:
        claims = None  # another job claiming a row would leave this one's ranks running different rows
    part = manifests.part_path(out_dir, job.shard, share.rank, share.world, claims.token if joined else None)
    others = [manifests.part_path(out_dir, job.shard, r, share.world) for r in range(share.world) if r != share.rank]
    run_id = dist.broadcast(f"{int(time.time())}-{secrets.token_hex(4)}" if dist.is_main else None)
    if joined:  # the holder is alive and writing: touch none of its files; work from the other end
        todo = todo[::-1]
        _stderr(f"bagel batch {task}: joined the job of pid {joined.get('pid')} on {joined.get('host')} in {out_dir}: "
                f"{len(todo)} rows not done, taken from the end, each one nobody holds")
    elif dist.is_main:
        if claims is not None:
            claims.clear_stale()
        manifests.remove_temp_files(out_dir)  # only those of dead writers: the shards of a job may share the folder
        for path in [part, *others]:
            if path.exists():
                manifests.PartWriter(path).close()  # cut a line a killed writer left unfinished
        where = f" on {dist.world} processes" if dist.world > 1 else ""
        shard = f" (shard {job.shard[0]}/{job.shard[1]})" if job.shard else ""
        _stderr(f"bagel batch {task}: {len(selected)} rows{shard} -> {out_dir}; "
                f"{len(selected) - len(todo_all)} already done, {len(todo_all)} to do{where}")
    progress = _Progress(len(todo_all), job.progress and dist.is_main, f"{task}", others if dist.is_main else [])
    dist.barrier()  # nobody writes before rank 0 has cleaned up and measured the part files

    try:
        if todo:
            device = data_parallel.rank_device(job.device, dist)
            if job.model is None and load is None:
                raise BagelInputError("no model: pass --model DIR_OR_HUB_ID or set BAGEL_MODEL")
            if load is None:
                import bagel_engine

                load = bagel_engine.load
            pipe = load(job.model, device=device, dtype=job.dtype, **job.load_options)
            group = max(1, job.batch_size) if task == "t2i" else 1
            with (manifests.PartWriter(part) if writes else _NoWriter()) as writer:
                for start in range(0, len(todo), group):
                    chunk = todo[start : start + group]
                    if claims is not None:  # rows another job holds (or finished meanwhile) are its own
                        chunk = [p for p in chunk if claims.claim(p.key)]
                        if not chunk:
                            continue
                    if len(chunk) == 1:
                        done = [(chunk[0], _process(pipe, chunk[0], job, base, base_seed, out_dir, dist, run_id, progress,
                                                    writes))]
                    else:
                        done = _process_together(pipe, chunk, job, base, base_seed, out_dir, dist, run_id, progress,
                                                 writes)
                    if not writes:
                        continue
                    for plan, record in done:
                        writer.append(record)
                        if claims is not None:
                            claims.done(plan.key)
                        progress.row_done(record["status"] == "ok")
                        if record["status"] != "ok":
                            prefix = f"[rank {dist.rank}] " if dist.world > 1 else ""
                            _stderr(f"{prefix}row {plan.key} ({plan.row.where()}) failed: {record['error']}")
        if dist.is_main and not lockstep:
            progress.wait_for_others()
    finally:
        progress.close()
        if claims is not None:
            claims.release()  # rows claimed and not done (an error, an interrupt) go back to the pool
            claims.finish()  # and the claims go, unless another live job on the folder still needs them
    dist.barrier()

    summary = None
    if dist.is_main:
        # The manifest covers every row of the input (of the shard), not only the --rows chosen now.
        scope = data_parallel.take_share(plans, job.shard, data_parallel.Dist())[0]
        merged = manifests.merge(out_dir, [p.key for p in scope], job.shard, own=part, joined=joined is not None)
        _write_results(out_dir, job.shard, scope, merged)
        chosen_keys = {p.key for p in selected}
        records = [r for r in merged if r["id"] in chosen_keys]
        stem = manifests.manifest_stem(job.shard)
        ok = sum(r.get("status") == "ok" for r in records)
        failed = [r for r in records if r.get("status") != "ok"]
        processed = sum(r.get("run") == run_id for r in records)
        summary = Summary(
            task=task, rows=len(selected), ok=ok, failed=len(failed), unfinished=len(selected) - len(records),
            processed=processed, skipped=len(records) - processed, processes=dist.world,
            elapsed_s=round(time.perf_counter() - t_start, 3), output_dir=str(out_dir),
            manifest=str(out_dir / f"{stem}.jsonl"), manifest_csv=str(out_dir / f"{stem}.csv"),
            failures=[{"id": str(r["id"]), "error": str(r.get("error"))} for r in failed[:10]],
        )
    return dist.broadcast(summary)


def _write_results(out_dir: Path, shard: tuple[int, int] | None, plans: list[Plan], merged: list[dict]) -> None:
    """``results.csv`` (``results.shardKofN.csv``): the input columns plus ``output_image``, as diffgentor writes."""
    by_id = {str(r["id"]): r for r in merged}
    rows = []
    for plan in plans:
        record = by_id.get(plan.key)
        cells = plan.row.cells_as_text()
        cells["output_image"] = record["output"] if record and record.get("status") == "ok" and record.get("output") else ""
        rows.append(cells)
    name = "results.csv" if shard is None else f"results.shard{shard[0]}of{shard[1]}.csv"
    manifests.write_results(out_dir, name, rows)


def _new_record(plan: Plan, job: BatchJob, dist: data_parallel.Dist, run_id: str, base: dict) -> dict[str, Any]:
    # params start as what was asked (the job's knobs and the row's cells, as written), so a row that fails
    # before its knobs parse still says what it asked for; a row that gets further records the parsed ones
    return {
        "id": plan.key, "index": plan.row.position, "task": job.task, "status": "failed", "output": None,
        "text": None, "think": None, "answer": None, "error": None, "seed": None, "prompt": None, "inputs": None,
        "params": _plain({**base, **knob_cells(plan.row.data, job.task)}) or None,
        "timings": None, "source": plan.row.where(), "rank": dist.rank, "run": run_id,
    }


def _think_and_answer(task: str, text: str | None, think: bool) -> tuple[str | None, str | None]:
    """The manifest's ``think`` and ``answer`` columns: for pictures made with think, the think text."""
    if text is None or not think:
        return None, text if task in knob_table.TEXT_TASKS else None
    plan, answer = split_think(text)
    if task in knob_table.IMAGE_TASKS:  # the text of a picture is all plan
        return plan if plan is not None else text.strip(), None
    return plan, answer


def _start(record: dict[str, Any], plan: Plan, job: BatchJob, base: dict, base_seed: int):
    call = build_call(plan, job.task, base, base_seed, job.prompt_column)
    record.update(seed=call.seed, prompt=call.prompt, inputs=call.inputs or None, params=_plain(dict(call.kwargs)))
    return call


def _finish(record: dict[str, Any], out, call, plan: Plan, job: BatchJob, out_dir: Path, model: str | None) -> None:
    if job.task in knob_table.IMAGE_TASKS:
        if getattr(out, "image", None) is None:
            raise RuntimeError("the model returned no image")
        manifests.save_image(out.image, out_dir / plan.output, describe(job.task, call.prompt, out, model))
        record["output"] = plan.output
    params = getattr(out, "params", None)
    text = getattr(out, "text", None)
    think, answer = _think_and_answer(job.task, text, bool(call.kwargs.get("think")))
    record.update(
        status="ok", text=text, think=think, answer=answer,
        seed=out.seed if getattr(out, "seed", None) is not None else call.seed,
        params=_plain(params) if params else record["params"],
        timings=_plain(dict(getattr(out, "timings", None) or {})),
    )


def _close(record: dict[str, Any], t0: float) -> dict[str, Any]:
    timings = record["timings"] or {}
    timings["row_s"] = round(time.perf_counter() - t0, 6)
    record["timings"] = timings
    record["finished_at"] = manifests.now()
    return record


def model_parallel_size(job: BatchJob) -> int:
    """Processes one model runs over (``--cfg-parallel-size`` x ``--tensor-parallel-size``, else
    ``--vae-patch-parallel-size``; 1: none)."""
    mesh = int(job.load_options.get("cfg_parallel_size") or 1) * int(job.load_options.get("tensor_parallel_size") or 1)
    return mesh if mesh > 1 else int(job.load_options.get("vae_patch_parallel_size") or 1)


class _NoWriter:
    """The part file of a model-parallel rank other than 0: it runs every row, rank 0 writes them."""

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False

    def append(self, record) -> None:
        pass


def _process(pipe, plan: Plan, job: BatchJob, base: dict, base_seed: int, out_dir: Path, dist: data_parallel.Dist,
             run_id: str, progress: _Progress, write: bool = True) -> dict[str, Any]:
    """One row: its call, and (``write``) its output files and record."""
    t0 = time.perf_counter()
    record = _new_record(plan, job, dist, run_id, base)
    try:
        call = _start(record, plan, job, base, base_seed)
        kwargs = dict(call.kwargs)
        if job.task in knob_table.IMAGE_TASKS:
            kwargs["callback"] = progress.step
        out = getattr(pipe, call.method)(*call.args, **kwargs)
        if write:
            _finish(record, out, call, plan, job, out_dir, getattr(pipe, "model_name", None))
    except Exception as e:  # noqa: BLE001 - a bad row fails alone; the job goes on
        if is_disk_full(e):  # not the row's fault: stop, every finished row is kept
            raise e if isinstance(e, DiskFull) else disk_full(e, f"the output of row {plan.key!r}") from e
        record.update(status="failed", error=_error_text(e))
    return _close(record, t0)


def _process_together(pipe, plans: list[Plan], job: BatchJob, base: dict, base_seed: int, out_dir: Path,
                      dist: data_parallel.Dist, run_id: str, progress: _Progress,
                      write: bool = True) -> list[tuple[Plan, dict[str, Any]]]:
    """t2i rows whose knobs agree (size, steps, guidance...) in one ``pipe.generate(list)`` call:
    every denoising step of all of them is one batched forward. Each row keeps its own seed, so its
    image equals the one made alone. A group whose call fails is retried row by row."""
    t0 = time.perf_counter()
    results: dict[str, dict[str, Any]] = {}
    groups: dict[str, list[tuple[Plan, Any]]] = {}
    for plan in plans:
        record = _new_record(plan, job, dist, run_id, base)
        try:
            call = _start(record, plan, job, base, base_seed)
        except Exception as e:  # noqa: BLE001
            record.update(status="failed", error=_error_text(e))
            results[plan.key] = _close(record, t0)
            continue
        results[plan.key] = record
        knobs = {k: v for k, v in call.kwargs.items() if k != "seed"}
        groups.setdefault(repr(sorted(knobs.items())), []).append((plan, call))
    for members in groups.values():
        if len(members) == 1:
            plan, _ = members[0]
            results[plan.key] = _process(pipe, plan, job, base, base_seed, out_dir, dist, run_id, progress, write)
            continue
        knobs = {k: v for k, v in members[0][1].kwargs.items() if k != "seed"}
        try:
            outs = pipe.generate([c.prompt for _, c in members], seed=[c.seed for _, c in members],
                                 callback=progress.step, **knobs)
        except Exception:  # noqa: BLE001 - find the bad row(s) one by one
            for plan, _ in members:
                results[plan.key] = _process(pipe, plan, job, base, base_seed, out_dir, dist, run_id, progress, write)
            continue
        for (plan, call), out in zip(members, outs):
            record = results[plan.key]
            if not write:
                continue
            try:
                _finish(record, out, call, plan, job, out_dir, getattr(pipe, "model_name", None))
            except Exception as e:  # noqa: BLE001
                if is_disk_full(e):
                    raise e if isinstance(e, DiskFull) else disk_full(e, f"the output of row {plan.key!r}") from e
                record.update(status="failed", error=_error_text(e))
            results[plan.key] = _close(record, t0)
    return [(plan, results[plan.key]) for plan in plans]


def exit_code(summary: Summary) -> int:
    """0 when every row of the job is done and ok, 3 when some failed or were left unfinished."""
    return 0 if summary.failed == 0 and summary.unfinished == 0 else 3

