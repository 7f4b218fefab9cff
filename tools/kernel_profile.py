"""Where an implementation's time goes: each kernel's CUDA time per step, from the torch profiler.

    python tools/kernel_profile.py OP IMPL [IMPL ...] [--seq-len 32768] [--mode fwd,fwdbwd]
        [--batch 2 --heads 16 --head-dim 128] [--dtype bfloat16] [--steps 5]
        [--switches] [--set 'LABEL:module.NAME=VALUE,...' ...]

On bench's inputs and steps (``harness.bench.measure``: the same shape, dtype and mode as a
``harness bench`` row): three warm-up steps (compile, autotune), then ``--steps`` profiled ones;
one table per implementation, form and mode, kernels by CUDA time, in µs per step. The forms:
the defaults, with ``--switches`` each switch the implementation registers, and each ``--set``
(as in tools/switch_compare.py), so that a switch's effect is seen kernel by kernel. Needs a
GPU. The per-stage tables of reports/<op>.md ("where the time goes") come from here.
"""

from __future__ import annotations

import typer
from rich.console import Console
from rich.table import Table

console = Console(width=150)
WARMUP_STEPS = 3


def main(
    op: str = typer.Argument(..., help="operator, e.g. delta_rule"),
    impls: list[str] = typer.Argument(..., help="implementations, e.g. chunk fla_chunk"),
    seq_len: int = typer.Option(32768, help="T"),
    mode: str = typer.Option("fwd,fwdbwd", help="fwd, bwd and/or fwdbwd"),
    batch: int = typer.Option(2), heads: int = typer.Option(16), head_dim: int = typer.Option(128),
    dtype: str = typer.Option("bfloat16"),
    steps: int = typer.Option(5, min=1, help="profiled steps (the table is per step)"),
    rows: int = typer.Option(15, help="kernels shown per table"),
    switches: bool = typer.Option(False, "--switches", help="also under each registered switch"),
    sets: list[str] = typer.Option([], "--set", help="also under 'LABEL:module.NAME=VALUE,...'"),
) -> None:
    import torch

    from harness.bench.measure import bench_case
    from harness.registry import get
    from harness.switches import parse_set_option, switched

    extra = parse_set_option(sets)

    if not torch.cuda.is_available():
        raise typer.BadParameter("needs a CUDA device")
    case = bench_case(op, batch, seq_len, heads, head_dim)
    for name in impls:
        impl = get(op, name)
        forms = [{"what": "defaults"}] + (list(impl.switches) if switches else []) + extra
        for form in forms:
            for m in mode.split(","):
                if m != "fwd" and not impl.backward:
                    continue
                with switched(form):
                    _profile(op, impl, case, dtype, m, steps, rows,
                             f"{op} {name} ({form['what']}) {m} {dtype} B={batch} T={seq_len} "
                             f"H={heads} D={head_dim}")


def _profile(op, impl, case, dtype: str, mode: str, steps: int, rows: int, title: str) -> None:
    import torch
    from torch.profiler import ProfilerActivity, profile

    from harness.bench.measure import make_call

    step = make_call(impl, case, dtype, mode)
    for _ in range(WARMUP_STEPS):
        step()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(steps):
            step()
        torch.cuda.synchronize()
    events = [e for e in prof.key_averages() if e.device_time_total > 0]
    events.sort(key=lambda e: -e.device_time_total)
    total = sum(e.device_time_total for e in events)
    table = Table(title=f"{title}: {total / steps:.0f} µs per step", title_justify="left")
    for col in ("kernel", "calls/step", "µs/step", "share"):
        table.add_column(col, justify="left" if col == "kernel" else "right")
    for e in events[:rows]:
        table.add_row(e.key[:80], f"{e.count / steps:g}", f"{e.device_time_total / steps:.0f}",
                      f"{e.device_time_total / total:.0%}")
    console.print(table)


if __name__ == "__main__":
    typer.run(main)
