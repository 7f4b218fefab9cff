"""What a kernel's warps wait on, from an Nsight Compute source page: per stall reason, per
opcode and per SASS instruction.

    ncu --import-source yes --section SourceCounters --section WarpStateStats \
        -k regex:KERNEL --launch-skip 2 --launch-count 1 -o REPORT python3 STEP.py
    ncu -i REPORT.ncu-rep --page source --csv --print-source sass > SASS.csv
    python tools/ncu_stalls.py SASS.csv [--top 25]

STEP.py is any script that calls the kernel three times or more (reports/titans.md: bench's
step, ``harness.bench.measure.make_call``). The CSV holds one row per SASS instruction with its
warp-state samples ("Warp Stall Sampling (All Samples)", and one ``stall_*`` column per reason).
This prints the samples' share by reason (``wait``: a fixed-latency dependency; ``short_sb``:
shared memory, conversions and other variable-latency results; ``barrier``: bar.sync;
``selected``: issuing), by opcode, and the instructions with the most samples, each with its two
largest reasons. The samples are the profiler's; a kernel's time is its instructions times the
cycles between them ("Warp Cycles Per Issued Instruction", ``ncu -i REPORT.ncu-rep --page
details``).
"""

from __future__ import annotations

import io
from pathlib import Path

import typer
from rich.console import Console
from rich.table import Table

console = Console(width=150)
SAMPLES = "Warp Stall Sampling (All Samples)"


def read_source_page(text: str):
    """The source page's table (its first line names the kernel), numbers as numbers."""
    import pandas as pd

    df = pd.read_csv(io.StringIO(text.split("\n", 1)[1]))
    for col in df.columns:
        if col not in ("Address", "Source"):
            df[col] = pd.to_numeric(df[col].astype(str).str.replace(",", ""),
                                    errors="coerce").fillna(0)
    df["opcode"] = (df["Source"].astype(str).str.replace(r"^@!?U?P\w+\s+", "", regex=True)
                    .str.split().str[0].str.split(".").str[0])
    return df


def stall_columns(df) -> list[str]:
    return [c for c in df.columns if c.startswith("stall_") and "Not Issued" not in c]


def shares(df) -> tuple:
    """(share of the samples by reason, by opcode), each largest first."""
    total = df[SAMPLES].sum()
    by_reason = (df[stall_columns(df)].sum() / total).sort_values(ascending=False)
    by_opcode = (df.groupby("opcode")[SAMPLES].sum() / total).sort_values(ascending=False)
    return by_reason, by_opcode


def main(sass_csv: Path = typer.Argument(..., help="ncu -i R --page source --csv "
                                         "--print-source sass"),
         top: int = typer.Option(25, help="instructions listed")) -> None:
    text = sass_csv.read_text()
    df = read_source_page(text)
    by_reason, by_opcode = shares(df)
    kernel = text.split("\n", 1)[0].split(",")[1].strip('"')
    console.print(f"{kernel}: {df[SAMPLES].sum():.0f} samples, "
                  f"{df['Instructions Executed'].sum():.0f} warp instructions executed")
    for title, series in (("stall reason", by_reason), ("opcode", by_opcode)):
        table = Table(title=f"samples by {title}", title_justify="left")
        table.add_column(title)
        table.add_column("share", justify="right")
        for name, share in series.head(12).items():
            table.add_row(name.removeprefix("stall_"), f"{share:.1%}")
        console.print(table)
    table = Table(title="instructions by samples", title_justify="left")
    for col in ("share", "address", "instruction", "first reason", "second reason"):
        table.add_column(col)
    reasons = stall_columns(df)
    total = df[SAMPLES].sum()
    for _, row in df.sort_values(SAMPLES, ascending=False).head(top).iterrows():
        first, second = row[reasons].sort_values(ascending=False).index[:2]
        table.add_row(f"{row[SAMPLES] / total:.1%}", str(row["Address"])[-5:],
                      str(row["Source"])[:60], f"{first[6:]} {row[first]:.0f}",
                      f"{second[6:]} {row[second]:.0f}")
    console.print(table)


if __name__ == "__main__":
    typer.run(main)
