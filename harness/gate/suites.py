"""Regression suites: named, fixed lists of cases the gate runs (``suites/<name>.toml``).

A suite names, per operator, the implementations and dtypes to run and the cases to run them
on. Every case is written out in full (sizes, varlen lengths, options, gate strength) with a
fixed seed, so two runs of a suite draw the same inputs case for case, and each case has an id
that stays the same from run to run: the baseline's entries are keyed by it.

    name = "ci"
    description = "..."
    devices = ["cpu", "cuda"]              # where the suite may run (default: both)

    [ops.delta_rule]
    impls = "*"                            # all available here except the family's truth,
    dtypes = ["float64", "float32"]        # or a list of names

    [[ops.delta_rule.case]]                # one explicit case (the "random" family's truth)
    id = "tail-70"
    dims = { B = 1, T = 70, H = 2, K = 16, V = 16 }
    seed = 3
    initial_state = true                   # also: seqlens, scale, output_final_state,
                                           # gate, options, impls, dtypes

    [[ops.gla.long]]                       # the long-sequence family (harness.cases.long_cases)
    id = "long"
    lengths = [256, 1024]                  # case ids long-T256, long-T1024
    seed = 7                               # case of length T draws from seed + T
    profile = "cpu"                        # head sizes of that profile

Everything is validated when the suite loads (unknown operators, implementations, dtypes,
keys, and case shapes the operator would reject), each error naming the file, the entry, what
was expected and what was given.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib  # type: ignore[no-redef]

import torch

from harness.cases import LONG_HEAD, Case, long_cases
from harness.implementation import DEVICES, DTYPES
from harness.registry import get
from references.operators import OPERATORS, levels_needed

SUITES_DIR = Path(__file__).resolve().parents[2] / "suites"
ALL = "*"
ID_PATTERN = re.compile(r"^[a-z0-9][a-z0-9_.+-]*$")
SUITE_KEYS = {"name", "description", "devices", "ops"}
OP_KEYS = {"impls", "dtypes", "case", "long"}
CASE_KEYS = {"id", "dims", "seed", "seqlens", "scale", "initial_state", "output_final_state",
             "gate", "options", "impls", "dtypes"}
LONG_KEYS = {"id", "lengths", "seed", "profile", "impls", "dtypes"}


class SuiteError(ValueError):
    """A suite that cannot be found, parsed or validated; the message says which and why."""


@dataclass
class SuiteCase:
    """One case of a suite: the harness case, its stable id, and what runs on it."""

    id: str
    case: Case
    family: str  # "random" (explicit case, truth: naive) or "long" (truth: chunk_ref)
    impls: list[str] | None  # None: every available implementation but the family's truth
    dtypes: list[str]

    @property
    def op(self) -> str:
        return self.case.op


@dataclass
class Suite:
    name: str
    path: Path
    description: str = ""
    devices: tuple[str, ...] = DEVICES
    cases: list[SuiteCase] = field(default_factory=list)

    @property
    def ops(self) -> list[str]:
        return list(dict.fromkeys(c.op for c in self.cases))

    def find(self, op: str, case_id: str) -> SuiteCase | None:
        for c in self.cases:
            if c.op == op and c.id == case_id:
                return c
        return None


def display(path: Path) -> str:
    """A path as a person would type it: relative to the working directory when inside it."""
    try:
        return str(Path(path).resolve().relative_to(Path.cwd().resolve()))
    except ValueError:
        return str(path)


def available_suites(directory: Path = SUITES_DIR) -> list[str]:
    return sorted(p.stem for p in directory.glob("*.toml"))


def resolve(name_or_path: str | Path, directory: Path = SUITES_DIR) -> Path:
    """``ci`` -> suites/ci.toml; a path to a .toml file is taken as it is."""
    text = str(name_or_path)
    if text.endswith(".toml") or "/" in text or "\\" in text:
        path = Path(text)
        if not path.is_file():
            raise SuiteError(f"suite file {path} does not exist")
        return path
    path = directory / f"{text}.toml"
    if not path.is_file():
        known = ", ".join(available_suites(directory)) or "none"
        raise SuiteError(f"unknown suite {text!r}: expected one of {known} (files in "
                         f"{display(directory)}) or a path to a .toml file")
    return path


def load_suite(name_or_path: str | Path, directory: Path = SUITES_DIR) -> Suite:
    path = resolve(name_or_path, directory)
    try:
        data = tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as exc:
        raise SuiteError(f"{display(path)}: malformed TOML: {exc}") from None
    return parse_suite(data, path)


def parse_suite(data: dict[str, Any], path: Path) -> Suite:
    where = display(path)
    _keys(where, data, SUITE_KEYS, required={"ops"})
    name = data.get("name", path.stem)
    _type(where, "name", name, str)
    if not ID_PATTERN.match(name):
        raise SuiteError(f"{where}: 'name' must match {ID_PATTERN.pattern}, got {name!r}")
    devices = data.get("devices", list(DEVICES))
    if not isinstance(devices, list) or not devices or any(d not in DEVICES for d in devices):
        raise SuiteError(f"{where}: 'devices' must be a non-empty list of {', '.join(DEVICES)}; "
                         f"got {devices!r}")
    suite = Suite(name=name, path=path, description=str(data.get("description", "")),
                  devices=tuple(devices))
    ops = data["ops"]
    _type(where, "ops", ops, dict)
    if not ops:
        raise SuiteError(f"{where}: 'ops' lists no operator; expected some of {', '.join(OPERATORS)}")
    for op_name, spec in ops.items():
        if op_name not in OPERATORS:
            raise SuiteError(f"{where}: unknown operator {op_name!r} in [ops.{op_name}]; "
                             f"expected one of {', '.join(OPERATORS)}")
        ctx = f"{where} [ops.{op_name}]"
        _type(ctx, "table", spec, dict)
        _keys(ctx, spec, OP_KEYS, required={"dtypes"})
        impls = _impls(ctx, op_name, spec.get("impls", ALL))
        dtypes = _dtypes(ctx, spec["dtypes"])
        if "case" not in spec and "long" not in spec:
            raise SuiteError(f"{ctx}: no cases; expected [[ops.{op_name}.case]] or "
                             f"[[ops.{op_name}.long]] entries")
        seen: set[str] = set()
        for i, entry in enumerate(_table_list(ctx, "case", spec.get("case", []))):
            case = _case(f"{ctx} case #{i + 1}", op_name, entry, impls, dtypes)
            _unique(ctx, seen, case.id)
            suite.cases.append(case)
        for i, entry in enumerate(_table_list(ctx, "long", spec.get("long", []))):
            for case in _long(f"{ctx} long #{i + 1}", op_name, entry, impls, dtypes):
                _unique(ctx, seen, case.id)
                suite.cases.append(case)
    return suite


# ---------------------------------------------------------------------------------- entries
def _case(ctx: str, op_name: str, entry: dict[str, Any], impls: list[str] | None,
          dtypes: list[str]) -> SuiteCase:
    op = OPERATORS[op_name]
    _keys(ctx, entry, CASE_KEYS, required={"id", "dims", "seed"})
    case_id = _id(ctx, entry["id"])
    ctx = f"{ctx} (id {case_id!r})"
    seed = _int(ctx, "seed", entry["seed"], low=0)
    seqlens = entry.get("seqlens")
    if seqlens is not None:
        if not isinstance(seqlens, list) or not seqlens or any(
                isinstance(n, bool) or not isinstance(n, int) or n < 0 for n in seqlens):
            raise SuiteError(f"{ctx}: 'seqlens' must be a non-empty list of ints >= 0, got {seqlens!r}")
    dims = _dims(ctx, op_name, entry["dims"], seqlens)
    scale = entry.get("scale")
    if scale is not None and (isinstance(scale, bool) or not isinstance(scale, (int, float))):
        raise SuiteError(f"{ctx}: 'scale' must be a number (omit it for the default), got {scale!r}")
    initial_state = entry.get("initial_state", False)
    output_final_state = entry.get("output_final_state", op.has_state)
    for key, value in (("initial_state", initial_state), ("output_final_state", output_final_state)):
        _type(ctx, key, value, bool)
        if value and not op.has_state:
            raise SuiteError(f"{ctx}: {op_name} takes no states; '{key}' must be false, got true")
    gate = entry.get("gate", 1.0)
    if "gate" in entry and not op.gated:
        raise SuiteError(f"{ctx}: {op_name} has no decay gates; remove 'gate' (got {gate!r})")
    if isinstance(gate, bool) or not isinstance(gate, (int, float)) or not gate > 0:
        raise SuiteError(f"{ctx}: 'gate' must be a number > 0 (log gate = gate * logsigmoid(x)), got {gate!r}")
    case = Case(op=op_name, dims=dims, seqlens=seqlens,
                scale=None if scale is None else float(scale), initial_state=initial_state,
                output_final_state=output_final_state, gate=float(gate),
                options=_options(ctx, op_name, entry.get("options", {})), seed=seed)
    _validate(ctx, case)
    impls = _impls(ctx, op_name, entry["impls"]) if "impls" in entry else impls
    dtypes = _dtypes(ctx, entry["dtypes"]) if "dtypes" in entry else dtypes
    return SuiteCase(id=case_id, case=case, family="random", impls=impls, dtypes=dtypes)


def _long(ctx: str, op_name: str, entry: dict[str, Any], impls: list[str] | None,
          dtypes: list[str]) -> list[SuiteCase]:
    _keys(ctx, entry, LONG_KEYS, required={"id", "lengths", "seed"})
    base = _id(ctx, entry["id"])
    ctx = f"{ctx} (id {base!r})"
    lengths = entry["lengths"]
    if not isinstance(lengths, list) or not lengths or any(
            isinstance(t, bool) or not isinstance(t, int) or t < 1 for t in lengths):
        raise SuiteError(f"{ctx}: 'lengths' must be a non-empty list of ints >= 1, got {lengths!r}")
    seed = _int(ctx, "seed", entry["seed"], low=0)
    profile = entry.get("profile", "cpu")
    if profile not in LONG_HEAD:
        raise SuiteError(f"{ctx}: 'profile' must be one of {', '.join(LONG_HEAD)}, got {profile!r}")
    impls = _impls(ctx, op_name, entry["impls"]) if "impls" in entry else impls
    dtypes = _dtypes(ctx, entry["dtypes"]) if "dtypes" in entry else dtypes
    out = []
    # Seeds follow T, not the position in the list: adding a length keeps the others' inputs.
    for case in long_cases(op_name, profile, tuple(lengths)):
        case = replace(case, seed=seed + case.dims["T"])
        _validate(ctx, case)
        out.append(SuiteCase(id=f"{base}-T{case.dims['T']}", case=case, family="long",
                             impls=impls, dtypes=dtypes))
    return out


def _dims(ctx: str, op_name: str, dims: Any, seqlens: list[int] | None) -> dict[str, int]:
    op = OPERATORS[op_name]
    if not isinstance(dims, dict):
        raise SuiteError(f"{ctx}: 'dims' must be a table like {{ {', '.join(f'{d} = ...' for d in op.dims)} }}, got {dims!r}")
    unknown = sorted(set(dims) - set(op.dims))
    if unknown:
        raise SuiteError(f"{ctx}: unknown size(s) {', '.join(unknown)} in 'dims'; {op_name} "
                         f"takes {', '.join(op.dims)}")
    for key, value in dims.items():
        _int(ctx, f"dims.{key}", value, low=1)
    out = {d: dims[d] for d in op.dims if d in dims}
    if "L" in op.dims and "L" not in out and "T" in out:  # default: just enough levels
        out["L"] = levels_needed(max(seqlens) if seqlens else out["T"])
    missing = [d for d in op.dims if d not in out]
    if missing:
        raise SuiteError(f"{ctx}: 'dims' lacks {', '.join(missing)}; {op_name} takes "
                         f"{', '.join(op.dims)}")
    if seqlens is not None:
        if out["B"] != 1:
            raise SuiteError(f"{ctx}: varlen cases pack sequences along T, so B must be 1; got B={out['B']}")
        if sum(seqlens) != out["T"]:
            raise SuiteError(f"{ctx}: 'seqlens' {seqlens} sum to {sum(seqlens)} but T={out['T']}")
    return out


def _options(ctx: str, op_name: str, options: Any) -> dict[str, Any]:
    op = OPERATORS[op_name]
    if not isinstance(options, dict):
        raise SuiteError(f"{ctx}: 'options' must be a table, got {options!r}")
    out = {name: values[0] for name, values in op.options.items()}  # defaults: the first value
    for name, value in options.items():
        if name not in op.options:
            known = ", ".join(op.options) or "none"
            raise SuiteError(f"{ctx}: unknown option {name!r} of {op_name}; expected one of {known}")
        kind = type(op.options[name][0])
        if type(value) is not kind:
            raise SuiteError(f"{ctx}: option {name!r} must be a {kind.__name__} (e.g. "
                             f"{op.options[name][0]!r}), got {value!r}")
        out[name] = value
    return out


def _validate(ctx: str, case: Case) -> None:
    """Run the operator's own argument checks on the case's shapes (no data: zero-stride
    tensors), so a suite cannot hold a case every implementation would reject."""
    op = case.operator
    sizes = dict(case.dims)
    sizes["N"] = len(case.seqlens) if case.seqlens is not None else case.dims["B"]
    args: dict[str, Any] = {}
    for inp in op.inputs:
        if not inp.present(case):
            continue
        shape = tuple(s if isinstance(s, int) else sizes[s] for s in inp.shapes[inp.pick(case)])
        args[inp.name] = torch.zeros((), dtype=torch.float64).expand(shape)
    if case.seqlens is not None:
        offsets = [0]
        for n in case.seqlens:
            offsets.append(offsets[-1] + n)
        args["cu_seqlens"] = torch.tensor(offsets, dtype=torch.int64)
    args.update(case.kwargs())
    try:
        op.validate(args)
    except (TypeError, ValueError) as exc:
        raise SuiteError(f"{ctx}: {case.op} rejects this case: {exc}") from None


# ---------------------------------------------------------------------------------- helpers
def _impls(ctx: str, op_name: str, value: Any) -> list[str] | None:
    if value == ALL or value == [ALL]:
        return None
    if not isinstance(value, list) or not value or not all(isinstance(v, str) for v in value):
        raise SuiteError(f"{ctx}: 'impls' must be \"*\" or a non-empty list of implementation "
                         f"names, got {value!r}")
    for name in value:
        try:
            impl = get(op_name, name)
        except KeyError as exc:
            raise SuiteError(f"{ctx}: {exc.args[0]}") from None
        if not getattr(impl, "checkable", True):
            raise SuiteError(f"{ctx}: {impl.key} is a {impl.kind}: it computes other math, so "
                             f"there is no error to gate; expected an implementation of {op_name}")
    return list(value)


def _dtypes(ctx: str, value: Any) -> list[str]:
    if not isinstance(value, list) or not value:
        raise SuiteError(f"{ctx}: 'dtypes' must be a non-empty list of {', '.join(DTYPES)}, got {value!r}")
    for d in value:
        if d not in DTYPES:
            raise SuiteError(f"{ctx}: unknown dtype {d!r}; expected one of {', '.join(DTYPES)}")
    return list(value)


def _keys(ctx: str, table: Any, allowed: set[str], required: set[str] = frozenset()) -> None:
    if not isinstance(table, dict):
        raise SuiteError(f"{ctx}: expected a table, got {table!r}")
    unknown = sorted(set(table) - allowed)
    if unknown:
        raise SuiteError(f"{ctx}: unknown key(s) {', '.join(map(repr, unknown))}; expected "
                         f"some of {', '.join(sorted(allowed))}")
    missing = sorted(required - set(table))
    if missing:
        raise SuiteError(f"{ctx}: missing key(s) {', '.join(map(repr, missing))}")


def _table_list(ctx: str, key: str, value: Any) -> list[dict[str, Any]]:
    if not isinstance(value, list) or not all(isinstance(v, dict) for v in value):
        raise SuiteError(f"{ctx}: '{key}' must be an array of tables ([[...{key}]]), got {value!r}")
    return value


def _type(ctx: str, key: str, value: Any, kind: type) -> None:
    if not isinstance(value, kind):
        raise SuiteError(f"{ctx}: '{key}' must be a {kind.__name__}, got {value!r}")


def _int(ctx: str, key: str, value: Any, low: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise SuiteError(f"{ctx}: '{key}' must be an int >= {low}, got {value!r}")
    return value


def _id(ctx: str, value: Any) -> str:
    if not isinstance(value, str) or not ID_PATTERN.match(value):
        raise SuiteError(f"{ctx}: 'id' must be a string matching {ID_PATTERN.pattern} "
                         f"(lower case, digits, . _ + -), got {value!r}")
    return value


def _unique(ctx: str, seen: set[str], case_id: str) -> None:
    if case_id in seen:
        raise SuiteError(f"{ctx}: case id {case_id!r} is used twice; ids must be unique per operator")
    seen.add(case_id)
