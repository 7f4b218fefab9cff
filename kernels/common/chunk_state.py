"""Chunked state passing: the state entering every chunk (forward) and its gradient (backward).

One program per (value tile, sequence, head) walks the chunks of its sequence in order with
the state S [K, BV] in float32 registers, as up to four [BK, BV] blocks of K rows (BK <= 64;
K <= 256): blocks keep each product's operands small, so nothing spills to local memory
(ptxas, K = V = 128, BV = 32: no stack, where one [128, 32] block had 360 bytes). For the delta
rule (docs/operators.md section 1), with the WY transform's w, u of each chunk (delta_rule/wy.py):

    h[n]  = S                       # the state entering chunk n (stored for the output stage)
    v'    = u - w S                 # the chunk's v'_t, stacked            [BT, BV]
    S     = S + K^T v'              # the state leaving the chunk

v' is stored (the output stage reads it; chunk_fwd_h_o instead writes the output in the walk
and stores h and v' only for a backward). The final S is the final state. What decides its
error in half precision is what enters v' and S rounded: u comes in float32 (rounded to bf16 it
alone costs ~2e-3, one bf16 ulp), and S and v' enter their products per FWD_MIXED_BY_DTYPE:
with hi + lo halves for fp16, rounded for bf16 (TF32 or halves keep the bf16 final state at
2.2-2.3e-3 instead of 3.4e-3, but cost the H200 0.28 ms of a 2 ms forward at 32K); w stays in
the inputs' dtype (~1e-3). reports/delta_rule.md (kernel switches, FWD_MIXED_BY_DTYPE) has the
emulation and the timings of each mode.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels.common.utils import (dot_mixed, dot_precision, finite_part, first_bad_row, load_cols,
                                   load_rows, nonfinite_safe, poison_rows, store_rows, tile, tuning,
                                   walk_bounds)

__all__ = ["chunk_fwd_h", "chunk_fwd_h_o", "chunk_fwd_h_gated", "chunk_bwd_dh",
           "chunk_bwd_dh_gated"]

# How S and v' (float32) enter their products with w and K (half precision) in the forward
# walk (utils.dot_mixed), per input dtype. The walk is latency-bound (about one program per SM,
# chunks in order), so every product in its chain costs time. On the H100 (B=2 T=32K H=16
# K=V=128 bf16, reports/delta_rule.md, FWD_MIXED_BY_DTYPE): "split" costs ~0.2 ms a forward
# over "round" and keeps the final state at 2.2e-3; "tf32" is 0.1 ms over "round" at 2.3e-3;
# "round" gives 3.4e-3 (fla: 4.0e-3, our check's floor 3.9e-3). On the H200 (2026-12-01, one run beside fla-core 0.6.0)
# "tf32" cost 0.28 ms a forward at 32K and left it slower than fla's (2.225 against 2.097 ms;
# "round" 1.941), so bf16 rounds: every bf16 error of B=2 T=1000 H=4 D=64 stays under fla's
# (o 3.97e-3 against 4.42e-3, final state 3.39e-3 against 4.03e-3, dq 4.30e-3 against
# 4.72e-3). For float16 TF32 keeps no more bits than the inputs, so float16 splits. Set
# FWD_MIXED to force one mode.
#
# Heads of up to FWD_TF32_MAX_K keys take "tf32" in bf16 too: there "round" left the final state
# at 3.4-5.1e-3 (H200, 2026-12-02; 3.96e-3 on the gpu suite's k16-v64, over the check's bf16
# floor of 3.91e-3); "tf32" gives 2.3-2.4e-3 at 3% of the forward (reports/delta_rule.md,
# kernel switches).
FWD_MIXED_BY_DTYPE = {torch.bfloat16: "round", torch.float16: "split", torch.float32: "split"}
FWD_TF32_MAX_K = 64
FWD_MIXED = None


def fwd_mixed(dtype: torch.dtype, K: int) -> str:
    """The forward walk's mode for S and v' (FWD_MIXED if set)."""
    if FWD_MIXED is not None:
        return FWD_MIXED
    if dtype == torch.bfloat16 and K <= FWD_TF32_MAX_K:
        return "tf32"
    return FWD_MIXED_BY_DTYPE[dtype]

MAX_STATE_TILE = 8192  # floats of state per program (K * BV), 64 registers a thread at 4 warps

# The walk over chunks is sequential, so the grid is only (V / BV) x N x H programs: BV = 32
# doubles them (more SMs busy), BV = 64 halves the re-reads of k and w. On the H100 at N*H = 32,
# K = V = 128 every key measured picked BV = 32, 4 warps: 128 programs for 132 SMs, each walking
# its chunks latency-bound. No BV = 16: 16-column products are where Triton 3.6 miscompiled a
# chunk kernel on the H100 (utils.MIN_TILE). The first config is the one numerical checks pin:
# 2 stages, because with 3 chunk_bwd_dh_kernel in float32 at K = V = 128 needs 245,760 bytes of
# shared memory, over the H100's 232,448 (`harness compile`); stages change no arithmetic.
STATE_CONFIGS = tuning([
    triton.Config({'BV': BV}, num_warps=num_warps, num_stages=num_stages)
    for BV in (32, 64) for num_warps in (4, 8) for num_stages in (2, 3, 4)
])


def _fits(configs, named_args, **kwargs):
    """Drop tiles whose float32 state would not fit in registers."""
    K = named_args['K'] if 'K' in named_args else kwargs['K']
    fit = [c for c in configs if triton.cdiv(K, 64) * 64 * c.kwargs['BV'] <= MAX_STATE_TILE]
    return fit or [min(configs, key=lambda c: c.kwargs['BV'])]


@triton.jit
def _block(p, i_b: tl.constexpr, o_v, m_v, K: tl.constexpr, V: tl.constexpr, BK: tl.constexpr):
    """(pointers, mask) of rows [i_b * BK, (i_b + 1) * BK) of a [K, V] state at p."""
    o_k = i_b * BK + tl.arange(0, BK)
    return p + o_k[:, None] * V + o_v[None, :], (o_k < K)[:, None] & m_v[None, :]


@triton.jit
def _load_state(p, i_nh, o_v, m_v, K: tl.constexpr, V: tl.constexpr, BK: tl.constexpr,
                BV: tl.constexpr, LOAD: tl.constexpr):
    """A [K, BV] float32 state as four [BK, BV] blocks of rows: state i_nh of p ([N*H, K, V])
    when LOAD, else zeros. Blocks past K stay zero and unused (the compiler drops them)."""
    b_1 = tl.zeros([BK, BV], dtype=tl.float32)
    b_2 = tl.zeros([BK, BV], dtype=tl.float32)
    b_3 = tl.zeros([BK, BV], dtype=tl.float32)
    b_4 = tl.zeros([BK, BV], dtype=tl.float32)
    if LOAD:
        p = p + i_nh.to(tl.int64) * K * V
        p_b, m_b = _block(p, 0, o_v, m_v, K, V, BK)
        b_1 += tl.load(p_b, mask=m_b, other=0.)
        if K > BK:
            p_b, m_b = _block(p, 1, o_v, m_v, K, V, BK)
            b_2 += tl.load(p_b, mask=m_b, other=0.)
        if K > 2 * BK:
            p_b, m_b = _block(p, 2, o_v, m_v, K, V, BK)
            b_3 += tl.load(p_b, mask=m_b, other=0.)
        if K > 3 * BK:
            p_b, m_b = _block(p, 3, o_v, m_v, K, V, BK)
            b_4 += tl.load(p_b, mask=m_b, other=0.)
    return b_1, b_2, b_3, b_4


@triton.jit
def _store_state(p, b_1, b_2, b_3, b_4, o_v, m_v, K: tl.constexpr, V: tl.constexpr,
                 BK: tl.constexpr):
    """Store the blocks of a [K, BV] state (as _load_state holds it) at p, in p's dtype."""
    DT = p.dtype.element_ty
    p_b, m_b = _block(p, 0, o_v, m_v, K, V, BK)
    tl.store(p_b, b_1.to(DT), mask=m_b)
    if K > BK:
        p_b, m_b = _block(p, 1, o_v, m_v, K, V, BK)
        tl.store(p_b, b_2.to(DT), mask=m_b)
    if K > 2 * BK:
        p_b, m_b = _block(p, 2, o_v, m_v, K, V, BK)
        tl.store(p_b, b_3.to(DT), mask=m_b)
    if K > 3 * BK:
        p_b, m_b = _block(p, 3, o_v, m_v, K, V, BK)
        tl.store(p_b, b_4.to(DT), mask=m_b)


