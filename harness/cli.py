"""The ``harness`` command line (typer + rich)."""

from __future__ import annotations

import os
import shlex
import time
import sys
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.table import Table

app = typer.Typer(add_completion=False, no_args_is_help=True,
                  help="Exact references and numerical checks for linear-attention kernels.")
console = Console(width=None if sys.stdout.isatty() else 150)

DEVICE_HELP = "auto: cuda when available, else cpu (Triton kernels run through its interpreter)."


def select_device(device: str) -> str:
    """Resolve auto/cpu/cuda. On the CPU, Triton kernels need TRITON_INTERPRET=1 before triton
    is imported, so it is set here, before any implementation is loaded."""
    import torch

    if device not in ("auto", "cpu", "cuda"):
        raise typer.BadParameter(f"expected auto, cpu or cuda, got {device!r}", param_hint="--device")
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise typer.BadParameter("cuda requested but torch sees no CUDA device", param_hint="--device")
    if device == "cpu":
        if "triton" in sys.modules and os.environ.get("TRITON_INTERPRET") != "1":
            console.print("[yellow]triton was imported before TRITON_INTERPRET=1 could be set; "
                          "kernels may not run on the CPU[/]")
        os.environ["TRITON_INTERPRET"] = "1"
    return device


AUTOTUNE_HELP = ("time every tiling config of each kernel and keep the fastest (as bench does); by "
                 "default numerical runs compile each kernel's first config alone: reproducible (the "
                 "autotuner's pick varies run to run, and configs differ in summation order, a few "
                 "ulps), and one compile per shape is minutes less on a GPU")


REF_DEVICE_HELP = ("where the float64 truth and the same-dtype references run: auto (the CPU when "
                   "the implementations run on a GPU, where the references' step loops are "
                   "launch-bound and their autograd graphs would take GPU memory), cpu, or device "
                   "(with the implementations)")


def set_ref_device(choice: str) -> None:
    """Record --ref-device for harness.check (and gate workers, which inherit the environment)."""
    from harness.check import REF_DEVICE_ENV, REF_DEVICES

    if choice not in REF_DEVICES:
        raise typer.BadParameter(f"expected one of {', '.join(REF_DEVICES)}, got {choice!r}",
                                 param_hint="--ref-device")
    os.environ[REF_DEVICE_ENV] = choice


def pin_configs(autotune: bool) -> None:
    """LINATTN_AUTOTUNE=0 unless asked to autotune; kernels read it when first imported."""
    if not autotune:
        os.environ["LINATTN_AUTOTUNE"] = "0"


def _fail(message: str) -> None:
    console.print(f"[red]error:[/] {message}")
    raise typer.Exit(2)


from harness.cli_gate import gate_cmd  # noqa: E402  (the command lives in its own module)

app.command("gate")(gate_cmd)


@app.command("list")
def list_cmd(device: str = typer.Option("auto", help=DEVICE_HELP)) -> None:
    """Every registered implementation: kind, devices, dtypes, and whether it can run here."""
    device = select_device(device)
    from harness.operators import OPERATORS
    from harness.registry import implementations, plugin_errors

    table = Table(title=f"operators and implementations (device: {device})", title_justify="left")
    for col in ("operator", "implementation", "kind", "devices", "dtypes", "available here"):
        table.add_column(col)
    for op in OPERATORS.values():
        for impl in implementations(op.name):
            why = impl.why_unavailable(device)
            table.add_row(op.name, impl.name, impl.kind, ",".join(impl.devices),
                          ",".join(impl.dtypes), "[green]yes[/]" if why is None else f"[red]no[/]: {why}")
    console.print(table)
    for name, err in plugin_errors().items():
        console.print(f"[red]plugin {name} failed to load:[/] {err}")


def _split(values: list[str]) -> list[str]:
    return [v.strip() for item in values for v in item.split(",") if v.strip()]


def _case_progress(path: Path):
    """A line per evaluated case (its worst error as a share of its tolerance, its seconds) and
    its rows appended to ``path`` as JSON lines, written as each case ends (flushed and synced,
    as bench's rows are): a check killed from outside (a device call's time limit) keeps every
    case it finished."""
    from harness.sweep import RowWriter

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


