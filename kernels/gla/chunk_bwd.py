"""GLA, chunked form, key gate: the backward of kernels.gla.chunk (its docstring has the forward).

Per chunk n, with b the cumulative log gate within the chunk (b_L at its last row), h = h[n] the
state entering it and dH the gradient of the state leaving it:

    dh[n-1 side]  dh = diag(exp(b_L)) dH + scale (Q * exp(b))^T dO      # walked back over chunks
    dA    = scale tril(dO V^T)
    dv_j  = sum_{i >= j} A_ij do_i + (k_j * exp(b_L - b_j)) dH
    dq_i  = scale exp(b_i) * (h do_i) + sum_{j <= i} dA_ij k_j * exp(b_i - b_j)
    dk_j  = sum_{i >= j} dA_ij q_i * exp(b_i - b_j) + exp(b_L - b_j) * (dH v_j)

The gate enters through b alone (b_i = sum of g over the chunk's tokens up to i), and the loss
through query-side factors exp(b_i) and key-side exp(-b_j), so d loss / d b_i = q_i dq_i -
k_i dk_i, plus for the last row the state leaving the chunk, rowsum(S_{n+1} * dH); and
dg_r = sum_{i >= r in the chunk} d loss / d b_i. With S_{n+1} = diag(exp(b_L)) h + sum_j
exp(b_L - b_j) k_j v_j^T, that last term is exp(b_L) rowsum(h * dH) + sum_j k_j dk_j^(state),
which chunk_gla_bwd_dqk_kernel sums per chunk with the terms that cancel kept apart. The
intra-chunk exponentials go through a block's first or last row, as in the
forward: every exponent <= 0. The walk back over chunks is the delta rule's
(kernels.common.chunk_state.chunk_bwd_dh_gated: its reverse walk under the key gate, without w).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels.common.chunk_state import chunk_bwd_dh_gated
from kernels.common.cumsum import pair_diff
from kernels.common.utils import (chunk_index, chunk_layout, chunk_rows, dot_precision, dot_split,
                                  load_rows, store_rows, tile)

__all__ = ["chunk_gla_bwd"]

# The diagonal 16-row blocks of the backward's intra-chunk terms dq' and dk': True forms each
# as one [16, 16, BK] product (one exponential per (i, j, c) shared by dq' and dk': half the
# exponentials, no loop of dependent loads), False row by row. Both exact. H200, T = 8192,
# B = 2, H = 16, K = V = 128 bf16, the intra kernel: products 1.37 ms at 4 warps (2.85 ms at
# 8), row by row 2.04 ms at 4 warps (3.22 at 8; unrolled 2.06). reports/gla.md. The forward's
# A has its own switch (kernels.gla.chunk.A_DIAG_3D).
DIAG_3D = True
# The dq/dk kernel's products of dO and V (the inputs' dtype) with the float32 states h and dH:
# True splits each state into two parts in the inputs' dtype (two products, ~16 mantissa bits
# of the state kept: utils.dot_split), False multiplies in float32 (three TF32 passes). H200,
# the same shape: 1.00 ms split (184 registers, no spills), 1.57 ms in float32 (264 bytes
# spilled). Both far below bf16's rounding of the inputs.
STATE_DOTS_SPLIT = True
# Software-pipelining stages of the dv and dq/dk kernels' loops. The loops run K / 64 and V / 64
# times; the staged float32 tiles are most of the shared memory (ptxas, sm_90, bf16, K = V =
# 128: dv 181 / 123 / 64 KB at 3 / 2 / 1 stages, one program an SM at 3 stages, two by
# registers at 1; dq/dk 114 / 65 / 32 KB, one program an SM by its registers whatever the
# stages). H200, the same shape, the dv kernel: 0.52 ms at 1 stage, 0.72 at 2, 0.67 at 3.
# DQK_STAGES not yet timed otherwise.
DV_STAGES = 1
# dq' and dk' of a chunk as two products where its gates stay within INTRA_WHOLE_SPREAD of its
# first row's, half-precision inputs only (0: off), in their own kernel, which marks the chunks
# it formed for the row-block kernel to skip; the forward's A does the same, and
# kernels.gla.chunk.A_WHOLE_SPREAD says why the bound and why not float32. Operands in one TF32
# pass ("tf32") or three ("tf32x3"). As a branch of one kernel with the row blocks, three passes:
# 2.91 ms at 8 warps, 1.85 at 4, against the row blocks' 1.37 (H200, the shape above). Its own
# kernel, one pass, 4 warps, 1 stage: 0.29 ms at bench's gates (logsigmoid(x)/16).
INTRA_WHOLE_SPREAD = 40.0
INTRA_WHOLE_PRECISION = "tf32"
INTRA_WHOLE_WARPS = 4
INTRA_WHOLE_STAGES = 1
DQK_STAGES = 3


@triton.heuristics({'IS_VARLEN': lambda a: a['cu_seqlens'] is not None})
@triton.jit(do_not_specialize=['T'])
def chunk_gla_bwd_dv_kernel(
    k, b, blo, A, do, dH, dv, cu_seqlens, chunk_indices, T,
    H: tl.constexpr, K: tl.constexpr, V: tl.constexpr, BT: tl.constexpr, BK: tl.constexpr,
    BV: tl.constexpr, PRECISION: tl.constexpr, IS_VARLEN: tl.constexpr,
):
    """dv = A^T dO + (K * exp(b_L - b)) dH for one chunk and value tile. A (float32) enters
    as two halves in the inputs' dtype: rounded to bfloat16 alone it put dv at 2.65e-3 on the
    issue's inputs (fla 2.34e-3; H200), as two halves at 2.22e-3, the float64 math's on the
    rounded inputs (reports/gla.md)."""
    i_v, i_c, i_bh = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    i_t, m_t, row0 = chunk_rows(cu_seqlens, chunk_indices, i_c, i_bh, T, H, BT, IS_VARLEN)
    i_g = chunk_index(i_c, i_bh, i_t, T, H, BT, IS_VARLEN)
    n_t = tl.sum(m_t.to(tl.int32), 0)
    o_c = tl.arange(0, BT)
    o_v = i_v * BV + tl.arange(0, BV)
    m_v = o_v < V
    p_dH = dH + (i_g * H + i_bh % H) * K * V
    b_dv = tl.zeros([BT, BV], dtype=tl.float32)
    for i_k in range(tl.cdiv(K, BK)):
        o_k = i_k * BK + tl.arange(0, BK)
        m_k = o_k < K
        b_bl = tl.load(b + (row0 + (n_t - 1) * H) * K + o_k, mask=m_k, other=0.)
        l_bl = tl.load(blo + (row0 + (n_t - 1) * H) * K + o_k, mask=m_k, other=0.)
        b_b = load_rows(b + row0 * K, o_c, m_t, o_k, K, H)
        l_b = load_rows(blo + row0 * K, o_c, m_t, o_k, K, H)
        b_kd = (load_rows(k + row0 * K, o_c, m_t, o_k, K, H).to(tl.float32)
                * tl.exp(tl.where(m_t[:, None], pair_diff(b_bl[None, :], l_bl[None, :], b_b, l_b),
                                  float("-inf"))))
        b_dH = tl.load(p_dH + o_k[:, None] * V + o_v[None, :], mask=m_k[:, None] & m_v[None, :],
                       other=0.)
        b_dv += tl.dot(b_kd, b_dH, input_precision=PRECISION)
    b_A = load_rows(A + row0 * BT, o_c, m_t, o_c, BT, H)
    b_do = load_rows(do + row0 * V, o_c, m_t, o_v, V, H)
    b_dv += dot_split(tl.trans(b_A), b_do, PRECISION)  # A (float32) as two halves
    store_rows(dv + row0 * V, b_dv, o_c, m_t, o_v, V, H)


@triton.heuristics({'IS_VARLEN': lambda a: a['cu_seqlens'] is not None})
@triton.jit(do_not_specialize=['T'])
def chunk_gla_bwd_dA_kernel(
    v, do, dA, cu_seqlens, chunk_indices, scale, T,
    H: tl.constexpr, V: tl.constexpr, BT: tl.constexpr, BV: tl.constexpr,
    PRECISION: tl.constexpr, IS_VARLEN: tl.constexpr,
):
    """dA = scale tril(dO V^T) for one chunk ([BT, BT] float32, zero above the diagonal)."""
    i_c, i_bh = tl.program_id(0), tl.program_id(1)
    i_t, m_t, row0 = chunk_rows(cu_seqlens, chunk_indices, i_c, i_bh, T, H, BT, IS_VARLEN)
    o_c = tl.arange(0, BT)
    b_dA = tl.zeros([BT, BT], dtype=tl.float32)
    for i_v in range(tl.cdiv(V, BV)):
        o_v = i_v * BV + tl.arange(0, BV)
        b_do = load_rows(do + row0 * V, o_c, m_t, o_v, V, H)
        b_v = load_rows(v + row0 * V, o_c, m_t, o_v, V, H)
        b_dA += tl.dot(b_do, tl.trans(b_v), input_precision=PRECISION)
    b_dA = tl.where(o_c[:, None] >= o_c[None, :], b_dA * scale, 0.)
    store_rows(dA + row0 * BT, b_dA, o_c, m_t, o_c, BT, H)


@triton.jit
def _row(x, i, o_k, m, K: tl.constexpr, H: tl.constexpr):
    """Row i of a [.., H, K] tensor (x at the chunk's first row), float32, 0 where not m."""
    return tl.load(x + i * H * K + o_k, mask=m, other=0.).to(tl.float32)


@triton.jit
def _diag_3d(q, k, dA, row0, r, o_r, m_r, n_t, o_k, b_b, l_b, H: tl.constexpr, K: tl.constexpr,
             BT: tl.constexpr, BC: tl.constexpr):
    """The diagonal block's strict terms of dq' and dk' for the rows o_r = r + [0, BC):
    e_ijc = exp(b_ic - b_jc) for i > j (0 elsewhere) once, then
    dq'_i += sum_j dA_ij k_j e_ij and dk'_j += sum_i dA_ij q_i e_ij."""
    o_d = tl.arange(0, BC)
    b_dA = tl.load(dA + row0 * BT + (o_r * H * BT)[:, None] + (r + o_d)[None, :],
                   mask=m_r[:, None] & m_r[None, :], other=0.)
    b_q = load_rows(q + row0 * K, o_r, m_r, o_k, K, H).to(tl.float32)
    b_k = load_rows(k + row0 * K, o_r, m_r, o_k, K, H).to(tl.float32)
    lower = (o_d[:, None] > o_d[None, :]) & m_r[:, None] & m_r[None, :]
    b_e = tl.exp(tl.where(lower[:, :, None],
                          pair_diff(b_b[:, None, :], l_b[:, None, :], b_b[None, :, :],
                                    l_b[None, :, :]), float("-inf")))
    b_Ae = b_dA[:, :, None] * b_e
    return tl.sum(b_Ae * b_k[None, :, :], 1), tl.sum(b_Ae * b_q[:, None, :], 0)


@triton.jit
def _diag_row(q, k, b, blo, dA, row0, j, o_r, m_r, n_t, o_k, m_k, b_b, l_b, b_dq, b_dk,
              H: tl.constexpr, K: tl.constexpr, BT: tl.constexpr):
    """Row j of the diagonal block: dq'_i += dA_ij k_j exp(b_i - b_j) for rows i > j and
    dk'_i += dA_ji q_j exp(b_j - b_i) for rows i < j (exp(-inf) = 0 elsewhere: no overflow)."""
    m_j = m_k & (j < n_t)
    b_kj, b_qj = _row(k + row0 * K, j, o_k, m_j, K, H), _row(q + row0 * K, j, o_k, m_j, K, H)
    b_bj, l_bj = _row(b + row0 * K, j, o_k, m_j, K, H), _row(blo + row0 * K, j, o_k, m_j, K, H)
    b_col = tl.load(dA + row0 * BT + o_r * H * BT + j, mask=m_r & (j < n_t), other=0.)
    b_row = tl.load(dA + row0 * BT + j * H * BT + o_r, mask=m_r & (j < n_t), other=0.)
    after = (o_r > j) & m_r
    b_dq += b_col[:, None] * b_kj[None, :] * tl.exp(tl.where(
        after[:, None], pair_diff(b_b, l_b, b_bj[None, :], l_bj[None, :]), float("-inf")))
    before = (o_r < j) & m_r & (j < n_t)
    b_dk += b_row[:, None] * b_qj[None, :] * tl.exp(tl.where(
        before[:, None], pair_diff(b_bj[None, :], l_bj[None, :], b_b, l_b), float("-inf")))
    return b_dq, b_dk


@triton.jit
def _intra_block(q, k, b, blo, dA, dq, dk, row0, m_t, n_t, I, i_k, H: tl.constexpr,
                 K: tl.constexpr, BT: tl.constexpr, BC: tl.constexpr, BK: tl.constexpr,
                 PRECISION: tl.constexpr, DIAG_3D: tl.constexpr):
    """dq' and dk' (below) for the BC rows of block I of a chunk and key tile i_k, by blocks:
    off the diagonal block through one row of block I (its first row r for dq', its last token
    row p for dk'), both factors <= 1; in the diagonal block element by element (BC x BC x BK
    exponentials). Stored (float32) into dq, dk."""
    o_c = tl.arange(0, BT)
    o_r = I * BC + tl.arange(0, BC)
    m_r = o_r < n_t
    o_k = i_k * BK + tl.arange(0, BK)
    m_k = o_k < K
    r = I * BC
    p = tl.minimum(r + BC - 1, n_t - 1)  # the block's last token row (< r: no token, all masked)
    b_b = load_rows(b + row0 * K, o_r, m_r, o_k, K, H)
    l_b = load_rows(blo + row0 * K, o_r, m_r, o_k, K, H)
    b_dq = tl.zeros([BC, BK], dtype=tl.float32)
    b_dk = tl.zeros([BC, BK], dtype=tl.float32)
    if I > 0:  # columns j < r, through row r (none where the block holds no token)
        m_j = (o_c < r) & m_t & (r < n_t)
        b_br, l_br = _row(b + row0 * K, r, o_k, m_k & (r < n_t), K, H), \
            _row(blo + row0 * K, r, o_k, m_k & (r < n_t), K, H)
        b_kr = load_rows(k + row0 * K, o_c, m_j, o_k, K, H).to(tl.float32) * tl.exp(tl.where(
            m_j[:, None], pair_diff(b_br[None, :], l_br[None, :],
                                    load_rows(b + row0 * K, o_c, m_j, o_k, K, H),
                                    load_rows(blo + row0 * K, o_c, m_j, o_k, K, H)), float("-inf")))
        b_dAr = tl.load(dA + row0 * BT + (o_r * H * BT)[:, None] + o_c[None, :],
                        mask=m_r[:, None] & m_j[None, :], other=0.)
        b_dq = tl.dot(b_dAr, b_kr, input_precision=PRECISION) * tl.exp(tl.where(
            m_r[:, None], pair_diff(b_b, l_b, b_br[None, :], l_br[None, :]), float("-inf")))
    if I < BT // BC - 1:  # rows i > the block, through row p
        m_i = (o_c >= r + BC) & m_t
        b_bp, l_bp = _row(b + row0 * K, p, o_k, m_k & (p >= r), K, H), \
            _row(blo + row0 * K, p, o_k, m_k & (p >= r), K, H)
        b_qp = load_rows(q + row0 * K, o_c, m_i, o_k, K, H).to(tl.float32) * tl.exp(tl.where(
            m_i[:, None], pair_diff(load_rows(b + row0 * K, o_c, m_i, o_k, K, H),
                                    load_rows(blo + row0 * K, o_c, m_i, o_k, K, H),
                                    b_bp[None, :], l_bp[None, :]), float("-inf")))
        b_dAc = tl.load(dA + row0 * BT + (o_c * H * BT)[None, :] + o_r[:, None],
                        mask=m_r[:, None] & m_i[None, :], other=0.)  # dA[i, j] at [j, i]
        b_dk = tl.dot(b_dAc, b_qp, input_precision=PRECISION) * tl.exp(tl.where(
            m_r[:, None], pair_diff(b_bp[None, :], l_bp[None, :], b_b, l_b), float("-inf")))
    if DIAG_3D:  # the diagonal block as one [BC, BC, BK] product: one exponential per (i, j, c)
        b_dqd, b_dkd = _diag_3d(q, k, dA, row0, r, o_r, m_r, n_t, o_k, b_b, l_b, H, K, BT, BC)
        b_dq += b_dqd
        b_dk += b_dkd
    else:
        for jj in range(BC):  # a loop, not unrolled: compile time
            b_dq, b_dk = _diag_row(q, k, b, blo, dA, row0, r + jj, o_r, m_r, n_t, o_k, m_k,
                                   b_b, l_b, b_dq, b_dk, H, K, BT)
    store_rows(dq + row0 * K, b_dq, o_r, m_r, o_k, K, H)
    store_rows(dk + row0 * K, b_dk, o_r, m_r, o_k, K, H)


@triton.heuristics({'IS_VARLEN': lambda a: a['cu_seqlens'] is not None,
                    'SKIP_DONE': lambda a: a['done'] is not None})
@triton.jit(do_not_specialize=['T'])
def chunk_gla_bwd_intra_kernel(
    q, k, b, blo, dA, dq, dk, done, cu_seqlens, chunk_indices, T,
    H: tl.constexpr, K: tl.constexpr, BT: tl.constexpr, BC: tl.constexpr, BK: tl.constexpr,
    PRECISION: tl.constexpr, DIAG_3D: tl.constexpr, IS_VARLEN: tl.constexpr,
    SKIP_DONE: tl.constexpr,
):
    """The strict intra-chunk parts, for the BC rows of block I of a chunk and one key tile:

        dq'_i = sum_{j < i} dA_ij k_j exp(b_i - b_j),   dk'_j = sum_{i > j} dA_ij q_i exp(b_i - b_j)

    by blocks (_intra_block), which chunk_gla_bwd_dqk_kernel completes; with SKIP_DONE, only
    where chunk_gla_bwd_intra_whole_kernel did not form them."""
    i_k, i_ci, i_bh = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    i_c, I = i_ci // (BT // BC), i_ci % (BT // BC)
    i_t, m_t, row0 = chunk_rows(cu_seqlens, chunk_indices, i_c, i_bh, T, H, BT, IS_VARLEN)
    n_t = tl.sum(m_t.to(tl.int32), 0)
    if SKIP_DONE:  # (a branch around the body in the other form cost 14%: H200, 1.57 ms)
        NT = tl.num_programs(1) // (BT // BC)
        if tl.load(done + (i_bh * NT + i_c) * tl.num_programs(0) + i_k) == 0:
            _intra_block(q, k, b, blo, dA, dq, dk, row0, m_t, n_t, I, i_k, H, K, BT, BC, BK,
                         PRECISION, DIAG_3D)
    else:
        _intra_block(q, k, b, blo, dA, dq, dk, row0, m_t, n_t, I, i_k, H, K, BT, BC, BK,
                     PRECISION, DIAG_3D)


@triton.heuristics({'IS_VARLEN': lambda a: a['cu_seqlens'] is not None})
@triton.jit(do_not_specialize=['T'])
def chunk_gla_bwd_intra_whole_kernel(
    q, k, b, blo, dA, dq, dk, done, cu_seqlens, chunk_indices, T,
    H: tl.constexpr, K: tl.constexpr, BT: tl.constexpr, BK: tl.constexpr,
    PRECISION: tl.constexpr, SPREAD: tl.constexpr, IS_VARLEN: tl.constexpr,
):
    """dq' and dk' (above) for a whole chunk and one key tile where d = b - b_0 (row 0 of the
    chunk) stays within SPREAD on the tile (done = 1), as two products:

        dq' = exp(d) * (stril(dA) (K * exp(-d))),   dk' = exp(-d) * (stril(dA)^T (Q * exp(d)))

    every factor within exp(+-SPREAD) of 1 (INTRA_WHOLE_SPREAD); elsewhere nothing is stored
    (done = 0) and chunk_gla_bwd_intra_kernel forms them by blocks."""
    i_k, i_c, i_bh = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    i_t, m_t, row0 = chunk_rows(cu_seqlens, chunk_indices, i_c, i_bh, T, H, BT, IS_VARLEN)
    o_c = tl.arange(0, BT)
    o_k = i_k * BK + tl.arange(0, BK)
    m_k = o_k < K
    m = m_t[:, None] & m_k[None, :]
    b_d = pair_diff(load_rows(b + row0 * K, o_c, m_t, o_k, K, H),
                    load_rows(blo + row0 * K, o_c, m_t, o_k, K, H),
                    tl.load(b + row0 * K + o_k, mask=m_k, other=0.)[None, :],
                    tl.load(blo + row0 * K + o_k, mask=m_k, other=0.)[None, :])
    b_d = tl.where(m, b_d, 0.)
    whole = tl.max(tl.max(tl.abs(b_d), 1), 0) <= SPREAD
    tl.store(done + (i_bh * tl.num_programs(1) + i_c) * tl.num_programs(0) + i_k,
             whole.to(tl.int8))
    if whole:
        b_e = tl.exp(b_d)
        b_ei = tl.exp(-b_d)
        b_dA = load_rows(dA + row0 * BT, o_c, m_t, o_c, BT, H)
        b_dA = tl.where(o_c[:, None] > o_c[None, :], b_dA, 0.)
        b_kt = load_rows(k + row0 * K, o_c, m_t, o_k, K, H).to(tl.float32) * b_ei
        b_qt = load_rows(q + row0 * K, o_c, m_t, o_k, K, H).to(tl.float32) * b_e
        b_dq = tl.dot(b_dA, b_kt, input_precision=PRECISION) * b_e
        b_dk = tl.dot(tl.trans(b_dA), b_qt, input_precision=PRECISION) * b_ei
        store_rows(dq + row0 * K, b_dq, o_c, m_t, o_k, K, H)
        store_rows(dk + row0 * K, b_dk, o_c, m_t, o_k, K, H)


@triton.jit
def _before_last(a_s, a_l, b_s, b_l):
    """The scan that sums all but the last: a run of rows as (the sum of all its rows but the
    last, its last row); two runs joined (a then b): (a_s + a_l + b_s, b_l). Started from
    (0, y_r) per row, row r's scan is (sum_{j < r} y_j, y_r), with no subtraction."""
    return a_s + a_l + b_s, b_l


@triton.heuristics({'IS_VARLEN': lambda a: a['cu_seqlens'] is not None})
@triton.jit(do_not_specialize=['T'])
def chunk_gla_bwd_dqk_kernel(
    q, k, v, b, blo, h, do, dH, dq, dk, dq_out, dk_out, dg, cu_seqlens, chunk_indices, scale, T,
    H: tl.constexpr, K: tl.constexpr, V: tl.constexpr, BT: tl.constexpr, BK: tl.constexpr,
    BV: tl.constexpr, PRECISION: tl.constexpr, SPLIT: tl.constexpr, IS_VARLEN: tl.constexpr,
):
    """dq, dk (into dq_out, dk_out, in the inputs' dtype) and dg for one chunk and key tile,
    from the strict intra-chunk parts dq', dk' in dq, dk (float32, from
    chunk_gla_bwd_intra_kernel). With the i = j terms apart (they cancel in q dq - k dk, and are
    the large ones under strong gates):

        dg_r = sum_{i >= r} (q_i dq''_i - k_i dk'_i) + sum_{j < r} k_j dk_j^(state)
               + exp(b_L) rowsum(h * dH)

    dq'' = dq' + scale exp(b) * (dO h^T), dk^(state) = exp(b_L - b) * (V dH^T); the sums over
    rows are float32 scans."""
    i_k, i_c, i_bh = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    i_t, m_t, row0 = chunk_rows(cu_seqlens, chunk_indices, i_c, i_bh, T, H, BT, IS_VARLEN)
    i_g = chunk_index(i_c, i_bh, i_t, T, H, BT, IS_VARLEN)
    n_t = tl.sum(m_t.to(tl.int32), 0)
    p_s = (i_g * H + i_bh % H) * K * V
    o_c = tl.arange(0, BT)
    o_k = i_k * BK + tl.arange(0, BK)
    m_k = o_k < K
    b_dAd = tl.zeros([BT], dtype=tl.float32)  # dA_ii / scale
    b_dqs = tl.zeros([BT, BK], dtype=tl.float32)  # dO h^T
    b_dks = tl.zeros([BT, BK], dtype=tl.float32)  # V dH^T
    b_anc = tl.zeros([BK], dtype=tl.float32)
    for i_v in range(tl.cdiv(V, BV)):
        o_v = i_v * BV + tl.arange(0, BV)
        m_kv = m_k[:, None] & (o_v < V)[None, :]
        b_do = load_rows(do + row0 * V, o_c, m_t, o_v, V, H)
        b_v = load_rows(v + row0 * V, o_c, m_t, o_v, V, H)
        b_h = tl.load(h + p_s + o_k[:, None] * V + o_v[None, :], mask=m_kv, other=0.)
        b_dH = tl.load(dH + p_s + o_k[:, None] * V + o_v[None, :], mask=m_kv, other=0.)
        b_dAd += tl.sum(b_do.to(tl.float32) * b_v.to(tl.float32), 1)
        if SPLIT:  # the float32 state as two products in dO's dtype
            b_dqs += dot_split(b_do, tl.trans(b_h), PRECISION)
            b_dks += dot_split(b_v, tl.trans(b_dH), PRECISION)
        else:
            b_dqs += tl.dot(b_do.to(tl.float32), tl.trans(b_h), input_precision=PRECISION)
            b_dks += tl.dot(b_v.to(tl.float32), tl.trans(b_dH), input_precision=PRECISION)
        b_anc += tl.sum(b_h * b_dH, 1)
    b_dAd = tl.where(m_t, b_dAd * scale, 0.)
    b_bl = tl.load(b + (row0 + (n_t - 1) * H) * K + o_k, mask=m_k, other=0.)
    l_bl = tl.load(blo + (row0 + (n_t - 1) * H) * K + o_k, mask=m_k, other=0.)
    # in phases, each tile dead before the next is formed (all at once they spilled: ptxas,
    # tools/kernel_registers.py)
    b_b = load_rows(b + row0 * K, o_c, m_t, o_k, K, H)
    l_b = load_rows(blo + row0 * K, o_c, m_t, o_k, K, H)
    b_dks *= tl.exp(tl.where(m_t[:, None], pair_diff(b_bl[None, :], l_bl[None, :], b_b, l_b),
                             float("-inf")))
    b_dq = b_dqs * tl.exp(b_b) * scale + load_rows(dq + row0 * K, o_c, m_t, o_k, K, H)
    b_k = load_rows(k + row0 * K, o_c, m_t, o_k, K, H).to(tl.float32)
    b_q = load_rows(q + row0 * K, o_c, m_t, o_k, K, H).to(tl.float32)
    b_x = b_q * b_dq  # dg from the strict parts (see above)
    store_rows(dq_out + row0 * K, b_dq + b_dAd[:, None] * b_k, o_c, m_t, o_k, K, H)
    b_dk = load_rows(dk + row0 * K, o_c, m_t, o_k, K, H)
    b_x -= b_k * b_dk
    b_y = b_k * b_dks
    store_rows(dk_out + row0 * K, b_dk + b_dAd[:, None] * b_q + b_dks, o_c, m_t, o_k, K, H)
    # row r: the rows i >= r of x, the rows j < r of y (float32 scans over at most 64 rows).
    # The sum over j < r is scanned as such, never as (sum over j <= r) - y_r: y at the chunk's
    # last row is k_L (v_L dH^T), O(10) against a dg of O(1e-3) under strong gates, and the
    # difference kept float32's rounding of it (dg 1.4e-5 off float64 at the sequence's end).
    b_ex, _ = tl.associative_scan((tl.zeros_like(b_y), b_y), 0, _before_last)
    b_dg = tl.cumsum(b_x, axis=0, reverse=True) + b_ex + (b_anc * tl.exp(b_bl))[None, :]
    store_rows(dg + row0 * K, b_dg, o_c, m_t, o_k, K, H)


def intra_chunk_grads(q, k, b, blo, dA, dq, dk, cu_seqlens, chunk_indices, NT: int, BT: int,
                      BC: int, prec: str):
    """dq', dk' (float32, into dq, dk): first by whole chunks where the gates allow it
    (INTRA_WHOLE_SPREAD, half-precision inputs), then by row blocks the rest."""
    B, T, H, K = q.shape
    BK = tile(K)
    done = None
    if q.dtype != torch.float32 and INTRA_WHOLE_SPREAD > 0:
        done = torch.empty(B * H, NT, triton.cdiv(K, BK), dtype=torch.int8, device=q.device)
        chunk_gla_bwd_intra_whole_kernel[(triton.cdiv(K, BK), NT, B * H)](
            q, k, b, blo, dA, dq, dk, done, cu_seqlens, chunk_indices, T, H=H, K=K, BT=BT,
            BK=BK, PRECISION=INTRA_WHOLE_PRECISION, SPREAD=float(INTRA_WHOLE_SPREAD),
            num_warps=INTRA_WHOLE_WARPS, num_stages=INTRA_WHOLE_STAGES)
    chunk_gla_bwd_intra_kernel[(triton.cdiv(K, BK), NT * (BT // BC), B * H)](
        q, k, b, blo, dA, dq, dk, done, cu_seqlens, chunk_indices, T, H=H, K=K, BT=BT, BC=BC,
        BK=BK, PRECISION=prec, DIAG_3D=DIAG_3D, num_warps=4)


def chunk_gla_bwd(q, k, v, g, saved, scale: float, initial_state, do, dht, cu_seqlens, BT: int,
                  BC: int):
    """(dq, dk, dv, dg, d(initial state) or None) from the forward's (b, blo, h, A)."""
    b, blo, h, A = saved
    B, T, H, K = q.shape
    V = v.shape[-1]
    N, NT, chunk_indices, chunk_offsets = chunk_layout(B, T, cu_seqlens, BT)
    chunks = NT * (B if cu_seqlens is None else 1)
    f32 = dict(dtype=torch.float32, device=q.device)
    dH = torch.empty(chunks, H, K, V, **f32)
    dh0 = torch.empty(N, H, K, V, **f32) if initial_state is not None else None
    dq, dk = torch.empty(B, T, H, K, **f32), torch.empty(B, T, H, K, **f32)  # dq', dk'
    dq_out, dk_out = torch.empty_like(q), torch.empty_like(k)
    dg = torch.empty_like(g)
    dv = torch.empty_like(v)
    prec = "ieee" if q.dtype == torch.float32 else "tf32x3"
    BK, BV = tile(K), tile(V)
    if NT:
        # the delta rule's reverse walk, under the key gate and without w and dv'
        chunk_bwd_dh_gated(q, b, do, dH, dht, dh0, scale, cu_seqlens, chunk_offsets, N, BT)
        chunk_gla_bwd_dv_kernel[(triton.cdiv(V, BV), NT, B * H)](
            k, b, blo, A, do, dH, dv, cu_seqlens, chunk_indices, T, H=H, K=K, V=V, BT=BT, BK=BK,
            BV=BV, PRECISION=prec, num_stages=DV_STAGES)
        dA = torch.empty(B, T, H, BT, **f32)
        chunk_gla_bwd_dA_kernel[(NT, B * H)](
            v, do, dA, cu_seqlens, chunk_indices, scale, T, H=H, V=V, BT=BT, BV=BV,
            PRECISION=dot_precision(q.dtype))
        intra_chunk_grads(q, k, b, blo, dA, dq, dk, cu_seqlens, chunk_indices, NT, BT, BC, prec)
        chunk_gla_bwd_dqk_kernel[(triton.cdiv(K, BK), NT, B * H)](
            q, k, v, b, blo, h, do, dH, dq, dk, dq_out, dk_out, dg, cu_seqlens, chunk_indices,
            scale, T, H=H,
            K=K, V=V, BT=BT, BK=BK, BV=BV, PRECISION=prec, SPLIT=STATE_DOTS_SPLIT, num_warps=8,
            num_stages=DQK_STAGES)
    elif dh0 is not None:  # no tokens: the initial state is the final one
        dh0.copy_(dht if dht is not None else torch.zeros_like(dh0))
    return dq_out, dk_out, dv, dg, dh0
