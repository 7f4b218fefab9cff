"""The device's measured ceilings: the matmul rate and the copy bandwidth its kernels could
reach at best, measured once per device and cached (``OUT/ceilings.json``, keyed by name).

On a GPU: a bfloat16 8192^3 ``torch.matmul`` (2 * 8192^3 FLOPs per call) and a 1 GiB
``copy_`` (bytes read + written), each timed with ``triton.testing.do_bench``. On the CPU a
small float32 matmul and a 64 MiB copy timed with ``time.perf_counter``, marked
``meaningful: false``: the kernels there run through the Triton interpreter, so no percentage
of a CPU ceiling says anything about them.
"""

from __future__ import annotations

import json
import platform
import statistics
import time
from pathlib import Path
from typing import Any

FILE = "ceilings.json"
GPU_MATMUL_N = 8192
GPU_COPY_BYTES = 2**30
CPU_MATMUL_N = 512
CPU_COPY_BYTES = 2**26
CPU_REPS = 7


def device_name(device: str) -> str:
    """A name that identifies the device model: the CUDA device's, or the CPU's model name."""
    if device == "cuda":
        import torch

        return torch.cuda.get_device_name(torch.cuda.current_device())
    model = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"cpu: {model or platform.processor() or platform.machine()}"


def _cpu_time_ms(fn) -> float:
    fn()
    samples = []
    for _ in range(CPU_REPS):
        start = time.perf_counter()
        fn()
        samples.append((time.perf_counter() - start) * 1e3)
    return statistics.median(samples)


def measure(device: str) -> dict[str, Any]:
    """Measure the matmul rate (TFLOP/s) and copy bandwidth (GB/s) of this device."""
    import torch

    if device == "cuda":
        import triton.testing

        n = GPU_MATMUL_N
        a = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
        b = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
        mm_ms = triton.testing.do_bench(lambda: torch.matmul(a, b), warmup=100, rep=500)
        del a, b
        src = torch.empty(GPU_COPY_BYTES // 4, device="cuda", dtype=torch.float32)
        dst = torch.empty_like(src)
        cp_ms = triton.testing.do_bench(lambda: dst.copy_(src), warmup=100, rep=500)
        del src, dst
        torch.cuda.empty_cache()
        matmul = f"bfloat16 {n}^3 torch.matmul, do_bench median"
        copy = f"{GPU_COPY_BYTES >> 20} MiB copy_, do_bench median, bytes read + written"
        copy_bytes, meaningful = GPU_COPY_BYTES, True
    else:
        n = CPU_MATMUL_N
        a, b = torch.randn(n, n), torch.randn(n, n)
        mm_ms = _cpu_time_ms(lambda: torch.matmul(a, b))
        src = torch.empty(CPU_COPY_BYTES // 4)
        dst = torch.empty_like(src)
        cp_ms = _cpu_time_ms(lambda: dst.copy_(src))
        matmul = f"float32 {n}^3 torch.matmul, perf_counter median"
        copy = f"{CPU_COPY_BYTES >> 20} MiB copy_, perf_counter median, bytes read + written"
        copy_bytes, meaningful = CPU_COPY_BYTES, False
    return {
        "device_name": device_name(device),
        "matmul_tflops": 2 * n**3 / (mm_ms * 1e-3) / 1e12,
        "copy_gbps": 2 * copy_bytes / (cp_ms * 1e-3) / 1e9,
        "matmul": matmul,
        "copy": copy,
        "meaningful": meaningful,
        "measured": time.strftime("%Y-%m-%d %H:%M:%S"),
    }


def request(spec: dict[str, Any], device: str) -> dict[str, Any]:
    """A worker's answer to "the ceilings of this device, unless ``spec["cached"]`` names it":
    {"device_name", "ceilings" (None when cached or failed), "error" (when it failed)}."""
    name = device_name(device)
    if name in spec.get("cached", []):
        return {"device_name": name, "ceilings": None}
    try:
        return {"device_name": name, "ceilings": measure(device)}
    except Exception as exc:  # no ceilings means no % columns, not no sweep
        from harness.worker import error_text

        return {"device_name": name, "ceilings": None, "error": error_text(exc)}


def load(out: Path) -> dict[str, dict[str, Any]]:
    """The cached ceilings under ``out``, by device name ({} when none)."""
    path = Path(out) / FILE
    if not path.exists():
        return {}
    try:
        data = json.loads(path.read_text())
    except ValueError:
        return {}
    return data if isinstance(data, dict) else {}


def save(out: Path, ceilings: dict[str, dict[str, Any]]) -> Path:
    path = Path(out) / FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    merged = {**load(out), **ceilings}
    path.write_text(json.dumps(merged, indent=1, sort_keys=True))
    return path
