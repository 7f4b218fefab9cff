"""The families of cases a check runs, and what each implementation gets of them.

* ``random``: hypothesis draws ``examples`` cases up front (the same ones for a seed); they run
  in parallel (``harness.check.runner``), and an implementation that fails is shrunk afterwards:
  hypothesis draws the same cases again for it alone (the ones already run are answered from
  the first pass) until the failure, then minimises it.
* ``long``, ``tiling``, ``causality``: fixed cases (``harness.cases``), no shrinking.

Coverage: an implementation that declines a case (no states, no varlen, an option it lacks)
gets the case without those features instead (``harness.cases.reduced``), right after it, so
that it is checked by every family it can run; at most a quarter of the family's cases are
added so.
"""

from __future__ import annotations

from typing import Any

from hypothesis import HealthCheck, given, reject, settings
from hypothesis import seed as hypothesis_seed
from hypothesis.errors import Unsatisfiable

from harness.cases import (Case, case_strategy, causality_cases, long_cases, reduced,
                           tiling_cases)
from harness.check.runner import CaseFailed, CheckResult, Setup, TruthMaker, past, run_cases
from harness.implementation import Implementation

Plan = list[tuple[Case, list[Implementation]]]


def _settings(examples: int):
    return settings(max_examples=examples, deadline=None, database=None, print_blob=False,
                    suppress_health_check=list(HealthCheck), report_multiple_bugs=False)


def draw(op: str, examples: int, seed: int, profile: str) -> list[Case]:
    """The cases hypothesis draws for ``seed``, in order (as the shrinking pass sees them)."""
    drawn: list[Case] = []

    @_settings(examples)
    @hypothesis_seed(seed)
    @given(case=case_strategy(op, profile))
    def collect(case: Case) -> None:
        drawn.append(case)

    collect()
    return list({c.to_json(): c for c in drawn}.values())  # each case once, first come first


def with_coverage(cases: list[Case], impls: list[Implementation]) -> Plan:
    """Every case for every implementation, and for each implementation that declines cases,
    the reduced forms of as many of them as a quarter of the family (at least one), each right
    after the case it reduces (so that a run its time limit ends early has them too)."""
    extra: dict[str, tuple[Case, list[Implementation]]] = {}
    after: dict[str, list[str]] = {}  # a case's json -> the reduced forms' that follow it
    budget = max(1, len(cases) // 4)
    for impl in impls:
        if impl.supports is None:
            continue
        added = 0
        for c in cases:
            if added == budget or impl.supports(c) is None:
                continue
            smaller = reduced(c, impl.supports)
            if smaller is None:
                continue
            key = smaller.to_json()
            if key not in extra:
                extra[key] = (smaller, [])
                after.setdefault(c.to_json(), []).append(key)
            if impl not in extra[key][1]:
                extra[key][1].append(impl)
                added += 1
    plan: Plan = []
    for c in cases:
        plan.append((c, list(impls)))
        plan += [extra[key] for key in after.get(c.to_json(), [])]
    return plan


def run_family(family: str, op: str, impls: list[Implementation], setup: Setup, profile: str,
               units, maker: TruthMaker, examples: int = 40, seed: int = 0,
               lengths: tuple[int, ...] | None = None,
               cases: list[Case] | None = None) -> CheckResult:
    """One family of ``op`` for ``impls`` (each family leaves out its own truth unless it was
    named); ``cases`` replays given cases instead (the "replay" family)."""
    if cases is None:
        cases = {"random": lambda: draw(op, examples, seed, profile),
                 "long": lambda: long_cases(op, profile, lengths),
                 "tiling": lambda: tiling_cases(op, profile),
                 "causality": lambda: causality_cases(op, profile)}[family]()
        plan = with_coverage(cases, impls)
    else:
        plan = [(c, list(impls)) for c in cases]
    result = run_cases(plan, family, setup, units, maker)
    if family == "random" and result.failures and not past(setup.deadline):
        result.failures = shrink_all(op, impls, result, setup, units, examples, seed, profile)
    return result


def shrink_all(op: str, impls: list[Implementation], result: CheckResult, setup: Setup, units,
               examples: int, seed: int, profile: str) -> list[CaseFailed]:
    """Each failing implementation's failure shrunk to a minimal case (or as it was, when the
    deadline comes first or the failing case was not one hypothesis drew)."""
    by_impl: dict[str, CaseFailed] = {}
    for failure in result.failures:
        for r in failure.rows:
            if r.get("status") == "fail" and r["impl"] not in by_impl:
                by_impl[r["impl"]] = failure
    cache: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for r in result.rows:
        cache.setdefault((r["impl"], r["case_json"]), []).append(r)
    out = []
    maker = TruthMaker(Setup(**{**setup.__dict__, "truth_jobs": 0}))
    try:
        for name, failure in by_impl.items():
            impl = next(i for i in impls if i.name == name)
            out.append(shrink(op, impl, failure, setup, units, maker, cache, examples, seed,
                              profile))
    finally:
        maker.close()
    return out


def shrink(op: str, impl: Implementation, failure: CaseFailed, setup: Setup, units,
           maker: TruthMaker, cache: dict, examples: int, seed: int,
           profile: str) -> CaseFailed:
    """Hypothesis's minimal failing case for ``impl`` (its rows alone)."""
    quiet = Setup(**{**setup.__dict__, "on_case": None})
    seen: dict[str, CaseFailed] = {}

    @_settings(examples)
    @hypothesis_seed(seed)
    @given(case=case_strategy(op, profile))
    def one(case: Case) -> None:
        key = case.to_json()
        if past(setup.deadline):
            if key in seen:  # hypothesis replays the failure it keeps: consistently
                raise seen[key]
            reject()
        rows = cache.get((impl.name, key))
        if rows is None:
            rows = run_cases([(case, [impl])], "random", quiet, units, maker).rows
            cache[(impl.name, key)] = rows
        if any(r.get("status") == "fail" for r in rows):
            seen[key] = CaseFailed(case, rows)
            raise seen[key]

    try:
        one()
    except CaseFailed as shrunk:
        return shrunk
    except Unsatisfiable:
        pass
    return CaseFailed(failure.case, [r for r in failure.rows if r["impl"] == impl.name])




def check_family(family: str, op: str, impls: list[Implementation], dtypes: list[str],
                 device: str, *, examples: int = 40, seed: int = 0, profile: str = "cpu",
                 lengths: tuple[int, ...] | None = None, cases: list[Case] | None = None,
                 isolate: bool = False, jobs: int = 1, deadline: float | None = None,
                 on_case=None, plugins: tuple[str, ...] = (), timeout: float = 600.0,
                 log_dir=None) -> CheckResult:
    """One family as a function call (in this process unless ``isolate``): what the CLI does
    for each family, for scripts and tests."""
    from pathlib import Path

    from harness.check.runner import executor

    setup = Setup(device=device, dtypes=list(dtypes), isolate=isolate, jobs=jobs, timeout=timeout,
                  plugins=list(plugins), deadline=deadline, on_case=on_case,
                  log_dir=Path(log_dir or "out/check/logs"))
    units, maker = executor(setup), TruthMaker(setup)
    try:
        return run_family(family, op, impls, setup, profile, units, maker, examples, seed,
                          lengths, cases)
    finally:
        units.close()
        maker.close()


__all__ = ["draw", "with_coverage", "run_family", "shrink", "check_family"]
