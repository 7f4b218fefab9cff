"""Running a check: each case's truths, then every implementation on it in every dtype.

The implementations run in worker processes (``harness.worker``; ``Isolated``): a device
fault, an out-of-memory, an abort or a hang (``timeout``) there costs that implementation its
remaining cases only; it is recorded as a ``fault`` row with the reason, and every other
implementation goes on. ``InProcess`` runs them here instead (``--no-isolate``: a debugger,
or implementations registered at run time that a fresh process cannot find).

Work overlaps: the truths of the next cases (CPU-bound step loops, in ``truth_jobs``
processes) are computed while ``jobs`` workers run the implementations of the cases already
prepared (each compiling its own kernels: on a cold GPU the time goes there). A case's rows
are handed to ``on_case`` as soon as all of its units are done.
"""

from __future__ import annotations

import multiprocessing
import queue
import shutil
import tempfile
import threading
import time
from concurrent.futures import Future, ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch

from harness.cases import Case
from harness.check import unit
from harness.check.engine import (REFERENCES, TRUTH, DeviceFault, claimed, declined_by_all,
                                  impl_rows, note_row, replay_command, run_impl, skip_reason)
from harness.implementation import Implementation
from harness.registry import get

UNIT = "harness.check.unit:run_unit"
# Called after each case with (case, its rows, seconds it took): the CLI's progress line and
# its rows written as they come, so a run killed from outside keeps its finished cases.
OnCase = Callable[[Case, list, float], None]


@dataclass
class Setup:
    """How a check runs (the CLI's options)."""

    device: str
    dtypes: list[str]
    isolate: bool = True
    jobs: int = 1  # worker processes running implementations
    truth_jobs: int = 0  # processes computing truths (0: this one)
    timeout: float = 600.0  # seconds one implementation may take on one case in one dtype
    plugins: list[str] = field(default_factory=list)
    deadline: float | None = None  # time.perf_counter(): start no new case after it
    on_case: OnCase | None = None
    log_dir: Path = Path("out/check/logs")


class CaseFailed(AssertionError):
    def __init__(self, case: Case, rows: list[dict[str, Any]]):
        self.case, self.rows = case, rows
        worst = [r for r in rows if not r["passed"]]
        super().__init__(f"{len(worst)} quantities failed on {case.to_json()}")


@dataclass
class CheckResult:
    op: str
    rows: list[dict[str, Any]]
    failures: list[CaseFailed]  # numerical failures, one per failing case (faults are rows)
    examples: int  # cases run
    seconds: float
    stopped: bool = False  # cut short by the deadline: the rows cover fewer cases


def past(deadline: float | None) -> bool:
    return deadline is not None and time.perf_counter() > deadline


# ---------------------------------------------------------------- who runs an implementation
class InProcess:
    """Runs units here; a sticky device fault is recorded as a fault like a worker's."""

    def __init__(self, setup: Setup):
        self.device = setup.device
        # (implementation, dtype) -> where it faulted
        self.faulted: dict[tuple[str, str], str] = {}

    def submit(self, spec: dict[str, Any], truth: Any) -> Future:
        fut: Future = Future()
        case, impl, dname = Case.from_json(spec["case"]), spec["impl_obj"], spec["dtype"]
        try:
            if spec["family"] == "causality":
                rows = unit.causality_rows(case, impl, dname, self.device)
            else:
                res = run_impl(case, impl, dname, truth, self.device)
                rows = impl_rows(case, impl, dname, truth, spec["family"], res)
            fut.set_result({"rows": rows})
        except DeviceFault as fault:
            fut.set_result({"fault": f"device fault: {fault.message}"})
        return fut

    def close(self, abort: bool = False) -> None:
        pass


