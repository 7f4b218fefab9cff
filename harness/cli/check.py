"""``harness check``: implementations of an operator against the float64 reference (the engine
is ``harness.check.engine``; docs/check.md says what is checked and how)."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Optional

import typer

from harness.cli.common import (AUTOTUNE_HELP, DEVICE_HELP, REF_DEVICE_HELP, console, fail,
                                known_op, pin_configs, select_device, set_ref_device, split)


def _case_progress(path: Path):
    """A line per evaluated case (its worst error as a share of its tolerance, its seconds) and
    its rows appended to ``path`` as JSON lines, written as each case ends (flushed and synced,
    as bench's rows are): a check killed from outside (a time limit) keeps every case it
    finished."""
    from harness.bench.sweep import RowWriter

    path.unlink(missing_ok=True)
    rows_out = RowWriter(path)
    count = 0

    def on_case(case, rows, seconds: float) -> None:
        nonlocal count
        count += 1
        shares = [r["error"] / r["tolerance"] for r in rows
                  if r.get("tolerance") and r["error"] == r["error"]]
        failed = sum(not r["passed"] for r in rows)
        worst = f"worst {max(shares):.0%} of tolerance" if shares else "nothing compared"
        console.print(f"case {count}: {case.label()}: {worst}"
                      + (f", [red]{failed} failed[/]" if failed else "") + f" ({seconds:.1f} s)")
        for r in rows:
            rows_out.write(r)
    return on_case


def _chosen(op: str, names: list[str], device: str) -> list:
    """The implementations named (each checkable and available here), or by default every one
    available here except the speed baselines."""
    from harness.registry import get, implementations

    if not names:
        return [i for i in implementations(op) if i.checkable and i.why_unavailable(device) is None]
    try:
        chosen = [get(op, n) for n in names]
    except KeyError as exc:
        fail(exc.args[0])
    for i in chosen:
        if not i.checkable:
            fail(f"{i.key} is a {i.kind} ({i.description}); it computes other math, so there is "
                 f"nothing to check it against: time it with `harness bench`")
        why = i.why_unavailable(device)
        if why:
            fail(f"{i.key} is not available on {device}: {why}")
    return chosen


def check(
    op: str = typer.Argument(..., help="operator, e.g. delta_rule (see `harness list`)"),
    impl: list[str] = typer.Option([], "--impl", help="implementation(s); default: all available except the truth 'naive'"),
    dtype: list[str] = typer.Option([], "--dtype", help="float64,float32,float16,bfloat16; default: float64,float32 on cpu, + bfloat16 on cuda"),
    examples: int = typer.Option(40, help="random cases hypothesis draws"),
    seed: int = typer.Option(0, help="hypothesis seed: the same seed draws the same cases"),
    device: str = typer.Option("auto", help=DEVICE_HELP),
    family: list[str] = typer.Option(["random", "long"], "--family", help="random, long and/or tiling (one case per head-dim tiling class)"),
    long_t: str = typer.Option("", help="lengths of the long family, e.g. 1024,4096 (default by device)"),
    case: Optional[str] = typer.Option(None, help="replay one case (JSON, as a failure prints it)"),
    max_time: Optional[float] = typer.Option(None, "--max-time", help="seconds: start no new case after this (a time-limited run still gets its table); the summary says how many ran"),
    out: Path = typer.Option(Path("out/check"), help="directory for CSV, JSON and plots"),
    autotune: bool = typer.Option(False, "--autotune/--pinned", help=AUTOTUNE_HELP),
    ref_device: str = typer.Option("auto", "--ref-device", help=REF_DEVICE_HELP),
    plugin: list[str] = typer.Option([], "--plugin", help="module or .py file registering extra implementations"),
) -> None:
    """Compare implementations of OP with the float64 reference: outputs, final states, gradients."""
    device = select_device(device)
    pin_configs(autotune)
    set_ref_device(ref_device)
    from harness.cases import Case
    from harness.check import engine
    from harness.check.report import frame, plot_long, print_summary, write
    from harness.implementation import DTYPES
    from harness.registry import load_plugin
    from references.operators import OPERATORS

    for spec in plugin:
        try:
            load_plugin(spec)
        except ValueError as exc:
            fail(f"--plugin: {exc}")
    known_op(op)
    names = split(impl)
    chosen = _chosen(op, names, device)
    dtypes = split(dtype) or (["float64", "float32"] + (["bfloat16"] if device == "cuda" else []))
    for d in dtypes:
        if d not in DTYPES:
            fail(f"unknown dtype {d!r}; known: {', '.join(DTYPES)}")
    families = split(family)
    for f in families:
        if f not in engine.FAMILIES:
            fail(f"unknown family {f!r}; known: {', '.join(engine.FAMILIES)}")
    profile = "cuda" if device == "cuda" else "cpu"

    def impls_for(fam: str) -> list:  # by default each family leaves out its own truth
        return chosen if names else [i for i in chosen if i.name != engine.TRUTH[fam]]

    results = []
    deadline = None if max_time is None else time.perf_counter() + max_time
    on_case = _case_progress(out / f"{op}_cases.jsonl")
    if case is not None:
        try:
            replay = Case.from_json(case)
        except (ValueError, TypeError) as exc:
            fail(f"--case: {exc}")
        if replay.op != op:
            fail(f"--case is a case of {replay.op!r}, not {op!r}")
        results.append(engine.check_cases([replay], chosen, dtypes, device, "replay",
                                          on_case=on_case))
    else:
        with console.status(f"checking {op} on {device}: {', '.join(i.name for i in chosen)}"):
            if "random" in families:
                results.append(engine.check_random(op, impls_for("random"), dtypes, device,
                                                   examples, seed, profile, deadline, on_case))
            if "long" in families:
                lengths = tuple(int(t) for t in long_t.split(",") if t.strip()) or None
                results.append(engine.check_long(op, impls_for("long"), dtypes, device, profile,
                                                 lengths, deadline, on_case))
            if "tiling" in families:
                results.append(engine.check_tiling(op, impls_for("tiling"), dtypes, device,
                                                   profile, deadline, on_case))

    rows = [r for res in results for r in res.rows]
    df = frame(rows)
    seconds = sum(r.seconds for r in results)
    cases = sum(r.examples for r in results)
    print_summary(console, df, OPERATORS[op], f"{op} on {device}: {cases} cases in {seconds:.1f} s "
                               f"(rel. error vs float64 reference; 'of tol' = error / tolerance)")
    paths = write(df, out, op)
    plot = plot_long(df, out / f"{op}_long.png", f"{op}: error against T ({device})")
    console.print(f"[dim]wrote {', '.join(str(p) for p in paths + ([plot] if plot else []))}[/]")

    failures = [r.failure for r in results if r.failure is not None]
    stopped = any(r.stopped for r in results)
    if stopped:
        console.print(f"[yellow]stopped at --max-time {max_time:g} s: {cases} cases ran, not all "
                      f"that were asked for[/]")
    if not failures:
        console.print(f"[green]{op}: all checks passed[/]" + (" (on the cases that ran)" if stopped else ""))
        return
    for failure in failures:
        _print_failure(op, device, failure)
    raise typer.Exit(1)


def _print_failure(op: str, device: str, failure) -> None:
    """The failing case, its worst quantities, and the command that replays it."""
    from harness.check.engine import replay_command

    bad = [r for r in failure.rows if not r["passed"]]
    console.print(f"\n[red bold]FAILED[/] on case {failure.case.label()}")
    for r in sorted(bad, key=lambda r: -r["error"] if r["error"] == r["error"] else 0)[:12]:
        console.print(f"  {r['impl']} {r['dtype']} {r['quantity']}: error {r['error']:.3e}"
                      f" > tolerance {r['tolerance']:.3e} {r['note']}")
    command = replay_command(op, sorted({r["impl"] for r in bad}), sorted({r["dtype"] for r in bad}),
                             device, failure.case)
    console.print("reproduce with:", style="bold")
    console.print(command, soft_wrap=True, highlight=False, markup=False)
