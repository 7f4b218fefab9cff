"""Pieces every reference shares: running a per-sequence function over a (varlen) batch,
the state dtype, and the segment sums that keep gate products in log space."""

from __future__ import annotations

from typing import Callable, Mapping

import torch
import torch.nn.functional as F

from references.spec import sequences

SeqFn = Callable[
    [dict[str, torch.Tensor | None], dict[str, torch.Tensor | None]],
    tuple[torch.Tensor, dict[str, torch.Tensor]],
]


def state_dtype(dtype: torch.dtype) -> torch.dtype:
    """States accumulate in float32, or float64 when the inputs are float64."""
    return torch.promote_types(dtype, torch.float32)


def l2norm(x: torch.Tensor) -> torch.Tensor:
    """x / ||x|| along the last dimension (the `use_qk_l2norm_in_kernel` normalisation)."""
    return F.normalize(x, p=2.0, dim=-1)


def per_step(x: Mapping[str, torch.Tensor | None]) -> dict[str, tuple[torch.Tensor, ...] | None]:
    """Each per-token tensor ``[T_n, ...]`` as its ``T_n`` steps, for a loop over time.

    ``x[t]`` inside the loop is the same math, but under autograd every index's backward writes
    a zero-filled gradient of the whole ``[T_n, ...]`` tensor, so the backward pass costs O(T^2)
    (one unbind per tensor stacks the step gradients once, O(T)).
    """
    return {n: None if t is None else t.unbind(0) for n, t in x.items()}


def per_chunk(x: Mapping[str, torch.Tensor | None], size: int) -> dict[str, tuple[torch.Tensor, ...] | None]:
    """Each per-token tensor ``[T_n, ...]`` as its chunks of ``size`` tokens (the last may be
    shorter); one split per tensor, for the reason given in ``per_step``: slicing ``x[i:i + C]``
    in a loop made the float64 chunked delta rule's backward take 93 s at T = 65536 (2 cores).
    An empty sequence has no chunks (``split`` alone would give one empty chunk)."""
    return {n: None if t is None else t.split(size, 0) if len(t) else () for n, t in x.items()}


def map_sequences(
    fn: SeqFn,
    B: int,
    T: int,
    cu_seqlens: torch.Tensor | None,
    tokens: Mapping[str, torch.Tensor | None],
    states: Mapping[str, torch.Tensor | None],
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Apply ``fn`` to every sequence of the batch and reassemble the results.

    ``tokens`` holds per-token tensors ``[B, T, ...]``; ``fn`` sees each sequence's slice
    ``[T_n, ...]`` (no batch axis). ``states`` holds per-sequence tensors ``[N, ...]``; ``fn``
    sees row n (or None). ``fn`` returns the output ``[T_n, ...]`` and a dict of final states
    ``[...]``. Returns the output ``[B, T, ...]`` and the final states stacked to ``[N, ...]``.
    """
    outs: list[torch.Tensor] = []
    finals: dict[str, list[torch.Tensor]] = {}
    for n, (b, bos, eos) in enumerate(sequences(T, B, cu_seqlens)):
        xs = {name: None if x is None else x[b, bos:eos] for name, x in tokens.items()}
        st = {name: None if s is None else s[n] for name, s in states.items()}
        o, final = fn(xs, st)
        outs.append(o)
        for name, s in final.items():
            finals.setdefault(name, []).append(s)
    o = torch.cat(outs, 0).unsqueeze(0) if cu_seqlens is not None else torch.stack(outs, 0)
    return o, {name: torch.stack(s, 0) for name, s in finals.items()}


def segsum(x: torch.Tensor) -> torch.Tensor:
    """Segment sums along the last axis: ``out[..., t, s] = sum_{s < r <= t} x[..., r]``.

    Lower-triangular (``t >= s``, zero on the diagonal) and ``-inf`` above it, built from
    masked cumulative sums so that no two large cumulative sums are ever subtracted: the
    result stays exact when the cumulative gate is far below the range of ``exp``, and a
    ``-inf`` log gate (a factor of exactly 0) gives ``-inf`` instead of ``nan``.
    """
    C = x.shape[-1]
    strict = torch.ones(C, C, dtype=torch.bool, device=x.device).tril(-1)
    xx = x.unsqueeze(-1).expand(*x.shape, C)  # xx[..., r, s] = x[..., r]
    xx = xx.masked_fill(~strict, 0)  # keep r > s
    out = torch.cumsum(xx, dim=-2)  # out[..., t, s] = sum_{s < r <= t} x[r]
    lower = torch.ones(C, C, dtype=torch.bool, device=x.device).tril(0)
    return out.masked_fill(~lower, float("-inf"))


def segprod(a: torch.Tensor) -> torch.Tensor:
    """Segment products along the last axis: ``out[..., t, s] = prod_{s < r <= t} a[..., r]``.

    For factors in [0, 1] (Titans' ``1 - alpha`` and ``eta``). Lower-triangular with ones on
    the diagonal and zeros above it. Only products of factors are formed, never a ratio of two
    cumulative products, so strong forgetting underflows to an exact 0 instead of 0/0, and a
    factor of exactly 0 still has the right gradient (which a log would turn into nan).
    O(C^3) for a chunk of C positions: meant for mini-batches.
    """
    C = a.shape[-1]
    strict = torch.ones(C, C, dtype=torch.bool, device=a.device).tril(-1)
    aa = a.unsqueeze(-1).expand(*a.shape, C)  # aa[..., r, s] = a[..., r]
    aa = torch.where(strict, aa, torch.ones_like(aa))  # keep r > s
    # out[t, s] = prod_{r <= t} aa[r, s], one cumulative product per column s
    out = torch.cumprod(aa, dim=-2)
    lower = torch.ones(C, C, dtype=torch.bool, device=a.device).tril(0)
    return torch.where(lower, out, torch.zeros_like(out))