class Isolated:
    """``jobs`` worker processes, each served by a thread taking units from one queue; a
    worker whose unit did not end well is replaced before its next unit."""

    def __init__(self, setup: Setup):
        from harness.worker import NO_AUTOTUNE_CACHE, Worker, cores

        self.setup = setup
        # (implementation, dtype) -> where it faulted
        self.faulted: dict[tuple[str, str], str] = {}
        self.queue: queue.Queue = queue.Queue()
        threads = max(1, cores() // max(1, setup.jobs + setup.truth_jobs))
        config = {"device": setup.device, "device_index": 0, "plugins": list(setup.plugins),
                  "threads": threads}
        # several workers share the device: their autotuning timings are not kept on disk
        env = NO_AUTOTUNE_CACHE if setup.jobs > 1 else {}
        self.workers = [Worker(config, setup.log_dir / f"worker{i}.log", env)
                        for i in range(setup.jobs)]
        self.threads = [threading.Thread(target=self._serve, daemon=True, args=(w,))
                        for w in self.workers]
        for t in self.threads:
            t.start()

    def _serve(self, worker) -> None:
        from harness.worker import WorkerFailed

        while True:
            item = self.queue.get()
            if item is None:
                worker.close()
                return
            fut, spec = item
            key = (spec["impl"], spec["dtype"])
            if key in self.faulted:  # it faulted in this dtype while this unit waited its turn
                fut.set_result({"not_run": self.faulted[key]})
                continue
            try:
                reply = worker.request({"target": UNIT, "spec": spec}, self.setup.timeout)
            except WorkerFailed as exc:
                fut.set_result({"fault": f"{exc.status}: {exc.reason}"})
                continue
            if reply.get("status") != "ok" or "fault" in reply:
                worker.kill()  # its CUDA context may be poisoned: a fresh one for the next unit
                reply = {"fault": reply.get("fault") or f"raised: {reply.get('reason')}"}
            fut.set_result(reply)

    def submit(self, spec: dict[str, Any], truth: Any) -> Future:
        fut: Future = Future()
        self.queue.put((fut, {k: v for k, v in spec.items() if k != "impl_obj"}))
        return fut

    def close(self, abort: bool = False) -> None:
        """Let the workers finish their units and stop; with ``abort`` (an interrupt) kill them
        now instead: a worker may be minutes into a compile, and a run told to stop must."""
        for _ in self.threads:
            self.queue.put(None)
        if abort:
            for w in self.workers:
                w.kill()
            return
        for t in self.threads:
            t.join(timeout=60)


def executor(setup: Setup):
    return Isolated(setup) if setup.isolate else InProcess(setup)


# ---------------------------------------------------------------- truths
def _truth_process(threads: int) -> None:
    torch.set_num_threads(threads)


class TruthMaker:
    """Computes each case's truths, here or in a pool of processes; with isolated workers the
    truths go to files in a temporary folder (removed at the end)."""

    def __init__(self, setup: Setup):
        self.setup = setup
        self.folder = Path(tempfile.mkdtemp(prefix="linattn-check-")) if setup.isolate else None
        self.pool = None
        if setup.isolate and setup.truth_jobs > 0:
            from harness.worker import cores

            self.pool = ProcessPoolExecutor(
                setup.truth_jobs, mp_context=multiprocessing.get_context("spawn"),
                initializer=_truth_process, initargs=(max(1, cores() // setup.truth_jobs),))
        self.count = 0

    def submit(self, case: Case, impls: list[Implementation], family: str) -> Future:
        """A future of (truth: a Truth per dtype, a file, or None where none is needed, and
        reference rows)."""
        dtypes = claimed(impls, self.setup.dtypes)
        checked = [i.name for i in impls]
        fut: Future = Future()
        if family == "causality" or declined_by_all(case, impls, dtypes, self.setup.device):
            # causality: compared with the implementation itself and a forward pass; a case
            # every implementation declines: only rows that say why
            fut.set_result((None, []))
            return fut
        self.count += 1
        path = None if self.folder is None else self.folder / f"truth{self.count}.pt"
        spec = dict(case=case.to_json(), checked=checked, dtypes=dtypes,
                    device=self.setup.device, family=family, path=str(path))
        if self.pool is not None:
            inner = self.pool.submit(unit.truth_job, spec)
            inner.add_done_callback(lambda f: fut.set_exception(f.exception()) if f.exception()
                                    else fut.set_result((path, f.result()["rows"])))
            return fut
        try:
            refs = [i for i in impls if i.name in REFERENCES]
            ts, rows = unit.prepare_truths(case, refs, checked, dtypes, self.setup.device,
                                           family, path)
            fut.set_result((path if path is not None else ts, rows))
        except Exception as exc:  # the truth failed: the case is recorded as such
            fut.set_exception(exc)
        return fut

    def close(self, abort: bool = False) -> None:
        """Wait for the truths being computed, or with ``abort`` (an interrupt) only cancel
        the waiting ones (those running were interrupted with this process's group)."""
        if self.pool is not None:
            self.pool.shutdown(wait=not abort, cancel_futures=True)
        if self.folder is not None:
            shutil.rmtree(self.folder, ignore_errors=True)


# ---------------------------------------------------------------- the run
@dataclass
class _Case:
    case: Case
    impls: list[Implementation]
    start: float
    rows: list[dict[str, Any]] = field(default_factory=list)
    pending: int = 0
    truth_done: bool = False
    reported: bool = False


class _Run:
    """One ``run_cases``: the cases opened in order (a truth each), their units handed to the
    executor as each truth arrives, every event handled in this thread."""

    def __init__(self, plan, family: str, setup: Setup, units, maker: TruthMaker):
        self.plan, self.family, self.setup, self.units, self.maker = plan, family, setup, units, maker
        self.events: queue.Queue = queue.Queue()
        self.states: list[_Case] = []
        self.rows: list[dict[str, Any]] = []
        self.done, self.stopped = 0, False

    def open_case(self, i: int) -> None:
        case, impls = self.plan[i]
        self.states.append(_Case(case, impls, time.perf_counter()))
        self.maker.submit(case, impls, self.family).add_done_callback(
            lambda f: self.events.put(("truth", i, f)))

    def on_truth(self, i: int, f: Future) -> None:
        st = self.states[i]
        st.truth_done = True
        try:
            truth, ref_rows = f.result()
        except Exception as exc:  # noqa: BLE001 - the truth failed: every row of the case lost
            truth_impl = get(st.case.op, TRUTH[self.family])
            st.rows.append(note_row(st.case, truth_impl, "*", self.family, "fault",
                                    f"the truth failed: {type(exc).__name__}: {exc}"))
            return
        st.rows += ref_rows
        covered = {(r["impl"], r["dtype"]) for r in ref_rows}
        for dname in claimed(st.impls, self.setup.dtypes):
            for impl in st.impls:
                if dname in impl.dtypes and (impl.name, dname) not in covered:
                    self.submit(i, st, impl, dname, truth)

    def submit(self, i: int, st: _Case, impl: Implementation, dname: str, truth: Any) -> None:
        """One unit, or the row that says why it does not run."""
        reason = skip_reason(impl, st.case, dname, self.setup.device)
        if reason:
            st.rows.append(note_row(st.case, impl, dname, self.family, "skipped",
                                    f"skipped: {reason}"))
            return
        if (impl.name, dname) in self.units.faulted:
            st.rows.append(note_row(st.case, impl, dname, self.family, "fault",
                                    f"not run: {self.units.faulted[impl.name, dname]}"))
            return
        st.pending += 1
        spec = dict(case=st.case.to_json(), impl=impl.name, impl_obj=impl, dtype=dname,
                    family=self.family, truth=str(truth))
        held = truth[dname] if isinstance(truth, dict) else truth
        self.units.submit(spec, held).add_done_callback(
            lambda u: self.events.put(("unit", i, (impl, dname), u)))

    def on_unit(self, i: int, key, u: Future) -> None:
        st, (impl, dname) = self.states[i], key
        st.pending -= 1
        reply = u.result()
        if "not_run" in reply:  # the implementation faulted while this unit waited
            st.rows.append(note_row(st.case, impl, dname, self.family, "fault",
                                    f"not run: {reply['not_run']}"))
        elif "fault" in reply:
            command = replay_command(st.case.op, [impl.name], [dname], self.setup.device, st.case)
            st.rows.append(note_row(st.case, impl, dname, self.family, "fault",
                                    f"fault: {reply['fault']}; replay: {command}"))
            self.units.faulted.setdefault(
                (impl.name, dname), f"{impl.name} faulted on {dname} {st.case.label()}")
        else:
            st.rows += reply["rows"]

    def handle(self, event) -> None:
        kind, i, *rest = event
        (self.on_truth if kind == "truth" else self.on_unit)(i, *rest)
        st = self.states[i]
        if st.truth_done and st.pending == 0 and not st.reported:
            st.reported = True
            self.done += 1
            self.rows += st.rows
            if self.setup.on_case is not None:
                self.setup.on_case(st.case, st.rows, time.perf_counter() - st.start)

    def loop(self) -> None:
        """Open cases while fewer truths than the window are in flight (and the deadline has not
        passed), handling every event ready first, until every opened case is done."""
        window = max(1, self.setup.truth_jobs) + 1  # truths prepared ahead of the workers
        nxt = 0
        while True:
            while not self.events.empty():  # what is ready first: a case's units start at once
                self.handle(self.events.get())
            if nxt < len(self.plan) and not self.stopped \
                    and sum(not s.truth_done for s in self.states) < window:
                if past(self.setup.deadline):
                    self.stopped = True
                else:
                    self.open_case(nxt)
                    nxt += 1
                continue
            if not any(s.pending or not s.truth_done for s in self.states):
                return
            self.handle(self.events.get())


def run_cases(plan: list[tuple[Case, list[Implementation]]], family: str, setup: Setup,
              units=None, maker: TruthMaker | None = None) -> CheckResult:
    """Every (case, implementations) of ``plan``, in order, until the deadline. ``units`` and
    ``maker`` may be shared between families (workers kept warm, faults remembered); made and
    closed here if not."""
    own = units is None
    units = units or executor(setup)
    maker = maker or TruthMaker(setup)
    run, start = _Run(plan, family, setup, units, maker), time.perf_counter()
    try:
        run.loop()
    finally:
        if own:
            units.close()
            maker.close()
    failures = [CaseFailed(st.case, st.rows) for st in run.states
                if any(r.get("status") == "fail" for r in st.rows)]
    return CheckResult(plan[0][0].op if plan else "", run.rows, failures, run.done,
                       time.perf_counter() - start, run.stopped)