@triton.jit
def _out_block(b_o, b_A, p_q, p_k, o_c, m_t, o_k, b_h, K: tl.constexpr, H: tl.constexpr,
               PRECISION: tl.constexpr):
    """One block of rows o_k of the output's products: b_o += Q_b S_b (S rounded to the
    inputs' dtype, as the output stage reads the stored h), b_A += Q_b K_b^T."""
    b_q = load_rows(p_q, o_c, m_t, o_k, K, H)
    b_o += tl.dot(b_q, b_h.to(b_q.dtype), input_precision=PRECISION)
    b_A += tl.dot(b_q, load_cols(p_k, o_c, m_t, o_k, K, H), input_precision=PRECISION)
    return b_o, b_A


@triton.jit
def _gated_update(b_h, p_kd, p_g, last, o_c, m_t, o_k, b_v, K: tl.constexpr, H: tl.constexpr,
                  PRECISION: tl.constexpr):
    """Rows o_k of S = diag(exp(b_L)) S + Kd^T V under a key gate (GLA): Kd = K * exp(b_L - b)
    as given (p_kd), b the chunk's cumulative log gate (p_g), L its last row."""
    b_bl = tl.load(p_g + last * H * K + o_k, mask=o_k < K, other=0.)
    return b_h * tl.exp(b_bl)[:, None] + tl.dot(load_cols(p_kd, o_c, m_t, o_k, K, H), b_v,
                                               input_precision=PRECISION)


