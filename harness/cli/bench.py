"""``harness bench`` and ``harness report``: timing and memory sweeps, and their report page.

The sweep itself is ``harness.bench.sweep`` (rows, workers, resume, torchrun), the numbers
``harness.bench.measure``, the tables and plots ``harness.bench.report`` (docs/bench.md).
"""

from __future__ import annotations

import importlib.metadata
import json
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Optional

import typer
from rich.markup import escape

from harness.cli.common import (DEVICE_HELP, SET_HELP, console, fail, select_device, split,
                                with_variants)

# Sizes when none are given: a GPU sweep, and a CPU run the Triton interpreter finishes.
DEFAULTS = {
    "cuda": dict(seq_len=[2048, 8192], batch=2, heads=16, head_dim=128, dtype=["bfloat16"]),
    "cpu": dict(seq_len=[64, 128], batch=1, heads=2, head_dim=16, dtype=["float32"]),
}
CPU_CAVEAT = ("timings on CPU (Triton interpreter) are not meaningful: this run shows the "
              "harness works, not how fast anything is")


def _ints(text: str, option: str) -> list[int]:
    values = []
    for part in split([text]):
        try:
            value = int(part)
        except ValueError:
            value = 0
        if value < 1:
            fail(f"{option}: expected comma-separated positive integers, got {text!r}")
        values.append(value)
    if not values:
        fail(f"{option}: expected comma-separated positive integers, got {text!r}")
    return values


def _positive(value: int | None, option: str, default: int) -> int:
    if value is None:
        return default
    if value < 1:
        fail(f"{option}: expected a positive integer, got {value}")
    return value


def _choose(ops: list[str], names: list[str], baseline: str | None, device: str) -> dict:
    """The implementations of each operator to measure, in order: the ones named (default:
    every one available here; on a GPU not the slow references), then the baseline if it is
    not among them."""
    from harness.registry import implementations

    by_op = {op: {i.name: i for i in implementations(op)} for op in ops}
    chosen: dict[str, list] = {op: [] for op in ops}

    def take(name: str, option: str) -> None:
        having = [op for op in ops if name in by_op[op]]
        if not having:
            known = sorted({n for op in ops for n in by_op[op]})
            fail(f"{option}: unknown implementation {name!r} of {', '.join(ops)}; "
                  f"known: {', '.join(known)}")
        for op in having:
            why = by_op[op][name].why_unavailable(device)
            if why:
                fail(f"{option}: {op}/{name} is not available on {device}: {why}")
            if by_op[op][name] not in chosen[op]:
                chosen[op].append(by_op[op][name])

    for name in dict.fromkeys(names):
        take(name, "--impl")
    if not names:
        for op in ops:
            chosen[op] = [i for i in by_op[op].values() if i.why_unavailable(device) is None
                          and not (device == "cuda" and i.kind == "reference")]
    if baseline:
        take(baseline, "--baseline")
    return {op: impls for op, impls in chosen.items() if impls}


def _versions() -> dict[str, str | None]:
    import torch

    found: dict[str, str | None] = {"torch": torch.__version__}
    for dist, key in (("triton", "triton"), ("fla-core", "fla")):
        try:
            found[key] = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            found[key] = None
    try:
        found["git"] = subprocess.run(
            ["git", "describe", "--always", "--dirty"], capture_output=True, text=True,
            timeout=10, cwd=Path(__file__).resolve().parents[1]).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        found["git"] = None
    return found


def _command(args: list[str], world: int) -> str:
    if world > 1:
        local = os.environ.get("LOCAL_WORLD_SIZE", str(world))
        return shlex.join(["torchrun", f"--nproc-per-node={local}", "-m", "harness", *args])
    return shlex.join(["harness", *args])


