"""harness.compile's choice of compiles per code path (each path's smallest launch compiled
whole, its largest through LLVM IR: the shared memory it needs) and the compile that stops
after the LLVM IR: it must still report what a whole compile reports of the front end and the
shared memory, the two things the compile step is there to catch."""

import importlib.util
import json
import os
import subprocess
import sys
import textwrap

import pytest

from harness.compile import Launch, path_ends, path_items

needs_nvidia = pytest.mark.skipif(importlib.util.find_spec("triton.backends.nvidia") is None,
                                  reason="Triton's NVIDIA backend is not installed")


def _launch(flag, block, dtype="float32"):
    return Launch("m", "k", {"x": ["ptr", dtype, True], "FLAG": ["const", flag],
                             "B": ["const", block]}, {"num_warps": 4})


def test_path_ends_are_the_smallest_and_largest_launch_of_each_path():
    launches = [_launch(True, 64), _launch(True, 32), _launch(True, 128), _launch(False, 16),
                _launch(True, 32, "bfloat16")]
    ends = [(small.args["B"][1], large.args["B"][1]) for small, large in path_ends(launches)]
    assert ends == [(32, 128), (16, 16), (32, 32)]


PROBE = textwrap.dedent('''
    import triton
    import triton.language as tl


    @triton.jit
    def dot_kernel(x, y, z, B: tl.constexpr):
        o = tl.arange(0, B)
        p = o[:, None] * B + o[None, :]
        tl.store(z + p, tl.dot(tl.load(x + p), tl.load(y + p)))
''')

RUN = textwrap.dedent('''
    import json, sys
    from harness.compile import Launch, compile_launch
    out = []
    for y, block in (("float32", 32), ("float32", 256), ("bfloat16", 32)):
        args = {"x": ["ptr", "float32", True], "y": ["ptr", y, True],
                "z": ["ptr", "float32", True], "B": ["const", block]}
        launch = Launch("dot_probe", "dot_kernel", args, {"num_warps": 4})
        out.append([compile_launch(launch, 90, whole) for whole in (False, True)])
    print(json.dumps(out))
''')


@needs_nvidia
def test_a_compile_through_llvm_ir_reports_what_a_whole_one_does(tmp_path):
    """A [B, B] x [B, B] float32 product: at B = 32 it compiles; at B = 256 its operands need
    more shared memory than sm_90 has; with a bfloat16 operand the front end refuses it. Both
    ways of compiling say the same of each (in a process without the interpreter)."""
    (tmp_path / "dot_probe.py").write_text(PROBE)
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.update(PYTHONPATH=os.pathsep.join([str(tmp_path), os.getcwd()]),
               TRITON_CACHE_DIR=str(tmp_path / "cache"))
    proc = subprocess.run([sys.executable, "-c", RUN], env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    (fits_llir, fits), (big_llir, big), (mixed_llir, mixed) = json.loads(proc.stdout)
    assert fits_llir is None and fits is None
    assert "bytes of shared memory; sm_90 allows 232448" in big_llir
    assert big_llir == big
    assert "Both operands must be same dtype. Got fp32 and bf16" in mixed_llir
    assert mixed_llir == mixed


def test_path_items_compile_a_path_with_one_launch_once():
    """A path whose smallest launch is its largest is compiled once, whole."""
    launches = [_launch(True, 32), _launch(True, 64), _launch(False, 16)]
    from unittest import mock

    with mock.patch("harness.compile.variants", lambda launch, all_configs: [
            (f"k B={launch.args['B'][1]} {launch.args['FLAG'][1]}", launch)]):
        items, chosen = path_items(launches)
    assert [(label, whole) for label, _, _, whole in items] == [
        ("k B=32 True", True), ("k B=16 False", True), ("k B=64 True through LLVM IR", False)]
    assert chosen == 3
