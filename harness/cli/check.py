"""``harness check``: implementations of an operator against the float64 reference (the engine
is ``harness.check``; docs/check.md says what is checked and how)."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Optional

import typer
from rich.markup import escape

from harness.cli.common import (AUTOTUNE_HELP, DEVICE_HELP, REF_DEVICE_HELP, SET_HELP, console,
                                fail, known_op, pin_configs, select_device, set_ref_device, split,
                                with_variants)

OURS = ("reference", "triton")  # the project's own kinds; peers come with --peers or --impl


def _case_progress(out: Path, op: str):
    """A line per finished case (its worst quantity as a share of its tolerance, which
    implementation, its seconds; its failures and faults) and its rows appended to
    ``<out>/<op>_cases.jsonl`` (flushed and synced), the CSV and JSON rewritten from them: a
    check stopped or killed from outside keeps every case it finished."""
    from harness.bench.sweep import RowWriter
    from harness.check.report import frame, write

    path = out / f"{op}_cases.jsonl"
    path.unlink(missing_ok=True)
    rows_out, kept, count = RowWriter(path), [], 0

    def on_case(case, rows, seconds: float) -> None:
        nonlocal count
        count += 1
        shares = [(r["error"] / r["tolerance"], r) for r in rows
                  if r.get("tolerance") and r["error"] == r["error"]]
        exact = [r for r in rows if r.get("tolerance") == 0 and r.get("status") in ("pass", "fail")]
        failed = sum(r.get("status") == "fail" for r in rows)
        faults = sum(r.get("status") == "fault" for r in rows)
        if shares:
            share, r = max(shares, key=lambda x: x[0])
            worst = f"worst {share:.0%} of tolerance ({escape(r['impl'])} {r['dtype']} {r['quantity']})"
        elif exact:  # the causality family: counts that must be 0
            worst = f"{len(exact)} exact comparison(s)"
        else:
            worst = "nothing compared"
        console.print(f"case {count}: {case.label()}: {worst}"
                      + (f", [red]{failed} failed[/]" if failed else "")
                      + (f", [red]{faults} fault(s)[/]" if faults else "")
                      + f" ({seconds:.1f} s)", highlight=False)
        for r in rows:
            rows_out.write(r)
        kept.extend(rows)
        write(frame(kept), out, op)
    return on_case


def _chosen(op: str, names: list[str], peers: bool, device: str) -> list:
    """The implementations named (each checkable and available here), or by default the
    project's own available here; with ``peers``, also the registered peers available here
    (beside the named ones too)."""
    from harness.registry import get, implementations

    added = [i for i in implementations(op) if i.checkable
             and (i.kind == "peer" and peers or not names and i.kind in OURS)
             and i.why_unavailable(device) is None]
    if not names:
        return added
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
    return chosen + [i for i in added if i.key not in {c.key for c in chosen}]


def _lengths(text: str) -> tuple[int, ...] | None:
    try:
        values = tuple(int(t) for t in text.split(",") if t.strip())
    except ValueError:
        values = (0,)
    if any(v < 1 for v in values):
        fail(f"--long-t: expected comma-separated positive integers, got {text!r}")
    return values or None


def check(
    op: str = typer.Argument(..., help="operator, e.g. delta_rule (see `harness list`)"),
    impl: list[str] = typer.Option([], "--impl", help="implementation(s); default: the project's own available here, but the truth 'naive'"),
    peers: bool = typer.Option(False, "--peers", help="add the registered peers (other libraries) available here, to the defaults or to --impl's"),
    dtype: list[str] = typer.Option([], "--dtype", help="float64,float32,float16,bfloat16; default: float64,float32 on cpu, float32,bfloat16 on cuda"),
    examples: int = typer.Option(40, help="random cases hypothesis draws"),
    seed: int = typer.Option(0, help="hypothesis seed: the same seed draws the same cases"),
    device: str = typer.Option("auto", help=DEVICE_HELP),
    family: list[str] = typer.Option(["random", "long"], "--family", help="random, long, tiling (one case per head-dim tiling class) and/or causality (a non-finite input reaches no earlier output)"),
    long_t: str = typer.Option("", help="lengths of the long family, e.g. 1024,4096 (default by device)"),
    case: Optional[str] = typer.Option(None, help="replay one case (JSON, as a failure prints it)"),
    max_time: Optional[float] = typer.Option(None, "--max-time", help="seconds: start no new case after this; the summary says how many ran"),
    jobs: Optional[int] = typer.Option(None, "--jobs", "-j", help="worker processes running implementations at once (default: 1 on cpu, half the cores up to 8 on cuda)"),
    timeout: float = typer.Option(600.0, help="seconds one implementation may take on one case in one dtype (compiles included) before its worker is killed"),
    isolate: bool = typer.Option(True, "--isolate/--no-isolate", help="run implementations in worker processes (a fault or a hang costs that implementation only); --no-isolate runs them here"),
    out: Path = typer.Option(Path("out/check"), help="directory for CSV, JSON, plots and worker logs"),
    autotune: bool = typer.Option(False, "--autotune/--pinned", help=AUTOTUNE_HELP),
    ref_device: str = typer.Option("auto", "--ref-device", help=REF_DEVICE_HELP),
    plugin: list[str] = typer.Option([], "--plugin", help="module or .py file registering extra implementations (here and in every worker)"),
    sets: list[str] = typer.Option([], "--set", help=SET_HELP),
) -> None:
    """Compare implementations of OP with the float64 reference: outputs, final states, gradients."""
    device = select_device(device)
    pin_configs(autotune)
    set_ref_device(ref_device)
    from harness.cases import Case
    from harness.check import engine
    from harness.check.runner import Setup
    from harness.implementation import DTYPES
    from harness.registry import load_plugin

    for spec in plugin:
        try:
            load_plugin(spec)
        except ValueError as exc:
            fail(f"--plugin: {exc}")
    known_op(op)
    names = split(impl)
    chosen, variants = with_variants(_chosen(op, names, peers, device), sets)
    if sets and not variants:
        fail("--set: switch forms apply to Triton implementations, and none is chosen")
    dtypes = split(dtype) or (["float64", "float32"] if device == "cpu" else ["float32", "bfloat16"])
    for d in dtypes:
        if d not in DTYPES:
            fail(f"unknown dtype {d!r}; known: {', '.join(DTYPES)}")
    families = split(family)
    for f in families:
        if f not in engine.FAMILIES:
            fail(f"unknown family {f!r}; known: {', '.join(engine.FAMILIES)}")
    if examples < 1:
        fail(f"--examples: expected a number of cases >= 1, got {examples}")
    if max_time is not None and max_time < 0:
        fail(f"--max-time: expected seconds >= 0, got {max_time}")
    if timeout <= 0 or (jobs is not None and jobs < 1):
        fail(f"--timeout and --jobs: expected positive values, got {timeout} and {jobs}")
    lengths = _lengths(long_t)
    replay = None
    if case is not None:
        try:
            replay = Case.from_json(case)
        except (ValueError, TypeError) as exc:
            fail(f"--case: {exc}")
        if replay.op != op:
            fail(f"--case is a case of {replay.op!r}, not {op!r}")
    if not chosen:
        fail(f"no implementation of {op} to check on {device}"
             + ("" if peers else " (--peers adds the other libraries' implementations)"))
    from harness.worker import cores

    cuda = device == "cuda"
    setup = Setup(device=device, dtypes=dtypes, isolate=isolate,
                  jobs=jobs or (min(8, max(1, cores() // 2)) if cuda else 1),
                  truth_jobs=max(1, cores() // 4) if cuda and isolate else 0, timeout=timeout,
                  plugins=list(plugin) + variants,
                  deadline=None if max_time is None else time.perf_counter() + max_time,
                  on_case=_case_progress(out, op), log_dir=out / "logs")
    _run(op, chosen, names, families, replay, setup, examples, seed, lengths, out, max_time,
         tuple(sets))


def _run(op, chosen, names, families, replay, setup, examples, seed, lengths, out,
         max_time, sets=()) -> None:
    """The families (or the replayed case) in order, sharing the workers; then the summary
    from the rows written as each case ended, and the verdict."""
    from harness.check import engine
    from harness.check.families import run_family
    from harness.check.runner import TruthMaker, executor

    profile = "cuda" if setup.device == "cuda" else "cpu"
    units, maker = executor(setup), TruthMaker(setup)
    results, asked = [], {}  # asked: the implementations some family was to check
    start, interrupted = time.perf_counter(), False
    console.print(f"checking {op} on {setup.device}: {escape(', '.join(i.name for i in chosen))} "
                  f"({'in ' + str(setup.jobs) + ' worker process(es)' if setup.isolate else 'in this process'})")
    try:
        todo = [(f, None) for f in families]
        if replay is not None:  # a planted case replays in its own family
            todo = [("causality" if replay.poison else "replay", [replay])]
        for fam, cases in todo:
            impls = chosen if names else [i for i in chosen if i.name != engine.TRUTH[fam]
                                          and not (fam == "causality" and i.kind == "reference")
                                          and not (fam == "long" and profile == "cuda"
                                                   and i.name in engine.REFERENCES)]
            asked.update({i.name: i for i in impls})
            results.append(run_family(fam, op, impls, setup, profile, units, maker, examples,
                                      seed, lengths, cases))
    except KeyboardInterrupt:
        interrupted = True
        console.print("[yellow]interrupted: the table below has the cases that finished[/]")
    finally:
        units.close(abort=interrupted)
        maker.close(abort=interrupted)
    _summary(op, list(asked.values()), setup, results, out, max_time,
             time.perf_counter() - start, interrupted, sets)


def _summary(op, asked, setup, results, out, max_time, seconds, interrupted=False,
             sets=()) -> None:
    """The table of every finished case (read back from what was written as each ended), the
    failures, the faults, what compared nothing; exit 1 on any of them, 130 if interrupted
    (not every case asked for ran: no verdict either way)."""
    from harness.check.report import frame, plot_long, print_summary, uncovered, write
    from references.operators import OPERATORS

    path = out / f"{op}_cases.jsonl"
    rows = [json.loads(x) for x in path.read_text().splitlines()] if path.exists() else []
    df = frame(rows)
    cases = df.groupby(["family", "case_json"]).ngroups if len(df) else 0
    print_summary(console, df, OPERATORS[op], f"{op} on {setup.device}: {cases} cases in "
                  f"{seconds:.1f} s (rel. error vs float64 reference; 'of tol' = error / tolerance)")
    paths = write(df, out, op)
    plot = plot_long(df, out / f"{op}_long.png", f"{op}: error against T ({setup.device})")
    console.print(f"[dim]wrote {', '.join(str(p) for p in paths + ([plot] if plot else []))}[/]")
    stopped = any(r.stopped for r in results) or len(results) == 0
    if stopped and max_time is not None:
        console.print(f"[yellow]stopped at --max-time {max_time:g} s: {cases} cases ran, not all "
                      f"that were asked for[/]")
    problems = []
    for failure in (f for r in results for f in r.failures):
        problems.append("failure")
        _print_failure(op, setup.device, failure, sets)
    for r in df[df["status"] == "fault"].itertuples(index=False):
        problems.append("fault")
        console.print(f"[red bold]FAULT[/] {escape(r.impl)} {r.dtype} on {r.case}: {escape(r.note)}",
                      highlight=False, soft_wrap=True)
    for name, why in uncovered(df, asked, setup.dtypes).items():
        problems.append("uncovered")
        console.print(f"[red]{escape(name)}: nothing compared: {escape(why)}[/]", highlight=False)
    compared = int(df["status"].isin(["pass", "fail"]).sum()) if len(df) else 0
    if compared == 0:
        problems.append("nothing")
        console.print(f"[red]{op}: nothing was compared[/] (every case skipped or none ran): "
                      f"nothing checked is not a pass")
    if interrupted:
        raise typer.Exit(130)
    if problems:
        raise typer.Exit(1)
    console.print(f"[green]{op}: all checks passed[/]" + (" (on the cases that ran)" if stopped else ""))


def _print_failure(op: str, device: str, failure, sets=()) -> None:
    """The failing case, its worst quantities, and the command that replays it."""
    from harness.check.engine import replay_command

    bad = [r for r in failure.rows if r.get("status") == "fail"]
    console.print(f"\n[red bold]FAILED[/] on case {failure.case.label()}", highlight=False)
    for r in sorted(bad, key=lambda r: -r["error"] if r["error"] == r["error"] else 0)[:12]:
        console.print(f"  {escape(r['impl'])} {r['dtype']} {r['quantity']}: error {r['error']:.3e}"
                      f" > tolerance {r['tolerance']:.3e} {r['note']}", highlight=False)
    command = replay_command(op, sorted({r["impl"] for r in bad}), sorted({r["dtype"] for r in bad}),
                             device, failure.case, sets)
    console.print("reproduce with:", style="bold")
    console.print(command, soft_wrap=True, highlight=False, markup=False)