def _row_line(row: dict[str, Any]) -> str:
    what = escape(f"{row['op']} {row['impl']} {row['dtype']} {row['mode']} T={row['T']}")
    if row["status"] == "ok":
        return f"[dim]{what}: {row['ms']:.3f} ms[/]"
    if row["status"] == "skipped":
        return f"[dim]{what}: skipped ({escape(str(row['reason']))})[/]"
    return f"[red]{what}: {row['status']}[/] {escape(str(row.get('reason', '')))}"


def bench(
    ops: list[str] = typer.Argument(..., help="operators (see `harness list`), or 'all'"),
    impl: list[str] = typer.Option([], "--impl", help="implementation(s), comma-separated or repeated; default: every available one (on a GPU: kernels, peers and baselines, no references)"),
    seq_len: Optional[str] = typer.Option(None, help="comma-separated T values (default: 2048,8192 on cuda, 64,128 on cpu)"),
    batch: Optional[int] = typer.Option(None, help="B (default: 2 on cuda, 1 on cpu)"),
    heads: Optional[int] = typer.Option(None, help="H (default: 16 on cuda, 2 on cpu)"),
    groups: Optional[int] = typer.Option(None, help="G, the q/k groups of the operators that have them (log-linear attention); H must be a multiple (default: G = H)"),
    head_dim: Optional[int] = typer.Option(None, help="K = V, D for TTT/Titans (default: 128 on cuda, 16 on cpu)"),
    dtype: Optional[str] = typer.Option(None, help="input dtype(s), comma-separated (default: bfloat16 on cuda, float32 on cpu)"),
    mode: str = typer.Option("fwd,fwdbwd", help="fwd, bwd and/or fwdbwd, comma-separated"),
    baseline: Optional[str] = typer.Option(None, help="implementation the speedup columns divide by (e.g. sdpa, fla_chunk)"),
    warmup: float = typer.Option(25.0, help="warm-up per row (ms, do_bench's)"),
    rep: float = typer.Option(100.0, help="timed repetitions per row (ms, do_bench's)"),
    timeout: float = typer.Option(300.0, help="seconds a row may take (compile and autotune included) before its worker is killed"),
    max_time: Optional[float] = typer.Option(None, help="seconds after which no new row starts (a time limit per call); the same command with --resume does the rest"),
    out: Path = typer.Option(Path("out/bench"), help="directory for rows.jsonl, CSV, JSON, plots, ceilings.json, meta.json"),
    resume: bool = typer.Option(False, "--resume", help="keep the rows already in OUT and measure only the rest (failed and timed-out rows again)"),
    isolate: bool = typer.Option(True, "--isolate/--no-isolate", help="measure each row in a worker process (crash-proof); --no-isolate for debugging"),
    prewarm: int = typer.Option(0, help="first compile every implementation's kernels in this many processes at once (one process a job; a cold Triton cache otherwise costs each first row its compiles, one after another)"),
    plugin: list[str] = typer.Option([], "--plugin", help="module or .py file registering extra implementations, imported here and in every worker"),
    sets: list[str] = typer.Option([], "--set", help=SET_HELP),
    device: str = typer.Option("auto", help=DEVICE_HELP),
) -> None:
    """Time implementations over a sweep of T: median ms and spread, tokens/s, TFLOP/s, GB/s, % of the device's ceilings, extra peak memory; table, CSV, JSON and plots under OUT."""
    device = select_device(device)
    from harness.bench import ceilings as ceil
    from harness.bench import sweep as sw
    from harness.bench.costs import MODES
    from harness.bench.report import (derive, failures, frame, plot, pivot, print_pivot, read_meta,
                                      write_tables)
    from harness.implementation import DTYPES
    from harness.registry import load_plugin
    from references.operators import OPERATORS

    for spec in plugin:
        try:
            load_plugin(spec)
        except ValueError as exc:
            fail(f"--plugin: {exc}")
    if ops == ["all"]:
        ops = list(OPERATORS)
    for op in ops:
        if op not in OPERATORS:
            fail(f"unknown operator {op!r}; expected one of {', '.join(OPERATORS)}, or all")
    ops = list(dict.fromkeys(ops))
    d = DEFAULTS[device]
    seq_lens = _ints(seq_len, "--seq-len") if seq_len is not None else d["seq_len"]
    B = _positive(batch, "--batch", d["batch"])
    H = _positive(heads, "--heads", d["heads"])
    D = _positive(head_dim, "--head-dim", d["head_dim"])
    if groups is not None and (groups < 1 or H % groups):
        fail(f"--groups: expected a divisor of H = {H}, got {groups}")
    dtypes = split([dtype]) if dtype is not None else d["dtype"]
    for name in dtypes:
        if name not in DTYPES:
            fail(f"--dtype: expected {', '.join(DTYPES)}, got {name!r}")
    modes = split([mode])
    for m in modes:
        if m not in MODES:
            fail(f"--mode: expected {', '.join(MODES)}, got {m!r}")
    if not modes or not dtypes:
        fail(f"--mode and --dtype need at least one value, got {mode!r} and {dtype!r}")
    if warmup < 0:
        fail(f"--warmup: expected milliseconds >= 0, got {warmup}")
    if rep <= 0 or timeout <= 0:
        fail(f"--rep and --timeout: expected positive values, got {rep} and {timeout}")
    if max_time is not None and max_time <= 0:
        fail(f"--max-time: expected positive seconds, got {max_time}")
    if prewarm < 0:
        fail(f"--prewarm: expected a number of processes >= 0, got {prewarm}")
    chosen, variants = _choose(ops, split(impl), baseline, device), []
    for op in chosen:
        chosen[op], specs = with_variants(chosen[op], sets)
        variants += specs
    if sets and not variants:
        fail("--set: switch forms apply to Triton implementations, and none is chosen")
    if not chosen:
        fail(f"no implementation of {', '.join(ops)} is available on {device}")

    args = ["bench", *ops] + (["--impl", ",".join(split(impl))] if impl else [])
    args += ["--seq-len", ",".join(map(str, seq_lens)), "--batch", str(B), "--heads", str(H),
             "--head-dim", str(D), "--dtype", ",".join(dtypes), "--mode", ",".join(modes)]
    args += ["--groups", str(groups)] if groups is not None else []
    args += (["--baseline", baseline] if baseline else []) + ["--warmup", f"{warmup:g}",
             "--rep", f"{rep:g}", "--timeout", f"{timeout:g}", "--device", device, "--out", str(out)]
    args += ["--max-time", f"{max_time:g}"] if max_time is not None else []
    args += ["--prewarm", str(prewarm)] if prewarm else []
    args += (["--resume"] if resume else []) + ([] if isolate else ["--no-isolate"])
    args += [a for p in plugin for a in ("--plugin", p)]
    args += [a for text in sets for a in ("--set", text)]

    sweep = sw.Sweep(impls=chosen, seq_lens=seq_lens, batch=B, heads=H, head_dim=D,
                     dtypes=dtypes, modes=modes, device=device, out=out, warmup=warmup, rep=rep,
                     timeout=timeout, isolate=isolate, resume=resume, plugins=list(plugin) + variants,
                     max_time=max_time, prewarm=prewarm, groups=groups)
    rank, world = int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))
    if device == "cpu" and rank == 0:
        console.print(f"[yellow bold]{CPU_CAVEAT}[/]")
    meta = read_meta(out) if resume else {}
    meta.update(_versions(), baseline=baseline, device=device, world_size=world,
                date=time.strftime("%Y-%m-%d %H:%M:%S"), argv=sys.argv[1:],
                commands=meta.get("commands", []) + [_command(args, world)])
    if rank == 0:  # now, so that a sweep killed from outside still has its command recorded
        out.mkdir(parents=True, exist_ok=True)
        (out / "meta.json").write_text(json.dumps(meta, indent=1))
    cached = ceil.load(out)
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    progress = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                        TimeElapsedColumn(), console=console, disable=rank != 0)
    with progress:
        task = progress.add_task(f"bench on {device}", total=None)

        def on_row(row: dict[str, Any], done: int, total: int) -> None:
            progress.update(task, completed=done, total=total)
            if rank == 0:
                progress.console.print(_row_line(row), highlight=False, soft_wrap=True)

        def on_prewarm(job: dict[str, Any]) -> None:
            if rank == 0:
                progress.console.print(
                    f"prewarm {job['op']} {escape(job['impl'])} {job['dtype']} {job['mode']} T={job['T']}: "
                    f"{job['status']} in {job['seconds']:g} s"
                    + (f": {job['message']}" if job["status"] != "ok" and job["message"] else ""),
                    highlight=False, soft_wrap=True)

        try:
            result = sw.run(sweep, on_row, cached_ceilings=list(cached), on_prewarm=on_prewarm)
        finally:
            sw.shutdown()
    if result.rank != 0:
        console.print(f"rank {result.rank}: measured {len(result.rows)} rows; rank 0 writes "
                      f"the table")
        return
    for note in result.notes:
        console.print(f"[yellow]{escape(note)}[/]", soft_wrap=True)
    if result.set_aside:
        console.print(f"[dim]started afresh: the earlier rows are in {out / 'previous'}[/]")
    all_ceilings = {**cached, **result.ceilings}
    if result.ceilings:
        ceil.save(out, result.ceilings)

    df = derive(frame(result.rows), all_ceilings, baseline)
    print_pivot(console, pivot(df, "ms", "{:.3f}"),
                f"median ms per call on {device} ({result.measured} rows measured now, "
                f"{len(df)} in {out})")
    if baseline:
        print_pivot(console, pivot(df, "speedup", "{:.2f}x"), f"speedup over {baseline}")
    bad = failures(df)
    for r in bad.itertuples(index=False):
        console.print(f"[red]{r.status}[/] {r.op} {r.impl} {r.dtype} {r.mode} T={r.T}: "
                      f"{escape(str(r.reason))}", highlight=False, soft_wrap=True)
    paths = write_tables(df, out, meta, all_ceilings) + plot(df, out, baseline)
    console.print(f"[dim]wrote {', '.join(str(p) for p in paths)}; `harness report {out}` "
                  f"writes the report page[/]")
    if len(bad):
        console.print(f"[red]{len(bad)} row(s) failed[/] (recorded; `--resume` measures them again)")
    if result.remaining:
        console.print(f"[yellow]--max-time {max_time:g} s reached: {result.remaining} row(s) not "
                      f"started; run the same command with --resume to measure them[/]")
    if device == "cpu":
        console.print(f"[yellow bold]{CPU_CAVEAT}[/]")


