"""The tolerance regression gate's verdict: a run's entries against the suite's baseline
(``harness.gate.baseline``).

An entry of the run is a *regression* when

* its error grew past ``max(baseline * growth, floor[dtype])``,
* it passed its tolerance in the baseline and fails it now,
* it is NaN/inf (or the implementation raised) where the baseline was finite,
* it was measured in the baseline and is skipped now, or is missing from the run altogether
  (an implementation that silently vanishes must not pass: the row says why it is missing);

an *improvement* when the error shrank below ``baseline / growth`` (from above the floor), turned
finite, or passes its tolerance now where it failed. Entries not in the baseline are *new*: they
fail the gate too, with the command that records them (a silent pass is what the gate exists to
prevent). ``--update`` rewrites the suite's section of the baseline from a run.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from harness.check.engine import TRUTH, replay_command
from harness.gate.run import SKIP, Key, Measurement, entry_key
from harness.gate.suites import Suite
from harness.registry import get

STATUS_ORDER = {"regression": 0, "new": 1, "improvement": 2, "ok": 3, "skipped": 4}


@dataclass
class Row:
    status: str
    op: str
    impl: str
    dtype: str
    case: str
    quantity: str
    baseline: float | None
    now: float | None
    reason: str
    reproduce: str = ""
    compared: bool = False  # measured both in the baseline and now
    known_failure: bool = False  # fails its tolerance now as in the baseline (and no worse)

    @property
    def ratio(self) -> float | None:
        if self.baseline is None or self.now is None or self.baseline == 0:
            return None
        return self.now / self.baseline


def _classify(b: dict[str, Any], r: dict[str, Any], growth: float, floor: float) -> tuple[str, str]:
    old, new = b["error"], r["error"]
    if old is None:
        if new is not None:
            return "improvement", "finite now (non-finite in the baseline)"
        return "ok", "non-finite, as in the baseline"
    if new is None:
        return "regression", f"non-finite now: {r.get('note') or 'NaN/inf'}"
    if b["passed"] and not r["passed"]:
        return "regression", "fails its tolerance now" + (f": {r['note']}" if r.get("note") else "")
    if new > max(old * growth, floor):
        grown = f"{new / old:.3g}x" if old > 0 else "from 0"
        return "regression", f"grew {grown} (allowed: {growth:g}x, floor {floor:.1e})"
    if not b["passed"] and r["passed"]:
        return "improvement", "passes its tolerance now"
    if old > floor and new * growth < old:
        return "improvement", f"shrank {old / new:.3g}x" if new > 0 else "exact now"
    return "ok", ""


def _why_missing(key: Key, suite: Suite, device: str) -> str:
    op, impl, dtype, case_id, _ = key
    sc = suite.find(op, case_id)
    if sc is None:
        return f"case {case_id!r} of {op} is no longer in the suite"
    try:
        im = get(op, impl)
    except KeyError:
        return f"{op}/{impl} is not registered any more"
    why = im.why_unavailable(device)
    if why:
        return f"{op}/{impl} is not available here: {why}"
    if sc.impls is not None and impl not in sc.impls:
        return f"{impl} is no longer listed in the suite's impls for this case"
    if sc.impls is None and impl == TRUTH[sc.family]:
        return f"{impl} is the {sc.family} family's truth, which '*' leaves out"
    if dtype not in sc.dtypes:
        return f"{dtype} is no longer listed in the suite's dtypes for this case"
    if dtype not in im.dtypes:
        return f"{op}/{impl} no longer claims {dtype}"
    return "the run produced no such quantity"


def _reproduce(key: Key, suite: Suite, device: str) -> str:
    op, impl, dtype, case_id, _ = key
    sc = suite.find(op, case_id)
    if sc is None:
        return ""
    return replay_command(op, [impl], [dtype], device, sc.case)


def compare(section: dict[str, Any], m: Measurement, suite: Suite, device: str) -> list[Row]:
    """Every entry of the baseline and of the run, classified (STATUS_ORDER)."""
    growth, floors = section["growth"], section["floor"]
    base = {entry_key(e): e for e in section["entries"]}
    run = m.entries
    run_measured = {k[:4] for k in run if k[4] != SKIP}
    base_measured = {k[:4] for k in base if k[4] != SKIP}
    run_skipped = {k[:4]: run[k].get("note", "skipped") for k in run if k[4] == SKIP}
    stale = {c for c, js in m.cases.items() if c in section["cases"] and section["cases"][c] != js}
    rows: list[Row] = []

    def add(status: str, k: Key, b: dict | None, r: dict | None, reason: str) -> None:
        rows.append(Row(status, *k, b["error"] if b else None, r["error"] if r else None, reason,
                        _reproduce(k, suite, device) if status == "regression" else "",
                        compared=b is not None and r is not None and k[4] != SKIP
                        and status != "new"))

    for k in sorted(base.keys() | run.keys()):
        b, r = base.get(k), run.get(k)
        case = f"{k[0]}/{k[3]}"
        if case in m.failures:
            if b is not None:
                add("regression", k, b, None, f"the case could not run: {m.failures[case]}")
        elif case in stale:
            add("new", k, b, r, "the case's definition changed since the baseline was recorded")
        elif b is None:
            if k[4] == SKIP and k[:4] in base_measured:
                continue  # reported on the measured entries, as "now skipped"
            reason = "not in the baseline"
            if k[4] == SKIP:
                reason += f" ({r['note']})"
            elif not r["passed"]:
                reason += "; fails its tolerance"
            add("new", k, None, r, reason)
        elif r is None:
            if k[4] == SKIP and k[:4] in run_measured:
                continue  # measured now: its entries are reported as new
            if k[4] != SKIP and k[:4] in run_skipped:
                add("regression", k, b, None, f"measured in the baseline, now {run_skipped[k[:4]]}")
            else:
                add("regression", k, b, None, f"missing from the run: {_why_missing(k, suite, device)}")
        elif k[4] == SKIP:
            add("skipped", k, b, r, r.get("note", ""))
        else:
            status, reason = _classify(b, r, growth, floors.get(k[2], 0.0))
            add(status, k, b, r, reason)
            rows[-1].known_failure = status == "ok" and r["passed"] is False
    for case, why in sorted(m.failures.items()):
        if not any(f"{r.op}/{r.case}" == case for r in rows):
            op, case_id = case.split("/", 1)
            add("regression", (op, "*", "*", case_id, "*"), None, None, f"the case could not run: {why}")
    rows.sort(key=lambda r: (STATUS_ORDER[r.status], r.op, r.impl, r.dtype, r.case, r.quantity))
    return rows


def counts(rows: list[Row]) -> dict[str, int]:
    out = {s: 0 for s in STATUS_ORDER}
    for r in rows:
        out[r.status] += 1
    out["compared"] = sum(r.compared for r in rows)
    out["known failures"] = sum(r.known_failure for r in rows)
    return out


def summary_line(c: dict[str, int]) -> str:
    return (f"compared {c['compared']}, regressions {c['regression']}, improvements "
            f"{c['improvement']}, new {c['new']}, skipped {c['skipped']}, known failures "
            f"{c['known failures']}")


def failed(c: dict[str, int]) -> bool:
    return c["regression"] > 0 or c["new"] > 0
