"""The CPU's math pinned to code paths that every x86-64 machine runs alike (for ``harness gate``).

MKL (torch's BLAS), ATen's vectorised kernels and NumPy (whose OpenBLAS and SIMD loops do the
Triton interpreter's dots and sums) each pick their kernels by the CPU's instruction set, and
the AVX2 and AVX-512 kernels round differently. The cpu-interpret baseline is compared on
whatever machine CI lands on, so unpinned its errors moved with the machine: on 2026-12-01, on
a Xeon with AVX-512 and AMX, 760 of the ci suite's 1267 entries differed from the machine that
had recorded them, most by a few percent, the ill-conditioned ones (the float32 Titans step loop
at T = 1024 with forgetting at gate 20) by up to 11x (dalpha 2.8e-5 there, 3.0e-4 here), and the
gate failed on nine of them with no code changed. Pinned, emulating another machine (MKL and
glibc limited to AVX2, or to SSE4.2 without FMA) changed no entry above the gate's floor (the
SSE4.2 one moved float64 entries at 1e-16, below it).

Each pin is set only where the user has not set the variable, and only has an effect on a
library loaded after it: the gate sets them before torch is imported in its own process when it
knows it will run on the CPU, and always before spawning its worker processes.
"""

from __future__ import annotations

import os
import platform
import subprocess
import sys

X86_PINS = {
    "MKL_CBWR": "COMPATIBLE",         # MKL: conditional numerical reproducibility, any x86 CPU
    "OPENBLAS_CORETYPE": "Prescott",  # NumPy's OpenBLAS: its SSE3 kernels
}
PINS = {"ATEN_CPU_CAPABILITY": "default"}  # ATen: its baseline kernels, not the AVX2/AVX-512 ones
NUMPY_FEATURES = "NPY_DISABLE_CPU_FEATURES"  # NumPy's own loops: its baseline, no dispatch
_QUERY = ("try:\n from numpy._core._multiarray_umath import __cpu_dispatch__ as d\n"
          "except ImportError:\n from numpy.core._multiarray_umath import __cpu_dispatch__ as d\n"
          "print(' '.join(d))")


def _numpy_dispatch() -> str:
    """This NumPy's dispatched CPU features (asked in a subprocess: the variable must be set
    before NumPy is imported here; naming a baseline feature makes NumPy refuse to import)."""
    try:
        done = subprocess.run([sys.executable, "-c", _QUERY], capture_output=True, text=True,
                              timeout=60, env={**os.environ, NUMPY_FEATURES: ""})
    except (OSError, subprocess.TimeoutExpired):
        return ""
    return done.stdout.strip() if done.returncode == 0 else ""


def pin() -> dict[str, str]:
    """Set the pins in os.environ (where unset) and return the variables as they now stand."""
    wanted = dict(PINS)
    if platform.machine().lower() in ("x86_64", "amd64"):
        wanted.update(X86_PINS)
        if NUMPY_FEATURES not in os.environ:
            features = _numpy_dispatch()
            if features:
                wanted[NUMPY_FEATURES] = features
    for name, value in wanted.items():
        os.environ.setdefault(name, value)
    return {name: os.environ[name] for name in sorted(wanted)}


def pinned() -> dict[str, str]:
    """The pin variables set in this environment (what a run's numbers were made under)."""
    names = set(PINS) | set(X86_PINS) | {NUMPY_FEATURES}
    return {name: os.environ[name] for name in sorted(names) if name in os.environ}


def unloaded() -> bool:
    """Whether the pinned libraries are still to be loaded in this process (so that pins set
    now reach it, and not only the processes it starts)."""
    return "torch" not in sys.modules and "numpy" not in sys.modules


def gpu_present() -> bool:
    """An NVIDIA device node (asked without importing torch, which would load MKL unpinned)."""
    return os.path.exists("/dev/nvidiactl")


__all__ = ["pin", "pinned", "unloaded", "gpu_present", "PINS", "X86_PINS"]
