"""Tables, files, plots and the report page of ``harness bench`` results.

The rows (``harness.bench.sweep``) hold what was measured; everything derived from them is computed
here, so a better cost model or a re-measured ceiling never needs a GPU again:
tokens/s, TFLOP/s and GB/s from ``harness.bench.costs``, the percentage of the device's measured
ceilings (``harness.bench.ceilings``), and the speedup over a baseline implementation.
``harness report DIR`` rebuilds the CSV, JSON, plots and ``report.md``/``report.html`` of a
sweep's directory from its rows alone.
"""

from __future__ import annotations

import html
import json
import math
from pathlib import Path
from typing import Any

import pandas as pd
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from harness.bench.costs import cost
from harness.bench.measure import KEY, row_case

COLUMNS = list(KEY) + [
    "kind", "status", "reason", "ms", "ms_p20", "ms_p80", "peak_mb", "tokens_per_s", "flops",
    "bytes", "tflops", "gbps", "pct_matmul", "pct_copy", "speedup", "device", "device_name",
    "timing", "seconds", "rank", "run"]
UNITS = {
    "ms": "median time of one call (ms); ms_p20/ms_p80 its 20th/80th percentiles",
    "peak_mb": "peak memory allocated during one call above what was allocated before it (MiB)",
    "tokens_per_s": "B * T / time",
    "flops, bytes": "cost model of the operator (harness/costs.py): FLOPs of the chunked "
                    "algorithm, minimum bytes moved; the softmax baseline by its own model",
    "tflops, gbps": "flops / time (TFLOP/s), bytes / time (GB/s)",
    "pct_matmul, pct_copy": "tflops and gbps as % of the device's measured bf16 matmul rate and "
                            "copy bandwidth (ceilings.json)",
    "speedup": "time of the baseline / time of the row, same op, dtype, mode and shape",
}
GROUP = ["op", "dtype", "mode", "B", "T", "H", "D"]
META = "meta.json"


def frame(rows: list[dict[str, Any]]) -> pd.DataFrame:
    df = pd.DataFrame(rows)
    for col in COLUMNS:
        if col not in df:
            df[col] = math.nan
    return df[COLUMNS + [c for c in df.columns if c not in COLUMNS]].reset_index(drop=True)


def _cost(row: pd.Series) -> tuple[float, float]:
    case = row_case(row)
    model = "softmax_attention" if row["kind"] == "baseline" else row["op"]
    c = cost(model, case.dims, row["dtype"], row["mode"], case.options)
    return c.flops, c.bytes


def derive(df: pd.DataFrame, ceilings: dict[str, dict[str, Any]] | None = None,
           baseline: str | None = None) -> pd.DataFrame:
    """Fill tokens/s, FLOPs, bytes, TFLOP/s, GB/s, % of ceilings and speedup from ms."""
    df = df.copy()
    if df.empty:
        return df
    costs = df.apply(_cost, axis=1, result_type="expand")
    df["flops"], df["bytes"] = costs[0], costs[1]
    seconds = pd.to_numeric(df["ms"], errors="coerce") * 1e-3
    ok = df["status"] == "ok"
    df["tokens_per_s"] = (df["B"] * df["T"] / seconds).where(ok)
    df["tflops"] = (df["flops"] / seconds / 1e12).where(ok)
    df["gbps"] = (df["bytes"] / seconds / 1e9).where(ok)
    ceilings = ceilings or {}
    matmul = df["device_name"].map(lambda n: ceilings.get(n, {}).get("matmul_tflops", math.nan))
    copy = df["device_name"].map(lambda n: ceilings.get(n, {}).get("copy_gbps", math.nan))
    df["pct_matmul"] = 100 * df["tflops"] / pd.to_numeric(matmul)
    df["pct_copy"] = 100 * df["gbps"] / pd.to_numeric(copy)
    df["speedup"] = math.nan
    if baseline:
        base = df[(df["impl"] == baseline) & ok].set_index(GROUP)["ms"]
        base = base[~base.index.duplicated(keep="last")]
        keyed = pd.MultiIndex.from_frame(df[GROUP])
        base_ms = pd.Series(base.reindex(keyed).to_numpy(), index=df.index)
        df["speedup"] = (base_ms / pd.to_numeric(df["ms"], errors="coerce")).where(ok)
    return df


