"""The ``harness`` command line (typer + rich): one module per command group over
``harness.cli.common``, assembled here.

    harness list                      every operator and implementation (listing.py)
    harness check OP                  against the float64 reference (check.py, docs/check.md)
    harness bench OP... / report DIR  timing and memory sweeps (bench.py, docs/bench.md)
    harness gate --suite NAME         the tolerance regression gate (gate.py, docs/gate.md)
    harness compile OP                kernels compiled for a GPU without one (compile.py,
                                      docs/compile.md)
"""

from __future__ import annotations

import typer

from harness.cli import bench, check, gate, listing
from harness.cli import compile as compile_group

app = typer.Typer(add_completion=False, no_args_is_help=True,
                  help="Exact references and numerical checks for linear-attention kernels.")
app.command("list")(listing.list_cmd)
app.command()(check.check)
app.command()(bench.bench)
app.command()(bench.report)
app.command("gate")(gate.gate_cmd)
app.command("compile")(compile_group.compile_cmd)


def main() -> None:
    app()
