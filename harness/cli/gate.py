"""``harness gate``: the tolerance regression gate on the command line (``harness.gate``;
docs/gate.md). Exit status: 0 passed (or baseline updated), 1 regressions or entries missing
from the baseline, 2 usage errors (unknown or invalid suite, missing or malformed baseline, a
suite not meant for this device).
"""

from __future__ import annotations

import shlex
from pathlib import Path
from typing import Optional

import typer

from harness.cli.common import console, fail, pin_configs, select_device, set_ref_device, split

MAX_ROWS = 40  # rows printed per table; the report under --out has all of them


def _command(suite: str, device: str, device_class: Optional[str], baselines: Optional[Path],
             update: bool, ops: list[str]) -> str:
    parts = ["harness", "gate", "--suite", suite]
    if ops:
        parts += ["--op", ",".join(ops)]
    if device != "auto":
        parts += ["--device", device]
    if device_class:
        parts += ["--device-class", device_class]
    if baselines is not None:
        parts += ["--baselines", str(baselines)]
    if update:
        parts.append("--update")
    return shlex.join(parts)


def gate_cmd(
    suite: str = typer.Option(..., "--suite", help="suite name (suites/<name>.toml) or path to a .toml file"),
    update: bool = typer.Option(False, "--update", help="rewrite the suite's baseline from this run and print what changed"),
    device: str = typer.Option("auto", help="auto: cuda when available, else cpu (Triton kernels through the interpreter)"),
    device_class: Optional[str] = typer.Option(None, "--device-class", help="baseline to use; default: cpu-interpret on the CPU, cuda-sm<major><minor> on a GPU"),
    baselines: Optional[Path] = typer.Option(None, help="directory of <device-class>.json baselines; default: baselines/ beside the suite file"),
    out: Path = typer.Option(Path("out/gate"), help="directory for the JSON and markdown report"),
    jobs: int = typer.Option(1, "--jobs", "-j", min=1, help="cases evaluated at once, each in its own process (a GPU run spends most of its time compiling each case's kernels)"),
    autotune: bool = typer.Option(False, "--autotune/--pinned", help="see `harness check --help`"),
    ref_device: str = typer.Option("auto", "--ref-device", help="see `harness check --help`"),
    op: list[str] = typer.Option([], "--op", help="only these operators' cases (comma-separated): compared with their entries alone; with --update, their entries are replaced and the other operators' kept"),
) -> None:
    """Run a suite and fail when any implementation's error grew past its recorded baseline."""
    import time

    from harness.gate import cpu_pins

    # the CPU's math pinned (harness/gate/cpu_pins.py) before torch loads it, when the run is
    # going to be on the CPU; worker processes get the pins in any case (harness/gate/run.py)
    pinned_here = None
    if device == "cpu" or (device == "auto" and not cpu_pins.gpu_present()):
        pinned_here = cpu_pins.unloaded()
        cpu_pins.pin()
    device_arg = device
    device = select_device(device)
    pin_configs(autotune)
    set_ref_device(ref_device)
    from harness.gate import baseline, compare, report, run
    from harness.gate.suites import SuiteError, display, load_suite

    try:
        s = load_suite(suite)
    except SuiteError as exc:
        fail(str(exc))
    ops = split(op)
    unknown = [o for o in ops if o not in s.ops]
    if unknown:
        fail(f"--op: suite {s.name!r} has no cases of {', '.join(unknown)}; it has {', '.join(s.ops)}")
    if device not in s.devices:
        fail(f"suite {s.name!r} runs on {', '.join(s.devices)} only, not on {device} "
              f"({display(s.path)}: devices = {list(s.devices)}). {s.description}".strip())
    try:
        dc = baseline.check_device_class(device_class or baseline.device_class(device))
        path = Path(display(baseline.baseline_path(dc, baselines or s.path.parent / "baselines")))
        data = baseline.read_baselines(path, dc)
    except baseline.GateError as exc:
        fail(str(exc))
    section = (data or {}).get("suites", {}).get(s.name)
    make = _command(suite, device_arg, device_class, baselines, update=True, ops=ops)
    if section is None and not update:
        fail(f"no baseline for device class {dc} / suite {s.name} ({path} "
              f"{'has no section ' + repr(s.name) if data else 'does not exist'}); create it with\n"
              f"  {make}\nthen review the file and commit it")

    start = time.perf_counter()
    with console.status(f"gate {s.name} on {device} ({dc})") as status:
        def progress(n: int, total: int, sc) -> None:
            status.update(f"gate {s.name} on {device}: case {n + 1}/{total}: {sc.op} {sc.id}")
            if not console.is_terminal:  # a log: one line per case, with the time so far
                console.print(f"case {n + 1}/{total}: {sc.op} {sc.id} ({time.perf_counter() - start:.0f} s)",
                              highlight=False)

        m = run.run_suite(s, device, progress, jobs=jobs, ops=ops)
        wall = time.perf_counter() - start
    if device == "cpu" and not pinned_here and run.in_process(jobs, len(m.cases)):
        console.print("[yellow]the CPU's math is not pinned in this process (torch was loaded "
                      "first): errors may differ from the baseline's by the machine's rounding; "
                      "-j 2 evaluates in fresh, pinned processes[/]")
    measured = sum(1 for k in m.entries if k[4] != run.SKIP)
    n_cases = sum(1 for sc in s.cases if not ops or sc.op in ops)
    console.print(f"gate {s.name} on {device} ({dc}): {n_cases} cases, {measured} entries in "
                  f"{wall:.1f} s wall, {m.total_seconds:.1f} s of case time ("
                  + ", ".join(f"{op} {t:.0f} s" for op, t in m.seconds.items()) + ")")
    if m.alone:
        console.print(f"ran out of memory beside the other workers, so evaluated again alone: "
                      f"{', '.join(m.alone)}", highlight=False)
    for case, why in sorted(m.failures.items()):
        console.print(f"[red]{case} could not run:[/] {why}")

    if update:
        _update(s, m, path, dc, section, make, device, ops)
        return
    section = run.only_ops(section, ops)
    rows = compare.compare(section, m, s, device)
    _print_rows(rows, path, section)
    c = compare.counts(rows)
    paths = report.write_report(out, s, dc, path, section, rows, m.total_seconds)
    console.print(compare.summary_line(c))
    console.print(f"[dim]wrote {', '.join(map(str, paths))}[/]")
    if compare.failed(c):
        what = []
        if c["regression"]:
            what.append(f"{c['regression']} regression(s)")
        if c["new"]:
            what.append(f"{c['new']} entr{'y' if c['new'] == 1 else 'ies'} not in the baseline")
        console.print(f"[red bold]gate {s.name}: FAILED[/] ({', '.join(what)}). If the change is "
                      f"intended, record it with\n  {make}\nand review the diff of {path}",
                      highlight=False)
        raise typer.Exit(1)
    console.print(f"[green bold]gate {s.name}: passed[/]")


