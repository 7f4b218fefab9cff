"""Compile before timing: ``harness bench --prewarm N``.

On a cold Triton cache a sweep pays every kernel's compiles (and a peer's autotune space) at
the first row of each implementation, one after another in its single timing worker: 30-70 s a
row on an H100 (2026-11-23). Prewarming runs each distinct (op, impl, dtype, mode) of the rows
still to measure once, at the smallest T it has in the sweep, in up to N processes at a time
(``python -m harness.bench.prewarm SPEC``: one process a job, so a crash or a hang costs that
job only), before any row is timed. The compiled kernels land
in Triton's on-disk cache, where the timing worker finds them. Nothing measured here is kept:
the jobs share the device, so their autotuning timings are noise and are not cached
(``TRITON_CACHE_AUTOTUNING=0``, and ``FLA_CACHE_RESULTS=0``: fla passes ``cache_results=True``
to its autotuners, which wins over Triton's setting); the worker autotunes again from the
compiled kernels.
A job that fails is only noted: its rows are measured (and fail, or not) as usual.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable

from harness.worker import NO_AUTOTUNE_CACHE, condense_stderr, describe_exit

JOB_KEY = ("op", "impl", "dtype", "mode")


def jobs(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One job per distinct (op, impl, dtype, mode) among the rows to measure (not skipped), at
    the smallest T it has; in the rows' order."""
    chosen: dict[tuple, dict[str, Any]] = {}
    for row in rows:
        if row.get("status") == "skipped":
            continue
        key = tuple(row[k] for k in JOB_KEY)
        if key not in chosen or row["T"] < chosen[key]["T"]:
            chosen[key] = {k: row[k] for k in (*JOB_KEY, "B", "T", "H", "D", "G") if k in row}
    return list(chosen.values())


def _run_one(job: dict[str, Any], timeout: float) -> dict[str, Any]:
    env = {**os.environ, **NO_AUTOTUNE_CACHE}
    start = time.perf_counter()
    try:
        done = subprocess.run([sys.executable, "-m", "harness.bench.prewarm", json.dumps(job)],
                              capture_output=True, text=True, timeout=timeout, env=env)
        status = "ok" if done.returncode == 0 else "failed"
        message = "" if status == "ok" else "; ".join(
            filter(None, [describe_exit(done.returncode, "job"),
                          condense_stderr(done.stderr or done.stdout)]))
    except subprocess.TimeoutExpired:
        status, message = "timeout", f"no result after {timeout:g} s"
    return {**job, "status": status, "message": message,
            "seconds": round(time.perf_counter() - start, 1)}


def prewarm(todo: list[dict[str, Any]], device: str, device_index: int, plugins: list[str],
            processes: int, timeout: float,
            on_job: Callable[[dict[str, Any]], None] | None = None) -> list[dict[str, Any]]:
    """Run :func:`jobs` of ``todo`` in up to ``processes`` processes at once; returns one result
    per job (its spec, status ok/failed/timeout, message, seconds)."""
    specs = [{**job, "device": device, "device_index": device_index, "plugins": list(plugins)}
             for job in jobs(todo)]
    results = []
    with ThreadPoolExecutor(max_workers=max(1, processes)) as pool:
        for result in pool.map(lambda spec: _run_one(spec, timeout), specs):
            results.append(result)
            if on_job is not None:
                on_job(result)
    return results


def summary(results: list[dict[str, Any]], seconds: float) -> str:
    bad = [r for r in results if r["status"] != "ok"]
    text = f"prewarmed {len(results)} job(s) in {seconds:.0f} s"
    if bad:
        text += f"; {len(bad)} did not finish (their rows are measured as usual): " + "; ".join(
            f"{r['op']} {r['impl']} {r['dtype']} {r['mode']}: {r['status']} {r['message']}"
            for r in bad)
    return text


def main(spec: dict[str, Any]) -> None:
    """One job, in this process: the row's step once (compile, autotune), synchronised; the
    process set up as a timing worker is (harness.worker.prepare)."""
    from harness.worker import prepare

    device = prepare(spec)
    from harness.bench.measure import make_call, row_case
    from harness.registry import get

    case = row_case(spec)
    impl = get(spec["op"], spec["impl"])
    with impl.switched():
        make_call(impl, case, spec["dtype"], spec["mode"], device)()
    if device == "cuda":
        import torch

        torch.cuda.synchronize()


if __name__ == "__main__":
    main(json.loads(sys.argv[1]))
