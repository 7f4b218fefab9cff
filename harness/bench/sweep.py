"""The sweep of ``harness bench``: which rows, measured in which process, kept where.

A row is one (op, impl, dtype, mode, B, T, H, D) (``harness.bench.KEY``), with G for an
operator with q/k groups under --groups. The sweep

* plans every row in a fixed order (operator, T, dtype, mode, implementation); rows an
  implementation cannot run (dtype, no backward, a declined case, too long for the Triton
  interpreter) are recorded as ``skipped`` with the reason, not measured;
* with ``prewarm`` N, first runs each implementation's kernels once in N processes at a time,
  so that the timed rows find them compiled (``harness.bench.prewarm``);
* measures each of the others in a worker process (``harness.worker``), so that a crash,
  a CUDA error or a hang costs that row only: it is recorded as ``failed`` or ``timeout`` with
  the reason and the sweep goes on (``isolate=False`` measures in this process, for debugging);
* starts no row after ``max_time`` seconds (a device's time limit per call): the rows left
  are for the same command with ``resume``;
* appends every finished row to ``OUT/rows.jsonl`` at once (flushed and synced), so a sweep
  that is killed keeps what it measured. With ``resume`` the rows already ``ok`` or ``skipped``
  there are not measured again; ``failed`` and ``timeout`` rows are (a fix or a longer timeout
  may make them pass). Without ``resume`` an earlier sweep's rows are moved to
  ``OUT/previous/`` and the sweep starts afresh;
* under ``torchrun`` (``WORLD_SIZE > 1``) shards the rows still to do across ranks (rank r
  takes every world-th row starting at r, measuring on GPU ``LOCAL_RANK``), each rank appending
  to ``OUT/rows.rank<r>.jsonl``, and gathers all rows on rank 0 with
  ``torch.distributed.gather_object``. The collectives use gloo: the processes that gather
  never touch the GPU (their workers do), so NCCL would need a CUDA context for nothing.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any, Callable

from harness.bench.measure import KEY, bench_case, row_key
from harness.implementation import Implementation
from references.operators import OPERATORS

DONE = ("ok", "skipped")
DIST_TIMEOUT = timedelta(hours=24)  # ranks wait for the slowest one at the final gather
CEILINGS_TIMEOUT = 600.0
ROW, CEILINGS = "harness.bench.measure:run_spec", "harness.bench.ceilings:request"


@dataclass
class Sweep:
    """What to measure and how."""

    impls: dict[str, list[Implementation]]  # operator -> implementations, in order
    seq_lens: list[int]
    batch: int
    heads: int
    head_dim: int
    dtypes: list[str]
    modes: list[str]
    device: str
    out: Path
    warmup: float = 25.0
    rep: float = 100.0
    timeout: float = 300.0
    isolate: bool = True
    resume: bool = False
    plugins: list[str] = field(default_factory=list)
    max_time: float | None = None  # s: start no row after this (a device's time limit)
    prewarm: int = 0  # processes compiling the rows' kernels before timing (harness.bench.prewarm)
    groups: int | None = None  # G, for the operators with q/k groups (None: G = H)


def skip_reason(impl: Implementation, case: Any, dtype: str, mode: str, device: str) -> str | None:
    """Why ``impl`` cannot run this row here (None when it can)."""
    reason = impl.dtype_unsupported(dtype, device) or impl.too_slow(case, device)
    if reason is None and mode != "fwd" and not impl.backward:
        reason = "no backward"
    if reason is None and impl.supports is not None:
        reason = impl.supports(case)
    return reason


def plan(sweep: Sweep) -> list[dict[str, Any]]:
    """Every row of the sweep, in order; the ones that cannot run carry status ``skipped``."""
    rows = []
    for op, impls in sweep.impls.items():
        for T in sweep.seq_lens:
            grouped = sweep.groups is not None and "G" in OPERATORS[op].dims
            G = sweep.groups if grouped else None
            case = bench_case(op, sweep.batch, T, sweep.heads, sweep.head_dim, G=G)
            for dtype in sweep.dtypes:
                for mode in sweep.modes:
                    for impl in impls:
                        row = dict(op=op, impl=impl.name, dtype=dtype, mode=mode, B=sweep.batch,
                                   T=T, H=sweep.heads, D=sweep.head_dim, kind=impl.kind,
                                   **({"G": G} if grouped else {}))
                        reason = skip_reason(impl, case, dtype, mode, sweep.device)
                        if reason:
                            row.update(status="skipped", reason=reason)
                        rows.append(row)
    return rows


# ---------------------------------------------------------------- rows on disk
def rows_files(out: Path) -> list[Path]:
    return sorted(Path(out).glob("rows*.jsonl"))


def read_rows(out: Path) -> list[dict[str, Any]]:
    """Every row appended under ``out`` (all ranks' files), oldest first. A line cut short by a
    crash is ignored."""
    rows = []
    for path in rows_files(out):
        for line in path.read_text().splitlines():
            try:
                row = json.loads(line)
            except ValueError:
                continue
            if isinstance(row, dict) and all(k in row for k in KEY):
                rows.append(row)
    rows.sort(key=lambda r: r.get("finished", 0.0))
    return rows


def latest(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The last row of every key, in the order the keys first appeared."""
    by_key: dict[tuple, dict[str, Any]] = {}
    for row in rows:
        by_key[row_key(row)] = row
    return list(by_key.values())


def set_aside(out: Path) -> list[Path]:
    """Move an earlier sweep's rows to ``out/previous/`` (replacing what was there)."""
    old = rows_files(out)
    if not old:
        return []
    previous = Path(out) / "previous"
    shutil.rmtree(previous, ignore_errors=True)
    previous.mkdir(parents=True)
    for path in old:
        path.rename(previous / path.name)
    return old


class RowWriter:
    """Appends rows to one JSON-lines file, each flushed and synced as it is written."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._file = open(self.path, "a")

    def write(self, row: dict[str, Any]) -> None:
        self._file.write(json.dumps(row) + "\n")
        self._file.flush()
        os.fsync(self._file.fileno())

    def close(self) -> None:
        self._file.close()


# ---------------------------------------------------------------- who measures
class InProcess:
    """Measures in this process (``--no-isolate``): a crash ends the sweep, a hang hangs it."""

    def __init__(self, device: str, device_index: int):
        self.device = device
        if device == "cuda":
            import torch

            torch.cuda.set_device(device_index)

    def run(self, spec: dict[str, Any], timeout: float) -> dict[str, Any]:
        from harness.worker import handle

        return handle({"target": ROW, "spec": spec}, self.device)

    def ceilings(self, cached: list[str]) -> dict[str, Any] | None:
        from harness.bench.ceilings import request

        return request({"cached": cached}, self.device)

    def abort(self) -> None:
        pass

    def close(self) -> None:
        pass


class Isolated:
    """Measures in a worker process, restarted after every row that did not succeed."""

    def __init__(self, device: str, device_index: int, plugins: list[str], log: Path):
        from harness.worker import Worker

        self.worker = Worker({"device": device, "device_index": device_index,
                              "plugins": list(plugins)}, log)

    def run(self, spec: dict[str, Any], timeout: float) -> dict[str, Any]:
        from harness.worker import WorkerFailed

        try:
            reply = self.worker.request({"target": ROW, "spec": spec}, timeout)
        except WorkerFailed as exc:
            return {"status": exc.status, "reason": exc.reason}
        if reply.get("status") != "ok":
            self.worker.kill()  # its CUDA context may be poisoned: a fresh one for the next row
        return reply

    def ceilings(self, cached: list[str]) -> dict[str, Any] | None:
        from harness.worker import WorkerFailed

        try:
            reply = self.worker.request({"target": CEILINGS, "spec": {"cached": cached}},
                                        CEILINGS_TIMEOUT)
        except WorkerFailed as exc:
            return {"device_name": None, "ceilings": None, "error": exc.reason}
        if reply.get("status") != "ok":
            return {"device_name": None, "ceilings": None, "error": reply.get("reason")}
        return reply

    def abort(self) -> None:
        self.worker.kill()

    def close(self) -> None:
        self.worker.close()


# ---------------------------------------------------------------- torchrun
def distributed() -> tuple[int, int, int]:
    """(rank, world size, local rank): (0, 1, 0) unless launched by torchrun with WORLD_SIZE > 1,
    in which case the gloo process group is initialised here."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return 0, 1, 0
    import torch.distributed as dist

    if not dist.is_initialized():
        dist.init_process_group("gloo", timeout=DIST_TIMEOUT)
    rank = dist.get_rank()
    return rank, dist.get_world_size(), int(os.environ.get("LOCAL_RANK", rank))


def _barrier(world: int) -> None:
    if world > 1:
        import torch.distributed as dist

        dist.barrier()


@dataclass
class Result:
    rows: list[dict[str, Any]]  # rank 0: every row of the output directory; other ranks: theirs
    ceilings: dict[str, dict[str, Any]]  # by device name, measured in this sweep
    rank: int = 0
    world: int = 1
    measured: int = 0  # rows measured (not skipped) in this sweep, all ranks
    remaining: int = 0  # rows not started because max_time ran out, all ranks
    set_aside: list[Path] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)  # warnings for the user (all ranks')


