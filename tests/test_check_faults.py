"""A fault, an abort or a hang costs the implementation that caused it alone: its remaining
cases in that dtype are not run, every other implementation and dtype goes on, and an interrupt
stops a run whose worker hangs at once (docs/check.md).

The planted implementations run in this process (check_family) or come in through --plugin: a
worker process only knows the built-ins and plugins."""

import functools
import time
from pathlib import Path

import pandas as pd
import pytest
import torch
from typer.testing import CliRunner

from harness.check.families import check_family
from harness.cli import app
from harness.registry import Implementation, get, register, unregister
from references.gla import chunk_gla_ref

runner = CliRunner()


SEEN: list[int] = []


def faulting_gla(q, k, v, gk=None, gv=None, seen=SEEN, only=None, **kw):
    """A planted kernel that faults like an out-of-bounds CUDA access once T >= 40 (in dtype
    ``only``, or in any): after such an error every later call fails as well (the context is
    unusable). ``seen`` records the T of every call it counts."""
    if only is None or q.dtype == only:
        seen.append(q.shape[1])
        if any(t >= 40 for t in seen):
            raise RuntimeError("CUDA error: an illegal memory access was encountered")
    return chunk_gla_ref(q, k, v, gk, gv, **kw)


def test_device_fault_costs_that_implementation_its_remaining_cases():
    # A sticky fault is recorded as a fault (with its replay command), not shrunk (every later
    # call would fail too), and the implementation runs no further case; the others go on.
    SEEN.clear()
    impl = register(Implementation(op="gla", name="faulting", kind="reference",
                                   target=faulting_gla), replace=True)
    try:
        result = check_family("random", "gla", [impl, get("gla", "chunk_ref")], ["float64"],
                              "cpu", examples=30, seed=0)
    finally:
        unregister("gla", "faulting")
    first = next(i for i, t in enumerate(SEEN) if t >= 40)
    assert len(SEEN) == first + 1  # nothing of it ran after the fault
    faults = [r for r in result.rows if r["status"] == "fault"]
    assert faults[0]["impl"] == "faulting" and "illegal memory access" in faults[0]["note"]
    assert "replay: harness check gla --impl faulting" in faults[0]["note"]
    assert all("not run: faulting faulted" in r["note"] for r in faults[1:])
    assert result.failures == []  # a fault is not a numerical failure to shrink
    ours = [r for r in result.rows if r["impl"] == "chunk_ref"]
    assert len({r["case_json"] for r in ours}) == result.examples > 20  # every case it had
    assert all(r["passed"] for r in ours)


SEEN32: list[int] = []


def test_a_fault_in_one_dtype_leaves_the_others_running():
    # A kernel that faults in one dtype is often right in the others (on an H200 a Titans
    # variant faulted in bfloat16 and ran in float16 and float32): the implementation stops in
    # the dtype it faulted in only.
    SEEN32.clear()
    impl = register(Implementation(op="gla", name="faulting32", kind="reference",
                                   target=functools.partial(faulting_gla, seen=SEEN32,
                                                            only=torch.float32)), replace=True)
    try:
        result = check_family("random", "gla", [impl], ["float64", "float32"], "cpu",
                              examples=20, seed=0)
    finally:
        unregister("gla", "faulting32")
    first = next(i for i, t in enumerate(SEEN32) if t >= 40)
    assert len(SEEN32) == first + 1  # nothing more in float32 after the fault
    rows64 = [r for r in result.rows if r["dtype"] == "float64"]
    assert len({r["case_json"] for r in rows64}) == result.examples  # every case in float64
    assert all(r["passed"] for r in rows64)
    faults = [r for r in result.rows if r["status"] == "fault"]
    assert faults and all(r["dtype"] == "float32" for r in faults)
    assert all("not run: faulting32 faulted on float32" in r["note"] for r in faults[1:])


