"""Fill fresh allocations with NaN while an implementation runs.

An output element a kernel never writes then shows up as a NaN in the comparison instead of
as whatever the allocator last held (often a right-looking value from the previous run).
Wraps ``torch.empty``, ``torch.empty_like``, ``torch.empty_strided`` and ``Tensor.new_empty``;
integer allocations get the dtype's most negative value.
"""

from __future__ import annotations

import contextlib
import functools
from typing import Any, Callable, Iterator

import torch

_TARGETS: tuple[tuple[Any, str], ...] = (
    (torch, "empty"),
    (torch, "empty_like"),
    (torch, "empty_strided"),
    (torch.Tensor, "new_empty"),
)


def _fill(t: Any) -> Any:
    if isinstance(t, torch.Tensor) and t.numel():
        if t.dtype.is_floating_point or t.dtype.is_complex:
            t.fill_(float("nan"))
        elif t.dtype != torch.bool:
            t.fill_(torch.iinfo(t.dtype).min)
    return t


def _poisoned(fn: Callable[..., Any]) -> Callable[..., Any]:
    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        with torch.no_grad():
            return _fill(fn(*args, **kwargs))

    return wrapper


@contextlib.contextmanager
def poison_allocations(enabled: bool = True) -> Iterator[None]:
    """Within the block, fresh ``empty`` allocations come back filled with NaN."""
    if not enabled:
        yield
        return
    saved = [(owner, name, getattr(owner, name)) for owner, name in _TARGETS]
    try:
        for owner, name, fn in saved:
            setattr(owner, name, _poisoned(fn))
        yield
    finally:
        for owner, name, fn in saved:
            setattr(owner, name, fn)