# ---------------------------------------------------------------- pivot tables
def _varying(df: pd.DataFrame, cols: list[str]) -> list[str]:
    return [c for c in cols if df[c].nunique(dropna=False) > 1]


def pivot(df: pd.DataFrame, value: str = "ms", fmt: str = "{:.3f}") -> pd.DataFrame:
    """One row per (op, dtype, mode, [B, H, D when they vary,] T), one column per
    implementation, cells formatted; failed rows read ``failed``/``timeout``, skipped ``-``."""
    if df.empty:
        return pd.DataFrame()
    grouped = "G" in df and bool(df["G"].notna().all())  # G where every row has one
    shape = ["B", "G", "H", "D"] if grouped else ["B", "H", "D"]
    index = ["op"] + _varying(df, ["dtype"]) + ["mode"] + _varying(df, shape) + ["T"]
    impls = list(dict.fromkeys(df["impl"]))

    def cell(r: pd.Series) -> str:
        if r["status"] == "ok":
            x = r[value]
            return fmt.format(x) if isinstance(x, (int, float)) and math.isfinite(x) else "-"
        return "-" if r["status"] == "skipped" else str(r["status"])

    cells = df.assign(_cell=df.apply(cell, axis=1))
    table = cells.pivot_table(index=index, columns="impl", values="_cell", aggfunc="last")
    table = table.reindex(columns=[i for i in impls if i in table.columns]).fillna("")
    mode_order = {"fwd": 0, "bwd": 1, "fwdbwd": 2}
    table = table.reset_index()
    table = table.sort_values(index, key=lambda s: s.map(mode_order) if s.name == "mode" else s,
                              kind="stable")
    table.columns.name = None
    return table.reset_index(drop=True)


def print_pivot(console: Console, table: pd.DataFrame, title: str) -> None:
    if table.empty:
        return
    t = Table(title=title, title_justify="left")
    for col in table.columns:
        # escaped: a variant's name "chunk[LABEL]" would otherwise read as rich markup
        t.add_column(escape(str(col)),
                     justify="left" if col in ("op", "dtype", "mode") else "right")
    for row in table.itertuples(index=False):
        cells = []
        for v in row:
            s = str(v)
            cells.append(f"[red]{s}[/]" if s in ("failed", "timeout") else s)
        t.add_row(*cells)
    console.print(t)


def failures(df: pd.DataFrame) -> pd.DataFrame:
    bad = df[df["status"].isin(["failed", "timeout"])]
    return bad[["op", "impl", "dtype", "mode", "T", "status", "reason"]].reset_index(drop=True)


