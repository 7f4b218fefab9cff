"""GLA, chunked form (docs/operators.md section 2), key gate: the forward here, the backward in
kernels.gla.chunk_bwd. The forward is four stages: the gates (b, and the gated operands
Q * exp(b) and K * exp(b_L - b), every chunk in parallel), A, the walk and the output stage. The
walk and the output stage are the delta rule's (kernels.common: chunk_state's walk under its
key gate, given the gated keys, and without w; chunk_output's stage with the gated queries and
A given); the gates, A and the backward are GLA's own.

Chunks of BT = 64 tokens. With b the cumulative log gate within a chunk (b_i = sum of g over
the chunk's tokens up to i, so b decreases, b_i <= 0) and h[n] the state entering chunk n:

    S_{n+1} = diag(exp(b_L)) h[n] + (K * exp(b_L - b))^T V             # L: the chunk's last row
    O       = scale (Q * exp(b)) h[n] + A V,
    A_ij    = scale sum_c q_ic k_jc exp(b_ic - b_jc)   for j <= i, 0 above

Every exponent here is <= 0, so nothing overflows at any gate strength (log gates to -60 per
step put b near -3840 at a chunk's end: exp(b) underflows to 0, which is the true value to
float32); the one exception, A of a chunk whose gates stay within A_WHOLE_SPREAD of its first
row's, takes exp(b_0 - b) <= exp(A_WHOLE_SPREAD). Otherwise A's entries need exp(b_i - b_j)
for j <= i, never exp(b_i) exp(-b_j): the chunk is cut into BC = 16-row blocks; for a column j
before row block I, with r = I's first row,

    exp(b_i - b_j) = exp(b_i - b_r) exp(b_r - b_j),    both factors <= 1,

so a block row of A is one product of q * exp(b - b_r) and k * exp(b_r - b); the diagonal
blocks take exp(b_i - b_j) element by element (BC x BC x K exponentials a block).

b is a compensated pair (b, blo: common.cumsum.local_scan) and every difference of two
b's is taken as pair_diff: at -60 a step b reaches -3800 within a chunk, where a float32 sum
rounds by up to 1.2e-4 a step (the gate's gradient was 4.8e-5 off float64 that way, 2.1e-7
now; reports/gla.md). exp(b) alone needs no pair: where b is that large it is 0.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels.common.chunk_output import chunk_fwd_o
from kernels.common.chunk_state import chunk_fwd_h_gated
from kernels.common import cumsum
from kernels.common.cumsum import local_scan, pair_diff
from kernels.common.utils import (check_launchable, chunk_layout, chunk_rows, dot_precision,
                                  load_rows, tile, tuning)
from kernels.gla.chunk_bwd import chunk_gla_bwd
from references.operators import GLA

__all__ = ["chunk_gla", "chunk_gla_fwd", "intra_chunk_A"]

BT = 64  # chunk size: a tiling choice, never a change of result
BC = 16  # A's row blocks
MAX_D = 256
# A's diagonal 16-row blocks: True forms each as one [16, 16, BK] product (8 warps), False row
# by row (4 warps). Both exact. H200, T = 8192, B = 2, H = 16, K = V = 128 bf16: row by row
# 0.90 ms, as products 1.76 ms (8 warps; 1.80 ms at 4 warps with a program per row block; row
# by row with a program per row block 1.15 ms at 4 warps, 1.35 at 8). reports/gla.md.
A_DIAG_3D = False
# The channels of each of those products (16, 32 or 64): at 64 and 4 warps they spilled (780 /
# 2576 bytes, ptxas), hence 8 warps there; narrower ones run at 4 (206 / 222 registers, no
# spills) and are slower still: 2.06 ms at 16, 2.01 at 32 (same shape). A_WARPS: None, or a
# number of warps for A's kernel whatever the form (not timed).
A_DIAG_BK = 64
A_WARPS = None
# A as one product for the whole chunk where the chunk's gates are mild: with d = b - b_0 (row 0
# of the chunk) and |d| <= A_WHOLE_SPREAD on every row and channel, A = tril((Q * exp(d))
# (K * exp(-d))^T) in float32 operands, every factor within exp(+-40) of 1: no overflow, no
# underflow. The exponentials are then 2 BT K a chunk instead of ~20 BT K, and the diagonal
# blocks' loop is gone. exp(d) alone is off by |d| float32 ulps of its argument (2e-6 relative
# at |d| = 40), far below half precision's rounding but not float32's: float32 inputs keep the
# row-block form. Its own kernel (chunk_gla_fwd_A_whole_kernel) marks the chunks it formed; the
# row-block kernel forms the others. 0: off. The product's operands in one TF32 pass
# (A_WHOLE_PRECISION "tf32": 10 mantissa bits, as fine as float16's and finer than bfloat16's)
# or three ("tf32x3"). Inside the row-block kernel, as a branch, with three passes at 8 warps,
# the form took 2.28 ms against the row blocks' 0.90 (H200, T = 8192, B = 2, H = 16,
# K = V = 128 bf16: 161 KB of shared memory a program, one program an SM). Its own kernel at
# bench's gates, the same shape: one pass, 4 warps, 1 stage 158 us, 2 stages 135; three passes
# 181; 8 warps 152. reports/gla.md.
A_WHOLE_SPREAD = 40.0
A_WHOLE_PRECISION = "tf32"
A_WHOLE_WARPS = 4
A_WHOLE_STAGES = 2


@triton.jit
def _diag_products(q, k, b, blo, row0, o_r, m_r, k0, H: tl.constexpr, K: tl.constexpr,
                   BC: tl.constexpr, BK: tl.constexpr, DBK: tl.constexpr):
    """sum_c q_ic k_jc exp(b_ic - b_jc) over the channels [k0, k0 + BK) for the rows i >= j of a
    diagonal block (0 above it), as [BC, BC, DBK] products (exp(-inf) = 0 off the lower
    triangle: no overflow)."""
    o_d = tl.arange(0, BC)
    on = (o_d[:, None] >= o_d[None, :]) & m_r[:, None] & m_r[None, :]
    b_Ad = tl.zeros([BC, BC], dtype=tl.float32)
    for i_d in tl.static_range(BK // DBK):
        o_k = k0 + i_d * DBK + tl.arange(0, DBK)
        b_q = load_rows(q + row0 * K, o_r, m_r, o_k, K, H).to(tl.float32)
        b_k = load_rows(k + row0 * K, o_r, m_r, o_k, K, H).to(tl.float32)
        b_b = load_rows(b + row0 * K, o_r, m_r, o_k, K, H)
        l_b = load_rows(blo + row0 * K, o_r, m_r, o_k, K, H)
        b_e = tl.exp(tl.where(on[:, :, None], pair_diff(b_b[:, None, :], l_b[:, None, :],
                                                        b_b[None, :, :], l_b[None, :, :]),
                              float("-inf")))
        b_Ad += tl.sum(b_q[:, None, :] * b_k[None, :, :] * b_e, 2)
    return b_Ad


@triton.jit
def _intra_row_block(q, k, b, blo, row0, n_t, I: tl.constexpr, H: tl.constexpr, K: tl.constexpr,
                     BT: tl.constexpr, BC: tl.constexpr, BK: tl.constexpr,
                     PRECISION: tl.constexpr, DIAG_3D: tl.constexpr, DBK: tl.constexpr):
    """Row block I of A [BC, BT] (unscaled): the columns before it by one product through the
    block's first row, its diagonal block element by element (DIAG_3D: as [BC, BC, DBK]
    products, placed into its columns by an exact product with a 0/1 matrix; else column by
    column)."""
    o_c = tl.arange(0, BT)
    o_d = tl.arange(0, BC)
    o_r = I * BC + o_d
    m_r = o_r < n_t
    b_A = tl.zeros([BC, BT], dtype=tl.float32)
    b_Ad = tl.zeros([BC, BC], dtype=tl.float32)
    for i_k in range(tl.cdiv(K, BK)):
        o_k = i_k * BK + tl.arange(0, BK)
        m_k = o_k < K
        b_q = load_rows(q + row0 * K, o_r, m_r, o_k, K, H).to(tl.float32)
        b_bi = load_rows(b + row0 * K, o_r, m_r, o_k, K, H)
        l_bi = load_rows(blo + row0 * K, o_r, m_r, o_k, K, H)
        # the reference row r = I * BC (b_r = 0 where the block holds no token: masked anyway)
        m_br = m_k & (I * BC < n_t)
        b_br = tl.load(b + row0 * K + I * BC * H * K + o_k, mask=m_br, other=0.)
        l_br = tl.load(blo + row0 * K + I * BC * H * K + o_k, mask=m_br, other=0.)
        if I > 0:
            m_j = (o_c < I * BC) & (I * BC < n_t)  # the columns before a block with tokens
            b_k = load_rows(k + row0 * K, o_c, m_j, o_k, K, H).to(tl.float32)
            b_bj = load_rows(b + row0 * K, o_c, m_j, o_k, K, H)
            l_bj = load_rows(blo + row0 * K, o_c, m_j, o_k, K, H)
            b_qr = b_q * tl.exp(tl.where(m_r[:, None], pair_diff(b_bi, l_bi, b_br[None, :],
                                                                 l_br[None, :]), float("-inf")))
            b_kr = b_k * tl.exp(tl.where(m_j[:, None], pair_diff(b_br[None, :], l_br[None, :],
                                                                 b_bj, l_bj), float("-inf")))
            b_A += tl.dot(b_qr.to(q.dtype.element_ty), tl.trans(b_kr.to(k.dtype.element_ty)),
                          input_precision=PRECISION)
        if DIAG_3D:
            b_Ad += _diag_products(q, k, b, blo, row0, o_r, m_r, i_k * BK, H, K, BC, BK, DBK)
        else:
            for jj in range(BC):  # a loop, not unrolled: 16 x 4 unrolled bodies compile slowly
                j = I * BC + jj
                p_j = row0 * K + j * H * K + o_k
                b_kj = tl.load(k + p_j, mask=m_k & (j < n_t), other=0.).to(tl.float32)
                b_bj1 = tl.load(b + p_j, mask=m_k & (j < n_t), other=0.)
                l_bj1 = tl.load(blo + p_j, mask=m_k & (j < n_t), other=0.)
                # exp(b_i - b_j) for token rows i >= j only (elsewhere exp(-inf) = 0: no overflow)
                b_e = tl.exp(tl.where((m_r & (o_r >= j))[:, None],
                                      pair_diff(b_bi, l_bi, b_bj1[None, :], l_bj1[None, :]),
                                      float("-inf")))
                b_col = tl.sum(b_q * b_kj[None, :] * b_e, 1)
                b_A += tl.where((o_c == j)[None, :], b_col[:, None], 0.)
    if DIAG_3D:  # column r + j of b_A gains column j of b_Ad
        place = (o_c[None, :] == o_r[:, None]).to(tl.float32)
        b_A += tl.dot(b_Ad, place, input_precision="ieee")
    return b_A, o_r, m_r


@triton.jit
def _whole_chunk(q, k, b, blo, row0, m_t, H: tl.constexpr, K: tl.constexpr, BT: tl.constexpr,
                 BK: tl.constexpr, PRECISION: tl.constexpr, SPREAD: tl.constexpr):
    """(tril((Q * exp(d)) (K * exp(-d))^T) unscaled, max |d|) for the chunk, d = b - b_0 on
    the rows that hold tokens (0 elsewhere). Exact where max |d| <= SPREAD; past it d is
    clamped to [-SPREAD, SPREAD] (finite, and not the result)."""
    o_c = tl.arange(0, BT)
    b_A = tl.zeros([BT, BT], dtype=tl.float32)
    spread = tl.zeros([BT], dtype=tl.float32)
    for i_k in range(tl.cdiv(K, BK)):
        o_k = i_k * BK + tl.arange(0, BK)
        m_k = o_k < K
        b_b0 = tl.load(b + row0 * K + o_k, mask=m_k, other=0.)
        l_b0 = tl.load(blo + row0 * K + o_k, mask=m_k, other=0.)
        b_d = pair_diff(load_rows(b + row0 * K, o_c, m_t, o_k, K, H),
                        load_rows(blo + row0 * K, o_c, m_t, o_k, K, H), b_b0[None, :],
                        l_b0[None, :])
        b_d = tl.where(m_t[:, None] & m_k[None, :], b_d, 0.)
        spread = tl.maximum(spread, tl.max(tl.abs(b_d), 1))
        b_d = tl.minimum(tl.maximum(b_d, -SPREAD), SPREAD)
        b_q = load_rows(q + row0 * K, o_c, m_t, o_k, K, H).to(tl.float32) * tl.exp(b_d)
        b_k = load_rows(k + row0 * K, o_c, m_t, o_k, K, H).to(tl.float32) * tl.exp(-b_d)
        b_A += tl.dot(b_q, tl.trans(b_k), input_precision=PRECISION)
    return tl.where(o_c[:, None] >= o_c[None, :], b_A, 0.), tl.max(spread, 0)


@triton.heuristics({'IS_VARLEN': lambda a: a['cu_seqlens'] is not None})
@triton.jit(do_not_specialize=['T'])
def chunk_gla_fwd_A_whole_kernel(
    q, k, b, blo, A, done, cu_seqlens, chunk_indices, scale, T,
    H: tl.constexpr, K: tl.constexpr, BT: tl.constexpr, BK: tl.constexpr,
    PRECISION: tl.constexpr, SPREAD: tl.constexpr, IS_VARLEN: tl.constexpr,
):
    """A of one chunk as one product, tril((Q * exp(d)) (K * exp(-d))^T) scaled, d = b - b_0,
    where the chunk's gates spread by at most SPREAD (done = 1); else nothing is stored
    (done = 0) and chunk_gla_fwd_A_kernel forms it by row blocks."""
    i_c, i_bh = tl.program_id(0), tl.program_id(1)
    i_t, m_t, row0 = chunk_rows(cu_seqlens, chunk_indices, i_c, i_bh, T, H, BT, IS_VARLEN)
    o_c = tl.arange(0, BT)
    b_A, spread = _whole_chunk(q, k, b, blo, row0, m_t, H, K, BT, BK, PRECISION, SPREAD)
    whole = spread <= SPREAD
    if whole:
        tl.store(A + row0 * BT + (o_c * H * BT)[:, None] + o_c[None, :], b_A * scale,
                 mask=m_t[:, None])
    tl.store(done + i_bh * tl.num_programs(0) + i_c, whole.to(tl.int8))


@triton.jit
def _row_blocks(q, k, b, blo, A, row0, n_t, scale, H: tl.constexpr, K: tl.constexpr,
                BT: tl.constexpr, BC: tl.constexpr, BK: tl.constexpr, PRECISION: tl.constexpr,
                DIAG_3D: tl.constexpr, DBK: tl.constexpr):
    """A of one chunk, scaled, stored row block by row block (_intra_row_block)."""
    o_c = tl.arange(0, BT)
    for I in tl.static_range(BT // BC):
        b_A, o_r, m_r = _intra_row_block(q, k, b, blo, row0, n_t, I, H, K, BT, BC, BK,
                                         PRECISION, DIAG_3D, DBK)
        tl.store(A + row0 * BT + (o_r * H * BT)[:, None] + o_c[None, :], b_A * scale,
                 mask=m_r[:, None])


@triton.heuristics({'IS_VARLEN': lambda a: a['cu_seqlens'] is not None,
                    'SKIP_DONE': lambda a: a['done'] is not None})
@triton.jit(do_not_specialize=['T'])
def chunk_gla_fwd_A_kernel(
    q, k, b, blo, A, done, cu_seqlens, chunk_indices, scale, T,
    H: tl.constexpr, K: tl.constexpr, BT: tl.constexpr, BC: tl.constexpr, BK: tl.constexpr,
    PRECISION: tl.constexpr, DIAG_3D: tl.constexpr, DBK: tl.constexpr,
    IS_VARLEN: tl.constexpr, SKIP_DONE: tl.constexpr,
):
    """A_ij = scale sum_c q_ic k_jc exp(b_ic - b_jc), j <= i, for one chunk ([BT, BT] float32)
    by row blocks (_intra_row_block); with SKIP_DONE, only where chunk_gla_fwd_A_whole_kernel
    did not."""
    i_c, i_bh = tl.program_id(0), tl.program_id(1)
    i_t, m_t, row0 = chunk_rows(cu_seqlens, chunk_indices, i_c, i_bh, T, H, BT, IS_VARLEN)
    n_t = tl.sum(m_t.to(tl.int32), 0)  # the rows that hold tokens
    if SKIP_DONE:
        if tl.load(done + i_bh * tl.num_programs(0) + i_c) == 0:
            _row_blocks(q, k, b, blo, A, row0, n_t, scale, H, K, BT, BC, BK, PRECISION, DIAG_3D,
                        DBK)
    else:
        _row_blocks(q, k, b, blo, A, row0, n_t, scale, H, K, BT, BC, BK, PRECISION, DIAG_3D, DBK)


# The gates stage's tiles: channels per program and warps (the scan runs down the tokens, so
# neither changes a result). BK = 64 at 4 warps, the first (pinned) config, took 309 us at
# B = 2, T = 8192, H = 16, K = 128 bf16 on an H200 (300 MB moved: ~75 us of bandwidth).
GATES_CONFIGS = tuning([triton.Config({'BK': BK}, num_warps=w)
                        for BK in (64, 32, 16) for w in (4, 2, 1)])


@triton.heuristics({'IS_VARLEN': lambda a: a['cu_seqlens'] is not None})
@triton.autotune(configs=GATES_CONFIGS, key=['H', 'K', 'BT', 'IS_VARLEN'])
@triton.jit(do_not_specialize=['T'])
def chunk_gla_fwd_gates_kernel(
    g, q, k, b, blo, qg, kd, cu_seqlens, chunk_indices, T,
    H: tl.constexpr, K: tl.constexpr, BT: tl.constexpr, BK: tl.constexpr, F64: tl.constexpr,
    IS_VARLEN: tl.constexpr,
):
    """One chunk and key tile: b + blo, the cumulative log gate within the chunk (local_scan),
    and the gated operands of the walk and the output stage, in the inputs' dtype:

        qg = Q * exp(b),    kd = K * exp(b_L - b)        (L the chunk's last row; exponents <= 0)
    """
    i_k, i_c, i_bh = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    i_t, m_t, row0 = chunk_rows(cu_seqlens, chunk_indices, i_c, i_bh, T, H, BT, IS_VARLEN)
    o_c = tl.arange(0, BT)
    o_k = i_k * BK + tl.arange(0, BK)
    m = m_t[:, None] & (o_k < K)[None, :]
    p = row0 * K + (o_c * H * K)[:, None] + o_k[None, :]
    b_b, l_b = local_scan(tl.load(g + p, mask=m, other=0.).to(tl.float32), F64)
    tl.store(b + p, b_b, mask=m)
    tl.store(blo + p, l_b, mask=m)
    is_last = (o_c == tl.sum(m_t.to(tl.int32), 0) - 1)[:, None]
    b_bl = tl.sum(tl.where(is_last, b_b, 0.), 0)  # row L of the pair, exactly
    l_bl = tl.sum(tl.where(is_last, l_b, 0.), 0)
    b_q = tl.load(q + p, mask=m, other=0.).to(tl.float32)
    tl.store(qg + p, (b_q * tl.exp(b_b)).to(qg.dtype.element_ty), mask=m)
    b_k = tl.load(k + p, mask=m, other=0.).to(tl.float32)
    b_kd = b_k * tl.exp(tl.where(m_t[:, None], pair_diff(b_bl[None, :], l_bl[None, :], b_b, l_b),
                                 float("-inf")))
    tl.store(kd + p, b_kd.to(kd.dtype.element_ty), mask=m)


def gated_operands(g, q, k, cu_seqlens, chunk_indices, NT: int):
    """(b, blo, qg, kd) of chunk_gla_fwd_gates_kernel: the cumulative log gate as a float32
    pair ([B, T, H, K] each) and Q * exp(b), K * exp(b_L - b) in q's dtype."""
    B, T, H, K = q.shape
    b = torch.empty(B, T, H, K, dtype=torch.float32, device=q.device)
    blo, qg, kd = torch.empty_like(b), torch.empty_like(q), torch.empty_like(k)
    if NT:
        grid = lambda meta: (triton.cdiv(K, meta['BK']), NT, B * H)  # noqa: E731
        chunk_gla_fwd_gates_kernel[grid](g, q, k, b, blo, qg, kd, cu_seqlens, chunk_indices, T,
                                         H=H, K=K, BT=BT, F64=cumsum.CUMSUM_F64)
    return b, blo, qg, kd


def intra_chunk_A(q, k, b, blo, scale: float, cu_seqlens, chunk_indices, NT: int,
                  dtype: torch.dtype = torch.float32):
    """A [B, T, H, BT] in ``dtype`` (row i of a chunk: A_ij scaled, zero for j > i; the
    output stage rounds A to the inputs' dtype, so a forward without a backward stores it so:
    the same result in half the bytes; the backward's dv splits a float32 A in two halves) from the
    cumulative gates (b, blo); every chunk in parallel: first as one product per chunk where
    its gates allow it (A_WHOLE_SPREAD, half-precision inputs), then by row blocks the rest."""
    B, T, H, K = q.shape
    A = torch.empty(B, T, H, BT, dtype=dtype, device=q.device)
    if not NT:
        return A
    done = None
    if q.dtype != torch.float32 and A_WHOLE_SPREAD > 0:
        done = torch.empty(B * H, NT, dtype=torch.int8, device=q.device)
        chunk_gla_fwd_A_whole_kernel[(NT, B * H)](
            q, k, b, blo, A, done, cu_seqlens, chunk_indices, scale, T, H=H, K=K, BT=BT,
            BK=tile(K), PRECISION=A_WHOLE_PRECISION, SPREAD=float(A_WHOLE_SPREAD),
            num_warps=A_WHOLE_WARPS, num_stages=A_WHOLE_STAGES)
    chunk_gla_fwd_A_kernel[(NT, B * H)](
        q, k, b, blo, A, done, cu_seqlens, chunk_indices, scale, T, H=H, K=K, BT=BT, BC=BC,
        BK=tile(K), PRECISION=dot_precision(q.dtype), DIAG_3D=A_DIAG_3D, DBK=A_DIAG_BK,
        num_warps=A_WARPS or (8 if A_DIAG_3D and A_DIAG_BK > 32 else 4))
    return A


def chunk_gla_fwd(q, k, v, g, scale: float, initial_state, output_final_state: bool,
                  cu_seqlens, with_output: bool = True, for_backward: bool = True):
    """(o [B,T,H,V] in v's dtype (None without with_output), final state [N,H,K,V] float32 or
    None, (b, blo, h, A) for a backward); inputs contiguous and checked. The states h[n] and A
    are kept in float32 ``for_backward`` (its dq/dk and dv products split them in two halves),
    else in the inputs' dtype, which is what the output stage multiplies them in either way."""
    B, T, H, K = q.shape
    V = v.shape[-1]
    N, NT, chunk_indices, chunk_offsets = chunk_layout(B, T, cu_seqlens, BT)
    chunks = NT * (B if cu_seqlens is None else 1)
    b, blo, qg, kd = gated_operands(g, q, k, cu_seqlens, chunk_indices, NT)
    h = torch.empty(chunks, H, K, V, dtype=torch.float32 if for_backward else q.dtype,
                    device=q.device)
    A = intra_chunk_A(q, k, b, blo, scale, cu_seqlens, chunk_indices, NT,
                      torch.float32 if for_backward else q.dtype)
    o = torch.empty_like(v) if with_output else None
    ht = torch.empty(N, H, K, V, dtype=torch.float32, device=q.device) if output_final_state else None
    if NT:
        # the delta rule's walk, under the key gate (K * exp(b_L - b) given) and without w
        chunk_fwd_h_gated(kd, v, b, h, initial_state, ht, cu_seqlens, chunk_offsets, N, BT)
        # the output stage shared with the delta rule, with Q * exp(b) for Q and A given (no
        # guard against non-finite inputs yet in GLA's stages: safe=False)
        if with_output:
            o = chunk_fwd_o(qg, k, v, h, scale, cu_seqlens, chunk_indices, NT, BT, A=A,
                            safe=False)
    elif ht is not None:  # no tokens: the final state is the initial one
        ht.copy_(initial_state if initial_state is not None else torch.zeros_like(ht))
    return o, ht, (b, blo, h, A)


class ChunkGLAFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, g, scale, initial_state, output_final_state, cu_seqlens):
        o, ht, saved = chunk_gla_fwd(q, k, v, g, scale, initial_state, output_final_state,
                                     cu_seqlens)
        ctx.save_for_backward(q, k, v, g, initial_state, cu_seqlens, *saved)
        ctx.scale = scale
        return o, ht

    @staticmethod
    def backward(ctx, do, dht):
        q, k, v, g, initial_state, cu_seqlens, *saved = ctx.saved_tensors
        return gradients(q, k, v, g, saved, ctx.scale, initial_state, cu_seqlens, do, dht)