@triton.heuristics({
    'USE_INITIAL_STATE': lambda a: a['h0'] is not None,
    'STORE_FINAL_STATE': lambda a: a['ht'] is not None,
    'STORE_STATES': lambda a: a['h'] is not None,
    'FUSE_OUTPUT': lambda a: a['o'] is not None,
    'USE_W': lambda a: a['w'] is not None,
    'USE_G': lambda a: a['g'] is not None,
    'IS_VARLEN': lambda a: a['cu_seqlens'] is not None,
})
@triton.autotune(configs=STATE_CONFIGS,
                 key=['H', 'K', 'V', 'BT', 'STORE_STATES', 'FUSE_OUTPUT', 'USE_W', 'USE_G',
                      'IS_VARLEN'],
                 prune_configs_by={'early_config_prune': _fits})
@triton.jit(do_not_specialize=['T'])
def chunk_fwd_h_kernel(
    k, w, u, v_new, h, h0, ht, q, o, g, cu_seqlens, chunk_offsets, scale, T,
    H: tl.constexpr, K: tl.constexpr, V: tl.constexpr, BT: tl.constexpr,
    BK: tl.constexpr, BV: tl.constexpr, PRECISION: tl.constexpr, MIXED: tl.constexpr,
    USE_INITIAL_STATE: tl.constexpr, STORE_FINAL_STATE: tl.constexpr,
    STORE_STATES: tl.constexpr, FUSE_OUTPUT: tl.constexpr, SAFE: tl.constexpr,
    USE_W: tl.constexpr, USE_G: tl.constexpr, IS_VARLEN: tl.constexpr,
):
    """The walk (module docstring); h[n] and v' stored when STORE_STATES. With FUSE_OUTPUT
    it also writes the chunk's output columns, the output stage's arithmetic in the walk:

        O = scale (Q h[n] + tril(Q K^T) v')        # h[n] = S and v' rounded to the inputs' dtype

    Without w (USE_W off) v' is u itself, the values; with a key gate (USE_G: g the chunk's
    cumulative log gate b, and k given as K * exp(b_L - b)) S = diag(exp(b_L)) S + k^T v' (GLA,
    kernels/gla/chunk.py)."""
    i_v, i_nh = tl.program_id(0), tl.program_id(1)
    i_n, i_h = i_nh // H, i_nh % H
    bos, eos, NT, c0 = walk_bounds(cu_seqlens, chunk_offsets, i_n, T, BT, IS_VARLEN)
    o_c = tl.arange(0, BT)
    o_k1 = tl.arange(0, BK)
    o_k2, o_k3, o_k4 = o_k1 + BK, o_k1 + 2 * BK, o_k1 + 3 * BK
    o_v = i_v * BV + tl.arange(0, BV)
    m_v = o_v < V

    # S [K, BV] as blocks of BK rows (the later ones only when K needs them)
    b_h1, b_h2, b_h3, b_h4 = _load_state(h0, i_nh, o_v, m_v, K, V, BK, BV,
                                         USE_INITIAL_STATE)
    for i_t in range(NT):
        if STORE_STATES:
            p_h = h + ((c0 + i_t) * H + i_h) * K * V
            _store_state(p_h, b_h1, b_h2, b_h3, b_h4, o_v, m_v, K, V, BK)
        m_t = i_t * BT + o_c < eos - bos
        row0 = (bos + i_t * BT) * H + i_h  # the chunk's first row (int64); offsets within stay int32
        p_k = k + row0 * K
        if USE_W:
            p_w = w + row0 * K
            # v' = u - w S     [BT, BV]: the products first, u after them (as in the backward walk)
            b_v = dot_mixed(load_rows(p_w, o_c, m_t, o_k1, K, H), b_h1, PRECISION, MIXED)
            if K > BK:
                b_v += dot_mixed(load_rows(p_w, o_c, m_t, o_k2, K, H), b_h2, PRECISION, MIXED)
            if K > 2 * BK:
                b_v += dot_mixed(load_rows(p_w, o_c, m_t, o_k3, K, H), b_h3, PRECISION, MIXED)
            if K > 3 * BK:
                b_v += dot_mixed(load_rows(p_w, o_c, m_t, o_k4, K, H), b_h4, PRECISION, MIXED)
            b_v = load_rows(u + row0 * V, o_c, m_t, o_v, V, H).to(tl.float32) - b_v
            if STORE_STATES:
                store_rows(v_new + row0 * V, b_v, o_c, m_t, o_v, V, H)
        else:
            b_v = load_rows(u + row0 * V, o_c, m_t, o_v, V, H)
        if FUSE_OUTPUT:
            # O = scale (Q h[n] + tril(Q K^T) v'), from S before its update
            p_q = q + row0 * K
            b_o = tl.zeros([BT, BV], dtype=tl.float32)
            b_A = tl.zeros([BT, BT], dtype=tl.float32)
            b_o, b_A = _out_block(b_o, b_A, p_q, p_k, o_c, m_t, o_k1, b_h1, K, H, PRECISION)
            if K > BK:
                b_o, b_A = _out_block(b_o, b_A, p_q, p_k, o_c, m_t, o_k2, b_h2, K, H, PRECISION)
            if K > 2 * BK:
                b_o, b_A = _out_block(b_o, b_A, p_q, p_k, o_c, m_t, o_k3, b_h3, K, H, PRECISION)
            if K > 3 * BK:
                b_o, b_A = _out_block(b_o, b_A, p_q, p_k, o_c, m_t, o_k4, b_h4, K, H, PRECISION)
            b_A = tl.where(o_c[:, None] >= o_c[None, :], b_A, 0.).to(k.dtype.element_ty)
            b_vf, b_bad = finite_part(b_v, SAFE)  # as chunk_output.chunk_fwd_o
            b_o += tl.dot(b_A, b_vf.to(k.dtype.element_ty), input_precision=PRECISION)
            b_o = poison_rows(b_o, o_c, first_bad_row(b_bad, o_c, BT), SAFE)
            store_rows(o + row0 * V, b_o * scale, o_c, m_t, o_v, V, H)
        if USE_G:
            p_g = g + row0 * K
            last = tl.minimum(BT, eos - bos - i_t * BT) - 1
            b_h1 = _gated_update(b_h1, p_k, p_g, last, o_c, m_t, o_k1, b_v, K, H, PRECISION)
            if K > BK:
                b_h2 = _gated_update(b_h2, p_k, p_g, last, o_c, m_t, o_k2, b_v, K, H, PRECISION)
            if K > 2 * BK:
                b_h3 = _gated_update(b_h3, p_k, p_g, last, o_c, m_t, o_k3, b_v, K, H, PRECISION)
            if K > 3 * BK:
                b_h4 = _gated_update(b_h4, p_k, p_g, last, o_c, m_t, o_k4, b_v, K, H, PRECISION)
        else:
            # S = S + K^T v'   (v' unrounded: S ends as the final state)
            b_h1 += dot_mixed(load_cols(p_k, o_c, m_t, o_k1, K, H), b_v, PRECISION, MIXED)
            if K > BK:
                b_h2 += dot_mixed(load_cols(p_k, o_c, m_t, o_k2, K, H), b_v, PRECISION, MIXED)
            if K > 2 * BK:
                b_h3 += dot_mixed(load_cols(p_k, o_c, m_t, o_k3, K, H), b_v, PRECISION, MIXED)
            if K > 3 * BK:
                b_h4 += dot_mixed(load_cols(p_k, o_c, m_t, o_k4, K, H), b_v, PRECISION, MIXED)
    if STORE_FINAL_STATE:
        p_ht = ht + i_nh.to(tl.int64) * K * V
        _store_state(p_ht, b_h1, b_h2, b_h3, b_h4, o_v, m_v, K, V, BK)