# ---------------------------------------------------------------- files
def write_tables(df: pd.DataFrame, out: Path, meta: dict[str, Any] | None = None,
                 ceilings: dict[str, Any] | None = None) -> list[Path]:
    """``bench.csv`` (one line per row) and ``bench.json`` (meta, ceilings, rows)."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    csv, js = out / "bench.csv", out / "bench.json"
    df.to_csv(csv, index=False)
    records = json.loads(df.to_json(orient="records"))
    js.write_text(json.dumps({"meta": meta or {}, "ceilings": ceilings or {}, "units": UNITS,
                              "rows": records}, indent=1))
    return [csv, js]


def _label(g: pd.DataFrame, impl: str, dtypes: int) -> str:
    return f"{impl} {g['dtype'].iloc[0]}" if dtypes > 1 else impl


def plot(df: pd.DataFrame, out: Path, baseline: str | None = None) -> list[Path]:
    """Per operator: ``<op>_time.png`` (median ms against T, log-log, the 20-80% band
    shaded), ``<op>_memory.png`` (peak MiB against T, when measured) and
    ``<op>_speedup.png`` (against the baseline, when given); one panel per mode."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    ok = df[df["status"] == "ok"]
    paths = []
    for op in dict.fromkeys(ok["op"]):
        sub = ok[ok["op"] == op]
        modes = [m for m in ("fwd", "bwd", "fwdbwd") if m in set(sub["mode"])]
        ndt = sub["dtype"].nunique()
        # one colour per (implementation, dtype) in every panel and figure of the operator
        cycle = plt.rcParams["axes.prop_cycle"].by_key()["color"]
        colour = {key: cycle[i % len(cycle)] for i, key in
                  enumerate(dict.fromkeys(zip(sub["impl"], sub["dtype"])))}
        figures = [("time", "ms", "median time (ms)", True)]
        if sub["peak_mb"].notna().any():
            figures.append(("memory", "peak_mb", "extra peak memory (MiB)", True))
        if baseline and sub["speedup"].notna().any():
            figures.append(("speedup", "speedup", f"speedup over {baseline}", False))
        for name, col, ylabel, logy in figures:
            fig, axes = plt.subplots(1, len(modes), figsize=(5.2 * len(modes), 4), squeeze=False)
            for ax, mode in zip(axes[0], modes):
                m = sub[sub["mode"] == mode]
                for (impl, dtype), g in m.groupby(["impl", "dtype"], sort=False):
                    g = g.sort_values("T")
                    y = pd.to_numeric(g[col], errors="coerce")
                    if not y.notna().any():
                        continue
                    line, = ax.plot(g["T"], y, marker="o", label=_label(g, impl, ndt),
                                    color=colour[impl, dtype])
                    if name == "time":
                        ax.fill_between(g["T"], g["ms_p20"], g["ms_p80"], alpha=0.2,
                                        color=line.get_color())
                ax.set_xscale("log", base=2)
                if logy:
                    ax.set_yscale("log")
                else:
                    ax.axhline(1.0, color="gray", lw=0.8, ls="--")
                ax.set_xlabel("T (tokens per sequence)")
                ax.set_ylabel(ylabel)
                ax.set_title(f"{op} {mode}")
                ax.grid(True, which="both", alpha=0.3)
                if ax.get_legend_handles_labels()[0]:
                    ax.legend(fontsize=7)
            r = sub.iloc[0]
            fig.suptitle(f"{op}: {ylabel} against T (B={r['B']} H={r['H']} D={r['D']}, "
                         f"{r['device_name']})", fontsize=9)
            fig.tight_layout()
            path = out / f"{op}_{name}.png"
            fig.savefig(path, dpi=110)
            plt.close(fig)
            paths.append(path)
    return paths


# ---------------------------------------------------------------- the report page
def md_table(df: pd.DataFrame) -> str:
    def fmt(v: Any) -> str:
        if isinstance(v, float):
            v = "" if math.isnan(v) else f"{v:.4g}"
        return str(v).replace("|", "\\|").replace("\n", " ")

    cols = [str(c) for c in df.columns]
    lines = ["| " + " | ".join(cols) + " |", "|" + "|".join(" --- " for _ in cols) + "|"]
    lines += ["| " + " | ".join(fmt(v) for v in row) + " |" for row in df.itertuples(index=False)]
    return "\n".join(lines)


def read_meta(out: Path) -> dict[str, Any]:
    path = Path(out) / META
    return json.loads(path.read_text()) if path.exists() else {}


