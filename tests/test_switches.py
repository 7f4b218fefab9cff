"""harness.switches: the `LABEL:module.NAME=VALUE` form tools/switch_compare.py and
tools/kernel_profile.py take, and the context that sets a switch for a block only."""

import pytest

from harness.switches import parse_set, switched
from kernels.gla import chunk_bwd


def test_parse_set_reads_labels_and_literals():
    got = parse_set("split off:kernels.gla.chunk_bwd.STATE_DOTS_SPLIT=False, a.B=64")
    assert got == {"what": "split off",
                   "set": {"kernels.gla.chunk_bwd.STATE_DOTS_SPLIT": False, "a.B": 64}}


def test_parse_set_takes_dicts_and_tuples_with_commas():
    # the per-dtype switches (kernels.titans.chunk.REPLAY) are dicts
    got = parse_set("f16:a.REPLAY={'bfloat16': 8, 'float16': 8},a.T=(1, 2), b.C=None")
    assert got["set"] == {"a.REPLAY": {"bfloat16": 8, "float16": 8}, "a.T": (1, 2), "b.C": None}


@pytest.mark.parametrize("text, says", [("no assignments", "LABEL:module.NAME=VALUE"),
                                        ("x:a.B=notaliteral", "'notaliteral'")])
def test_parse_set_names_what_is_wrong(text, says):
    with pytest.raises(ValueError, match=says):
        parse_set(text)


def test_switched_sets_a_constant_for_the_block_only():
    before = chunk_bwd.STATE_DOTS_SPLIT
    with switched({"set": {"kernels.gla.chunk_bwd.STATE_DOTS_SPLIT": not before}}):
        assert chunk_bwd.STATE_DOTS_SPLIT is (not before)
    assert chunk_bwd.STATE_DOTS_SPLIT is before


def test_compile_records_launches_under_an_extra_form_too():
    """`harness.compile record --set` (tools/kernel_registers.py --set): the launches of a form
    no registration lists are recorded beside the defaults' (A's diagonal products over 16
    channels: DBK=16 appears only under the form), and the interpreter is left as it was (tests
    that run kernels in this process come after)."""
    from triton.runtime.interpreter import InterpretedFunction

    from harness.compile import record

    before = InterpretedFunction.run

    def dbks(extra):
        launches, errors = record("gla", ["chunk"], ["basic"], extra=extra)
        assert errors == []
        return {x.args["DBK"][1] for x in launches if x.name == "chunk_gla_fwd_A_kernel"}

    assert dbks(()) == {64}
    form = parse_set("A3D16:kernels.gla.chunk.A_DIAG_3D=True,kernels.gla.chunk.A_DIAG_BK=16")
    assert dbks((form,)) == {64, 16}
    assert InterpretedFunction.run is before


def test_switch_compare_runs_the_kernels_through_the_interpreter_on_its_own(tmp_path):
    """On a machine without a GPU, tools/switch_compare.py sets TRITON_INTERPRET=1 itself before
    triton is imported (as `harness check` does): started without it, it measures the kernel's
    errors (it used to record every quantity as inf, the kernel refusing CPU inputs)."""
    import json
    import os
    import subprocess
    import sys
    from pathlib import Path

    import torch

    if torch.cuda.is_available():
        pytest.skip("on a GPU the tool runs the kernels there")
    root = Path(__file__).resolve().parents[1]
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = str(root)
    subprocess.run([sys.executable, str(root / "tools" / "switch_compare.py"), "ttt", "chunk",
                    "--no-registered", "--acc", "1,20,1,16", "--dtype", "float32", "--seq-len",
                    "", "--out", str(tmp_path)], env=env, cwd=root, check=True,
                   capture_output=True, timeout=600)
    rows = json.loads((tmp_path / "results.json").read_text())["accuracy"]
    assert rows and all(r["error"] < 1e-5 for r in rows), [r["note"] for r in rows][:2]