def chunk_fwd_h(k, w, u, initial_state, output_final_state: bool, cu_seqlens, chunk_offsets,
                N: int, NT: int, BT: int, mixed: str | None = None):
    """Returns (h [B, NT, H, K, V] or [1, NT_all, H, K, V], v_new [B, T, H, V] in w's dtype,
    final state or None).

    h is kept in k's dtype (it feeds the output stage's matmuls); the final state in float32.
    ``mixed`` overrides how S and v' enter their products (utils.dot_mixed; default
    fwd_mixed(k.dtype, K)).
    """
    h, v_new, ht = _states(k, u, w, True, output_final_state, cu_seqlens, N, NT)
    _launch_fwd_h(k, w, u, v_new, h, initial_state, ht, None, None, 1.0, cu_seqlens,
                  chunk_offsets, N, BT, mixed)
    return h, v_new, ht


def chunk_fwd_h_o(q, k, w, u, scale: float, initial_state, output_final_state: bool,
                  keep_states: bool, cu_seqlens, chunk_offsets, N: int, NT: int, BT: int,
                  mixed: str | None = None):
    """The walk with the output stage in it (chunk_output.chunk_fwd_o's O, its arithmetic):
    returns (o [B, T, H, V] in k's dtype, final state or None, h or None, v_new or None).
    h and v' are stored only when ``keep_states`` (for the backward): inference writes neither,
    and nothing reads h back."""
    B, T, H, _ = k.shape
    o = k.new_empty(B, T, H, u.shape[-1])
    h, v_new, ht = _states(k, u, w, keep_states, output_final_state, cu_seqlens, N, NT)
    _launch_fwd_h(k, w, u, v_new, h, initial_state, ht, q, o, scale, cu_seqlens, chunk_offsets,
                  N, BT, mixed)
    return o, ht, h, v_new


