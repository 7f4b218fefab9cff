"""The pieces of a check that run in a process of their own.

* :func:`truth_job`: the truths of one case (the float64 truth and the same-dtype references
  in every dtype), saved to a file for the implementations' units, and the rows of the
  references checked as implementations. Run in a pool of processes (CPU-bound step loops).
* :func:`run_unit`: one implementation on one case in one dtype against a saved truth, in a
  worker process (``harness.worker``): a device fault, an abort or a hang there costs that
  implementation alone. Returns its rows, or the fault.
* :func:`causality_unit`: the causality family's check of one implementation on one case
  (a non-finite value planted at one token reaches no earlier output and no other sequence).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import torch

from harness.cases import Case, cast_args, sample
from harness.check.engine import (REFERENCES, DeviceFault, Run, Truth, impl_rows, note_row,
                                  reference_device, reference_rows, run, run_impl, truths)
from harness.implementation import DTYPES
from harness.registry import get
from references.spec import sequences

VALUES = {"nan": math.nan, "inf": math.inf, "-inf": -math.inf}


# ---------------------------------------------------------------- truths
def save_truths(ts: dict[str, Truth], path: Path) -> None:
    """What the units need of each dtype's Truth (not the references' runs), on the CPU."""
    cpu = lambda d: {n: (None if x is None else x.detach().cpu()) for n, x in d.items()}  # noqa: E731
    torch.save({d: {"outputs": cpu(t.truth.outputs), "grads": cpu(t.truth.grads),
                    "ref_errors": t.ref_errors, "douts": cpu(t.douts)} for d, t in ts.items()},
               path)


def load_truth(path: str | Path, dname: str) -> Truth:
    data = torch.load(path, weights_only=True)[dname]
    return Truth(Run(data["outputs"], data["grads"]), data["ref_errors"], {}, data["douts"])


def prepare_truths(case: Case, refs: list, checked: list[str], dtypes: list[str], device: str,
                   family: str, path: Path | None) -> tuple[dict[str, Truth], list[dict[str, Any]]]:
    """The case's truths in ``dtypes`` for the implementations named ``checked`` (saved to
    ``path``, if given), and the rows of ``refs``, the references among them (their same-dtype
    runs are their results)."""
    ts = truths(case, checked, dtypes, device, family)
    if path is not None:
        save_truths(ts, Path(path))
    return ts, reference_rows(case, refs, ts, family)


def truth_job(spec: dict[str, Any]) -> dict[str, Any]:
    """``prepare_truths`` in a process of the truth pool, from a spec of plain values."""
    case = Case.from_json(spec["case"])
    refs = [get(case.op, n) for n in spec["checked"] if n in REFERENCES]
    _, rows = prepare_truths(case, refs, spec["checked"], spec["dtypes"], spec["device"],
                             spec["family"], spec["path"])
    return {"rows": rows}


# ---------------------------------------------------------------- one implementation
def run_unit(spec: dict[str, Any], device: str) -> dict[str, Any]:
    """``spec["impl"]`` on ``spec["case"]`` in ``spec["dtype"]`` against the truth saved at
    ``spec["truth"]``: {"rows": [...]}, or {"fault": why} when the device faulted (the worker
    must then be replaced: a sticky CUDA error leaves its context unusable)."""
    case = Case.from_json(spec["case"])
    try:
        impl = get(case.op, spec["impl"])
    except KeyError:
        return {"fault": f"{case.op}/{spec['impl']} is not registered in a worker process: "
                         f"register it through a plugin (--plugin FILE.py or the entry point "
                         f"group linattn_harness.plugins), or run with --no-isolate"}
    if spec["family"] == "causality":
        return {"rows": causality_rows(case, impl, spec["dtype"], device)}
    t = load_truth(spec["truth"], spec["dtype"])
    try:
        res = run_impl(case, impl, spec["dtype"], t, device)
    except DeviceFault as fault:
        return {"fault": f"device fault: {fault.message}"}
    return {"rows": impl_rows(case, impl, spec["dtype"], t, spec["family"], res)}


# ---------------------------------------------------------------- causality
def planted(args: dict[str, Any], case: Case) -> dict[str, Any]:
    """The case's arguments with its poison planted (a copy; the clean ones are unchanged)."""
    p = case.poison
    out = dict(args)
    x = args[p["input"]].clone()
    if case.seqlens is not None:  # packed: sequence n starts after the ones before it
        row, start = 0, sum(case.seqlens[:p["seq"]])
    else:
        row, start = p["seq"], 0
    x[row, start + p["t"]] = VALUES[p["value"]]  # every head and channel of that token
    out[p["input"]] = x
    return out


