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
import traceback
from dataclasses import dataclass, field
from typing import Any, Callable

import torch

from harness.cases import Case, cast_args, sample
from harness.check.poison import poison_allocations
from harness.check.tolerances import tolerance
from harness.implementation import DTYPES, Implementation
from harness.registry import get


# The implementation each family treats as exact (in float64): the step-by-step reference,
# except for long sequences, where its token loop is too slow and the chunked one stands in.
TRUTH = {"random": "naive", "replay": "naive", "tiling": "naive", "causality": "naive",
         "long": "chunk_ref"}
FAMILIES = ("random", "long", "tiling", "causality")  # the ones `harness check --family` runs
REFERENCES = ("naive", "chunk_ref")


def dtype_references(family: str, checked: list[str]) -> list[str]:
    """The references run in each dtype for the tolerance: both, except in the long family,
    where the truth's chunked form alone plus any reference that is itself being checked
    (``checked``: the names of the implementations being checked)."""
    if family != "long":
        return list(REFERENCES)
    return [n for n in REFERENCES if n == TRUTH["long"] or n in checked]


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
    # The outputs of the same call without any input needing a gradient (``run(inference=True)``)
    inference: dict[str, torch.Tensor | None] = field(default_factory=dict)


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


def named_outputs(names: tuple[str, ...], out: Any) -> dict[str, Any]:
    """An implementation's return value by output name; a TypeError unless it is a tuple of
    one value per output."""
    if not isinstance(out, tuple) or len(out) != len(names):
        raise TypeError(f"returned {type(out).__name__} of length "
                        f"{len(out) if isinstance(out, tuple) else '-'}, expected a tuple {names}")
    return dict(zip(names, out))


def run(fn: Callable[..., Any], args: dict[str, Any], case: Case, dtype: torch.dtype,
        douts: dict[str, torch.Tensor] | None, backward: bool = True,
        poison: bool = False, inference: bool = False) -> Run:
    """Call ``fn`` on the case's arguments in ``dtype``; backpropagate ``douts`` if given;
    with ``inference`` and ``douts``, call it again under ``torch.no_grad`` on inputs that
    need no gradient (``Run.inference``; without ``douts`` the one call is that one already)."""
    op = case.operator
    result = Run()
    want_grad = backward and douts is not None
    try:
        call_args = cast_args(args, case, dtype, want_grad)
        with poison_allocations(poison), torch.enable_grad():
            result.outputs = named_outputs(op.outputs, fn(**call_args))
            if want_grad:
                loss = sum((result.outputs[n].double() * d).sum()
                           for n, d in douts.items() if result.outputs.get(n) is not None)
                if isinstance(loss, torch.Tensor) and loss.requires_grad:
                    loss.backward()
                for inp in op.inputs:
                    x = call_args.get(inp.name)
                    if x is not None and inp.differentiable:
                        result.grads[inp.name] = x.grad
        if inference and want_grad:  # without gradients the call above was the inference one
            result.inference = dict.fromkeys(op.outputs)  # what fails if the call raises
            with poison_allocations(poison), torch.no_grad():
                result.inference = named_outputs(op.outputs, fn(**cast_args(args, case, dtype,
                                                                            False)))
    except Exception as exc:
        lines = traceback.format_exception_only(type(exc), exc)
        if is_device_fault(exc):
            raise DeviceFault(lines[-1].strip(), case) from exc
        result.error = lines[-1].strip()
    return result


@dataclass
class Truth:
    """What an implementation is compared with on one case in one dtype: the float64 truth on
    the dtype's rounded inputs (on the reference device), the worse same-dtype reference's
    error per quantity, those references' own runs, and the upstream gradients (float64, the
    reference device; drawn once per case, so every dtype and every process uses the same)."""

    truth: Run
    ref_errors: dict[str, float]
    ref_runs: dict[str, Run]
    douts: dict[str, torch.Tensor]


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


def skip_reason(impl: Implementation, case: Case, dname: str, device: str) -> str | None:
    """Why ``impl`` cannot run ``case`` in ``dname`` here (None when it can)."""
    reason = impl.dtype_unsupported(dname, device) or impl.too_slow(case, device)
    if reason is None and impl.supports is not None:
        reason = impl.supports(case)
    return reason


def declined_by_all(case: Case, impls: list[Implementation], dtypes: list[str],
                    device: str) -> bool:
    """Whether every implementation skips ``case`` in every dtype of ``dtypes`` it claims: then
    no truth is needed (on a GPU host the float64 step loop of a TTT case with 4-token
    mini-batches, which its kernels decline, took 70 s for nothing)."""
    return all(skip_reason(impl, case, d, device)
               for d in dtypes for impl in impls if d in impl.dtypes)


def claimed(impls: list[Implementation], dtypes: list[str]) -> list[str]:
    """The dtypes of ``dtypes`` that one of ``impls`` claims: the ones a truth is needed for."""
    return [d for d in dtypes if any(d in impl.dtypes for impl in impls)]