def _states(k, u, w, keep: bool, output_final_state: bool, cu_seqlens, N: int, NT: int):
    """(h, v_new) when ``keep`` (else None, None) and the final state's buffer or None."""
    B, T, H, K = k.shape
    V = u.shape[-1]
    h = k.new_empty(B if cu_seqlens is None else 1, NT, H, K, V) if keep else None
    v_new = torch.empty_like(u, dtype=w.dtype) if keep else None  # u may be float32
    ht = k.new_empty(N, H, K, V, dtype=torch.float32) if output_final_state else None
    return h, v_new, ht


def _launch_fwd_h(k, w, u, v_new, h, h0, ht, q, o, scale, cu_seqlens, chunk_offsets, N, BT,
                  mixed):
    B, T, H, K = k.shape
    V = u.shape[-1]
    grid = lambda meta: (triton.cdiv(V, meta['BV']), N * H)  # noqa: E731
    chunk_fwd_h_kernel[grid](k, w, u, v_new, h, h0, ht, q, o, None, cu_seqlens,
                             chunk_offsets, scale, T, H=H, K=K, V=V, BT=BT, BK=tile(K),
                             PRECISION=dot_precision(k.dtype),
                             MIXED=mixed or fwd_mixed(k.dtype, K), SAFE=nonfinite_safe())


