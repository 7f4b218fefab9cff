"""What ``harness gate --update`` changed in a baseline, and the gate's report files (JSON and
markdown under ``--out``): the presentation side of harness/gate/run.py."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from harness.gate.compare import Row, counts, failed, summary_line
from harness.gate.run import SKIP, entry_key
from harness.gate.suites import Suite


# ----------------------------------------------------------------------------------- changes
@dataclass
class Change:
    change: str  # changed / added / removed / case changed
    op: str
    impl: str
    dtype: str
    case: str
    quantity: str
    old: str
    new: str


def show_entry(e: dict[str, Any] | None) -> str:
    if e is None:
        return "-"
    if e["quantity"] == SKIP:
        return e.get("note", "skipped")
    if e["error"] is None:  # no finite error: the note says why (a NaN, or the run's exception)
        note = e.get("note") or ""
        err = "non-finite" if note in ("", "non-finite error") else f"no finite error: {note[:100]}"
    else:
        err = f"{e['error']:.3g}"
    return err + ("" if e["passed"] else " (fails tol)")


def changes(old: dict[str, Any] | None, new: dict[str, Any]) -> list[Change]:
    """What ``--update`` changed in a suite's section, entry by entry."""
    before = {entry_key(e): e for e in (old or {}).get("entries", [])}
    after = {entry_key(e): e for e in new["entries"]}
    out = []  # changed case definitions first: they explain the entries that follow
    old_cases = (old or {}).get("cases", {})
    for case, js in sorted(new["cases"].items()):
        if case in old_cases and old_cases[case] != js:
            op, case_id = case.split("/", 1)
            was, now = old_cases[case], js
            diff = sorted(k for k in was.keys() | now.keys() if was.get(k) != now.get(k))
            out.append(Change("case changed", op, "*", "*", case_id, "*",
                              " ".join(f"{k}={json.dumps(was.get(k))}" for k in diff),
                              " ".join(f"{k}={json.dumps(now.get(k))}" for k in diff)))
    for k in sorted(before.keys() | after.keys()):
        b, a = before.get(k), after.get(k)
        if b is not None and a is not None and show_entry(b) == show_entry(a):
            continue
        kind = "added" if b is None else "removed" if a is None else "changed"
        out.append(Change(kind, *k, show_entry(b), show_entry(a)))
    return out


# ------------------------------------------------------------------------------------ reports
def fmt_error(x: float | None) -> str:
    return "-" if x is None else f"{x:.3g}"


def write_report(out: Path, suite: Suite, dc: str, baseline: Path, section: dict[str, Any],
                 rows: list[Row], seconds: float) -> list[Path]:
    """``<suite>.json`` and ``<suite>.md`` under ``out``: the summary and every row that is
    not ok (regressions, new entries, improvements)."""
    out.mkdir(parents=True, exist_ok=True)
    c = counts(rows)
    shown = [r for r in rows if r.status in ("regression", "new", "improvement")]
    head = dict(suite=suite.name, device_class=dc, baseline=str(baseline),
                growth=section["growth"], floor=section["floor"], seconds=round(seconds, 1),
                passed=not failed(c), summary=c)
    js = out / f"{suite.name}.json"
    js.write_text(json.dumps({**head, "rows": [asdict(r) for r in shown]}, indent=1) + "\n")
    lines = [f"# Gate: suite `{suite.name}` on `{dc}`", "",
             f"{'PASSED' if not failed(c) else 'FAILED'}: {summary_line(c)} ({seconds:.0f} s).", "",
             f"Baseline `{baseline}`: growth {section['growth']:g}x, floors "
             + ", ".join(f"{d} {v:.1e}" for d, v in sorted(section["floor"].items())) + ".", ""]
    if shown:
        lines += ["| status | op | impl | dtype | case | quantity | baseline | now | ratio | why |",
                  "| --- | --- | --- | --- | --- | --- | ---: | ---: | ---: | --- |"]
        for r in shown:
            ratio = "-" if r.ratio is None else f"{r.ratio:.3g}x"
            lines.append(f"| {r.status} | {r.op} | {r.impl} | {r.dtype} | {r.case} | {r.quantity} "
                         f"| {fmt_error(r.baseline)} | {fmt_error(r.now)} | {ratio} | {r.reason.replace('|', '/')} |")
    else:
        lines.append("No regressions, new entries or improvements.")
    md = out / f"{suite.name}.md"
    md.write_text("\n".join(lines) + "\n")
    return [js, md]
