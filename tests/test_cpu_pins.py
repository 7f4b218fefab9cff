"""The gate's CPU pins (harness/gate/cpu_pins.py): set only where unset, and a process started with
them loads torch's baseline kernels and a NumPy that imports (naming one of NumPy's baseline
features in NPY_DISABLE_CPU_FEATURES makes it refuse to import)."""

import json
import os
import platform
import subprocess
import sys

import pytest

from harness.gate import cpu_pins

X86 = platform.machine().lower() in ("x86_64", "amd64")


@pytest.fixture
def clean_env(monkeypatch):
    for name in (*cpu_pins.PINS, *cpu_pins.X86_PINS, cpu_pins.NUMPY_FEATURES):
        monkeypatch.delenv(name, raising=False)


def test_pins_are_set_where_unset_and_a_users_setting_wins(clean_env, monkeypatch):
    monkeypatch.setenv("MKL_CBWR", "AVX2")
    got = cpu_pins.pin()
    assert got["ATEN_CPU_CAPABILITY"] == "default" == os.environ["ATEN_CPU_CAPABILITY"]
    if X86:
        assert got["MKL_CBWR"] == "AVX2"  # the user's, kept
        assert got["OPENBLAS_CORETYPE"] == "Prescott"
        assert "AVX2" in got[cpu_pins.NUMPY_FEATURES].split()
        assert "SSE2" not in got[cpu_pins.NUMPY_FEATURES].split()
    assert cpu_pins.pinned() == got


def test_a_pinned_process_runs_torchs_baseline_kernels(clean_env):
    env = {**os.environ, **cpu_pins.pin()}
    code = ("import json, numpy, torch; print(json.dumps([torch.backends.cpu.get_cpu_capability(), "
            "float((numpy.arange(4.0) ** 2).sum())]))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env,
                          timeout=120)
    assert done.returncode == 0, done.stderr
    capability, total = json.loads(done.stdout.strip().splitlines()[-1])
    assert capability == "DEFAULT" and total == 14.0
