"""Log-linear attention, chunked (docs/operators.md section 5): the forward and its function.

    o_t = sum_{s <= t} level_scales[t, lvl(t, s)] exp(G_t - G_s) scale <q_t, k_s> v_s,
    lvl(t, t) = 0,  lvl(t, s) = bit_length(t XOR s)   (positions within the sequence)

With chunks of C = BT = 2^c positions (references/log_linear_attn.py derives this), a pair in
one chunk has its level from the positions within the chunk, and a pair across chunks n > m
has level c + bit_length(n XOR m): chunk n reads, for every bit l - 1 set in n, one state

    S_l(n) = sum over the chunks m of its Fenwick bucket, of their s, of
             exp(G_{nC - 1} - G_s) k_s v_s^T                    (decayed to chunk n's start)

and adds level_scales[t, c + l] exp(G_t - G_{nC - 1}) scale S_l(n)^T q_t. Two kernels:

1. ``chunk_log_linear_attn_fwd_local_kernel``, one program per (value tile, chunk, head): the
   chunk's own part, A = scale (Q K^T) o exp(b_i - b_j) o level_scales[i, lvl(i, j)] (lower
   triangle; b the chunk's cumulative log gates, summed in float64), o = A V into a float32
   buffer, and the chunk's own state H_n = sum_s exp(b_last - b_s) k_s v_s^T.
2. ``chunk_log_linear_attn_fwd_levels_kernel``, one program per (value tile, sequence, head),
   walks the chunks in order with the level states in a float32 scratch of its own, each
   scaled by a decay factor kept on chip (so that the decay of every state over a chunk is
   one multiplication of a vector): chunk n adds its active levels' part to the buffer and
   writes o; then, with p the trailing zeros of n + 1, the states of levels 1 .. p and H_n
   merge into level p + 1 (the reference's step).

Under WALK_LOCAL (by default when no input needs a gradient) the walk also forms each chunk's
own output (step 1's A V) and step 1's kernel is not launched: the forward in one kernel,
with no float32 buffer.

The backward is kernels/log_linear_attn/chunk_bwd.py; the forward keeps only its inputs.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels.common.utils import (MIN_TILE, check_launchable, chunk_bounds, chunk_index,
                                  chunk_layout, dot_mixed, dot_precision, finite_part,
                                  first_bad_row, load_rows, poison_rows, walk_bounds)
from kernels.log_linear_attn.chunk_bwd import chunk_backward
from kernels.log_linear_attn.stages import (chunk_gates, chunk_levels, chunk_total,
                                            decay_to_end, intra_weights, level_state,
                                            level_weights, merge_levels, own_state, walk_state,
                                            walk_tiles)
from references.operators import LOG_LINEAR, levels_needed

__all__ = ["chunk_log_linear_attn"]

BT = 64  # C, the chunk: levels 0 .. 6 inside it
MAX_DIM = 256  # K and V
BV = 64  # the value tile (utils.MIN_TILE: narrower tiles met Triton 3.6 miscompiles)

# Switch, off: the forward's walk forms each chunk's own state H_n from k and v itself, one
# [K, 64] x [64, 64] product a chunk more in the walk, instead of reading it from a float32
# [chunks, H, K, V] buffer the local kernel wrote (1.07 GB at B = 2, T = 32K, H = 16,
# K = V = 128). H200, bf16, B = 2, G = H = 16, K = V = 128 (reports/log_linear_attn.md): the
# forward 1.654 / 3.455 ms against 1.512 / 3.211 at 8K / 16K (+9%), its peak 206 / 400 MB
# against 462 / 912. Off: the forward's time.
WALK_STATES = False

# Switch: the forward in one kernel: the walk also forms each chunk's own output
# (own_output, as the local kernel would), and the local kernel is not launched. Neither the
# float32 buffer of the chunks' own outputs ([B, T, H, V]: 1.07 GB at B = 2, T = 32K,
# H = 16, V = 128) nor the chunks' states' is allocated, so the forward's extra peak is o and
# the walk's scratch; the products of the chunk's own pairs join the walk's programs (64 at
# B = 2, H = 16, V = 128) instead of a grid of their own. The same values, bit for bit (the
# same products, summed in the same order). H100, bf16, B = 2, G = 1, H = 16, K = V = 128,
# 2K / 8K / 16K / 32K (reports/log_linear_attn.md): the forward's extra peak 26 / 78 / 144 /
# 274 MB against 122 / 462 / 912 / 1810 (fla 48 / 193 / 386 / 772), its time 0.419 / 1.849 /
# 3.787 / 8.187 ms against 0.345 / 1.555 / 3.340 / 7.329 (+12-21%); fwd+bwd +5%, its peak
# the backward's either way. None (the default): the one kernel when no input needs a
# gradient (torch.no_grad, or none with requires_grad: inference), the two kernels when one
# does (their buffers are freed before the backward, which sets the peak); True or False:
# always or never.
WALK_LOCAL = None

# Switch, on: the same for the backward's dq walk (the local kernel then writes no H_n): the
# backward's float32 states are its largest buffer (1 GB at 32K, above). With WALK_STATES on
# for both, fwd+bwd took 1.2% longer at 8K on the H200 (the forward's 9% included).
BWD_WALK_STATES = True

# Switch, on: the backward's two walks (dq forward, dk and dv in reverse), independent of each
# other, in one launch side by side instead of one after the other: twice the programs at once
# (64 each at B = 2, H = 16, V = 128 on an H200's 132 SMs), both at 8 warps. H200, as above:
# fwd+bwd 6.303 / 13.273 ms against 7.959 / 16.856 (-21%). It holds a second scratch for the
# reverse walk's accumulators ([N H, levels, 128, 64] float32: 18 MB at B = 2, H = 16, 32K).
WALKS_TOGETHER = True

# How the walks and the chunks' own states multiply a float32 state, accumulator or decayed key
# with the inputs' half-precision rows (utils.dot_mixed): "split" keeps ~16 bits of the float32
# side in two products; "round" rounds it to the inputs' dtype in one. Rounded, dg drifted while
# its carry across chunks took the pairs of neighbouring chunks from both walks (float16, log
# gates uniform in [-0.1, 0], CPU: dg 1.34e-3 rounded against 2.17e-4 split at T = 4096). The
# carry now leaves those pairs out (chunk_bwd.py): 2.67e-4 against 2.24e-4 (dq, dk, dv 3.5e-4
# to 3.7e-4 either way). On the H200, "round" took 20-26% off fwd+bwd at 8K / 16K (bf16,
# reports/log_linear_attn.md), before that change; bfloat16's errors under it are not yet
# measured since. Float32 inputs: exact products either way.
WALK_MIXED = "split"


@triton.jit
def own_output(b_q, k, v, ls, b_b, tok0, i_g, i_h, o_c, m_t, o_k, o_v, scale, G: tl.constexpr,
               H: tl.constexpr, K: tl.constexpr, V: tl.constexpr, L: tl.constexpr,
               BT: tl.constexpr, C_BITS: tl.constexpr, PRECISION: tl.constexpr):
    """The chunk's own part of o, a [BT, BV] tile in float32 (step 1 of the module docstring):
    A V, A = scale (Q K^T) o exp(b_i - b_j) o level_scales[i, lvl(i, j)] on the lower
    triangle, from the chunk's q rows b_q and cumulative log gates b_b. A non-finite v_s
    reaches rows t >= s only (utils.finite_part: masks select)."""
    b_k = load_rows(k + (tok0 * G + i_g) * K, o_c, m_t, o_k, K, G)
    b_vv, b_bad = finite_part(tl.load(v + ((tok0 + o_c) * H + i_h)[:, None] * V + o_v[None, :],
                                      mask=m_t[:, None] & (o_v < V)[None, :], other=0.), True)
    b_w = intra_weights(ls, tok0, i_h, o_c, m_t, chunk_levels(o_c, C_BITS), H, L, C_BITS, BT)
    causal = (o_c[:, None] >= o_c[None, :]) & m_t[None, :]
    b_decay = tl.exp(tl.where(causal, b_b[:, None] - b_b[None, :], 0.).to(tl.float32))
    b_A = tl.where(causal, tl.dot(b_q, tl.trans(b_k), input_precision=PRECISION), 0.)
    b_A = b_A * b_decay * b_w * scale
    b_o = tl.dot(b_A.to(b_vv.dtype), b_vv, input_precision=PRECISION)
    return poison_rows(b_o, o_c, first_bad_row(b_bad, o_c, BT), True)


@triton.heuristics({'IS_VARLEN': lambda a: a['cu_seqlens'] is not None})
@triton.jit(do_not_specialize=['T'])
def chunk_log_linear_attn_fwd_local_kernel(
    q, k, v, g, ls, o_acc, hc, cu_seqlens, chunk_indices, scale, T, G: tl.constexpr,
    H: tl.constexpr, K: tl.constexpr, V: tl.constexpr, L: tl.constexpr, BK: tl.constexpr,
    BV: tl.constexpr, BT: tl.constexpr, C_BITS: tl.constexpr, PRECISION: tl.constexpr,
    MIXED: tl.constexpr, STATES_IN_WALK: tl.constexpr, IS_VARLEN: tl.constexpr,
):
    """One value tile, chunk and head: the chunk's own output (own_output) into o_acc, and its
    state unless the walk forms it (step 1 of the module docstring)."""
    i_c, i_v, i_bh = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    i_h = i_bh % H
    i_g = i_h // (H // G)
    bos, eos, i_t = chunk_bounds(cu_seqlens, chunk_indices, i_c, i_bh // H, T, BT, IS_VARLEN)
    tok0 = bos + i_t * BT
    o_c = tl.arange(0, BT)
    m_t = i_t * BT + o_c < eos - bos
    o_k = tl.arange(0, BK)
    o_v = i_v * BV + tl.arange(0, BV)
    # q and k rows of group i_g: tokens G rows apart (utils.load_rows's row step)
    b_q = load_rows(q + (tok0 * G + i_g) * K, o_c, m_t, o_k, K, G)
    b_b = chunk_gates(g, tok0, i_h, o_c, m_t, H)
    b_o = own_output(b_q, k, v, ls, b_b, tok0, i_g, i_h, o_c, m_t, o_k, o_v, scale, G, H, K, V,
                     L, BT, C_BITS, PRECISION)
    tl.store(o_acc + ((tok0 + o_c) * H + i_h)[:, None] * V + o_v[None, :], b_o,
             mask=m_t[:, None] & (o_v < V)[None, :])
    if not STATES_IN_WALK:  # H_n (b_last: the last real token's)
        b_f = decay_to_end(b_b, chunk_total(b_b, o_c, eos - bos - i_t * BT, BT), m_t)
        b_h = own_state(k + (tok0 * G + i_g) * K, v + (tok0 * H + i_h) * V, o_c, m_t, o_k, o_v,
                        b_f, K, V, G, H, PRECISION, MIXED)
        i_s = chunk_index(i_c, i_bh, i_t, T, H, BT, IS_VARLEN) * H + i_h
        tl.store(hc + (i_s * K + o_k[:, None]) * V + o_v[None, :], b_h,
                 mask=(o_k < K)[:, None] & (o_v < V)[None, :])


@triton.heuristics({'IS_VARLEN': lambda a: a['cu_seqlens'] is not None})
@triton.jit(do_not_specialize=['T'])
def chunk_log_linear_attn_fwd_levels_kernel(
    q, k, v, g, ls, o_acc, o, hc, sc, cu_seqlens, chunk_offsets, scale, T, G: tl.constexpr,
    H: tl.constexpr, K: tl.constexpr, V: tl.constexpr, L: tl.constexpr, BK: tl.constexpr,
    BV: tl.constexpr, BT: tl.constexpr, C_BITS: tl.constexpr, NL: tl.constexpr,
    BL: tl.constexpr, PRECISION: tl.constexpr, MIXED: tl.constexpr,
    STATES_IN_WALK: tl.constexpr, LOCAL_IN_WALK: tl.constexpr, IS_VARLEN: tl.constexpr,
):
    """One value tile, sequence and head: the chunks in order, the level states in the scratch
    sc [programs, NL, BK, BV] (step 2 of the module docstring); each chunk's own state read
    from hc, or formed here (STATES_IN_WALK); its own output read from o_acc, or formed here
    (LOCAL_IN_WALK)."""
    i_nh, i_v = tl.program_id(0), tl.program_id(1)
    i_h = i_nh % H
    i_g = i_h // (H // G)
    bos, eos, NT, c0 = walk_bounds(cu_seqlens, chunk_offsets, i_nh // H, T, BT, IS_VARLEN)
    o_c = tl.arange(0, BT)
    o_k, o_v, o_l, o_s, p_sc = walk_tiles(sc, i_nh, i_v, V, BK, BV, BL, NL)
    b_dec = tl.zeros([BL], dtype=tl.float32)  # each level state's decay since it was written
    for n in range(NT):
        tok0 = bos + n * BT
        m_t = n * BT + o_c < eos - bos
        p_o = ((tok0 + o_c) * H + i_h)[:, None] * V + o_v[None, :]
        m_o = m_t[:, None] & (o_v < V)[None, :]
        b_q = load_rows(q + (tok0 * G + i_g) * K, o_c, m_t, o_k, K, G)
        b_b = chunk_gates(g, tok0, i_h, o_c, m_t, H)
        b_e = tl.exp(b_b.to(tl.float32)) * scale  # exp(G_t - G_{nC - 1}) scale
        if LOCAL_IN_WALK:
            b_o = own_output(b_q, k, v, ls, b_b, tok0, i_g, i_h, o_c, m_t, o_k, o_v, scale, G,
                             H, K, V, L, BT, C_BITS, PRECISION)
        else:
            b_o = tl.load(o_acc + p_o, mask=m_o, other=0.)
        for l in range(1, NL + 1):  # the levels c + l whose bit l - 1 is set in n
            if ((n >> (l - 1)) & 1) == 1:
                b_S = level_state(p_sc, l, b_dec, o_l, o_s, BK, BV)
                b_l = level_weights(ls, tok0, i_h, o_c, m_t & (C_BITS + l < L), C_BITS + l, H,
                                    L)
                b_qs = dot_mixed(b_q, b_S, PRECISION, MIXED)
                b_o += (b_l * b_e)[:, None] * b_qs
        tl.store(o + p_o, b_o.to(o.dtype.element_ty), mask=m_o)
        # to chunk n + 1: every state decays by the chunk's gates; levels 1 .. p and H_n merge
        # into level p + 1 (p: trailing zeros of n + 1)
        b_H = walk_state(k, v, hc, b_b, tok0, c0 + n, i_g, i_h, o_c, m_t, o_k, o_v,
                         eos - bos - n * BT, K, V, G, H, BT, PRECISION, MIXED, STATES_IN_WALK)
        b_dec *= tl.exp(chunk_total(b_b, o_c, eos - bos - n * BT, BT).to(tl.float32))
        b_dec = merge_levels(p_sc, b_H, b_dec, n, o_l, o_s, BK, BV, NL)


def _levels_above(B: int, T: int, cu_seqlens: torch.Tensor | None) -> int:
    """NL, the levels above the chunk's that the longest sequence uses (at least 1)."""
    N = B if cu_seqlens is None else len(cu_seqlens) - 1
    longest = T if cu_seqlens is None else int(torch.diff(cu_seqlens).max()) if N else 0
    return max(1, levels_needed(triton.cdiv(longest, BT)) - 1)


