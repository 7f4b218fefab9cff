"""tools/titans_overlap.py on the CPU (Triton's interpreter): the one launch and the two give
the same values, and a difference is reported with exit status 1."""

import importlib.util
from pathlib import Path

import pytest
import typer
from typer.testing import CliRunner

from kernels.titans import chunk

ROOT = Path(__file__).resolve().parents[1]
spec = importlib.util.spec_from_file_location("titans_overlap",
                                              ROOT / "tools" / "titans_overlap.py")
titans_overlap = importlib.util.module_from_spec(spec)
spec.loader.exec_module(titans_overlap)


@pytest.fixture
def app(monkeypatch):
    for name in ("REPLAY_OVERLAP", "WALK_WARPS", "REPLAY_WARPS", "OVERLAP_WARPS", "OVERLAP_SHARE",
                 "chunk_titans_linear_fwd_overlap_kernel"):
        monkeypatch.setattr(chunk, name, getattr(chunk, name))  # restored after the tool's sets
    cli = typer.Typer()
    cli.command()(titans_overlap.main)
    return cli


def test_equal_forms_pass(app):
    result = CliRunner().invoke(app, ["--device", "cpu", "--no-time"])
    assert result.exit_code == 0, result.output
    assert result.output.count("equal [True, True, True]") == 2
    assert "all equal" in result.output


def test_a_difference_fails(app, monkeypatch):
    forward = titans_overlap.forward

    def off_by_one_ulp(chunk, x, states, cu, overlap):
        o, ht, st = forward(chunk, x, states, cu, overlap)
        return (o.nextafter(o.new_tensor(float("inf"))) if overlap else o), ht, st

    monkeypatch.setattr(titans_overlap, "forward", off_by_one_ulp)
    result = CliRunner().invoke(app, ["--device", "cpu", "--no-time"])
    assert result.exit_code == 1, result.output
    assert "failed: ['f16 B=1 T=200 H=2 D=16', 'f16 varlen 12 sequences H=2 D=16']" in \
        result.output.replace("\n", "")