def chunk_fwd_h_gated(kd, v, g, h, initial_state, ht, cu_seqlens, chunk_offsets, N: int,
                      BT: int):
    """The walk under a key gate, without w (GLA): h[n] into ``h`` ([chunks, H, K, V], kept in
    its dtype) and the final state into ``ht`` (or None); g the cumulative log gate within each
    chunk (its last row is read), kd = K * exp(b_L - b) in the inputs' dtype
    (kernels.gla.chunk.gated_operands)."""
    B, T, H, K = kd.shape
    V = v.shape[-1]
    grid = lambda meta: (triton.cdiv(V, meta['BV']), N * H)  # noqa: E731
    chunk_fwd_h_kernel[grid](kd, None, v, None, h, initial_state, ht, None, None, g,
                             cu_seqlens, chunk_offsets, 1.0, T, H=H, K=K, V=V, BT=BT,
                             BK=tile(K), PRECISION=dot_precision(kd.dtype), MIXED="round",
                             SAFE=False)


@triton.jit
def _dh_update(b_dh, p_q, p_w, o_c, m_t, o_k, b_do, b_dv, scale, K: tl.constexpr, H: tl.constexpr,
               PRECISION: tl.constexpr):
    """One block of rows o_k of dS + (scale Q)^T dO - w^T dv'."""
    b_qt = load_cols(p_q, o_c, m_t, o_k, K, H)
    b_wt = load_cols(p_w, o_c, m_t, o_k, K, H)
    b_dh += tl.dot(b_qt, b_do, input_precision=PRECISION) * scale
    return b_dh - tl.dot(b_wt, b_dv.to(b_wt.dtype), input_precision=PRECISION)


@triton.jit
def _dh_gated_update(b_dh, p_q, p_g, last, o_c, m_t, o_k, b_do, scale, K: tl.constexpr,
                     H: tl.constexpr, PRECISION: tl.constexpr):
    """Rows o_k of dS = diag(exp(b_L)) dS + scale (Q * exp(b))^T dO under a key gate (GLA)."""
    b_bl = tl.load(p_g + last * H * K + o_k, mask=o_k < K, other=0.)
    b_qg = (load_cols(p_q, o_c, m_t, o_k, K, H).to(tl.float32)
            * tl.exp(load_cols(p_g, o_c, m_t, o_k, K, H)) * scale)
    return b_dh * tl.exp(b_bl)[:, None] + tl.dot(b_qg.to(b_do.dtype), b_do,
                                                 input_precision=PRECISION)


@triton.heuristics({
    'USE_FINAL_STATE_GRADIENT': lambda a: a['dht'] is not None,
    'STORE_INITIAL_STATE_GRADIENT': lambda a: a['dh0'] is not None,
    'USE_W': lambda a: a['w'] is not None,
    'USE_G': lambda a: a['g'] is not None,
    'IS_VARLEN': lambda a: a['cu_seqlens'] is not None,
})
@triton.autotune(configs=STATE_CONFIGS, key=['H', 'K', 'V', 'BT', 'USE_W', 'USE_G', 'IS_VARLEN'],
                 prune_configs_by={'early_config_prune': _fits})
