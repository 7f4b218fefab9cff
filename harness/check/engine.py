"""The numerical checks: every implementation against the float64 truth.

For one case and one dtype, the inputs are drawn in float64, rounded to the dtype, and

* the truth is the step-by-step reference in float64 on the rounded inputs (the long-sequence
  family uses the chunked float64 reference: the step loop is too slow at 64K tokens);
* both references run in the dtype give the error the dtype itself costs (the worse of two;
  in the long family the chunked one alone, unless the step loop is itself being checked:
  at 64K tokens its loop took minutes on the host per dtype, and one reference can only
  tighten the tolerance);
* each implementation runs in the dtype with fresh allocations poisoned with NaN, and is
  compared on every output, every final state and, under random upstream gradients on all of
  them, the gradient of every differentiable input.

The truth and the references run on ``reference_device`` (by default the CPU when the
implementations run on a GPU: their step loops are launch-bound there, and their autograd
graphs would share the GPU's memory with the kernels); the implementations' results are
compared there.

A quantity passes when its relative error is within ``harness.check.tolerances.tolerance``.
Three families: ``random`` (hypothesis draws the cases and shrinks a failure to a minimal one),
``long`` (growing T with gates strong enough to leave float32 range) and ``tiling`` (one case
per head-dim class the kernels tile differently).
"""

from __future__ import annotations

import math
import os
import shlex
import time
import traceback
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
from hypothesis import HealthCheck, given, reject, settings
from hypothesis import seed as hypothesis_seed
from hypothesis.errors import Unsatisfiable

from harness.cases import Case, case_strategy, cast_args, long_cases, sample, tiling_cases
from harness.check.poison import poison_allocations
from harness.check.tolerances import tolerance
from harness.implementation import DTYPES, Implementation
from harness.registry import get


# The implementation each family treats as exact (in float64): the step-by-step reference,
# except for long sequences, where its token loop is too slow and the chunked one stands in.
TRUTH = {"random": "naive", "replay": "naive", "tiling": "naive", "long": "chunk_ref"}
FAMILIES = ("random", "long", "tiling")  # the ones `harness check --family` draws
REFERENCES = ("naive", "chunk_ref")


def dtype_references(family: str, impls: list[Implementation]) -> list[str]:
    """The references run in each dtype for the tolerance: both, except in the long family,
    where the truth's chunked form alone plus any reference that is itself being checked."""
    if family != "long":
        return list(REFERENCES)
    names = {i.name for i in impls}
    return [n for n in REFERENCES if n == TRUTH["long"] or n in names]


# Where the truth and the references run: "auto" (the CPU when the implementations run on a
# GPU, else with them), "cpu" or "device" (with the implementations). The CLI's --ref-device
# sets it; gate workers inherit it. On the H100 a float64 step loop took ~60 s per T = 2048
# delta-rule case (kernel launches); on 2 CPU cores it takes 12 s.
REF_DEVICE_ENV = "LINATTN_REF_DEVICE"
REF_DEVICES = ("auto", "cpu", "device")


def reference_device(device: str) -> str:
    """The device the truth and the references run on, for implementations on ``device``."""
    choice = os.environ.get(REF_DEVICE_ENV, "auto")
    if choice not in REF_DEVICES:
        raise ValueError(f"{REF_DEVICE_ENV}: expected one of {', '.join(REF_DEVICES)}, got {choice!r}")
    if choice == "device" or (choice == "auto" and device == "cpu"):
        return device
    return "cpu"


def rel_error(x: torch.Tensor | None, ref: torch.Tensor) -> float:
    """``||x - ref|| / ||ref||`` in float64 on ref's device; inf for a missing, misshapen or
    non-finite x."""
    if x is None or tuple(x.shape) != tuple(ref.shape):
        return math.inf
    x64, r64 = x.detach().to(ref.device, torch.float64), ref.detach().double()
    if not torch.isfinite(x64).all():
        return math.inf
    num, den = torch.linalg.vector_norm(x64 - r64).item(), torch.linalg.vector_norm(r64).item()
    if den == 0.0:
        return 0.0 if num == 0.0 else math.inf
    return num / den


@dataclass
class Run:
    """What one callable produced on one case in one dtype."""

    outputs: dict[str, torch.Tensor | None] = field(default_factory=dict)
    grads: dict[str, torch.Tensor | None] = field(default_factory=dict)
    error: str | None = None


# Messages of errors that leave the CUDA context unusable: every later call in the process fails
# too, so a check must stop at the first one (shrinking would "minimise" to whatever case ran
# next, which is how an H100 run once reported a one-token case for a fault it did not cause).
STICKY = ("illegal memory access", "unspecified launch failure", "device-side assert",
          "misaligned address", "illegal instruction", "an illegal address")