@app.command()
def check(
    op: str = typer.Argument(..., help="operator, e.g. delta_rule (see `harness list`)"),
    impl: list[str] = typer.Option([], "--impl", help="implementation(s); default: all available except the truth 'naive'"),
    dtype: list[str] = typer.Option([], "--dtype", help="float64,float32,float16,bfloat16; default: float64,float32 on cpu, + bfloat16 on cuda"),
    examples: int = typer.Option(40, help="random cases hypothesis draws"),
    seed: int = typer.Option(0, help="hypothesis seed: the same seed draws the same cases"),
    device: str = typer.Option("auto", help=DEVICE_HELP),
    family: list[str] = typer.Option(["random", "long"], "--family", help="random and/or long"),
    long_t: str = typer.Option("", help="lengths of the long family, e.g. 1024,4096 (default by device)"),
    case: Optional[str] = typer.Option(None, help="replay one case (JSON, as a failure prints it)"),
    max_time: Optional[float] = typer.Option(None, "--max-time", help="seconds: start no new case after this (a capped GPU call still gets its table); the summary says how many ran"),
    out: Path = typer.Option(Path("out/check"), help="directory for CSV, JSON and plots"),
    autotune: bool = typer.Option(False, "--autotune/--pinned", help=AUTOTUNE_HELP),
    ref_device: str = typer.Option("auto", "--ref-device", help=REF_DEVICE_HELP),
) -> None:
    """Compare implementations of OP with the float64 reference: outputs, final states, gradients."""
    device = select_device(device)
    pin_configs(autotune)
    set_ref_device(ref_device)
    from harness.cases import Case
    from harness.check import DTYPES, TRUTH, check_cases, check_long, check_random
    from harness.operators import OPERATORS
    from harness.registry import get, implementations
    from harness.report import frame, plot_long, print_summary, write

    if op not in OPERATORS:
        _fail(f"unknown operator {op!r}; known: {', '.join(OPERATORS)}")
    names = _split(impl)
    if names:
        try:
            chosen = [get(op, n) for n in names]
        except KeyError as exc:
            _fail(exc.args[0])
        for i in chosen:
            if not i.checkable:
                _fail(f"{i.key} is a {i.kind} ({i.description}); it computes other math, so "
                      f"there is nothing to check it against: time it with `harness bench`")
            why = i.why_unavailable(device)
            if why:
                _fail(f"{i.key} is not available on {device}: {why}")
    else:  # everything that runs here except baselines; each family then leaves out its truth
        chosen = [i for i in implementations(op)
                  if i.checkable and i.why_unavailable(device) is None]
    dtypes = _split(dtype) or (["float64", "float32"] + (["bfloat16"] if device == "cuda" else []))
    for d in dtypes:
        if d not in DTYPES:
            _fail(f"unknown dtype {d!r}; known: {', '.join(DTYPES)}")
    families = _split(family)
    for f in families:
        if f not in ("random", "long"):
            _fail(f"unknown family {f!r}; known: random, long")
    profile = "cuda" if device == "cuda" else "cpu"

    results = []
    deadline = None if max_time is None else time.perf_counter() + max_time
    on_case = _case_progress(out / f"{op}_cases.jsonl")
    if case is not None:
        try:
            replay = Case.from_json(case)
        except (ValueError, TypeError) as exc:
            _fail(f"--case: {exc}")
        if replay.op != op:
            _fail(f"--case is a case of {replay.op!r}, not {op!r}")
        results.append(check_cases([replay], chosen, dtypes, device, "replay", on_case=on_case))
    else:
        with console.status(f"checking {op} on {device}: {', '.join(i.name for i in chosen)}"):
            if "random" in families:
                impls = chosen if names else [i for i in chosen if i.name != TRUTH["random"]]
                results.append(check_random(op, impls, dtypes, device, examples, seed, profile,
                                            deadline, on_case))
            if "long" in families:
                impls = chosen if names else [i for i in chosen if i.name != TRUTH["long"]]
                lengths = tuple(int(t) for t in long_t.split(",") if t.strip()) or None
                results.append(check_long(op, impls, dtypes, device, profile, lengths, deadline,
                                          on_case))

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
    if any(r.stopped for r in results):
        console.print(f"[yellow]stopped at --max-time {max_time:g} s: {cases} cases ran, not all "
                      f"that were asked for[/]")
    if not failures:
        console.print(f"[green]{op}: all checks passed[/]"
                      + (" (on the cases that ran)" if any(r.stopped for r in results) else ""))
        return
    for failure in failures:
        bad = [r for r in failure.rows if not r["passed"]]
        console.print(f"\n[red bold]FAILED[/] on case {failure.case.label()}")
        for r in sorted(bad, key=lambda r: -r["error"] if r["error"] == r["error"] else 0)[:12]:
            console.print(f"  {r['impl']} {r['dtype']} {r['quantity']}: error {_fmtf(r['error'])}"
                          f" > tolerance {_fmtf(r['tolerance'])} {r['note']}")
        failed_impls = sorted({r["impl"] for r in bad})
        failed_dtypes = sorted({r["dtype"] for r in bad})
        cmd = ["harness", "check", op] + [a for i in failed_impls for a in ("--impl", i)]
        cmd += [a for d in failed_dtypes for a in ("--dtype", d)]
        cmd += ["--device", device, "--case", failure.case.to_json()]
        console.print("reproduce with:", style="bold")
        console.print(" ".join(shlex.quote(c) for c in cmd), soft_wrap=True, highlight=False,
                      markup=False)
    raise typer.Exit(1)


