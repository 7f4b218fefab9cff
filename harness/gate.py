"""The tolerance regression gate: run a suite, compare every error with its recorded baseline.

A baseline (``suites/baselines/<device-class>.json``) records, per suite, one error per
(operator, implementation, dtype, case, quantity), whether it passed the check's own tolerance,
and which cases were skipped and why. Errors depend on the device class (TF32 dots and
autotuned tiles on a GPU, NumPy under the Triton interpreter), so a baseline belongs to one
device class and is never compared with a run on another.

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

import importlib.metadata
import json
import math
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from harness.check import TRUTH, DeviceFault, evaluate
from harness.registry import get, implementations
from harness.suites import SUITES_DIR, Suite, SuiteCase
from harness.tolerances import FLOOR as CHECK_FLOOR

# Allowed growth. Reruns on one device class are deterministic for the references and for the
# interpreter (NumPy), on any x86-64 machine once the CPU's math is pinned (below), so on the
# CPU any factor above 1 would do. The factor only has to absorb what legitimately moves an
# error on the same class of device: a different BLAS build (MKL, OpenBLAS) reassociating the
# references' sums, and on a GPU the
# tile sizes autotuning picks (a different BT/BK reorders the dot products). Those move a relative
# error by tens of percent; a real regression (a lost guard against exp overflow, a dot demoted
# to a lower precision, a wrong mask) moves it by 10x or more (see harness/tolerances.py).
GROWTH = 2.0

# Below the floor an error never counts as a regression (nor as an improvement): it is rounding
# noise whose digits depend on summation order. A tenth of the check's floor: the check treats
# everything below FLOOR as exact; the gate looks one decade deeper, to see drift the check
# would not (float32 kernels sit at 1e-7..1e-6, float16 at 3e-4..1e-3), without reaching the
# float64 roundoff (1e-16..1e-15) where the order of a sum decides the digits.
FLOOR = {dtype: float(f"{floor / 10:.3g}") for dtype, floor in CHECK_FLOOR.items()}

# On the CPU the libraries' kernels are pinned to ones every x86-64 machine runs alike
# (harness/cpu_pins.py): unpinned, AVX2 and AVX-512 kernels round differently, and errors of
# ill-conditioned quantities moved by up to 11x between machines.
# The CPU runs single-threaded: a BLAS splits its sums by thread, so the digits of an error
# would depend on the core count of the machine CI lands on; and on tensors this small, threads
# only add synchronisation (the ci suite's GLA cases ran 5x slower with 2 threads than with 1
# on a busy 2-core machine, with identical errors).
CPU_THREADS = 1

BASELINES = SUITES_DIR / "baselines"
STATUS_ORDER = {"regression": 0, "new": 1, "improvement": 2, "ok": 3, "skipped": 4}
SKIP = "*"  # the quantity of a skipped (implementation, dtype, case)
DEVICE_CLASS = re.compile(r"^[a-z0-9][a-z0-9_.-]*$")

Key = tuple[str, str, str, str, str]  # op, impl, dtype, case id, quantity


class GateError(Exception):
    """A usage error: missing or malformed baseline, bad device class (exit status 2)."""


def device_class(device: str) -> str:
    """``cpu-interpret`` on the CPU (kernels through the Triton interpreter), else
    ``cuda-sm<major><minor>`` of the current CUDA device (``cuda-sm90`` on an H100)."""
    if device == "cpu":
        return "cpu-interpret"
    import torch

    major, minor = torch.cuda.get_device_capability()
    return f"cuda-sm{major}{minor}"


def check_device_class(name: str) -> str:
    if not DEVICE_CLASS.match(name):
        raise GateError(f"--device-class must match {DEVICE_CLASS.pattern} (e.g. cpu-interpret, "
                        f"cuda-sm90), got {name!r}")
    return name


def environment(device: str) -> dict[str, str]:
    """What made the numbers (recorded beside them in the baseline)."""
    env = {}
    for pkg in ("torch", "triton", "numpy"):
        try:
            env[pkg] = importlib.metadata.version(pkg)
        except importlib.metadata.PackageNotFoundError:
            env[pkg] = "not installed"
    if device == "cuda":
        import torch

        from harness.check import reference_device

        env["device"] = torch.cuda.get_device_name()
        env["references"] = reference_device(device)
    else:
        from harness import cpu_pins

        env["device"] = f"cpu (Triton interpreter), {CPU_THREADS} thread(s)"
        env["cpu_pins"] = " ".join(f"{k}={v}" for k, v in cpu_pins.pinned().items()) or "none"
    return env


# ------------------------------------------------------------------------------------ running
@dataclass
class Measurement:
    entries: dict[Key, dict[str, Any]]
    cases: dict[str, dict[str, Any]]  # "op/case id" -> the case (what the entries were measured on)
    failures: dict[str, str]  # "op/case id" -> why the case could not be evaluated at all
    seconds: dict[str, float]  # per operator

    @property
    def total_seconds(self) -> float:
        return sum(self.seconds.values())


def _round(x: float) -> float:
    """Three significant digits: enough to see a change, few enough for reviewable diffs."""
    return float(f"{x:.3g}")


def entry_key(entry: dict[str, Any]) -> Key:
    return (entry["op"], entry["impl"], entry["dtype"], entry["case"], entry["quantity"])


def _entry(sc: SuiteCase, row: dict[str, Any]) -> dict[str, Any]:
    e = dict(op=sc.op, impl=row["impl"], dtype=row["dtype"], case=sc.id, quantity=row["quantity"])
    if row["quantity"] == SKIP:
        return {**e, "error": None, "passed": None, "note": row["note"]}
    err = row["error"]
    e.update(error=_round(err) if math.isfinite(err) else None, passed=bool(row["passed"]))
    note = row["note"] or ("" if math.isfinite(err) else "non-finite error")
    if note:
        e["note"] = note
    return e


def checkable(impl: Any) -> bool:
    """Whether it computes the operator's math (a speed baseline such as softmax attention
    does not: '*' leaves it out and a suite may not list it)."""
    return getattr(impl, "checkable", True)


def chosen_impls(sc: SuiteCase, device: str) -> tuple[list[Any], list[tuple[Any, str]]]:
    """(implementations to run, [(implementation, why skipped)]) for one case here."""
    if sc.impls is None:
        return [i for i in implementations(sc.op) if checkable(i)
                and i.name != TRUTH[sc.family] and i.why_unavailable(device) is None], []
    run, skipped = [], []
    for name in sc.impls:
        impl = get(sc.op, name)
        why = impl.why_unavailable(device)
        if why:
            skipped.append((impl, why))
        else:
            run.append(impl)
    return run, skipped


def in_process(jobs: int, cases: int) -> bool:
    """Whether run_suite evaluates in this process (else in spawned workers)."""
    return jobs <= 1 or cases <= 1


def run_suite(suite: Suite, device: str,
              progress: Callable[[int, int, SuiteCase], None] | None = None,
              jobs: int = 1, ops: list[str] | None = None) -> Measurement:
    """Evaluate every case of the suite on ``device`` (those of ``ops`` only, if given); one
    entry per measured quantity and one per skipped (implementation, dtype, case). ``jobs`` > 1
    evaluates cases in that many worker processes (on a GPU the time goes to compiling each
    case's kernel shapes, which parallelises; every case's result is the same as in one
    process)."""
    import torch

    chosen = [n for n, sc in enumerate(suite.cases) if not ops or sc.op in ops]
    threads = torch.get_num_threads()
    if device == "cpu":
        torch.set_num_threads(CPU_THREADS)
    try:
        if not in_process(jobs, len(chosen)):
            results = _run_parallel(suite, chosen, device, progress, jobs)
        else:
            results = []
            for done, n in enumerate(chosen):
                if progress is not None:
                    progress(done, len(chosen), suite.cases[n])
                results.append(_run_case(suite.cases[n], device))
        return _measurement([suite.cases[n] for n in chosen], results)
    finally:
        torch.set_num_threads(threads)


def _run_case(sc: SuiteCase, device: str) -> tuple[list[dict[str, Any]], str | None, float]:
    """One case: its gate entries, why its truth could not run (or None), and its seconds."""
    start = time.perf_counter()
    impls, skipped = chosen_impls(sc, device)
    rows = [dict(impl=impl.name, dtype=d, quantity=SKIP, note=f"skipped: {why}")
            for impl, why in skipped for d in sc.dtypes if d in impl.dtypes]
    failure = None
    try:
        rows += evaluate(sc.case, impls, sc.dtypes, device, sc.family)
    except Exception as exc:  # the truth failed: every entry of the case goes missing
        failure = f"{type(exc).__name__}: {exc}"
    except DeviceFault as fault:  # later cases in this process will fail too, each recorded
        failure = f"device fault in {fault.impl or 'a reference'} {fault.dtype}: {fault.message}"
    return [_entry(sc, row) for row in rows], failure, time.perf_counter() - start


def _worker(path: str, index: int, device: str, jobs: int):
    """A worker process's case (spawned: it loads the suite and the registry itself); ``jobs``
    workers run at once."""
    import os

    import torch

    from harness.check import reference_device
    from harness.suites import load_suite

    if device == "cpu":
        torch.set_num_threads(CPU_THREADS)
    elif reference_device(device) == "cpu":  # the references' loops share the host's cores
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
        torch.set_num_threads(max(1, (cores or 1) // jobs))
    return index, _run_case(load_suite(path).cases[index], device)


def case_size(sc: SuiteCase) -> int:
    """The product of a case's dimensions: the order in which the workers take the cases,
    largest first, so that the longest case (the long family's: minutes) does not start last
    and hold up a run that is otherwise done."""
    return math.prod(sc.case.dims.values())


def _run_parallel(suite: Suite, chosen: list[int], device: str, progress, jobs: int) -> list:
    """The cases ``chosen`` (indices into suite.cases), in ``jobs`` worker processes."""
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor, as_completed

    results: dict[int, Any] = {}
    if device == "cpu":  # the workers load torch and NumPy with the CPU's math pinned
        from harness import cpu_pins

        cpu_pins.pin()
    ctx = multiprocessing.get_context("spawn")  # CUDA cannot be forked
    workers = min(jobs, len(chosen))
    with ProcessPoolExecutor(max_workers=workers, mp_context=ctx) as pool:
        futures = [pool.submit(_worker, str(suite.path), n, device, workers)
                   for n in sorted(chosen, key=lambda n: -case_size(suite.cases[n]))]
        for done, future in enumerate(as_completed(futures)):
            n, result = future.result()
            results[n] = result
            if progress is not None:
                progress(done, len(chosen), suite.cases[n])
    return [results[n] for n in chosen]


def _measurement(cases: list[SuiteCase], results: list) -> Measurement:
    entries: dict[Key, dict[str, Any]] = {}
    failures: dict[str, str] = {}
    seconds: dict[str, float] = {}
    for sc, (case_entries, failure, secs) in zip(cases, results):
        for e in case_entries:
            entries[entry_key(e)] = e
        if failure is not None:
            failures[f"{sc.op}/{sc.id}"] = failure
        seconds[sc.op] = seconds.get(sc.op, 0.0) + secs
    return Measurement(entries, {f"{sc.op}/{sc.id}": json.loads(sc.case.to_json()) for sc in cases},
                       failures, seconds)


def _select(section: dict[str, Any], ops: list[str], inside: bool = True) -> dict[str, Any]:
    """The section's entries and cases of ``ops`` (inside) or of the other operators."""
    return dict(entries=[e for e in section["entries"] if (e["op"] in ops) == inside],
                cases={c: js for c, js in section["cases"].items() if (c.split("/", 1)[0] in ops) == inside})


def only_ops(section: dict[str, Any], ops: list[str] | None) -> dict[str, Any]:
    """What a gate run restricted to ``ops`` is compared with (all of it when ``ops`` is empty)."""
    return dict(section, **_select(section, ops)) if ops else section


# ------------------------------------------------------------------------------- baseline I/O
def baseline_path(dc: str, directory: Path | None = None) -> Path:
    return (directory or BASELINES) / f"{dc}.json"


def read_baselines(path: Path, dc: str) -> dict[str, Any] | None:
    """The whole baseline file of a device class (None when there is none yet)."""
    if not path.exists():
        return None
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise GateError(f"{path}: malformed baseline (not JSON): {exc}") from None
    if not isinstance(data, dict) or not isinstance(data.get("suites"), dict):
        raise GateError(f"{path}: malformed baseline: expected an object with 'device_class' "
                        f"and 'suites', got keys {sorted(data) if isinstance(data, dict) else type(data).__name__}")
    if data.get("device_class") != dc:
        raise GateError(f"{path}: is the baseline of device class {data.get('device_class')!r}, "
                        f"not {dc!r}; baselines are never shared across device classes")
    for name, section in data["suites"].items():
        _check_section(path, name, section)
    return data


def _check_section(path: Path, name: str, section: Any) -> None:
    where = f"{path}: suite {name!r}"
    if not isinstance(section, dict):
        raise GateError(f"{where}: expected an object, got {type(section).__name__}")
    missing = {"growth", "floor", "entries", "cases", "command"} - set(section)
    if missing:
        raise GateError(f"{where}: missing {', '.join(sorted(missing))}")
    growth = section["growth"]
    if isinstance(growth, bool) or not isinstance(growth, (int, float)) or not growth >= 1:
        raise GateError(f"{where}: 'growth' must be a number >= 1, got {growth!r}")
    floor = section["floor"]
    if not isinstance(floor, dict) or any(not isinstance(v, (int, float)) or v < 0
                                          for v in floor.values()):
        raise GateError(f"{where}: 'floor' must map dtypes to numbers >= 0, got {floor!r}")
    need = {"op", "impl", "dtype", "case", "quantity", "error", "passed"}
    for i, e in enumerate(section["entries"]):
        if not isinstance(e, dict) or need - set(e):
            raise GateError(f"{where}: entry #{i + 1} must have {', '.join(sorted(need))}, got {e!r}")
        if e["error"] is not None and not isinstance(e["error"], (int, float)):
            raise GateError(f"{where}: entry #{i + 1} has a non-numeric error {e['error']!r}")
        if e["dtype"] not in floor and e["quantity"] != SKIP:
            raise GateError(f"{where}: entry #{i + 1} has dtype {e['dtype']!r} with no floor")


def make_section(m: Measurement, command: str, env: dict[str, str],
                 old: dict[str, Any] | None, ops: list[str] | None = None) -> dict[str, Any]:
    """A suite's baseline from a run; growth and floors carry over from the old one. A run
    restricted to ``ops`` replaces those operators' entries and cases and keeps the others', and
    records its command and environment per operator under "op_updates"."""
    entries, cases = dict(m.entries), dict(m.cases)
    section = {"command": command, "environment": env}
    if ops:  # what recorded these operators' entries; the section's own command stays
        updates = dict(old.get("op_updates", {})) if old else {}
        updates.update({op: {"command": command, "environment": env} for op in ops})
        if old:
            section = {"command": old["command"], "environment": old["environment"]}
            others = _select(old, ops, inside=False)
            entries.update({entry_key(e): e for e in others["entries"]})
            cases.update(others["cases"])
        section["op_updates"] = dict(sorted(updates.items()))
    return {
        **section,
        "growth": old["growth"] if old else GROWTH,
        "floor": old["floor"] if old else dict(FLOOR),
        "cases": dict(sorted(cases.items())),
        "entries": [entries[k] for k in sorted(entries)],
    }


ENTRY_FIELDS = ("op", "impl", "dtype", "case", "quantity", "error", "passed", "note")


def dumps(data: dict[str, Any]) -> str:
    """Sorted keys and entries, one entry (and one case) per line, its fields in a fixed order:
    a rerun that changes one error changes one line."""
    compact: dict[str, str] = {}
    doc = json.loads(json.dumps(data))

    def one_line(obj: Any, fields: tuple[str, ...] | None = None) -> str:
        token = f"@line:{len(compact)}@"
        if fields:
            obj = {f: obj[f] for f in fields if f in obj} | {k: obj[k] for k in sorted(obj) if k not in fields}
        compact[f'"{token}"'] = json.dumps(obj, sort_keys=fields is None)
        return token

    for section in doc["suites"].values():
        section["entries"] = [one_line(e, ENTRY_FIELDS) for e in section["entries"]]
        section["cases"] = {k: one_line(c) for k, c in section["cases"].items()}
    text = json.dumps(doc, indent=1, sort_keys=True)
    for token, line in compact.items():
        text = text.replace(token, line, 1)
    return text + "\n"


def write_baseline(path: Path, dc: str, suite: str, section: dict[str, Any]) -> None:
    data = read_baselines(path, dc) or {"device_class": dc, "suites": {}}
    data["suites"][suite] = section
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(dumps(data))


# ---------------------------------------------------------------------------------- comparing
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
    case = sc.case.to_json()
    return (f"harness check {op} --impl {impl} --dtype {dtype} --device {device} "
            f"--case '{case}'")


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