def is_device_fault(exc: BaseException) -> bool:
    text = str(exc)
    return any(s in text for s in STICKY)


class DeviceFault(BaseException):
    """A sticky device error: not an Exception, so hypothesis neither retries nor shrinks it."""

    def __init__(self, message: str, case: Case | None = None, impl: str = "", dtype: str = ""):
        super().__init__(message)
        self.message, self.case, self.impl, self.dtype = message, case, impl, dtype

    def row(self) -> dict[str, Any]:
        case = self.case
        return dict(op=case.op, impl=self.impl or "?", kind="", dtype=self.dtype or "?",
                    family="", case=case.label(), T=case.dims["T"], case_json=case.to_json(),
                    quantity="*", error=math.inf, ref_error=math.nan, tolerance=0.0, passed=False,
                    note=f"device fault, run stopped (replay this case alone, with "
                         f"CUDA_LAUNCH_BLOCKING=1): {self.message}")


def run(fn: Callable[..., Any], args: dict[str, Any], case: Case, dtype: torch.dtype,
        douts: dict[str, torch.Tensor] | None, backward: bool = True,
        poison: bool = False) -> Run:
    """Call ``fn`` on the case's arguments in ``dtype``; backpropagate ``douts`` if given."""
    op = case.operator
    result = Run()
    want_grad = backward and douts is not None
    try:
        call_args = cast_args(args, case, dtype, want_grad)
        with poison_allocations(poison), torch.enable_grad():
            out = fn(**call_args)
            if not isinstance(out, tuple) or len(out) != len(op.outputs):
                raise TypeError(f"returned {type(out).__name__} of length "
                                f"{len(out) if isinstance(out, tuple) else '-'}, expected a "
                                f"tuple {op.outputs}")
            result.outputs = dict(zip(op.outputs, out))
            if want_grad:
                loss = sum((result.outputs[n].double() * d).sum()
                           for n, d in douts.items() if result.outputs.get(n) is not None)
                if isinstance(loss, torch.Tensor) and loss.requires_grad:
                    loss.backward()
                for inp in op.inputs:
                    x = call_args.get(inp.name)
                    if x is not None and inp.differentiable:
                        result.grads[inp.name] = x.grad
    except Exception as exc:
        lines = traceback.format_exception_only(type(exc), exc)
        if is_device_fault(exc):
            raise DeviceFault(lines[-1].strip(), case) from exc
        result.error = lines[-1].strip()
    return result


@dataclass
class Truth:
    """The float64 truth and the same-dtype reference's errors, for one case and dtype."""

    run: Run
    ref_errors: dict[str, float]


def quantities(case: Case, truth: Run, backward: bool) -> list[tuple[str, torch.Tensor]]:
    """(name, truth tensor) of everything compared: outputs, final states, gradients."""
    out = [(n, t) for n, t in truth.outputs.items() if t is not None]
    if backward:
        out += [(f"d{n}", g) for n, g in truth.grads.items() if g is not None]
    return out


def compare(run_: Run, truth: Run) -> dict[str, float]:
    errors = {n: rel_error(run_.outputs.get(n), t) for n, t in truth.outputs.items() if t is not None}
    errors.update({f"d{n}": rel_error(run_.grads.get(n), g) for n, g in truth.grads.items()
                   if g is not None})
    return errors


