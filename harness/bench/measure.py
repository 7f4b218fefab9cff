"""Timing and memory of implementations on one shape: the measuring core of ``harness bench``.

On a GPU, time is the median (and 20th/80th percentiles) of ``triton.testing.do_bench`` (CUDA
events, warm-up excluded, the L2 cache flushed between repetitions), and memory the peak
allocated during one call above what was allocated before it (the inputs; for ``bwd`` also the
saved forward). On the CPU, time is the median of ``time.perf_counter`` over repeated calls and
memory is NaN: there the Triton kernels run through the interpreter and the timings mean
nothing. Inputs are drawn like the checks' (unit-norm keys, sigmoid betas, ...).

:func:`run_spec` measures one row of a sweep (``harness.bench.sweep``), in whichever process runs it.
"""

from __future__ import annotations

import gc
import math
import statistics
import time
from dataclasses import replace
from typing import Any, Callable

import torch

from harness.bench.costs import MODES
from harness.cases import Case, case_dims, cast_args, sample
from harness.implementation import DTYPES, Implementation
from references.operators import OPERATORS

# The identity of a row of a sweep: --resume skips a row whose key is done. A row of an
# operator with q/k groups also has G (--groups; rows without it have G = H).
KEY = ("op", "impl", "dtype", "mode", "B", "T", "H", "D")
CPU_MIN_REPS, CPU_MAX_REPS = 3, 100


def row_key(row: dict[str, Any]) -> tuple:
    return (*(row[k] for k in KEY), row.get("G"))


# The timed inputs' log gates: logsigmoid(x) / 16, x standard normal (GLA layers divide their
# gate logits by 16; a decay of about exp(-0.05) a token). A kernel whose work depends on the
# gates (chunk_gla's whole-chunk forms, kernels/gla/chunk.py) is timed where models run it;
# the check's families cover gates to -60 a token.
BENCH_GATE = 1 / 16


def bench_case(op_name: str, B: int, T: int, H: int, head_dim: int, seed: int = 0,
               G: int | None = None) -> Case:
    """The case a benchmark times: one shape (K = V = D; G q/k groups where the operator has
    them, default H), default options, no states, log gates of strength BENCH_GATE."""
    options = {name: values[0] for name, values in OPERATORS[op_name].options.items()}
    return Case(op=op_name, dims=case_dims(op_name, B, T, H, head_dim, G=G),
                initial_state=False, output_final_state=False, options=options, seed=seed,
                gate=BENCH_GATE)


def row_case(row: dict[str, Any], seed: int = 0) -> Case:
    """bench_case of a row (or a worker's spec): its op, B, T, H, D and G where it has one."""
    G = row.get("G")
    G = None if G is None or G != G else int(G)  # absent, or NaN in a table of mixed rows
    return bench_case(row["op"], int(row["B"]), int(row["T"]), int(row["H"]), int(row["D"]),
                      seed, G)


_INPUTS: dict[tuple, dict[str, Any]] = {}  # the last case's inputs, in its dtype, on its device


def bench_inputs(case: Case, dtype: str, device: str) -> dict[str, Any]:
    """The case's arguments in ``dtype`` on ``device``, without gradients. Drawing them (in
    float64, on the CPU) takes seconds at long T, and a sweep's consecutive rows (its
    implementations and modes) share one case, so the last one is kept."""
    key = (case.to_json(), dtype, str(device))
    if key not in _INPUTS:
        _INPUTS.clear()
        gc.collect()
        args = cast_args(sample(case, "cpu"), case, DTYPES[dtype], grad=False)
        _INPUTS[key] = {n: x.to(device) if isinstance(x, torch.Tensor) else x
                        for n, x in args.items()}
    return _INPUTS[key]


def make_call(impl: Implementation, case: Case, dtype: str, mode: str, device: str = "cuda"
              ) -> Callable[[], Any]:
    """A closure running one timed step: forward, backward of a saved forward, or both."""
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    args = cast_args(bench_inputs(case, dtype, device), case, DTYPES[dtype], grad=mode != "fwd")
    fn = impl.load()
    leaves = [x for x in args.values() if isinstance(x, torch.Tensor) and x.requires_grad]
    if mode == "fwd":
        def step():
            with torch.no_grad():
                return fn(**args)
        return step
    out = fn(**args)[0]
    do = torch.randn_like(out)
    # allow_unused: a baseline ignores the gates (softmax attention has none)
    if mode == "bwd":
        def step():
            return torch.autograd.grad(out, leaves, do, retain_graph=True, allow_unused=True)
        return step

    def step():
        o = fn(**args)[0]
        return torch.autograd.grad(o, leaves, do, allow_unused=True)
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


def measure_cpu(step: Callable[[], Any], warmup: float = 25, rep: float = 100) -> dict[str, float]:
    """Like :func:`measure` with ``time.perf_counter``: one call to compile and size the loop,
    calls for ``warmup`` ms, then ``rep`` ms of timed calls (3 to 100 of them). No memory."""
    start = time.perf_counter()
    step()
    first = max((time.perf_counter() - start) * 1e3, 1e-3)
    for _ in range(min(int(warmup / first), CPU_MAX_REPS)):
        step()
    samples = []
    for _ in range(max(CPU_MIN_REPS, min(int(rep / first), CPU_MAX_REPS))):
        start = time.perf_counter()
        step()
        samples.append((time.perf_counter() - start) * 1e3)
    q = statistics.quantiles(samples, n=10, method="inclusive")
    return {"ms": statistics.median(samples), "ms_p20": q[1], "ms_p80": q[7], "peak_mb": math.nan}


def run_spec(spec: dict[str, Any], device: str | None = None) -> dict[str, Any]:
    """Measure one row: ``spec`` holds the row key (op, impl, dtype, mode, B, T, H, D) and
    ``device``, ``warmup``, ``rep`` (ms). Returns the measurements; raises what the
    implementation raises. (A worker process calls it with its device, which is the spec's.)"""
    from harness.bench.ceilings import device_name
    from harness.registry import get

    device = spec["device"]
    impl = get(spec["op"], spec["impl"])
    case = row_case(spec, spec.get("seed", 0))
    try:
        with impl.switched():  # a variant's form, through every timed step
            step = make_call(impl, case, spec["dtype"], spec["mode"], device)
            if device == "cuda":
                result = measure(step, spec["warmup"], spec["rep"])
            else:
                result = measure_cpu(step, spec["warmup"], spec["rep"])
            del step
    finally:
        gc.collect()
        if device == "cuda":
            torch.cuda.empty_cache()
    result["device_name"] = device_name(device)
    result["timing"] = "cuda events (do_bench)" if device == "cuda" else "cpu perf_counter"
    return result


def with_T(case: Case, T: int) -> Case:
    return replace(case, dims={**case.dims, "T": T})