def truths(case: Case, checked: list[str], dtypes: list[str], device: str,
           family: str) -> dict[str, Truth]:
    """The Truth of every dtype in ``dtypes``, for checking the implementations named
    ``checked`` on ``device``."""
    op = case.operator
    truth_fn = get(op.name, TRUTH[family]).load()
    rdev = reference_device(device)
    args = sample(case, rdev)  # drawn on the CPU, then moved: the same values everywhere
    out: dict[str, Truth] = {}
    douts: dict[str, torch.Tensor] | None = None
    for dname in dtypes:
        dtype = DTYPES[dname]
        rounded = cast_args(args, case, dtype, grad=False)  # inputs as the dtype holds them
        if douts is None:  # upstream gradients: drawn once per case, shaped like the outputs
            first = run(truth_fn, rounded, case, torch.float64, None)
            if first.error:
                raise RuntimeError(f"the truth ({TRUTH[family]}) failed on {case.to_json()}: {first.error}")
            gen = torch.Generator().manual_seed(case.seed + 1)
            douts = {n: torch.randn(t.shape, generator=gen, dtype=torch.float64).to(rdev)
                     for n, t in first.outputs.items() if t is not None}
        truth = run(truth_fn, rounded, case, torch.float64, douts)
        if truth.error:
            raise RuntimeError(f"the truth ({TRUTH[family]}) failed on {case.to_json()}: {truth.error}")
        # What the dtype itself costs: the worse of the two references run in it (the step
        # loop and the chunked form round differently; both are honest algorithms).
        ref_runs: dict[str, Run] = {}
        ref_errors: dict[str, float] = {}
        if dtype != torch.float64:
            names = dtype_references(family, checked)
            refs = [get(op.name, name).load() for name in names]
            for name, fn in zip(names, refs):
                ref_runs[name] = run(fn, rounded, case, dtype, douts)
                for q, e in compare(ref_runs[name], truth).items():
                    ref_errors[q] = max(ref_errors.get(q, 0.0), e)
            few = [f"d{n}" for n, g in truth.grads.items()
                   if g is not None and g.numel() <= FEW_NUMBERS]
            if few:
                few_number_draws(case, truth_fn, refs, rounded, dtype, douts, few, ref_errors)
        out[dname] = Truth(truth, ref_errors, ref_runs, douts)
    return out


# A gradient of a few numbers (Titans' dtheta at T = 1: one per sequence and head) is a sum or
# two whose rounding error is one draw from a wide spread, for the references as for a kernel:
# on one such float32 case the step loop's error was 1.8e-6 on a 2-core CPU host and 3.1e-7 on
# the CPU of an H100 host (the same inputs and code), and over 12 random draws at T = 1 (inputs
# and upstream gradients) a kernel's and the reference's errors each ranged over three orders of
# magnitude, either one up to 10x the other. The tolerance would rest on one draw of the
# reference's error, so for such a gradient the references also run under FEW_DRAWS other draws
# of the upstream gradients (each with its own float64 truth) and the worst error counts.
# Gradients of more than FEW_NUMBERS numbers keep the one draw: their norms average the spread
# away, and the extra truths would cost long cases minutes. Three more draws were too few: on an
# H100's host the worst of four was still 3.1e-7 on a case whose kernel error was 2.0e-6
# (float32 dtheta, B=1 T=1 H=1 D=64, seed 0; 105% of the tolerance in every kernel form).
FEW_NUMBERS = 16
FEW_DRAWS = 7


def few_number_draws(case: Case, truth_fn: Callable[..., Any], refs: list[Callable[..., Any]],
                     rounded: dict[str, Any], dtype: torch.dtype,
                     douts: dict[str, torch.Tensor], few: list[str],
                     ref_errors: dict[str, float]) -> None:
    """Raise ``ref_errors`` of the gradients ``few`` to the references' worst error over
    FEW_DRAWS more draws of the upstream gradients (drawn from the case's seed)."""
    gen = torch.Generator().manual_seed(case.seed + 2)
    for _ in range(FEW_DRAWS):
        other = {n: torch.randn(d.shape, generator=gen, dtype=torch.float64).to(d.device)
                 for n, d in douts.items()}
        truth = run(truth_fn, rounded, case, torch.float64, other)
        if truth.error:
            return
        for fn in refs:
            errors = compare(run(fn, rounded, case, dtype, other), truth)
            for q in few:
                if math.isfinite(errors.get(q, math.nan)):
                    ref_errors[q] = max(ref_errors.get(q, 0.0), errors[q])


def base_row(case: Case, impl: Implementation, dname: str, family: str) -> dict[str, Any]:
    return dict(op=case.op, impl=impl.name, kind=impl.kind, dtype=dname, family=family,
                case=case.label(), T=case.dims["T"], case_json=case.to_json())