def evaluate(case: Case, impls: list[Implementation], dtypes: list[str], device: str,
             family: str = "random") -> list[dict[str, Any]]:
    """Check every implementation on one case in every dtype; one row per quantity."""
    op = case.operator
    truth_fn = get(op.name, TRUTH[family])
    rdev = reference_device(device)
    args64 = sample(case, device)  # drawn on the CPU, then moved: the same values everywhere
    args_ref = args64 if rdev == device else sample(case, rdev)
    rows: list[dict[str, Any]] = []
    douts: dict[str, torch.Tensor] | None = None  # on the reference device
    douts_impl: dict[str, torch.Tensor] | None = None  # the same, on the implementations' device
    gen = torch.Generator().manual_seed(case.seed + 1)
    for dname in dtypes:
        dtype = DTYPES[dname]
        todo = []
        for impl in impls:
            if dname not in impl.dtypes:
                continue  # not a dtype it claims: nothing to report
            reason = impl.dtype_unsupported(dname, device) or impl.too_slow(case, device)
            if reason is None and impl.supports is not None:
                reason = impl.supports(case)
            todo.append((impl, reason))
        if not todo:
            continue
        rounded = cast_args(args64, case, dtype, grad=False)  # inputs as the dtype holds them
        rounded_ref = rounded if rdev == device else cast_args(args_ref, case, dtype, grad=False)
        if douts is None:  # upstream gradients: drawn once per case, shaped like the outputs
            first = run(truth_fn.load(), rounded_ref, case, torch.float64, None)
            if first.error:
                raise RuntimeError(f"the truth ({truth_fn.key}) failed on {case.to_json()}: {first.error}")
            douts = {n: torch.randn(t.shape, generator=gen, dtype=torch.float64).to(rdev)
                     for n, t in first.outputs.items() if t is not None}
            douts_impl = {n: t.to(device) for n, t in douts.items()}
        truth = run(truth_fn.load(), rounded_ref, case, torch.float64, douts)
        if truth.error:
            raise RuntimeError(f"the truth ({truth_fn.key}) failed on {case.to_json()}: {truth.error}")
        # What the dtype itself costs: the worse of the two references run in it (the step
        # loop and the chunked form round differently; both are honest algorithms).
        ref_runs: dict[str, Run] = {}
        ref_errors: dict[str, float] = {}
        if dtype != torch.float64:
            for name in dtype_references(family, impls):
                ref_runs[name] = run(get(op.name, name).load(), rounded_ref, case, dtype, douts)
                for q, e in compare(ref_runs[name], truth).items():
                    ref_errors[q] = max(ref_errors.get(q, 0.0), e)
        for impl, reason in todo:
            base = dict(op=op.name, impl=impl.name, kind=impl.kind, dtype=dname, family=family,
                        case=case.label(), T=case.dims["T"], case_json=case.to_json())
            if reason:
                rows.append({**base, "quantity": "*", "error": math.nan, "ref_error": math.nan,
                             "tolerance": math.nan, "passed": True, "note": f"skipped: {reason}"})
                continue
            # a reference checked as an implementation: its same-dtype run above (on the
            # reference device) is its result
            is_ref = impl.name in ref_runs and impl is get(op.name, impl.name)
            res = ref_runs[impl.name] if is_ref else None
            if res is None:
                try:
                    res = run(impl.load(), rounded, case, dtype, douts_impl,
                              backward=impl.backward, poison=True)
                except DeviceFault as fault:
                    fault.impl, fault.dtype = impl.name, dname
                    raise
            errors = compare(res, truth)
            for name, _ in quantities(case, truth, impl.backward):
                ref_err = ref_errors.get(name, 0.0)
                err, tol = errors[name], tolerance(dname, ref_err)
                note = res.error or ""
                if not res.error and name in op.outputs and res.outputs.get(name) is None:
                    note = f"{name} missing (returned None)"
                rows.append({**base, "quantity": name, "error": err, "ref_error": ref_err,
                             "tolerance": tol, "passed": bool(err <= tol), "note": note})
            if not res.error and not case.output_final_state:
                extra = [n for n in op.outputs[1:] if res.outputs.get(n) is not None]
                if extra:
                    rows.append({**base, "quantity": ",".join(extra), "error": math.inf,
                                 "ref_error": 0.0, "tolerance": 0.0, "passed": False,
                                 "note": "final state returned with output_final_state=False"})
    return rows


class CaseFailed(AssertionError):
    def __init__(self, case: Case, rows: list[dict[str, Any]]):
        self.case, self.rows = case, rows
        worst = [r for r in rows if not r["passed"]]
        super().__init__(f"{len(worst)} quantities failed on {case.to_json()}")


@dataclass
class CheckResult:
    op: str
    rows: list[dict[str, Any]]
    failure: CaseFailed | None
    examples: int
    seconds: float
    stopped: bool = False  # cut short by the deadline (--max-time): the rows cover fewer cases


# Called after each evaluated case with (case, its rows, seconds it took): the CLI's progress
# line and its rows written as they come, so a run killed from outside keeps its finished cases.
OnCase = Callable[[Case, list, float], None]


def _evaluated(on_case: OnCase | None, case: Case, rows: list, t0: float) -> None:
    if on_case is not None:
        on_case(case, rows, time.perf_counter() - t0)


def past(deadline: float | None) -> bool:
    """Whether ``deadline`` (a time.perf_counter() value) has passed."""
    return deadline is not None and time.perf_counter() > deadline