def report(
    out_dir: Path = typer.Argument(..., help="a directory `harness bench --out` wrote"),
    baseline: Optional[str] = typer.Option(None, help="implementation the speedups divide by (default: the sweep's --baseline)"),
) -> None:
    """Write OUT_DIR/report.md and report.html (tables, plots, commands) from a bench sweep's rows; rebuilds its CSV, JSON and plots too."""
    from harness.bench import ceilings as ceil
    from harness.bench.report import read_meta, write_report
    from harness.bench.sweep import latest, read_rows

    if not out_dir.is_dir():
        fail(f"OUT_DIR: expected a directory written by `harness bench`, got {str(out_dir)!r}")
    rows = latest(read_rows(out_dir))
    if not rows:
        fail(f"OUT_DIR: no rows in {out_dir} (expected rows*.jsonl from `harness bench`)")
    meta = read_meta(out_dir)
    if baseline is not None:
        impls = sorted({r["impl"] for r in rows})
        if baseline not in impls:
            fail(f"--baseline: expected one of the implementations in {out_dir} "
                  f"({', '.join(impls)}), got {baseline!r}")
        meta["baseline"] = baseline
    paths = write_report(out_dir, rows, meta, ceil.load(out_dir))
    console.print(f"wrote {', '.join(str(p) for p in paths)}")
