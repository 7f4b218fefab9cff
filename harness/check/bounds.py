"""Bounds-check every memory access of Triton kernels run on the interpreter.

On a GPU, a load or store a little past the end of a tensor usually lands in the caching
allocator's slack: it reads garbage or writes over a neighbour without a fault, and faults only
when the allocations happen to put the address on an unmapped page. The interpreter reads and
writes raw host memory, unchecked, in the same way. Within ``checked_bounds()``, every lane a
load, store or atomic add does not mask off must lie, whole, inside the storage of one of the
tensors passed to the launch that issued it; otherwise ``OutOfBounds`` names the kernel, the
access and the first stray address.

Only the interpreter is checked (``TRITON_INTERPRET=1``); compiled kernels run as they are, and
a kernel the compiler gets wrong is right here (chunk_fwd_o's 32-wide value tiles on an H200,
reports/delta_rule.md, Triton miscompiles).
"""

from __future__ import annotations

import contextlib
import functools
from typing import Any, Iterator

import numpy as np
import torch

__all__ = ["OutOfBounds", "checked_bounds"]


class OutOfBounds(RuntimeError):
    """A kernel on the interpreter touched memory outside every tensor it was given."""


class _Launch:
    """The storages ([start, end) byte ranges, sorted) of the launch being interpreted."""

    def __init__(self, kernel: str, tensors: list[torch.Tensor]):
        spans = {}
        for t in tensors:
            s = t.untyped_storage()
            spans[s.data_ptr()] = s.nbytes()
        order = sorted(spans)
        self.kernel = kernel
        self.starts = np.array(order, dtype=np.uint64)
        self.ends = np.array([p + spans[p] for p in order], dtype=np.uint64)

    def check(self, ptrs: np.ndarray, mask: np.ndarray, itemsize: int, what: str) -> None:
        # masks arrive as bool or as int32 0/1 (a mask combined with a scalar condition)
        addr = ptrs[np.broadcast_to(mask.astype(bool), ptrs.shape)]
        if addr.size == 0:
            return
        lo, hi = int(addr.min()), int(addr.max()) + itemsize
        j = int(np.searchsorted(self.starts, lo, side="right")) - 1
        if j >= 0 and hi <= int(self.ends[j]):
            return  # the common case: every lane inside one storage
        addr = addr.astype(np.uint64).ravel()
        i = np.searchsorted(self.starts, addr, side="right").astype(np.int64) - 1
        ok = (i >= 0) & (addr + np.uint64(itemsize) <= self.ends[np.maximum(i, 0)])
        if not ok.all():
            bad = addr[~ok]
            near = ", ".join(f"[{hex(int(a))}, {hex(int(b))})" for a, b in zip(self.starts, self.ends))
            raise OutOfBounds(
                f"{self.kernel}: {what} of {bad.size} of {addr.size} unmasked lanes outside "
                f"every tensor argument, first at {hex(int(bad[0]))} ({itemsize}-byte elements; "
                f"the arguments' storages: {near})")


def _tensors(args: Any) -> Iterator[torch.Tensor]:
    for a in args:
        if isinstance(a, torch.Tensor):
            yield a
        elif isinstance(a, (tuple, list)):
            yield from _tensors(a)
        elif hasattr(a, "base") and isinstance(getattr(a, "base"), torch.Tensor):
            yield a.base  # a tensor descriptor


@contextlib.contextmanager
def checked_bounds(enabled: bool = True) -> Iterator[None]:
    """Within the block, interpreted loads and stores outside their launch's tensors raise."""
    if not enabled:
        yield
        return
    from triton.runtime import interpreter as interp

    launches: list[_Launch] = []
    Grid, Builder = interp.GridExecutor, interp.InterpreterBuilder
    saved = [(Grid, "__call__", Grid.__call__), (Builder, "create_masked_load", Builder.create_masked_load),
             (Builder, "create_masked_store", Builder.create_masked_store),
             (Builder, "create_atomic_rmw", Builder.create_atomic_rmw)]

    def itemsize(ptrs: Any) -> int:
        return np.dtype(interp._get_np_dtype(ptrs.get_element_ty())).itemsize

    @functools.wraps(Grid.__call__)
    def call(self, *args, **kwargs):
        launches.append(_Launch(self.fn.__name__, list(_tensors([*args, *kwargs.values()]))))
        try:
            return saved[0][2](self, *args, **kwargs)
        except Exception as exc:  # the interpreter wraps what a kernel raises
            if isinstance(exc.__cause__, OutOfBounds):
                raise exc.__cause__ from None
            raise
        finally:
            launches.pop()

    @functools.wraps(Builder.create_masked_load)
    def load(self, ptrs, mask, other, *rest):
        if launches:
            launches[-1].check(ptrs.data, mask.data, itemsize(ptrs), "a load")
        return saved[1][2](self, ptrs, mask, other, *rest)

    @functools.wraps(Builder.create_masked_store)
    def store(self, ptrs, value, mask, *rest):
        if launches:
            launches[-1].check(ptrs.data, mask.data, itemsize(ptrs), "a store")
        return saved[2][2](self, ptrs, value, mask, *rest)

    @functools.wraps(Builder.create_atomic_rmw)
    def atomic(self, op, ptr, val, mask, *rest):
        if launches:
            launches[-1].check(ptr.data, mask.data, itemsize(ptr), "an atomic")
        return saved[3][2](self, op, ptr, val, mask, *rest)

    try:
        for (owner, name, _), fn in zip(saved, (call, load, store, atomic)):
            setattr(owner, name, fn)
        yield
    finally:
        for owner, name, fn in saved:
            setattr(owner, name, fn)