def _forward(q, k, v, g, level_scales, scale, cu_seqlens, NL, states_in_walk, local_in_walk,
             mixed):
    """o of the module docstring's two kernels, or of the walk alone under local_in_walk
    (contiguous inputs, checked)."""
    states_in_walk = states_in_walk or local_in_walk
    B, T, G, K = q.shape
    H, V, L = v.shape[2], v.shape[3], level_scales.shape[-1]
    N, NT, chunk_indices, chunk_offsets = chunk_layout(B, T, cu_seqlens, BT)
    chunks = NT * (B if cu_seqlens is None else 1)
    BK = max(MIN_TILE, triton.next_power_of_2(K))
    NV = triton.cdiv(V, BV)
    f32 = {"dtype": torch.float32, "device": q.device}
    o_acc = torch.empty(0 if local_in_walk else B, T, H, V, **f32)
    hc = torch.empty(0 if states_in_walk else chunks, H, K, V, **f32)
    o = torch.empty_like(v)
    meta = dict(G=G, H=H, K=K, V=V, L=L, BK=BK, BV=BV, BT=BT, C_BITS=BT.bit_length() - 1,
                PRECISION=dot_precision(q.dtype), MIXED=mixed, STATES_IN_WALK=states_in_walk,
                num_warps=4)
    if NT:
        # grid axes 1 and 2 take at most 65535: chunks and sequences x heads go on axis 0
        if not local_in_walk:
            chunk_log_linear_attn_fwd_local_kernel[(NT, NV, B * H)](
                q, k, v, g, level_scales, o_acc, hc, cu_seqlens, chunk_indices, float(scale),
                T, **meta)
        sc = torch.empty(N * H * NV, NL, BK, BV, **f32)
        chunk_log_linear_attn_fwd_levels_kernel[(N * H, NV)](
            q, k, v, g, level_scales, o_acc, o, hc, sc, cu_seqlens, chunk_offsets,
            float(scale), T, NL=NL, BL=triton.next_power_of_2(NL), LOCAL_IN_WALK=local_in_walk,
            **meta)
    return o