PLANTED = """
import os, time
from harness.registry import Implementation, register
from references.delta_rule import chunk_delta_rule_ref

def aborts(**kw):
    os.abort()  # what a device fault that kills the process looks like from outside

def hangs(**kw):
    time.sleep(3600)

def stateless(**kw):
    return chunk_delta_rule_ref(**kw)

def no_states(case):
    if case.initial_state or case.output_final_state or case.seqlens is not None:
        return "no states or varlen here"
    return None

def register_all():
    register(Implementation(op="delta_rule", name="planted_abort", kind="peer", target=aborts))
    register(Implementation(op="delta_rule", name="planted_hang", kind="peer", target=hangs))
    register(Implementation(op="delta_rule", name="planted_stateless", kind="peer",
                            target=stateless, supports=no_states))
"""


def test_an_abort_and_a_hang_cost_only_themselves(tmp_path):
    """Each implementation runs in a worker process: one that aborts its process and one that
    never returns (--timeout) are recorded as faults with their replay commands; the others'
    rows are in the table and the files; exit 1 naming the planted ones. A peer that declines
    every case with states or varlen still gets the cases without them."""

    plugin = tmp_path / "planted.py"
    plugin.write_text(PLANTED)
    result = runner.invoke(app, [
        "check", "delta_rule", "--impl", "chunk_ref,planted_abort,planted_hang,planted_stateless",
        "--plugin", str(plugin), "--examples", "4", "--family", "random", "--dtype", "float64",
        "--device", "cpu", "--timeout", "5", "-j", "2", "--out", str(tmp_path / "out")])
    assert result.exit_code == 1, result.output
    out = result.output
    assert "FAULT planted_abort float64" in out and "SIGABRT" in out
    assert "FAULT planted_hang float64" in out and "no result after 5 s" in out
    assert "replay: harness check delta_rule --impl planted_abort" in out
    df = pd.read_csv(tmp_path / "out" / "delta_rule.csv")
    ours = df[df["impl"] == "chunk_ref"]
    assert len(set(ours["case_json"])) == 4 and ours["passed"].all()
    stateless = df[(df["impl"] == "planted_stateless") & (df["status"] == "pass")]
    assert len(stateless) > 0 and not stateless["case_json"].str.contains('"initial_state":true').any()
    assert set(df.loc[df["status"] == "fault", "impl"]) == {"planted_abort", "planted_hang"}


def test_an_interrupt_stops_a_run_whose_worker_hangs(tmp_path):
    """SIGINT (Ctrl-C, or `timeout -s INT` around a GPU run) while a worker is inside a unit
    that never ends (a hang here; minutes of compiling on a GPU): the run kills its workers
    and exits 130 at once, instead of waiting for them (it used to wait a minute per worker
    thread, and on a GPU outlived the `timeout` that sent the signal)."""
    import os
    import signal
    import subprocess
    import sys

    plugin = tmp_path / "planted.py"
    plugin.write_text(PLANTED)
    proc = subprocess.Popen(
        [sys.executable, "-m", "harness", "check", "delta_rule", "--impl", "planted_hang",
         "--plugin", str(plugin), "--examples", "2", "--family", "random", "--dtype", "float64",
         "--device", "cpu", "--timeout", "600", "-j", "1", "--out", str(tmp_path / "out")],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])},
        # a background job of a shell ignores SIGINT, and so would the run started from it
        # (Python then installs no KeyboardInterrupt): give it SIGINT's default back
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    logs = tmp_path / "out" / "logs" / "worker0.log"
    deadline = time.monotonic() + 120
    while not logs.exists() and time.monotonic() < deadline:
        time.sleep(0.5)
    time.sleep(5)  # the worker has started and taken the first unit: it sleeps for an hour
    proc.send_signal(signal.SIGINT)
    try:
        out, _ = proc.communicate(timeout=30)
    except subprocess.TimeoutExpired:
        proc.kill()
        pytest.fail("the interrupted run did not exit within 30 s")
    assert proc.returncode == 130, out
    assert "interrupted" in out
