"""``harness compile``: an operator's Triton kernels compiled for a GPU on a machine without one
(``harness.compile``; docs/compile.md). Prints a line per recorded implementation and per
compiled kernel variant as it happens, so a run logged to a file shows its progress."""

from __future__ import annotations

import time

import typer

from harness.cli.common import console, fail, known_op, split


def _printer(op: str, arch: int):
    """The event handler of compile_op: one plain line per event, with the time so far and,
    while compiling, how long the rest should take at the pace so far."""
    start = time.perf_counter()
    state = {"done": 0, "total": 0, "jobs": 1}

    def on_event(event: dict) -> None:
        elapsed = time.perf_counter() - start
        if event["phase"] == "record":
            console.print(f"recorded {event['impl']} ({event['what']}) under the interpreter: "
                          f"{event['launches']} distinct launches so far ({elapsed:.0f} s)",
                          highlight=False)
        elif event["phase"] == "build-start":
            state.update(total=event["total"], jobs=event["jobs"], built=time.perf_counter())
            chosen = (f"{event['chosen']} of the {event['launches']} launches (each code path's "
                      "smallest whole, its largest through LLVM IR)"
                      if event["chosen"] < event["launches"] else f"{event['launches']} launches")
            console.print(f"compiling {event['total']} kernel variants of {chosen} for "
                          f"sm_{arch} in {event['jobs']} process(es)", highlight=False)
        else:
            state["done"] += 1
            done, total = state["done"], state["total"]
            pace = (time.perf_counter() - state["built"]) / done
            verdict = "[red]FAILED[/]" if event["error"] else "ok"
            console.print(f"[{done:>{len(str(total))}}/{total}] {verdict} {event['seconds']:5.1f} s "
                          f"{event['label']} ({elapsed:.0f} s, ~{pace * (total - done):.0f} s left)",
                          highlight=False)
    return on_event


def compile_cmd(
    op: str = typer.Argument(..., help="operator, e.g. delta_rule"),
    impl: list[str] = typer.Option([], "--impl", help="Triton implementation(s); default: all of the operator's"),
    case: list[str] = typer.Option([], "--case", help="ids of the gpu suite's cases to record on; default: all"),
    arch: int = typer.Option(90, help="CUDA compute capability to compile for, e.g. 80, 90"),
    jobs: int = typer.Option(2, "--jobs", "-j", min=1, help="compiles at once"),
    all_configs: bool = typer.Option(False, "--all-configs", help="every autotune config, not the first alone"),
    dtype: list[str] = typer.Option([], "--dtype", help="input dtypes the launches are recorded with and compiled in; default: float32,bfloat16,float16"),
    each_path: bool = typer.Option(False, "--each-path", help="per code path (kernel, dtypes, flags), its smallest launch compiled whole and its largest through LLVM IR (the shared memory it needs), instead of every head-dim specialisation"),
) -> None:
    """Compile OP's Triton kernels for a GPU on a machine without one: every launch that OP's
    kernels make on the gpu suite's cases in float32, bfloat16 and float16 (recorded under the
    interpreter, which runs no kernel to record them). Catches what the interpreter cannot: a
    kernel that would not compile on the GPU."""
    from harness.compile import RECORD_DTYPES, compile_op

    known_op(op)
    start = time.perf_counter()
    try:
        data = compile_op(op, split(impl), arch, jobs, all_configs, split(case),
                          dtypes=tuple(split(dtype) or RECORD_DTYPES),
                          on_event=_printer(op, arch), each_path=each_path)
    except (RuntimeError, ValueError) as exc:
        fail(str(exc))
    for err in data["errors"]:
        console.print(f"[yellow]interpreted run failed:[/] {err}", highlight=False)
    failed = [(label, err) for label, err, _ in data["compiled"] if err is not None]
    for label, err in failed:
        console.print(f"[red bold]does not compile:[/] {label}", highlight=False)
        console.print(err, highlight=False, markup=False)
    seconds = sum(t for _, _, t in data["compiled"])
    console.print(f"{op}: {len(data['launches'])} distinct launches, {len(data['compiled'])} "
                  f"compiles for sm_{arch} ({seconds:.0f} s of compiling, "
                  f"{time.perf_counter() - start:.0f} s in all), {len(failed)} failed")
    if failed or data["errors"]:
        raise typer.Exit(1)