@triton.jit(do_not_specialize=['T'])
def chunk_bwd_dh_kernel(
    q, k, w, do, dv_local, dv, dh, dht, dh0, g, cu_seqlens, chunk_offsets, scale, T,
    H: tl.constexpr, K: tl.constexpr, V: tl.constexpr, BT: tl.constexpr,
    BK: tl.constexpr, BV: tl.constexpr, PRECISION: tl.constexpr,
    USE_FINAL_STATE_GRADIENT: tl.constexpr, STORE_INITIAL_STATE_GRADIENT: tl.constexpr,
    USE_W: tl.constexpr, USE_G: tl.constexpr, IS_VARLEN: tl.constexpr,
):
    """The reverse walk over chunks. dS holds the gradient of the state leaving chunk n:

        dh[n] = dS                                   # stored: d(state leaving chunk n)
        dv'   = dv_local + K dS                      # v' feeds the outputs and S_{n+1}
        dS    = dS + (scale Q)^T dO - w^T dv'        # d(state entering chunk n)

    and after the first chunk dS is d(initial_state). Blocks of BK rows as in the forward.
    Without w and under a key gate (USE_W off, USE_G: g the chunk's cumulative log gate; GLA,
    whose dv is formed apart) only dS = diag(exp(b_L)) dS + scale (Q * exp(b))^T dO."""
    i_v, i_nh = tl.program_id(0), tl.program_id(1)
    i_n, i_h = i_nh // H, i_nh % H
    bos, eos, NT, c0 = walk_bounds(cu_seqlens, chunk_offsets, i_n, T, BT, IS_VARLEN)
    o_c = tl.arange(0, BT)
    o_k1 = tl.arange(0, BK)
    o_k2, o_k3, o_k4 = o_k1 + BK, o_k1 + 2 * BK, o_k1 + 3 * BK
    o_v = i_v * BV + tl.arange(0, BV)
    m_v = o_v < V

    # dS [K, BV] as blocks of BK rows
    b_dh1, b_dh2, b_dh3, b_dh4 = _load_state(dht, i_nh, o_v, m_v, K, V, BK, BV,
                                             USE_FINAL_STATE_GRADIENT)
    for i_r in range(NT):
        i_t = NT - 1 - i_r
        p_dh = dh + ((c0 + i_t) * H + i_h) * K * V
        _store_state(p_dh, b_dh1, b_dh2, b_dh3, b_dh4, o_v, m_v, K, V, BK)
        m_t = i_t * BT + o_c < eos - bos
        row0 = (bos + i_t * BT) * H + i_h  # the chunk's first row (int64); offsets within stay int32
        if USE_G:
            p_q, p_g = q + row0 * K, g + row0 * K
            last = tl.minimum(BT, eos - bos - i_t * BT) - 1
            b_do = load_rows(do + row0 * V, o_c, m_t, o_v, V, H)
            b_dh1 = _dh_gated_update(b_dh1, p_q, p_g, last, o_c, m_t, o_k1, b_do, scale, K, H,
                                     PRECISION)
            if K > BK:
                b_dh2 = _dh_gated_update(b_dh2, p_q, p_g, last, o_c, m_t, o_k2, b_do, scale, K,
                                         H, PRECISION)
            if K > 2 * BK:
                b_dh3 = _dh_gated_update(b_dh3, p_q, p_g, last, o_c, m_t, o_k3, b_do, scale, K,
                                         H, PRECISION)
            if K > 3 * BK:
                b_dh4 = _dh_gated_update(b_dh4, p_q, p_g, last, o_c, m_t, o_k4, b_do, scale, K,
                                         H, PRECISION)
        else:
            p_q, p_k, p_w = q + row0 * K, k + row0 * K, w + row0 * K
            # dv' = K dS + dv_local     [BT, BV]. dv_local is added after the products: loaded
            # first, as the products' accumulator, it stayed a synchronous load in the loop (not
            # pipelined: the ttgir kept one tt.load) and cost ~1 us a chunk on the H100.
            b_k = load_rows(p_k, o_c, m_t, o_k1, K, H)
            b_dv = tl.dot(b_k, b_dh1.to(b_k.dtype), input_precision=PRECISION)
            if K > BK:
                b_k = load_rows(p_k, o_c, m_t, o_k2, K, H)
                b_dv += tl.dot(b_k, b_dh2.to(b_k.dtype), input_precision=PRECISION)
            if K > 2 * BK:
                b_k = load_rows(p_k, o_c, m_t, o_k3, K, H)
                b_dv += tl.dot(b_k, b_dh3.to(b_k.dtype), input_precision=PRECISION)
            if K > 3 * BK:
                b_k = load_rows(p_k, o_c, m_t, o_k4, K, H)
                b_dv += tl.dot(b_k, b_dh4.to(b_k.dtype), input_precision=PRECISION)
            b_dv += load_rows(dv_local + row0 * V, o_c, m_t, o_v, V, H).to(tl.float32)
            store_rows(dv + row0 * V, b_dv, o_c, m_t, o_v, V, H)
            # dS = dS + (scale Q)^T dO - w^T dv'
            b_do = load_rows(do + row0 * V, o_c, m_t, o_v, V, H)
            b_dh1 = _dh_update(b_dh1, p_q, p_w, o_c, m_t, o_k1, b_do, b_dv, scale, K, H, PRECISION)
            if K > BK:
                b_dh2 = _dh_update(b_dh2, p_q, p_w, o_c, m_t, o_k2, b_do, b_dv, scale, K, H, PRECISION)
            if K > 2 * BK:
                b_dh3 = _dh_update(b_dh3, p_q, p_w, o_c, m_t, o_k3, b_do, b_dv, scale, K, H, PRECISION)
            if K > 3 * BK:
                b_dh4 = _dh_update(b_dh4, p_q, p_w, o_c, m_t, o_k4, b_do, b_dv, scale, K, H, PRECISION)
    if STORE_INITIAL_STATE_GRADIENT:
        p_dh0 = dh0 + i_nh.to(tl.int64) * K * V
        _store_state(p_dh0, b_dh1, b_dh2, b_dh3, b_dh4, o_v, m_v, K, V, BK)


