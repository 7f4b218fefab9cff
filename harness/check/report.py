"""Tables, files and plots of check results (pandas, rich, matplotlib)."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pandas as pd
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from harness.implementation import DTYPES
from references.spec import Operator

DTYPE_ORDER = {name: i for i, name in enumerate(DTYPES)}
COLUMNS = ["op", "impl", "kind", "dtype", "family", "case", "T", "quantity", "error",
           "ref_error", "tolerance", "passed", "status", "note", "case_json"]
OURS = ("reference", "triton")


def frame(rows: list[dict[str, Any]]) -> pd.DataFrame:
    return pd.DataFrame(rows, columns=COLUMNS)


FAMILY_ORDER = {"random": 0, "replay": 0, "tiling": 1, "long": 2, "causality": 3}


def summary(df: pd.DataFrame, op: Operator | None = None) -> pd.DataFrame:
    """One row per (implementation, dtype, family, quantity) compared: worst error and margin;
    ours first, then the peers."""
    checked = df[df["status"].isin(["pass", "fail"])].copy()
    if checked.empty:
        return pd.DataFrame(columns=["who", "impl", "dtype", "family", "quantity", "cases",
                                     "failed", "max_error", "max_tolerance_used"])
    checked["who"] = checked["kind"].map(lambda k: "ours" if k in OURS else "peer")
    if op is not None:  # outputs first, then gradients in the order of the inputs
        order = {q: i for i, q in enumerate(list(op.outputs) + [f"d{i.name}" for i in op.inputs])}
        checked["_q"] = checked["quantity"].map(lambda q: order.get(q, len(order)))
        checked["_f"] = checked["family"].map(FAMILY_ORDER)
        checked["_d"] = checked["dtype"].map(DTYPE_ORDER)
        checked["_w"] = checked["who"].map({"ours": 0, "peer": 1})
        checked = checked.sort_values(["_w", "_f", "impl", "_d", "_q"], kind="stable")
    # the causality family counts elements that must be 0 (tolerance 0)
    exact = checked["tolerance"] == 0
    checked["used"] = (checked["error"] / checked["tolerance"]).where(
        ~exact, checked["error"].map(lambda e: 0.0 if e == 0 else math.inf))
    g = checked.groupby(["who", "impl", "dtype", "family", "quantity"], sort=False)
    out = g.agg(cases=("error", "size"), failed=("passed", lambda s: int((~s).sum())),
                max_error=("error", "max"), max_tolerance_used=("used", "max"))
    return out.reset_index()


def _fmt(x: float) -> str:
    if isinstance(x, float) and (math.isnan(x) or math.isinf(x)):
        return str(x)
    return f"{x:.2e}"


def print_summary(console: Console, df: pd.DataFrame, op: Operator | None, title: str) -> None:
    s = summary(df, op)
    table = Table(title=title, title_justify="left")
    for col in ("who", "impl", "dtype", "family", "quantity", "cases", "max rel err", "of tol", "pass"):
        table.add_column(col, justify="right" if col in ("cases", "max rel err", "of tol") else "left")
    for r in s.itertuples(index=False):
        ok = r.failed == 0
        table.add_row(r.who, escape(r.impl), r.dtype, r.family, r.quantity, str(r.cases), _fmt(r.max_error),
                      f"{100 * r.max_tolerance_used:.0f}%" if math.isfinite(r.max_tolerance_used) else "inf",
                      "[green]pass[/]" if ok else f"[red]FAIL ({r.failed})[/]")
    console.print(table)
    skipped = df[df["status"] == "skipped"]
    for (impl, note), n in skipped.groupby(["impl", "note"]).size().items():
        console.print(f"[dim]{escape(impl)}: {n} case(s) {escape(note)}[/]", highlight=False)


def uncovered(df: pd.DataFrame, asked: list, dtypes: list[str]) -> dict[str, str]:
    """The implementations a family was asked to check (by default or by name) that compared
    nothing and did not fault, with why: what they were skipped for, or the dtypes they lack."""
    out = {}
    for impl in asked:
        mine = df[df["impl"] == impl.name]
        if mine["status"].isin(["pass", "fail", "fault"]).any():
            continue
        notes = sorted(set(mine.loc[mine["status"] == "skipped", "note"]))
        if notes:
            out[impl.name] = "; ".join(notes[:3]) + (" ..." if len(notes) > 3 else "")
        elif not set(dtypes) & set(impl.dtypes):
            out[impl.name] = f"it takes {', '.join(impl.dtypes)}, none of {', '.join(dtypes)}"
        else:
            out[impl.name] = "no case ran"
    return out


def write(df: pd.DataFrame, out: Path, stem: str) -> list[Path]:
    out.mkdir(parents=True, exist_ok=True)
    csv, js = out / f"{stem}.csv", out / f"{stem}.json"
    df.to_csv(csv, index=False)
    js.write_text(json.dumps(json.loads(df.to_json(orient="records")), indent=1))
    return [csv, js]


def plot_long(df: pd.DataFrame, path: Path, title: str) -> Path | None:
    """Error against T for the long family: outputs and gradients, a line per impl/dtype."""
    long = df[(df["family"] == "long") & (df["quantity"] != "*")].copy()
    if long.empty:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    long["kind_q"] = long["quantity"].map(lambda q: "gradients" if q.startswith("d") else "outputs")
    fig, axes = plt.subplots(1, 2, figsize=(11, 4), sharey=True)
    for ax, part in zip(axes, ("outputs", "gradients")):
        sub = long[long["kind_q"] == part]
        for (impl, dtype), g in sub.groupby(["impl", "dtype"]):
            worst = g.groupby("T")["error"].max().replace(0.0, 1e-17)
            ax.plot(worst.index, worst.values, marker="o", label=f"{impl} {dtype}")
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("T (tokens)")
        ax.set_title(f"{part}: worst rel. error")
        ax.grid(True, which="both", alpha=0.3)
    axes[0].set_ylabel("||x - ref|| / ||ref||")
    axes[0].legend(fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
