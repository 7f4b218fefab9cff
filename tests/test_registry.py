"""The registry: built-ins, third-party plugins discovered through entry points, and the CLI
around them."""

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from typer.testing import CliRunner

from harness.cli import app
from references.operators import OPERATORS
from harness.registry import Implementation, get, implementations, register

ROOT = Path(__file__).resolve().parents[1]
runner = CliRunner()


def make_plugin(where: Path, name: str, body: str) -> None:
    """An installed distribution as pip leaves it: a module and a dist-info with the entry point."""
    (where / f"{name}.py").write_text(textwrap.dedent(body))
    info = where / f"{name}-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text(
        f"[linattn_harness.plugins]\n{name} = {name}:register_all\n")


def harness_cli(args, pythonpath):
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(pythonpath), str(ROOT)])}
    return subprocess.run([sys.executable, "-m", "harness", *args], capture_output=True,
                          text=True, env=env, cwd=pythonpath, timeout=300)


def test_out_of_tree_plugin_is_discovered_and_checked(tmp_path):
    make_plugin(tmp_path, "toyplugin", """
        from harness.registry import Implementation, register

        def toy_delta_rule(q, k, v, beta, scale=None, **kw):
            from references.delta_rule import naive_recurrent_delta_rule
            return naive_recurrent_delta_rule(q, k, v, beta, scale=scale, **kw)

        def register_all():
            register(Implementation(op="delta_rule", name="toy_peer", kind="peer",
                                    target=toy_delta_rule, devices=("cpu",),
                                    dtypes=("float64", "float32"), description="toy"))
    """)
    make_plugin(tmp_path, "brokenplugin", """
        def register_all():
            raise RuntimeError("no GPU driver here")
    """)
    listed = harness_cli(["list", "--device", "cpu"], tmp_path)
    assert listed.returncode == 0, listed.stderr
    assert "toy_peer" in listed.stdout and "peer" in listed.stdout
    assert "plugin brokenplugin failed to load" in listed.stdout
    assert "no GPU driver here" in listed.stdout
    checked = harness_cli(["check", "delta_rule", "--impl", "toy_peer", "--examples", "3",
                           "--family", "random", "--device", "cpu",
                           "--out", str(tmp_path / "out")], tmp_path)
    assert checked.returncode == 0, checked.stdout + checked.stderr
    assert "toy_peer" in checked.stdout and "all checks passed" in checked.stdout
    assert (tmp_path / "out" / "delta_rule.csv").exists()


def test_builtins_cover_every_operator():
    for op in OPERATORS:
        names = {i.name for i in implementations(op)}
        assert {"naive", "chunk_ref"} <= names, (op, names)
        assert get(op, "naive").why_unavailable("cpu") is None


def test_register_rejects_bad_entries():
    with pytest.raises(ValueError, match="unknown operator 'mamba'"):
        register(Implementation(op="mamba", name="x", kind="triton", target=print))
    with pytest.raises(ValueError, match="kind must be one of"):
        register(Implementation(op="gla", name="x", kind="cuda", target=print))
    with pytest.raises(ValueError, match="gla/naive is already registered"):
        register(Implementation(op="gla", name="naive", kind="reference", target=print))


def test_unavailable_implementation_says_why():
    impl = Implementation(op="gla", name="needs_gpu", kind="triton", target="no.such.module:fn",
                          devices=("cuda",))
    assert impl.why_unavailable("cpu") == "runs on cuda, not cpu"
    assert "cannot import no.such.module:fn" in impl.why_unavailable("cuda")
    probe = Implementation(op="gla", name="probe", kind="peer", target=print,
                           available=lambda: "fla is not installed")
    assert probe.why_unavailable("cpu") == "fla is not installed"


def test_list_shows_all_operators():
    result = runner.invoke(app, ["list", "--device", "cpu"])
    assert result.exit_code == 0
    for op in OPERATORS:
        assert op in result.output


@pytest.mark.parametrize("args, words", [
    (["check", "mamba"], ["unknown operator 'mamba'", "delta_rule", "log_linear_attn"]),
    (["check", "gla", "--impl", "nope"], ["unknown implementation 'nope' of gla", "chunk_ref"]),
    (["check", "gla", "--dtype", "int8"], ["unknown dtype 'int8'"]),
    (["check", "gla", "--case", "{}"], ["--case"]),
])
def test_cli_unknown_names_exit_2(args, words):
    result = runner.invoke(app, args + ["--device", "cpu"])
    assert result.exit_code == 2, result.output
    for w in words:
        assert w in result.output


def test_every_registered_switch_names_an_existing_module_constant():
    """A switch is a module constant the kernels read at launch: a misspelt path would fail
    only when the switch is measured (unittest.mock.patch refuses a missing attribute), on
    the GPU; here it fails on the CPU."""
    import importlib

    seen = 0
    for op in OPERATORS:
        for impl in implementations(op):
            for switch in impl.switches:
                for path in switch["set"]:
                    module, _, name = path.rpartition(".")
                    assert hasattr(importlib.import_module(module), name), (impl.name, path)
                    seen += 1
    assert seen > 0