def _print_rows(rows, path: Path, section) -> None:
    from rich.table import Table

    from harness.gate import report

    shown = [r for r in rows if r.status in ("regression", "new", "improvement")]
    if not shown:
        console.print(f"no regressions, new entries or improvements against {path}")
        return
    table = Table(title=f"against {path} (growth {section['growth']:g}x)", title_justify="left")
    for col in ("status", "op", "impl", "dtype", "case", "quantity", "baseline", "now", "ratio", "why"):
        table.add_column(col, justify="right" if col in ("baseline", "now", "ratio") else "left")
    style = {"regression": "red", "new": "yellow", "improvement": "green"}
    for r in shown[:MAX_ROWS]:
        table.add_row(f"[{style[r.status]}]{r.status}[/]", r.op, r.impl, r.dtype, r.case, r.quantity,
                      report.fmt_error(r.baseline), report.fmt_error(r.now),
                      "-" if r.ratio is None else f"{r.ratio:.3g}x", r.reason)
    console.print(table)
    if len(shown) > MAX_ROWS:
        console.print(f"... and {len(shown) - MAX_ROWS} more rows (all of them in the report)")
    seen = set()
    for r in rows:
        if r.status == "regression" and r.reproduce and (r.op, r.impl, r.dtype, r.case) not in seen:
            if len(seen) == 3:
                break
            if not seen:
                console.print("reproduce with:", style="bold")
            seen.add((r.op, r.impl, r.dtype, r.case))
            console.print(r.reproduce, soft_wrap=True, highlight=False, markup=False)


def _update(s, m, path: Path, dc: str, old, command: str, device: str,
            ops: list[str]) -> None:
    from rich.table import Table

    from harness.gate import baseline, report, run

    if m.failures:
        console.print(f"[red]not writing {path}: {len(m.failures)} case(s) could not run[/]")
        raise typer.Exit(1)
    section = baseline.make_section(m, command, run.environment(device), old, ops)
    baseline.write_baseline(path, dc, s.name, section)
    ch = report.changes(old, section)
    if ops and old is not None:
        kept = sum(1 for e in section["entries"] if e["op"] not in ops)
        console.print(f"kept {kept} entries of the other operators from the old section")
    for key in ("command", "environment"):
        if old is not None and old.get(key) != section[key]:
            console.print(f"{key} changed: {old.get(key)} -> {section[key]}", highlight=False)
    if old is None:
        console.print(f"created the {s.name} section of {path}: {len(section['entries'])} entries")
    elif not ch:
        console.print(f"baseline unchanged: {path} ({len(section['entries'])} entries)")
    else:
        table = Table(title=f"changed in {path} (suite {s.name})", title_justify="left")
        for col in ("change", "op", "impl", "dtype", "case", "quantity", "old", "new"):
            table.add_column(col)
        for c in ch[:MAX_ROWS]:
            table.add_row(c.change, c.op, c.impl, c.dtype, c.case, c.quantity, c.old, c.new)
        console.print(table)
        if len(ch) > MAX_ROWS:
            console.print(f"... and {len(ch) - MAX_ROWS} more (git diff {path})")
        console.print(f"updated {path}: {len(ch)} change(s), {len(section['entries'])} entries")
    failing = [e for e in section["entries"] if e["passed"] is False]
    if failing:
        console.print(f"[yellow]{len(failing)} entr{'y' if len(failing) == 1 else 'ies'} fail their "
                      f"tolerance and are recorded as known failures (the gate fails if they get worse):[/]")
        for e in failing[:10]:
            console.print(f"  {e['op']} {e['impl']} {e['dtype']} {e['case']} {e['quantity']}: "
                          f"{report.show_entry(e)}", highlight=False)
