"""The split backward's walk by column slices (kernels/titans/walk_bwd.py's
chunk_titans_linear_bwd_walk_cols_kernel, chunk_bwd.WALK_SLICES) through the interpreter. A pair
of programs swapping sums while both run cannot run there (it runs a launch's programs one after
another): its math runs as one program over every column (WALK_SLICES {64: 1}), through the same
per-slice sums; the pair's exchange is `harness check` on a GPU, and the LayerNorm backward by
two halves is tests/test_kernels_common.py's."""

import pytest
import torch

from harness.check.engine import rel_error
from kernels.titans import chunk, chunk_bwd, chunk_titans_linear
from references.titans import naive_titans_linear

import walk_grads  # tests/walk_grads.py
from test_kernels_titans import NAMES, inputs


def grads(fn, x, st, cu=None):
    return walk_grads.grads(fn, NAMES, x, st, cu, 16, torch.float32)


@pytest.mark.parametrize("T,D,cu,kw", [
    (57, 16, [0, 21, 21, 22, 57], {}), (70, 20, None, {"h0": False, "s0": False})])
def test_walk_by_columns(monkeypatch, T, D, cu, kw):
    """float32: every gradient within 1e-6 of float64 (measured 1.7e-7 to 4.9e-7, the
    one-program walk's up to 4.9e-7), and within 5e-7 of the one-program walk's (measured
    <= 1.6e-7: the LayerNorm backward's sums in another order), over sequences of 21, 0, 1
    and 35 tokens, and at D = 20 (a 64-wide tile) without initial states, its last mini-batch
    partial; with its next mini-batch's rows loaded ahead or not (COLS_PREFETCH) the same bits
    (the same arithmetic on the same rows)."""
    monkeypatch.setattr(chunk, "SPLIT_BACKWARD", True)
    x, st, cu = inputs(1, T, 2, D, cu=cu, **kw)
    ref = grads(naive_titans_linear, x, st, cu)
    monkeypatch.setattr(chunk_bwd, "WALK_SLICES", {})
    whole = grads(chunk_titans_linear, x, st, cu)
    monkeypatch.setattr(chunk_bwd, "WALK_SLICES", {64: 1})
    got = grads(chunk_titans_linear, x, st, cu)
    monkeypatch.setattr(chunk_bwd, "COLS_PREFETCH", not chunk_bwd.COLS_PREFETCH)
    other = grads(chunk_titans_linear, x, st, cu)
    assert set(got) == set(ref)
    for name in ref:
        assert rel_error(got[name], ref[name]) < 1e-6, (name, rel_error(got[name], ref[name]))
        assert rel_error(got[name], whole[name]) < 5e-7, (name, rel_error(got[name], whole[name]))
        assert torch.equal(got[name], other[name]), name


def test_walk_slices(monkeypatch):
    """Two slices on the GPU; on CPU tensors the one-program walk where WALK_SLICES names more
    than CPU_WALK_SLICES (the interpreter cannot run a pair), one slice where it names one; the
    one-program walk under HALF_GRADS (whole rows' scales) and where WALK_SLICES names no BD;
    anything but 1 or 2 slices a ValueError naming the switch before any launch."""
    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    monkeypatch.setattr(chunk_bwd, "WALK_SLICES", {128: 2})
    assert chunk_bwd.walk_slices(128, cuda, False) == 2
    assert chunk_bwd.walk_slices(128, cpu, False) == 0
    assert chunk_bwd.walk_slices(128, cuda, True) == 0
    assert chunk_bwd.walk_slices(64, cuda, False) == 0
    monkeypatch.setattr(chunk_bwd, "WALK_SLICES", {64: 1, 128: 2})
    assert chunk_bwd.walk_slices(64, cpu, False) == 1
    monkeypatch.setattr(chunk_bwd, "WALK_SLICES", {128: 4})
    with pytest.raises(ValueError, match="WALK_SLICES must map BD = 128 to 1 or 2"):
        chunk_bwd.walk_slices(128, cuda, False)
