"""L2 normalisation along the last dimension, forward and backward (shared by the kernels).

    y  = x / max(||x||, EPS)                      # F.normalize(x, dim=-1), EPS = 1e-12
    dx = (dy - y * sum(dy * y)) * rstd,   rstd = 1 / max(||x||, EPS)

The floor only guards the zero vector (y = 0, dx = dy / EPS, as F.normalize); rows with
0 < ||x|| < EPS are not treated specially (F.normalize drops the projection term there).

Rows of any length D <= 256 (masked to the next power of two); sums in float32; ``y`` and ``dx``
come back in ``x``'s dtype, ``rstd`` in float32 (one per row), which is
all the backward needs besides ``y``. The launchers are autograd-free: the operators' autograd
Functions call ``l2norm_fwd`` before their recurrence and ``l2norm_bwd`` after it.
``l2norm_vec`` normalises one row already in registers (a kernel that fuses the normalisation).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

__all__ = ["EPS", "MAX_D", "l2norm_fwd", "l2norm_bwd", "l2norm_vec"]

EPS = 1e-12  # floor on the norm, as F.normalize
_EPS = tl.constexpr(EPS)  # the same, as the kernels see it
MAX_D = 256  # longest row one program holds
ROW_TILE = 4096  # elements per program: BR rows of BD


@triton.jit
def l2norm_vec(b_x):
    """x / max(||x||, EPS) of one float32 row [BD] (masked lanes hold 0)."""
    return b_x / tl.maximum(tl.sqrt(tl.sum(b_x * b_x)), _EPS)


@triton.jit(do_not_specialize=['M'])
def l2norm_fwd_kernel(x, y, rstd, M, D: tl.constexpr, BR: tl.constexpr, BD: tl.constexpr):
    i_r = tl.program_id(0)
    o_r = i_r.to(tl.int64) * BR + tl.arange(0, BR)
    o_d = tl.arange(0, BD)
    m_r = o_r < M
    m_x = m_r[:, None] & (o_d < D)[None, :]
    # [BR, BD]
    b_x = tl.load(x + o_r[:, None] * D + o_d[None, :], mask=m_x, other=0.).to(tl.float32)
    # [BR]
    b_norm = tl.maximum(tl.sqrt(tl.sum(b_x * b_x, 1)), _EPS)
    b_y = b_x / b_norm[:, None]
    tl.store(y + o_r[:, None] * D + o_d[None, :], b_y.to(y.dtype.element_ty), mask=m_x)
    tl.store(rstd + o_r, 1. / b_norm, mask=m_r)


@triton.jit(do_not_specialize=['M'])
def l2norm_bwd_kernel(y, rstd, dy, dx, M, D: tl.constexpr, BR: tl.constexpr, BD: tl.constexpr):
    i_r = tl.program_id(0)
    o_r = i_r.to(tl.int64) * BR + tl.arange(0, BR)
    o_d = tl.arange(0, BD)
    m_r = o_r < M
    m_x = m_r[:, None] & (o_d < D)[None, :]
    # [BR, BD]
    b_y = tl.load(y + o_r[:, None] * D + o_d[None, :], mask=m_x, other=0.).to(tl.float32)
    b_dy = tl.load(dy + o_r[:, None] * D + o_d[None, :], mask=m_x, other=0.).to(tl.float32)
    # [BR]
    b_rstd = tl.load(rstd + o_r, mask=m_r, other=0.)
    b_dx = (b_dy - b_y * tl.sum(b_dy * b_y, 1)[:, None]) * b_rstd[:, None]
    tl.store(dx + o_r[:, None] * D + o_d[None, :], b_dx.to(dx.dtype.element_ty), mask=m_x)


def _tiles(D: int, M: int) -> tuple[int, int]:
    if D > MAX_D:
        raise ValueError(f"l2norm: rows of length D={D} exceed {MAX_D}")
    BD = triton.next_power_of_2(D)
    BR = max(1, min(triton.next_power_of_2(max(M, 1)), ROW_TILE // BD))
    return BR, BD


def l2norm_fwd(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """y = x / ||x|| along the last dim (x's dtype) and rstd = 1 / ||x|| (float32, x.shape[:-1])."""
    x = x.contiguous()
    D = x.shape[-1]
    M = x.numel() // D if D else 0
    y = torch.empty_like(x)
    rstd = torch.empty(x.shape[:-1], dtype=torch.float32, device=x.device)
    if M:
        BR, BD = _tiles(D, M)
        l2norm_fwd_kernel[(triton.cdiv(M, BR),)](x, y, rstd, M, D=D, BR=BR, BD=BD)
    return y, rstd


def l2norm_bwd(y: torch.Tensor, rstd: torch.Tensor, dy: torch.Tensor) -> torch.Tensor:
    """dx from the saved y, rstd and the upstream dy (any float dtype); dx has y's dtype."""
    y, dy = y.contiguous(), dy.contiguous()
    D = y.shape[-1]
    M = y.numel() // D if D else 0
    dx = torch.empty_like(y)
    if M:
        BR, BD = _tiles(D, M)
        l2norm_bwd_kernel[(triton.cdiv(M, BR),)](y, rstd, dy, dx, M, D=D, BR=BR, BD=BD)
    return dx