def gradients(q, k, v, g, saved, scale: float, initial_state, cu_seqlens, do, dht):
    """An autograd Function's backward of (q, k, v, g, scale, initial_state,
    output_final_state, cu_seqlens) from the forward's (b, blo, h, A): chunk_gla_bwd."""
    dq, dk, dv, dg, dh0 = chunk_gla_bwd(
        q, k, v, g, saved, scale, initial_state, do.contiguous().to(v.dtype),
        None if dht is None else dht.contiguous().float(), cu_seqlens, BT, BC)
    if dh0 is not None:
        dh0 = dh0.to(initial_state.dtype)
    return dq, dk, dv, dg, None, dh0, None, None


def checked_inputs(name: str, q, k, v, g, scale, initial_state, output_final_state, cu_seqlens):
    """(q, k, v, g, scale, initial_state, needs a backward): the arguments checked (a clear
    error naming ``name`` before any launch), made contiguous, scale resolved."""
    dims = GLA.validate({"q": q, "k": k, "v": v, "gk": g, "scale": scale,
                         "initial_state": initial_state, "output_final_state": output_final_state,
                         "cu_seqlens": cu_seqlens})
    check_launchable(name, q)
    if max(dims["K"], dims["V"]) > MAX_D:
        raise ValueError(f"{name}: K and V must be <= {MAX_D}, got K={dims['K']}, V={dims['V']}")
    q, k, v, g = (x.contiguous() for x in (q, k, v, g))
    if initial_state is not None:
        initial_state = initial_state.contiguous()
    grad = torch.is_grad_enabled() and any(x is not None and x.requires_grad
                                           for x in (q, k, v, g, initial_state))
    return q, k, v, g, GLA.resolve_scale(scale, dims), initial_state, grad


def chunk_gla(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor,
    scale: float | None = None,
    initial_state: torch.Tensor | None = None,
    output_final_state: bool = False,
    cu_seqlens: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Gated linear attention in chunks of 64 tokens (Triton), key gate ``g`` ([B,T,H,K], log
    space, <= 0), forward and backward."""
    q, k, v, g, scale, initial_state, grad = checked_inputs(
        "chunk_gla", q, k, v, g, scale, initial_state, output_final_state, cu_seqlens)
    if grad:
        return ChunkGLAFunction.apply(q, k, v, g, scale, initial_state, output_final_state,
                                      cu_seqlens)
    o, ht, _ = chunk_gla_fwd(q, k, v, g, scale, initial_state, output_final_state, cu_seqlens,
                             for_backward=False)
    return o, ht