def _outputs(fn, args: dict[str, Any], case: Case, dtype: torch.dtype, grad: bool = False) -> Run:
    """The forward's outputs: under torch.no_grad, or with ``grad`` on inputs that need
    gradients (no backward: the upstream gradients are none)."""
    if grad:
        return run(fn, args, case, dtype, {}, backward=True)
    with torch.no_grad():
        return run(fn, args, case, dtype, None, backward=False)


def _count(case: Case, args: dict[str, Any], clean: Run, dirty: Run, ref: Run) -> tuple[int, int]:
    """(leak, wrong) of one forward: see causality_rows."""
    p, leak, wrong = case.poison, 0, 0
    for n, (row, lo, hi) in enumerate(sequences(case.dims["T"], case.dims["B"],
                                                args["cu_seqlens"])):
        o_c, o_d, o_r = (r.outputs["o"][row, lo:hi].detach() for r in (clean, dirty, ref))
        cut = p["t"] if n == p["seq"] else hi - lo  # everything of another sequence
        before_c, before_d = o_c[:cut].cpu(), o_d[:cut].cpu()
        leak += int((~(before_d == before_c) | ~torch.isfinite(before_d)).sum())
        wrong += int((torch.isfinite(o_d[cut:].cpu()) != torch.isfinite(o_r[cut:].cpu())).sum())
        for name in case.operator.outputs[1:]:
            s_c, s_d, s_r = (r.outputs.get(name) for r in (clean, dirty, ref))
            if s_d is None or s_r is None:
                continue
            s_c, s_d = s_c.detach(), s_d.detach()
            if n != p["seq"]:  # states are [N, ...]: one row per sequence
                leak += int((~(s_d[n] == s_c[n]) | ~torch.isfinite(s_d[n])).sum())
            else:
                wrong += int((torch.isfinite(s_d[n].cpu()) != torch.isfinite(s_r[n].cpu())).sum())
    return leak, wrong


def causality_rows(case: Case, impl, dname: str, device: str) -> list[dict[str, Any]]:
    """Two rows. ``leak``: the elements of the output before the planted token, and of every
    other sequence (their final states too), that differ from the implementation's own output
    on the clean inputs (exactly). ``non-finite``: after it, the elements whose finiteness
    differs from the step-by-step reference's (float64, on the same planted inputs): a
    non-finite input must not give a finite output the math makes non-finite, nor the other
    way round. Both must be 0. An implementation with an inference path (``inference_path``)
    is counted under both its forwards, without and with gradients."""
    dtype = DTYPES[dname]
    args = sample(case, device)
    rdev = reference_device(device)
    ref = _outputs(get(case.op, "naive").load(),
                   planted(cast_args(sample(case, rdev), case, dtype, grad=False), case),
                   case, torch.float64)
    base = {**note_row(case, impl, dname, "causality", "pass", ""), "ref_error": 0.0,
            "tolerance": 0.0}
    p, leak, wrong = case.poison, 0, 0
    for grad in (False, True) if impl.inference_path else (False,):
        with impl.switched():
            clean = _outputs(impl.load(), args, case, dtype, grad)
            dirty = _outputs(impl.load(), planted(args, case), case, dtype, grad)
        error = clean.error or dirty.error or ref.error
        if error:
            return [{**base, "quantity": "leak", "error": math.inf, "passed": False,
                     "status": "fail", "note": error}]
        counts = _count(case, args, clean, dirty, ref)
        leak, wrong = leak + counts[0], wrong + counts[1]
    note = f"{p['value']} in {p['input']} at token {p['t']} of sequence {p['seq']}"
    return [{**base, "quantity": "leak", "error": float(leak), "passed": leak == 0,
             "status": "pass" if leak == 0 else "fail",
             "note": note + ("" if leak == 0 else f": {leak} earlier or other-sequence elements changed")},
            {**base, "quantity": "non-finite", "error": float(wrong), "passed": wrong == 0,
             "status": "pass" if wrong == 0 else "fail",
             "note": note + ("" if wrong == 0 else f": {wrong} elements finite where the math is not, or not where it is")}]


__all__ = ["truth_job", "run_unit", "save_truths", "load_truth", "causality_rows"]
