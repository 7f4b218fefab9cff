"""An implementation under each of its kernel switches, beside peers, in one process: the
accuracy of every quantity on one case against the float64 truth, and the median time per T.

    python tools/switch_compare.py OP IMPL [--peer NAME ...] [--set 'LABEL:module.NAME=VALUE,...' ...]
        [--acc B,T,H,D | --case JSON] [--dtype bfloat16 | ''] [--seq-len 2048,8192,32768] [--mode fwd,fwdbwd]
        [--batch 2 --heads 16 --head-dim 128] [--out out/switches]

The variants are IMPL under its defaults, under each switch its registration lists
(``Implementation.switches``, e.g. chunk's "the unfused WY forward"), and under each ``--set``
(module constants the kernels read when they run, e.g.
``--set 'fused output:kernels.delta_rule.chunk.FUSED_OUTPUT=True'``); peers run as they are.
A switch stays set for the whole of its variant's forward and backward. Accuracy is the check
engine's (``harness.check.engine.evaluate``: inputs drawn in float64, rounded to the dtype,
relative error of every output, final state and gradient, with initial and final states);
times are bench's (``harness.bench.measure``: ``do_bench`` median on a GPU). This is how a
switch's default is chosen: the numbers behind each go into reports/<op>.md.
"""

from __future__ import annotations

import json
from pathlib import Path

import typer
from rich.console import Console
from rich.table import Table

from harness.switches import parse_set_option, switched

console = Console(width=150)


def main(
    op: str = typer.Argument(..., help="operator, e.g. delta_rule"),
    impl: str = typer.Argument(..., help="the implementation whose switches are compared, e.g. chunk"),
    peer: list[str] = typer.Option([], "--peer", help="implementations run beside it as they are, e.g. fla_chunk"),
    sets: list[str] = typer.Option([], "--set", help="an extra variant: 'LABEL:module.NAME=VALUE,...'"),
    registered: bool = typer.Option(True, "--registered/--no-registered",
                                    help="also the switches IMPL's registration lists"),
    acc: str = typer.Option("2,1000,4,64", help="B,T,H,D of the accuracy case (K = V = D)"),
    case_json: str = typer.Option("", "--case", help="the accuracy case as JSON (as a check "
                                  "failure prints it), instead of --acc"),
    dtype: str = typer.Option("bfloat16", help="dtype(s) of the accuracy case, comma-separated; "
                              "empty: no accuracy rows (times only)"),
    seq_len: str = typer.Option("2048,8192,32768", help="T of the timed rows; empty: no timing"),
    mode: str = typer.Option("fwd,fwdbwd", help="timed modes"),
    batch: int = typer.Option(2), heads: int = typer.Option(16), head_dim: int = typer.Option(128),
    time_dtype: str = typer.Option("bfloat16", help="dtype of the timed rows"),
    out: Path = typer.Option(Path("out/switches"), help="where results.json goes"),
) -> None:
    from harness.cli.common import select_device

    device = select_device("auto")  # on the CPU: TRITON_INTERPRET=1 before triton is imported

    from harness.cases import Case, case_dims
    from harness.check.engine import evaluate
    from harness.registry import get
    from references.operators import OPERATORS

    if device == "cpu":
        console.print("[yellow]no GPU: accuracy only, through the interpreter (float32, float16)[/]")
    target = get(op, impl)
    variants = [(f"{impl}", target, {})]
    if registered:
        variants += [(f"{impl}: {s['what']}", target, s) for s in target.switches]
    variants += [(f"{impl}: {s['what']}", target, s) for s in parse_set_option(sets)]
    variants += [(name, get(op, name), {}) for name in peer]

    if case_json:
        case = Case.from_json(case_json)
    else:
        B, T, H, D = (int(x) for x in acc.split(","))
        has_state = OPERATORS[op].has_state
        case = Case(op=op, dims=case_dims(op, B, T, H, D), initial_state=has_state,
                    output_final_state=has_state, seed=0)
    results = {"op": op, "acc_case": json.loads(case.to_json()), "accuracy": [], "time": []}
    for dname in [d for d in dtype.split(",") if d.strip()]:
        table = Table(title=f"{op} {dname}, {case.label()}: relative error against float64",
                      title_justify="left")
        rows = {}
        for label, implementation, switch in variants:
            with switched(switch):
                for r in evaluate(case, [implementation], [dname], device):
                    rows.setdefault(label, {})[r["quantity"]] = r["error"]
                    results["accuracy"].append({**r, "variant": label})
        quantities = list(dict.fromkeys(q for v in rows.values() for q in v))
        for col in ["variant"] + quantities:
            table.add_column(col, justify="left" if col == "variant" else "right")
        for label, errs in rows.items():
            table.add_row(label, *(f"{errs[q]:.3g}" if q in errs else "-" for q in quantities))
        console.print(table)

    lengths = [int(t) for t in seq_len.split(",") if t.strip()]
    if device == "cuda" and lengths:
        _time_variants(op, variants, lengths, mode.split(","), (batch, heads, head_dim),
                       time_dtype, results, out)
    _write(out, results)
    console.print(f"[dim]wrote {out / 'results.json'}[/]")


def _time_variants(op, variants, lengths, modes, shape, time_dtype, results, out) -> None:
    """Each variant's median ms and extra peak memory per (mode, T) on bench's inputs, into
    results["time"] and a table; results.json rewritten after each variant."""
    from harness.bench.measure import bench_case, make_call, measure

    batch, heads, head_dim = shape
    table = Table(title=f"{op} {time_dtype} B={batch} H={heads} D={head_dim}: median ms",
                  title_justify="left")
    for col in ["variant"] + [f"{m} T={t}" for m in modes for t in lengths]:
        table.add_column(col, justify="left" if col == "variant" else "right")
    for label, implementation, switch in variants:
        cells, peaks = [], []
        for m in modes:
            for t in lengths:
                with switched(switch):
                    step = make_call(implementation, bench_case(op, batch, t, heads, head_dim),
                                     time_dtype, m)
                    ms = measure(step)
                del step
                results["time"].append({"variant": label, "mode": m, "T": t, **ms})
                cells.append(f"{ms['ms']:.3f}")
                peaks.append(f"{ms['peak_mb']:.0f}")
        table.add_row(label, *cells)
        console.print(f"[dim]{label}: {' '.join(cells)} ms; peak {' '.join(peaks)} MB[/]")
        _write(out, results)  # what has been timed survives a run stopped part way
    console.print(table)


def _write(out: Path, results: dict) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(results, indent=1, default=str))


if __name__ == "__main__":
    typer.run(main)
