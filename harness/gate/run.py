"""Running a suite for the gate: every case evaluated by the check engine, each measured
quantity one entry keyed by (operator, implementation, dtype, case id, quantity), each skipped
(implementation, dtype, case) one entry with the reason; in this process or in ``-j`` spawned
worker processes (largest case first; a case that ran out of device memory beside the others
is evaluated again alone).
"""

from __future__ import annotations

import dataclasses
import importlib.metadata
import json
import math
import time
from dataclasses import dataclass
from functools import partial
from typing import Any, Callable

from harness.check.engine import TRUTH, DeviceFault, evaluate
from harness.gate.suites import Suite, SuiteCase
from harness.registry import get, implementations

# On the CPU the libraries' kernels are pinned to ones every x86-64 machine runs alike
# (harness/gate/cpu_pins.py): unpinned, AVX2 and AVX-512 kernels round differently, and errors of
# ill-conditioned quantities moved by up to 11x between machines.
# The CPU runs single-threaded: a BLAS splits its sums by thread, so the digits of an error
# would depend on the core count of the machine CI lands on; and on tensors this small, threads
# only add synchronisation (the ci suite's GLA cases ran 5x slower with 2 threads than with 1
# on a busy 2-core machine, with identical errors).
CPU_THREADS = 1

SKIP = "*"  # the quantity of a skipped (implementation, dtype, case)
Key = tuple[str, str, str, str, str]  # op, impl, dtype, case id, quantity


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

        from harness.check.engine import reference_device

        env["device"] = torch.cuda.get_device_name()
        env["references"] = reference_device(device)
    else:
        from harness.gate import cpu_pins

        env["device"] = f"cpu (Triton interpreter), {CPU_THREADS} thread(s)"
        env["cpu_pins"] = " ".join(f"{k}={v}" for k, v in cpu_pins.pinned().items()) or "none"
    return env


@dataclass
class Measurement:
    entries: dict[Key, dict[str, Any]]
    cases: dict[str, dict[str, Any]]  # "op/case id" -> the case (what the entries were measured on)
    failures: dict[str, str]  # "op/case id" -> why the case could not be evaluated at all
    seconds: dict[str, float]  # per operator
    alone: list[str] = dataclasses.field(default_factory=list)  # "op/case id": run again alone

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
        alone: list[int] = []
        if not in_process(jobs, len(chosen)):
            results = _run_parallel(suite, chosen, device, progress, jobs)
            results, alone = again_alone(chosen, results, partial(_alone, suite, device=device))
        else:
            results = []
            for done, n in enumerate(chosen):
                if progress is not None:
                    progress(done, len(chosen), suite.cases[n])
                results.append(_run_case(suite.cases[n], device))
        m = _measurement([suite.cases[n] for n in chosen], results)
        m.alone = [f"{suite.cases[n].op}/{suite.cases[n].id}" for n in alone]
        return m
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

    import torch

    from harness.check.engine import reference_device
    from harness.gate.suites import load_suite

    if device == "cpu":
        torch.set_num_threads(CPU_THREADS)
    elif reference_device(device) == "cpu":  # the references' loops share the host's cores
        from harness.worker import cores

        torch.set_num_threads(max(1, cores() // jobs))
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
        from harness.gate import cpu_pins

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


# What a device's out-of-memory error says (torch's "CUDA out of memory", Triton's "[CUDA]: out
# of memory" where a module or a launch did not get its memory).
OUT_OF_MEMORY = "out of memory"


def out_of_memory(result: tuple[list[dict[str, Any]], str | None, float]) -> bool:
    """Whether a case's result (_run_case's) holds an out-of-memory error."""
    entries, failure, _ = result
    return (OUT_OF_MEMORY in (failure or "")
            or any(OUT_OF_MEMORY in e.get("note", "") for e in entries))


def again_alone(chosen: list[int], results: list, run_alone: Callable[[int], Any]
                ) -> tuple[list, list[int]]:
    """(results, the cases run again): each case of ``chosen`` whose result ran out of memory
    beside the other workers evaluated again by ``run_alone``, one at a time. On a GPU every
    worker holds its own context and its kernels' memory (a kernel that spills reserves local
    memory for as many threads as the GPU holds at once): on an H100 with -j 14 (2026-12-06),
    46 entries of the gpu suite's float32 64-token mini-batch cases of TTT and Titans raised
    Triton's "out of memory", where runs of one operator's cases had measured them. A result
    that runs out of memory alone too is kept: the gate records it as it records any error."""
    again = [i for i, n in enumerate(chosen) if out_of_memory(results[i])]
    results = list(results)
    for i in again:
        results[i] = run_alone(chosen[i])
    return results, [chosen[i] for i in again]


def _alone(suite: Suite, n: int, device: str):
    """Case n of the suite evaluated in a fresh worker process of its own."""
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    ctx = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(max_workers=1, mp_context=ctx) as pool:
        return pool.submit(_worker, str(suite.path), n, device, 1).result()[1]


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


def select_ops(section: dict[str, Any], ops: list[str], inside: bool = True) -> dict[str, Any]:
    """The section's entries and cases of ``ops`` (inside) or of the other operators."""
    return dict(entries=[e for e in section["entries"] if (e["op"] in ops) == inside],
                cases={c: js for c, js in section["cases"].items() if (c.split("/", 1)[0] in ops) == inside})


def only_ops(section: dict[str, Any], ops: list[str] | None) -> dict[str, Any]:
    """What a gate run restricted to ``ops`` is compared with (all of it when ``ops`` is empty)."""
    return dict(section, **select_ops(section, ops)) if ops else section
