"""Two or more operators' bench rows on one figure: an operator's time against the operator it is
measured beside (Titans' chunk against TTT's, say), from the bench.csv files `harness bench
--out` wrote. `harness bench` plots each operator on its own figure; this folds each row's
operator into its implementation's label ("titans chunk", "ttt chunk") and draws them with
harness.bench.report.plot, so the figures look like the bench's own. Given several files,
a row timed in more than one keeps its latest measurement:

    python tools/beside_plot.py reports/titans/raw/2026-12-06-h100/bench-defaults-d64.csv \
        --name titans-ttt --out reports/titans
"""

from __future__ import annotations

import sys
from pathlib import Path

import pandas as pd
import typer

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from harness.bench.report import plot  # noqa: E402


# what makes two rows the same measurement
ROW = ["op", "impl", "dtype", "mode", "B", "T", "H", "D"]


def fold(df: pd.DataFrame, name: str) -> pd.DataFrame:
    """The rows as one operator ``name``, each implementation labelled with its own operator;
    a row measured again in a later run (its ``finished`` time) replaces the earlier one, so
    that a mode timed anew can join the rows it was not timed again with. A ValueError unless
    they share one B, H and D."""
    df = df.sort_values("finished", kind="stable").drop_duplicates(ROW, keep="last")
    shapes = df[["B", "H", "D"]].drop_duplicates()
    if len(shapes) != 1:
        raise ValueError(f"expected rows of one B, H, D; got {len(shapes)}: "
                         f"{shapes.to_dict('records')}")
    return df.assign(impl=df["op"] + " " + df["impl"], op=name)


def main(csv: list[Path] = typer.Argument(..., help="bench.csv files, rows of one B, H, D"),
         name: str = typer.Option(..., help="the figures' name: NAME_time.png, ..."),
         out: Path = typer.Option(Path("."), help="directory for the figures")) -> None:
    """Plot the rows of every operator in CSV on one figure per quantity."""
    try:
        df = fold(pd.concat([pd.read_csv(p) for p in csv], ignore_index=True), name)
    except ValueError as e:
        raise typer.BadParameter(str(e)) from None
    for path in plot(df, out):
        typer.echo(f"wrote {path}")


if __name__ == "__main__":
    typer.run(main)
