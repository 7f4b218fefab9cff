"""Gate baselines: one file per device class (``suites/baselines/<device-class>.json``), one
section per suite holding one error per (operator, implementation, dtype, case, quantity),
whether it passed the check's own tolerance, which cases were skipped and why, the allowed
growth and the floors, and the command and environment that recorded it. Errors depend on the
device class (TF32 dots and autotuned tiles on a GPU, NumPy under the Triton interpreter), so a
baseline belongs to one device class and is never compared with a run on another.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

from harness.check.tolerances import FLOOR as CHECK_FLOOR
from harness.gate.run import SKIP, Measurement, entry_key, select_ops
from harness.gate.suites import SUITES_DIR

# Allowed growth. Reruns on one device class are deterministic for the references and for the
# interpreter (NumPy), on any x86-64 machine once the CPU's math is pinned
# (harness/gate/cpu_pins.py) and single-threaded (harness.gate.run.CPU_THREADS), so on the
# CPU any factor above 1 would do. The factor only has to absorb what legitimately moves an
# error on the same class of device: a different BLAS build (MKL, OpenBLAS) reassociating the
# references' sums, and on a GPU the
# tile sizes autotuning picks (a different BT/BK reorders the dot products). Those move a relative
# error by tens of percent; a real regression (a lost guard against exp overflow, a dot demoted
# to a lower precision, a wrong mask) moves it by 10x or more (see harness/check/tolerances.py).
GROWTH = 2.0

# Below the floor an error never counts as a regression (nor as an improvement): it is rounding
# noise whose digits depend on summation order. A tenth of the check's floor: the check treats
# everything below FLOOR as exact; the gate looks one decade deeper, to see drift the check
# would not (float32 kernels sit at 1e-7..1e-6, float16 at 3e-4..1e-3), without reaching the
# float64 roundoff (1e-16..1e-15) where the order of a sum decides the digits.
FLOOR = {dtype: float(f"{floor / 10:.3g}") for dtype, floor in CHECK_FLOOR.items()}

BASELINES = SUITES_DIR / "baselines"
DEVICE_CLASS = re.compile(r"^[a-z0-9][a-z0-9_.-]*$")


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
            others = select_ops(old, ops, inside=False)
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