def _fmtf(x: float) -> str:
    return f"{x:.3e}"


@app.command("compile")
def compile_cmd(
    op: str = typer.Argument(..., help="operator, e.g. delta_rule"),
    impl: list[str] = typer.Option([], "--impl", help="Triton implementation(s); default: all of the operator's"),
    case: list[str] = typer.Option([], "--case", help="ids of the gpu suite's cases to record on; default: all"),
    arch: int = typer.Option(90, help="CUDA compute capability to compile for, e.g. 80, 90"),
    jobs: int = typer.Option(2, "--jobs", "-j", min=1, help="compiles at once"),
    all_configs: bool = typer.Option(False, "--all-configs", help="every autotune config, not the first alone"),
    half: list[str] = typer.Option([], "--half", help="dtypes the float16 launches are compiled in; default: bfloat16,float16"),
) -> None:
    """Compile OP's Triton kernels for a GPU on a machine without one: every launch that OP's
    kernels make on the gpu suite's cases (recorded under the interpreter), in bfloat16 too.
    Catches what the interpreter cannot: a kernel that would not compile on the GPU."""
    from harness.compile import compile_op
    from harness.operators import OPERATORS

    if op not in OPERATORS:
        _fail(f"unknown operator {op!r}; known: {', '.join(OPERATORS)}")
    with console.status(f"compiling {op}'s kernels for sm_{arch}"):
        try:
            data = compile_op(op, _split(impl), arch, jobs, all_configs, _split(case),
                              half_as=tuple(_split(half) or ["bfloat16", "float16"]))
        except (RuntimeError, ValueError) as exc:
            _fail(str(exc))
    for err in data["errors"]:
        console.print(f"[yellow]interpreted run failed:[/] {err}", highlight=False)
    failed = [(label, err) for label, err, _ in data["compiled"] if err is not None]
    for label, err in failed:
        console.print(f"[red bold]does not compile:[/] {label}", highlight=False)
        console.print(err, highlight=False, markup=False)
    seconds = sum(t for _, _, t in data["compiled"])
    console.print(f"{op}: {len(data['launches'])} distinct launches, {len(data['compiled'])} "
                  f"compiles for sm_{arch} ({seconds:.0f} s), {len(failed)} failed")
    if failed or data["errors"]:
        raise typer.Exit(1)


def main() -> None:
    app()


from harness import cli_bench  # noqa: E402,F401  (registers `bench` and `report`)