def note_row(case: Case, impl: Implementation, dname: str, family: str, status: str,
             note: str) -> dict[str, Any]:
    """A row that compared nothing: ``status`` is skipped (it cannot run the case; not a
    failure) or fault (it did not finish; a failure)."""
    return {**base_row(case, impl, dname, family), "quantity": "*", "error": math.nan,
            "ref_error": math.nan, "tolerance": math.nan, "passed": status == "skipped",
            "status": status, "note": note}


def run_impl(case: Case, impl: Implementation, dname: str, t: Truth, device: str) -> Run:
    """``impl`` on the case's inputs rounded to ``dname``, on ``device``, fresh allocations
    poisoned with NaN, backpropagating the truth's upstream gradients (under its switch form,
    forward and backward, if it has one)."""
    try:
        with impl.switched():
            return run(impl.load(), sample(case, device), case, DTYPES[dname],
                       {n: d.to(device) for n, d in t.douts.items()}, backward=impl.backward,
                       poison=True, inference=impl.inference_path)
    except DeviceFault as fault:
        fault.impl, fault.dtype = impl.name, dname
        raise


def impl_rows(case: Case, impl: Implementation, dname: str, t: Truth, family: str,
              res: Run) -> list[dict[str, Any]]:
    """One row per quantity: ``res`` (the implementation's run) against the truth."""
    op, base = case.operator, base_row(case, impl, dname, family)
    errors = compare(res, t.truth)
    rows = []
    for name, _ in quantities(case, t.truth, impl.backward):
        ref_err = t.ref_errors.get(name, 0.0)
        err, tol = errors[name], tolerance(dname, ref_err)
        note = res.error or ""
        if name in res.inference:  # an output: the worse of the forwards with and without grad
            err_inf = rel_error(res.inference[name], t.truth.outputs[name])
            if not err_inf <= err:
                err, note = err_inf, note or "the worse of the two forwards: the one without gradients"
        if not res.error and name in op.outputs and res.outputs.get(name) is None:
            note = f"{name} missing (returned None)"
        rows.append({**base, "quantity": name, "error": err, "ref_error": ref_err,
                     "tolerance": tol, "passed": bool(err <= tol),
                     "status": "pass" if err <= tol else "fail", "note": note})
    if not res.error and not case.output_final_state:
        extra = [n for n in op.outputs[1:] if res.outputs.get(n) is not None
                 or res.inference.get(n) is not None]
        if extra:
            rows.append({**base, "quantity": ",".join(extra), "error": math.inf,
                         "ref_error": 0.0, "tolerance": 0.0, "passed": False, "status": "fail",
                         "note": "final state returned with output_final_state=False"})
    return rows


def reference_rows(case: Case, impls: list[Implementation], ts: dict[str, Truth],
                   family: str) -> list[dict[str, Any]]:
    """Rows of the references checked as implementations: their same-dtype runs of the Truth
    (on the reference device) are their results."""
    rows = []
    for dname, t in ts.items():
        for impl in impls:
            if dname in impl.dtypes and impl.name in t.ref_runs \
                    and impl is get(case.op, impl.name):
                rows += impl_rows(case, impl, dname, t, family, t.ref_runs[impl.name])
    return rows


def evaluate(case: Case, impls: list[Implementation], dtypes: list[str], device: str,
             family: str = "random") -> list[dict[str, Any]]:
    """Check every implementation on one case in every dtype, in this process; one row per
    quantity (and one per implementation and dtype it skips; no truth when every one does)."""
    if declined_by_all(case, impls, dtypes, device):
        return [note_row(case, impl, d, family, "skipped",
                         f"skipped: {skip_reason(impl, case, d, device)}")
                for d in claimed(impls, dtypes) for impl in impls if d in impl.dtypes]
    ts = truths(case, [i.name for i in impls], claimed(impls, dtypes), device, family)
    rows = reference_rows(case, impls, ts, family)
    done = {(r["impl"], r["dtype"]) for r in rows}
    for dname in ts:
        for impl in impls:
            if dname not in impl.dtypes or (impl.name, dname) in done:
                continue
            reason = skip_reason(impl, case, dname, device)
            if reason:
                rows.append(note_row(case, impl, dname, family, "skipped", f"skipped: {reason}"))
            else:
                rows += impl_rows(case, impl, dname, ts[dname], family,
                                  run_impl(case, impl, dname, ts[dname], device))
    return rows


def replay_command(op: str, impls: list[str], dtypes: list[str], device: str, case: Case,
                   sets: tuple[str, ...] = ()) -> str:
    """The shell command that checks exactly ``case`` again (quoted for a POSIX shell); a
    variant "name[LABEL]" is asked for as its implementation and the switch forms ``sets``."""
    names = dict.fromkeys(i.split("[", 1)[0] for i in impls)
    argv = ["harness", "check", op] + [a for i in names for a in ("--impl", i)]
    if any("[" in i for i in impls):
        argv += [a for text in sets for a in ("--set", text)]
    argv += [a for d in dtypes for a in ("--dtype", d)]
    argv += ["--device", device, "--case", case.to_json()]
    return shlex.join(argv)
