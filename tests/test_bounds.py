"""harness.check.bounds: interpreted loads and stores outside the launch's tensors raise."""

import pytest
import torch
import triton
import triton.language as tl

from harness.check.bounds import OutOfBounds, checked_bounds


@triton.jit
def _copy(x, y, n_load, n_store, BLOCK: tl.constexpr):
    o = tl.arange(0, BLOCK)
    b = tl.load(x + o, mask=o < n_load, other=0.)
    tl.store(y + o, b, mask=o < n_store)


def test_masked_lanes_and_in_bounds_accesses_pass():
    x, y = torch.arange(10.), torch.zeros(10)
    with checked_bounds():
        _copy[(1,)](x, y, 10, 10, BLOCK=16)  # lanes 10..15 masked off on both sides
    assert torch.equal(x, y)


@pytest.mark.parametrize("n_load,n_store,what", [(11, 10, "a load"), (10, 11, "a store")])
def test_one_element_past_the_end_raises(n_load, n_store, what):
    # the neighbouring allocation is bigger than one element, so unchecked this would pass
    x, y = torch.arange(10.), torch.zeros(10)
    with checked_bounds(), pytest.raises(OutOfBounds, match=f"_copy: {what} of 1 of 1[01] unmasked"):
        _copy[(1,)](x, y, n_load, n_store, BLOCK=16)


@triton.jit
def _copy_if(x, y, n, go, BLOCK: tl.constexpr):
    o = tl.arange(0, BLOCK)
    ok = go > 0  # a scalar condition: the combined mask comes as int32 0/1, not bool
    tl.store(y + o, tl.load(x + o, mask=(o < n) & ok, other=0.), mask=(o < n) & ok)


def test_a_mask_combined_with_a_scalar_condition_masks():
    # n = 40 is past both tensors: only the masks keep these accesses legal
    x, y = torch.arange(10.), torch.zeros(10)
    with checked_bounds():
        _copy_if[(1,)](x, y, 40, 0, BLOCK=64)
        with pytest.raises(OutOfBounds, match=r"_copy_if: a load of \d+ of 40 unmasked"):
            _copy_if[(1,)](x, y, 40, 1, BLOCK=64)
    assert torch.equal(y, torch.zeros(10))


@triton.jit
def _add(y, n, BLOCK: tl.constexpr):
    o = tl.arange(0, BLOCK)
    tl.atomic_add(y + o, tl.full([BLOCK], 1., tl.float32), mask=o < n, sem="relaxed")


def test_an_atomic_add_past_the_end_raises():
    y = torch.zeros(10)
    with checked_bounds():
        _add[(1,)](y, 10, BLOCK=16)
        with pytest.raises(OutOfBounds, match="_add: an atomic of 1 of 11 unmasked"):
            _add[(1,)](y, 11, BLOCK=16)
    assert torch.equal(y[:10], torch.ones(10))


def test_the_interpreter_is_restored_on_exit():
    from triton.runtime import interpreter as interp

    def hooks():
        B = interp.InterpreterBuilder
        return (interp.GridExecutor.__call__, B.create_masked_load, B.create_masked_store,
                B.create_atomic_rmw)

    before = hooks()
    with checked_bounds():
        assert all(now is not then for now, then in zip(hooks(), before))
    assert hooks() == before
