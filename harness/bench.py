"""Timing and memory of implementations on one shape: the measuring core of ``harness bench``.

Time is the median of ``triton.testing.do_bench`` (CUDA events, warm-up excluded, the L2 cache
flushed between repetitions). Memory is the peak allocated during one call above what the
inputs already hold. Inputs are drawn like the checks' (unit-norm keys, sigmoid betas, ...).
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any, Callable

import torch

from harness.cases import Case, sample
from harness.check import DTYPES, cast_args
from harness.operators import OPERATORS
from harness.registry import Implementation

MODES = ("fwd", "bwd", "fwdbwd")


def bench_case(op_name: str, B: int, T: int, H: int, head_dim: int, seed: int = 0) -> Case:
    """The case a benchmark times: one shape, default options, no states in or out."""
    op = OPERATORS[op_name]
    dims: dict[str, int] = {"B": B, "T": T}
    if "G" in op.dims:
        dims["G"] = H
    dims["H"] = H
    if "D" in op.dims:
        dims["D"] = head_dim
    else:
        dims["K"] = dims["V"] = head_dim
    if "L" in op.dims:
        from harness.operators import levels_needed

        dims["L"] = levels_needed(T)
    options = {name: values[0] for name, values in op.options.items()}
    return Case(op=op_name, dims=dims, initial_state=False, output_final_state=False,
                options=options, seed=seed)


def make_call(impl: Implementation, case: Case, dtype: str, mode: str, device: str = "cuda"
              ) -> Callable[[], Any]:
    """A closure running one timed step: forward, backward of a saved forward, or both."""
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    args = cast_args(sample(case, device), case, DTYPES[dtype], grad=mode != "fwd")
    fn = impl.load()
    leaves = [x for x in args.values() if isinstance(x, torch.Tensor) and x.requires_grad]
    if mode == "fwd":
        def step():
            with torch.no_grad():
                return fn(**args)
        return step
    out = fn(**args)[0]
    do = torch.randn_like(out)
    if mode == "bwd":
        def step():
            return torch.autograd.grad(out, leaves, do, retain_graph=True)
        return step

    def step():
        o = fn(**args)[0]
        return torch.autograd.grad(o, leaves, do)
    return step


def measure(step: Callable[[], Any], warmup: int = 25, rep: int = 100) -> dict[str, float]:
    """Median, 20th and 80th percentile time (ms), and extra peak memory (MB) of one step."""
    import triton.testing

    step()  # compile, autotune
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    step()
    torch.cuda.synchronize()
    peak = (torch.cuda.max_memory_allocated() - base) / 2**20
    q50, q20, q80 = triton.testing.do_bench(step, warmup=warmup, rep=rep, quantiles=[0.5, 0.2, 0.8])
    return {"ms": q50, "ms_p20": q20, "ms_p80": q80, "peak_mb": peak}


def with_T(case: Case, T: int) -> Case:
    return replace(case, dims={**case.dims, "T": T})