class ChunkLogLinearAttnFunction(torch.autograd.Function):
    """Forward by _forward, keeping only the inputs; backward by
    kernels/log_linear_attn/chunk_bwd.py (which rebuilds the chunks' states)."""

    @staticmethod
    def forward(ctx, q, k, v, g, level_scales, scale, cu_seqlens, NL, local_in_walk):
        o = _forward(q, k, v, g, level_scales, scale, cu_seqlens, NL, WALK_STATES,
                     local_in_walk, WALK_MIXED)
        ctx.save_for_backward(q, k, v, g, level_scales, cu_seqlens)
        ctx.scale, ctx.NL = scale, NL
        ctx.switches = (BWD_WALK_STATES, WALKS_TOGETHER, WALK_MIXED)  # as the call ran
        return o

    @staticmethod
    def backward(ctx, do):
        q, k, v, g, level_scales, cu_seqlens = ctx.saved_tensors
        grads = chunk_backward(q, k, v, g, level_scales, do, ctx.scale, cu_seqlens, BT, BV,
                               ctx.NL, *ctx.switches)
        return (*grads, None, None, None, None)


def chunk_log_linear_attn(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor,
    level_scales: torch.Tensor,
    initial_state: torch.Tensor | None = None,
    output_final_state: bool = False,
    cu_seqlens: torch.Tensor | None = None,
    scale: float | None = 1.0,
) -> tuple[torch.Tensor, None]:
    """Log-linear attention (Triton), differentiable in q, k, v, g and level_scales. q, k
    [B,T,G,K]; v [B,T,H,V]; g [B,T,H] (log forget gates); level_scales [B,T,H,L]. Returns
    (o [B,T,H,V] in v's dtype, None). K, V <= 256; no initial or final state (OPERATORS.md)."""
    name = "chunk_log_linear_attn"
    args = dict(q=q, k=k, v=v, g=g, level_scales=level_scales, initial_state=initial_state,
                output_final_state=output_final_state, cu_seqlens=cu_seqlens, scale=scale)
    dims = LOG_LINEAR.validate(args)
    check_launchable(name, q)
    for what in ("K", "V"):
        if dims[what] > MAX_DIM:
            raise ValueError(f"{name}: {what} must be <= {MAX_DIM}, got {what}={dims[what]}")
    scale = LOG_LINEAR.resolve_scale(scale, dims)
    q, k, v, g, level_scales = (x.contiguous() for x in (q, k, v, g, level_scales))
    NL = _levels_above(dims["B"], dims["T"], cu_seqlens)
    local_in_walk = WALK_LOCAL
    if local_in_walk is None:  # one kernel for inference, two (faster) when training
        local_in_walk = not (torch.is_grad_enabled()
                             and any(x.requires_grad for x in (q, k, v, g, level_scales)))
    o = ChunkLogLinearAttnFunction.apply(q, k, v, g, level_scales, scale, cu_seqlens, NL,
                                         local_in_walk)
    return o, None