def chunk_bwd_dh(q, k, w, do, dv_local, dht, scale: float, need_dh0: bool, cu_seqlens,
                 chunk_offsets, N: int, NT: int, BT: int):
    """Returns (dh like h: gradient of the state leaving each chunk, dv' like dv_local,
    d(initial_state) float32 or None)."""
    B, T, H, K = k.shape
    V = do.shape[-1]
    BK = tile(K)
    dh = k.new_empty(B if cu_seqlens is None else 1, NT, H, K, V)
    dv = torch.empty_like(dv_local)
    dh0 = k.new_empty(N, H, K, V, dtype=torch.float32) if need_dh0 else None
    grid = lambda meta: (triton.cdiv(V, meta['BV']), N * H)  # noqa: E731
    chunk_bwd_dh_kernel[grid](q, k, w, do, dv_local, dv, dh, dht, dh0, None, cu_seqlens,
                              chunk_offsets, scale, T, H=H, K=K, V=V, BT=BT, BK=BK,
                              PRECISION=dot_precision(k.dtype))
    return dh, dv, dh0


def chunk_bwd_dh_gated(q, g, do, dh, dht, dh0, scale: float, cu_seqlens, chunk_offsets, N: int,
                       BT: int):
    """The reverse walk under a key gate, without w and dv' (GLA): the gradient of the state
    leaving each chunk into ``dh`` ([chunks, H, K, V], kept in its dtype), d(initial state) into
    ``dh0`` (or None); ``dht`` the final state's gradient or None."""
    B, T, H, K = q.shape
    V = do.shape[-1]
    grid = lambda meta: (triton.cdiv(V, meta['BV']), N * H)  # noqa: E731
    chunk_bwd_dh_kernel[grid](q, None, None, do, None, None, dh, dht, dh0, g, cu_seqlens,
                              chunk_offsets, scale, T, H=H, K=K, V=V, BT=BT, BK=tile(K),
                              PRECISION=dot_precision(q.dtype))