def write_report(out: Path, rows: list[dict[str, Any]], meta: dict[str, Any],
                 ceilings: dict[str, dict[str, Any]]) -> list[Path]:
    """Rebuild ``bench.csv``, ``bench.json`` and the plots, and write ``report.md`` and
    ``report.html`` (the same content) embedding the plots and the commands that made them."""
    out = Path(out)
    baseline = meta.get("baseline")
    df = derive(frame(rows), ceilings, baseline)
    written = write_tables(df, out, meta, ceilings)
    plots = plot(df, out, baseline)
    blocks: list[tuple[str, Any]] = [("h1", "harness bench")]
    commands = meta.get("commands") or []
    if commands:
        blocks.append(("p", "Made by (each line one run into this directory; later runs with "
                            "`--resume` add or replace rows):"))
        blocks.append(("code", "\n".join(commands)))
    devices = sorted(set(df["device_name"].dropna().astype(str)))
    facts = [f"device: {', '.join(devices) or meta.get('device_name', '?')}"]
    facts += [f"{k}: {meta[k]}" for k in ("torch", "triton", "fla", "git", "date") if meta.get(k)]
    blocks.append(("list", facts))
    if any(str(d).startswith("cpu") for d in df["device"].dropna()):
        blocks.append(("p", "**Timings on CPU (Triton interpreter) are not meaningful**: they "
                            "show the harness runs, not how fast anything is."))
    for name, c in sorted(ceilings.items()):
        blocks.append(("p", f"Ceilings of {name}: {c['matmul_tflops']:.4g} TFLOP/s "
                            f"({c['matmul']}), {c['copy_gbps']:.4g} GB/s ({c['copy']})"
                       + ("" if c.get("meaningful") else " - not meaningful on a CPU") + "."))
    for op in dict.fromkeys(df["op"]):
        sub = df[df["op"] == op]
        blocks.append(("h2", op))
        blocks.append(("p", "Median time per call (ms):"))
        blocks.append(("table", pivot(sub, "ms", "{:.3f}")))
        if baseline and sub["speedup"].notna().any():
            blocks.append(("p", f"Speedup over `{baseline}` (its time / this time):"))
            blocks.append(("table", pivot(sub, "speedup", "{:.2f}x")))
        derived = [("tflops", "{:.3g}", "TFLOP/s by the cost model (`harness/costs.py`):"),
                   ("gbps", "{:.3g}", "GB/s by the cost model (minimum bytes / time):"),
                   ("pct_matmul", "{:.1f}%", "TFLOP/s as % of the measured matmul ceiling:"),
                   ("pct_copy", "{:.1f}%", "GB/s as % of the measured copy ceiling:")]
        for col, fmt, title in derived:
            if sub[col].notna().any():
                blocks.append(("p", title))
                blocks.append(("table", pivot(sub, col, fmt)))
        for p in plots:
            if p.name.startswith(f"{op}_"):
                blocks.append(("img", p.name))
    bad = failures(df)
    if not bad.empty:
        blocks.append(("h2", "Failed rows"))
        blocks.append(("table", bad))
    blocks.append(("h2", "Columns of bench.csv"))
    blocks.append(("list", [f"{k}: {v}" for k, v in UNITS.items()]))
    md, page = out / "report.md", out / "report.html"
    md.write_text(_markdown(blocks))
    page.write_text(_html(blocks))
    return written + plots + [md, page]


def _markdown(blocks: list[tuple[str, Any]]) -> str:
    parts = []
    for kind, x in blocks:
        if kind == "h1":
            parts.append(f"# {x}")
        elif kind == "h2":
            parts.append(f"## {x}")
        elif kind == "p":
            parts.append(x)
        elif kind == "code":
            parts.append(f"```\n{x}\n```")
        elif kind == "list":
            parts.append("\n".join(f"- {item}" for item in x))
        elif kind == "table":
            parts.append(md_table(x))
        elif kind == "img":
            parts.append(f"![{x}]({x})")
    return "\n\n".join(parts) + "\n"


def _html(blocks: list[tuple[str, Any]]) -> str:
    parts = ["<!doctype html><html><head><meta charset='utf-8'><title>harness bench</title>",
             "<style>body{font-family:sans-serif;max-width:1200px;margin:auto}"
             "table{border-collapse:collapse;margin:8px 0}td,th{border:1px solid #ccc;"
             "padding:2px 6px;text-align:right}img{max-width:100%}</style></head><body>"]
    for kind, x in blocks:
        if kind in ("h1", "h2"):
            parts.append(f"<{kind}>{html.escape(x)}</{kind}>")
        elif kind == "p":
            parts.append(f"<p>{html.escape(x).replace('**', '')}</p>")
        elif kind == "code":
            parts.append(f"<pre>{html.escape(x)}</pre>")
        elif kind == "list":
            parts.append("<ul>" + "".join(f"<li>{html.escape(i)}</li>" for i in x) + "</ul>")
        elif kind == "table":
            parts.append(x.to_html(index=False, na_rep="", escape=True))
        elif kind == "img":
            parts.append(f"<p><img src='{html.escape(x)}' alt='{html.escape(x)}'></p>")
    parts.append("</body></html>")
    return "\n".join(parts)