def run(sweep: Sweep, on_row: Callable[[dict[str, Any], int, int], None] | None = None,
        cached_ceilings: list[str] = (),
        on_prewarm: Callable[[dict[str, Any]], None] | None = None) -> Result:
    """Plan, shard, (prewarm,) measure and gather. ``on_row(row, done, total)`` is called on
    each finished row of this rank (the progress display), ``on_prewarm(job)`` on each
    finished prewarm job."""
    deadline = None if sweep.max_time is None else time.monotonic() + sweep.max_time
    rank, world, local_rank = distributed()
    out = Path(sweep.out)
    out.mkdir(parents=True, exist_ok=True)
    previous = latest(read_rows(out)) if sweep.resume else []
    _barrier(world)  # everyone has read the earlier rows before anyone writes
    moved = set_aside(out) if (rank == 0 and not sweep.resume) else []
    _barrier(world)
    done = {row_key(r) for r in previous if r.get("status") in DONE}
    todo = [r for r in plan(sweep) if row_key(r) not in done]
    mine = todo[rank::world]
    run_id = time.strftime("%Y%m%d-%H%M%S")
    name = "rows.jsonl" if world == 1 else f"rows.rank{rank}.jsonl"
    writer = RowWriter(out / name)
    if sweep.isolate:
        runner = Isolated(sweep.device, local_rank, sweep.plugins, out / "logs" / f"worker{rank}.log")
    else:
        runner = InProcess(sweep.device, local_rank)
    ceilings: dict[str, dict[str, Any]] = {}
    new_rows: list[dict[str, Any]] = []
    notes: list[str] = []
    measured = remaining = 0
    try:
        if sweep.prewarm > 0 and any(r.get("status") != "skipped" for r in mine):
            from harness.bench import prewarm

            start = time.perf_counter()
            results = prewarm.prewarm(mine, sweep.device, local_rank, sweep.plugins, sweep.prewarm,
                                      sweep.timeout, on_prewarm)
            notes.append(f"rank {rank}: " + prewarm.summary(results, time.perf_counter() - start))
        if any(r.get("status") != "skipped" for r in mine):
            reply = runner.ceilings(list(cached_ceilings)) or {}
            if reply.get("ceilings"):
                ceilings[reply["device_name"]] = reply["ceilings"]
            if reply.get("error"):
                notes.append(f"rank {rank}: measuring the device's ceilings failed, so no % "
                             f"columns: {reply['error']}")
        for i, spec in enumerate(mine):
            if deadline is not None and time.monotonic() > deadline:
                remaining = len(mine) - i
                break
            start = time.perf_counter()
            row = dict(spec)
            if row.get("status") != "skipped":
                measured += 1
                call = {**spec, "device": sweep.device, "warmup": sweep.warmup, "rep": sweep.rep}
                row.update(runner.run(call, sweep.timeout))
            row.update(device=sweep.device, rank=rank, run=run_id, finished=time.time(),
                       seconds=round(time.perf_counter() - start, 3))
            writer.write(row)
            new_rows.append(row)
            if on_row is not None:
                on_row(row, i + 1, len(mine))
    except BaseException:  # interrupted (Ctrl-C): do not wait for the row in flight
        runner.abort()
        raise
    finally:
        runner.close()
        writer.close()
    if world > 1:
        import torch.distributed as dist

        gathered: list[Any] | None = [None] * world if rank == 0 else None
        dist.gather_object((new_rows, ceilings, measured, remaining, notes), gathered, dst=0)
        if rank == 0:
            new_rows, measured, remaining, notes = [], 0, 0, []
            for rows_r, ceilings_r, measured_r, remaining_r, notes_r in gathered:
                new_rows.extend(rows_r)
                ceilings.update(ceilings_r)
                measured += measured_r
                remaining += remaining_r
                notes.extend(notes_r)
        dist.barrier()
    rows = latest(previous + new_rows) if rank == 0 else new_rows
    return Result(rows=rows, ceilings=ceilings, rank=rank, world=world, measured=measured,
                  remaining=remaining, set_aside=moved, notes=notes)


def shutdown() -> None:
    """Leave the process group (torchrun), if any."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        import torch.distributed as dist

        if dist.is_initialized():
            dist.destroy_process_group()
