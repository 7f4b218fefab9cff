"""``harness list``: every operator and implementation, and whether it runs here."""

from __future__ import annotations

import typer
from rich.table import Table

from harness.cli.common import DEVICE_HELP, console, select_device


def list_cmd(device: str = typer.Option("auto", help=DEVICE_HELP)) -> None:
    """Every registered implementation: kind, devices, dtypes, and whether it can run here."""
    device = select_device(device)
    from harness.registry import implementations, plugin_errors
    from references.operators import OPERATORS

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