def check_random(op_name: str, impls: list[Implementation], dtypes: list[str], device: str,
                 examples: int, seed: int, profile: str,
                 deadline: float | None = None, on_case: OnCase | None = None) -> CheckResult:
    """The random family: hypothesis draws ``examples`` cases and shrinks any failure. Past
    ``deadline`` no further case is evaluated: a shrink in progress stops at the smallest
    failing case found so far."""
    rows: list[dict[str, Any]] = []
    count = 0
    stopped = False
    start = time.perf_counter()
    failed: dict[str, CaseFailed] = {}  # by case: replayed past the deadline without evaluating

    @settings(max_examples=examples, deadline=None, database=None, print_blob=False,
              suppress_health_check=list(HealthCheck), report_multiple_bugs=False)
    @hypothesis_seed(seed)
    @given(case=case_strategy(op_name, profile))
    def one(case: Case) -> None:
        nonlocal count, stopped
        if past(deadline):
            if case.to_json() in failed:  # hypothesis replays the failure it keeps: consistently
                raise failed[case.to_json()]
            stopped = True
            reject()
        count += 1
        t0 = time.perf_counter()
        case_rows = guarded(evaluate, case, impls, dtypes, device, "random")
        _evaluated(on_case, case, case_rows, t0)
        if not all(r["passed"] for r in case_rows):
            failed[case.to_json()] = CaseFailed(case, case_rows)
            raise failed[case.to_json()]
        rows.extend(case_rows)

    failure = None
    try:
        one()
    except Unsatisfiable:  # every draw rejected: the deadline passed before the first case
        if not stopped:
            raise
    except CaseFailed as exc:  # raised again on the minimal example once shrinking is done
        failure = exc
        rows.extend(exc.rows)
    except DeviceFault as fault:  # the first faulting case, as it was drawn
        failure = CaseFailed(fault.case, [fault.row()])
        rows.extend(failure.rows)
    return CheckResult(op_name, rows, failure, count, time.perf_counter() - start, stopped)


def guarded(evaluate_: Callable[..., list[dict[str, Any]]], case: Case, *args: Any) -> list:
    """evaluate_(case, ...), with any sticky device error raised as a DeviceFault naming case
    (one from preparing the inputs too: then the fault may be the previous case's)."""
    try:
        return evaluate_(case, *args)
    except DeviceFault as fault:
        fault.case = fault.case or case
        raise
    except Exception as exc:
        if is_device_fault(exc):
            raise DeviceFault(f"{type(exc).__name__}: {exc}".splitlines()[0], case) from exc
        raise


def check_cases(cases: list[Case], impls: list[Implementation], dtypes: list[str],
                device: str, family: str, deadline: float | None = None,
                on_case: OnCase | None = None) -> CheckResult:
    """Fixed cases (the long family, a replayed case): no drawing, no shrinking; in order until
    ``deadline``."""
    rows: list[dict[str, Any]] = []
    failure = None
    start = time.perf_counter()
    done, stopped = 0, False
    for case in cases:
        if past(deadline):
            stopped = True
            break
        done += 1
        t0 = time.perf_counter()
        try:
            case_rows = guarded(evaluate, case, impls, dtypes, device, family)
        except DeviceFault as fault:  # the process's device is unusable: stop here
            failure = CaseFailed(fault.case, [fault.row()])
            rows.extend(failure.rows)
            _evaluated(on_case, case, failure.rows, t0)
            break
        _evaluated(on_case, case, case_rows, t0)
        rows.extend(case_rows)
        if failure is None and not all(r["passed"] for r in case_rows):
            failure = CaseFailed(case, case_rows)
    return CheckResult(cases[0].op if cases else "", rows, failure, done,
                       time.perf_counter() - start, stopped)


def check_long(op_name: str, impls: list[Implementation], dtypes: list[str], device: str,
               profile: str, lengths: tuple[int, ...] | None = None,
               deadline: float | None = None, on_case: OnCase | None = None) -> CheckResult:
    return check_cases(long_cases(op_name, profile, lengths), impls, dtypes, device, "long",
                       deadline, on_case)


def check_tiling(op_name: str, impls: list[Implementation], dtypes: list[str], device: str,
                 profile: str, deadline: float | None = None,
                 on_case: OnCase | None = None) -> CheckResult:
    return check_cases(tiling_cases(op_name, profile), impls, dtypes, device, "tiling",
                       deadline, on_case)


def replay_command(op: str, impls: list[str], dtypes: list[str], device: str, case: Case) -> str:
    """The shell command that checks exactly ``case`` again (quoted for a POSIX shell)."""
    argv = ["harness", "check", op] + [a for i in impls for a in ("--impl", i)]
    argv += [a for d in dtypes for a in ("--dtype", d)]
    argv += ["--device", device, "--case", case.to_json()]
    return shlex.join(argv)
