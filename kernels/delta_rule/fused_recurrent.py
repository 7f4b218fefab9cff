"""Delta rule, fused recurrent form (docs/operators.md section 1): one pass over time, state on chip.

Forward. One program per (value tile, sequence, head) holds S [BK, BV] in float32 registers:

    p_t  = S_{t-1}^T k_t,   r_t = v_t - p_t,   v'_t = beta_t * r_t
    S_t  = S_{t-1} + k_t v'_t^T
    o_t  = S_t^T (scale q_t)

beta_t is one number per token ([B,T,H]) or one per value channel ([B,T,H,V]); either way the
columns of S evolve independently, so value tiles never talk to each other. When gradients are
needed the kernel also stores r_t (float32, [B,T,H,V]): with it S_t is rebuilt exactly as the
forward built it, and v is not needed again.

Backward. Write dX for d(loss)/dX, dS_t for the gradient reaching S_t (from o_t .. o_{T-1} and
from the final state), dS_T = d(final_state). S_t enters o_t, S_{t+1} (identity and p_{t+1}),
and v'_t enters S_t only, so, going backward from t = T-1 to 0:

    dS_t    += (scale q_t) do_t^T                    # o_t = S_t^T (scale q_t)
    dv'_t    = dS_t^T k_t                            # S_t = S_{t-1} + k_t v'_t^T
    dk_t     = dS_t v'_t  +  S_{t-1} dp_t            # outer product, and p_t = S_{t-1}^T k_t
    dv_t     = beta_t dv'_t                          # dr_t = beta_t dv'_t, and v_t enters r_t only
    dbeta_t  = sum_v dv'_t * r_t                     # per channel: dv'_t * r_t, no sum
    dp_t     = -beta_t dv'_t                         # r_t = v_t - p_t
    dS_{t-1} = dS_t + k_t dp_t^T                     # p_t = S_{t-1}^T k_t
    dq_t     = scale S_t do_t
    d(initial_state) = dS_{-1}

Two kernels, each a sweep with one [BK, BV] tile in registers (value tiles independent again):

(a) reverse sweep with dS: dv_t, dbeta_t, dp_t (float32) and the first term of dk_t;
    at the end dS_{-1} = d(initial_state);
(b) forward sweep rebuilding S from initial_state, k, beta and r: dq_t and the second term of
    dk_t (added to the first).

dq, dk and per-token dbeta sum over value channels. dq and dk go into one float32 [B, T, H, K]
buffer each: stored when there is one value tile, else atomically added (relaxed) from each
tile (a float32 sum of NV terms in whatever order the tiles arrive: not bit-reproducible, off
by an ulp of float32 at most per term); per-token dbeta writes a float32 partial per tile
into [.., cdiv(V, MIN_BV)] zeroed slots that PyTorch sums. dv and per-channel dbeta are complete
per tile. Both sweeps autotune their value tile and warps, as the forward does.

Every sweep loads token t+1's rows before token t's arithmetic (see _row). With
``use_qk_l2norm_in_kernel`` the autograd path normalises q and k with ``kernels.common.l2norm``
first (saving the normalised q, k and 1/||x||) and back-propagates dq, dk through it last; the
no-grad path (decoding) normalises inside the forward kernel, so a
call is one launch.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from references.operators import DELTA_RULE
from kernels.common.l2norm import MAX_D, l2norm_bwd, l2norm_fwd, l2norm_vec
from kernels.common.utils import add_row, check_launchable, nh_bucket, seq_bounds, tuning

__all__ = ["fused_recurrent_delta_rule", "fused_recurrent_delta_rule_fwd",
           "fused_recurrent_delta_rule_bwd"]

@triton.jit
def _row(x, i_tok, o_d, m_d, D: tl.constexpr):
    """Row i_tok (token * H + head) of a [.., H, D] tensor at columns o_d where m_d, else 0.
    The sweeps load every row a step ahead: a step's loads take ~1 us, its arithmetic 0.47 us
    (H100), so token t+1's loads go out before token t's arithmetic and wait behind it."""
    return tl.load(x + i_tok * D + o_d, mask=m_d, other=0.)


@triton.jit
def _beta(beta, i_tok, o_v, m_v, ok, V: tl.constexpr, BETA_PER_CHANNEL: tl.constexpr):
    """beta_t of row i_tok: [BV] per value channel, else a scalar (0 where not m_v / not ok)."""
    if BETA_PER_CHANNEL:
        return tl.load(beta + i_tok * V + o_v, mask=m_v & ok, other=0.)
    else:
        return tl.load(beta + i_tok, mask=ok, other=0.)


# Each sweep walks T steps, each a chain of two reductions over K and a rank-1 update (0.47 us
# on the H100 with the loads a step ahead): what fills the device is many programs in flight.
# Narrow value tiles (BV = 8, 16) multiply the programs when N * H is small; wide ones re-read
# q and k less when it is large. Tuned per (K, V, N*H bucket). The forward pins (BV 32, 1
# warp), the backward (BV 32, 4 warps: it holds dS or S and a step's temporaries) for numerics.
SWEEP_CONFIGS = [triton.Config({'BV': BV}, num_warps=num_warps)
                 for BV in (32, 16, 8) for num_warps in (1, 2, 4)]
MIN_BV = 8  # the narrowest value tile: the backward's per-token dbeta has a slot per tile
FWD_CONFIGS = tuning(SWEEP_CONFIGS)
BWD_CONFIGS = tuning(sorted(SWEEP_CONFIGS, key=lambda c: (c.kwargs['BV'], c.num_warps) != (32, 4)))


@triton.heuristics({
    'USE_INITIAL_STATE': lambda a: a['h0'] is not None,
    'STORE_FINAL_STATE': lambda a: a['ht'] is not None,
    'SAVE_R': lambda a: a['r'] is not None,
    'IS_VARLEN': lambda a: a['cu_seqlens'] is not None,
})
@triton.autotune(configs=FWD_CONFIGS, key=['K', 'V', 'NH_BUCKET', 'SAVE_R'])
@triton.jit(do_not_specialize=['T'])
def fused_recurrent_delta_rule_fwd_kernel(
    q, k, v, beta, o, r, h0, ht, cu_seqlens, scale, T, NH_BUCKET,
    H: tl.constexpr, K: tl.constexpr, V: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
    BETA_PER_CHANNEL: tl.constexpr, USE_QK_L2NORM: tl.constexpr, USE_INITIAL_STATE: tl.constexpr,
    STORE_FINAL_STATE: tl.constexpr, SAVE_R: tl.constexpr, IS_VARLEN: tl.constexpr,
):
    i_v, i_nh = tl.program_id(0), tl.program_id(1)
    i_n, i_h = i_nh // H, i_nh % H
    bos, eos = seq_bounds(cu_seqlens, i_n, T, IS_VARLEN)
    o_k = tl.arange(0, BK)
    o_v = i_v * BV + tl.arange(0, BV)
    m_k, m_v = o_k < K, o_v < V
    m_h = m_k[:, None] & m_v[None, :]
    o_h = i_nh.to(tl.int64) * K * V + o_k[:, None] * V + o_v[None, :]

    # S [BK, BV]
    b_h = tl.zeros([BK, BV], dtype=tl.float32)
    if USE_INITIAL_STATE:
        b_h += tl.load(h0 + o_h, mask=m_h, other=0.)
    L = eos - bos
    i_tok = bos * H + i_h
    ok = L > 0
    # token t's inputs, in their own dtype, loaded a step ahead (see _row)
    b_q, b_k = _row(q, i_tok, o_k, m_k & ok, K), _row(k, i_tok, o_k, m_k & ok, K)
    b_v, b_beta = _row(v, i_tok, o_v, m_v & ok, V), _beta(beta, i_tok, o_v, m_v, ok, V,
                                                          BETA_PER_CHANNEL)
    for i_t in range(0, L):
        # the next token's row (the last step loads its own again)
        i_nxt = (bos + tl.minimum(i_t + 1, L - 1)) * H + i_h
        n_q, n_k = _row(q, i_nxt, o_k, m_k, K), _row(k, i_nxt, o_k, m_k, K)
        n_v, n_beta = _row(v, i_nxt, o_v, m_v, V), _beta(beta, i_nxt, o_v, m_v, ok, V,
                                                         BETA_PER_CHANNEL)
        b_kf, b_qs = b_k.to(tl.float32), b_q.to(tl.float32)
        if USE_QK_L2NORM:
            b_qs, b_kf = l2norm_vec(b_qs), l2norm_vec(b_kf)
        b_qs = b_qs * scale
        # r_t = v_t - S_{t-1}^T k_t;  S_t = S_{t-1} + k_t (beta_t r_t)^T;  o_t = S_t^T (scale q_t)
        b_r = b_v.to(tl.float32) - tl.sum(b_h * b_kf[:, None], 0)
        b_h += b_kf[:, None] * (b_beta.to(tl.float32) * b_r)[None, :]
        b_o = tl.sum(b_h * b_qs[:, None], 0)
        tl.store(o + i_tok * V + o_v, b_o.to(o.dtype.element_ty), mask=m_v)
        if SAVE_R:
            tl.store(r + i_tok * V + o_v, b_r, mask=m_v)
        b_q, b_k, b_v, b_beta, i_tok = n_q, n_k, n_v, n_beta, i_nxt
    if STORE_FINAL_STATE:
        tl.store(ht + o_h, b_h, mask=m_h)


@triton.heuristics({
    'USE_FINAL_STATE_GRADIENT': lambda a: a['dht'] is not None,
    'STORE_INITIAL_STATE_GRADIENT': lambda a: a['dh0'] is not None,
    'IS_VARLEN': lambda a: a['cu_seqlens'] is not None,
})
# autotuning runs the kernel once per config: dk's atomic sum and dbeta's slots start at zero
@triton.autotune(configs=BWD_CONFIGS, key=['K', 'V', 'NH_BUCKET', 'BETA_PER_CHANNEL'],
                 reset_to_zero=['dk', 'dbeta'])
@triton.jit(do_not_specialize=['T'])
def fused_recurrent_delta_rule_bwd_dh_kernel(
    q, k, r, beta, do, dht, dh0, dp, dk, dv, dbeta, cu_seqlens, scale, T, NH_BUCKET,
    H: tl.constexpr, K: tl.constexpr, V: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
    NV_SLOTS: tl.constexpr,
    BETA_PER_CHANNEL: tl.constexpr, USE_FINAL_STATE_GRADIENT: tl.constexpr,
    STORE_INITIAL_STATE_GRADIENT: tl.constexpr, IS_VARLEN: tl.constexpr,
):
    """(a) the reverse sweep: dS from d(final_state) down to d(initial_state)."""
    i_v, i_nh = tl.program_id(0), tl.program_id(1)
    i_n, i_h = i_nh // H, i_nh % H
    NV: tl.constexpr = (V + BV - 1) // BV
    bos, eos = seq_bounds(cu_seqlens, i_n, T, IS_VARLEN)
    o_k = tl.arange(0, BK)
    o_v = i_v * BV + tl.arange(0, BV)
    m_k, m_v = o_k < K, o_v < V
    m_h = m_k[:, None] & m_v[None, :]
    o_h = i_nh.to(tl.int64) * K * V + o_k[:, None] * V + o_v[None, :]

    # dS [BK, BV]
    b_dh = tl.zeros([BK, BV], dtype=tl.float32)
    if USE_FINAL_STATE_GRADIENT:
        b_dh += tl.load(dht + o_h, mask=m_h, other=0.)
    L = eos - bos
    ok = L > 0
    i_tok = (eos - 1) * H + i_h
    # token t's rows, loaded a step ahead (t runs backward)
    b_q, b_k = _row(q, i_tok, o_k, m_k & ok, K), _row(k, i_tok, o_k, m_k & ok, K)
    b_r, b_do = _row(r, i_tok, o_v, m_v & ok, V), _row(do, i_tok, o_v, m_v & ok, V)
    b_beta = _beta(beta, i_tok, o_v, m_v, ok, V, BETA_PER_CHANNEL)
    for i_t in range(0, L):
        i_nxt = (eos - 1 - tl.minimum(i_t + 1, L - 1)) * H + i_h
        n_q, n_k = _row(q, i_nxt, o_k, m_k, K), _row(k, i_nxt, o_k, m_k, K)
        n_r, n_do = _row(r, i_nxt, o_v, m_v, V), _row(do, i_nxt, o_v, m_v, V)
        n_beta = _beta(beta, i_nxt, o_v, m_v, ok, V, BETA_PER_CHANNEL)
        b_kf, b_betaf = b_k.to(tl.float32), b_beta.to(tl.float32)
        # dS_t += (scale q_t) do_t^T
        b_dh += (b_q.to(tl.float32) * scale)[:, None] * b_do.to(tl.float32)[None, :]
        # dk_t (first term) = dS_t v'_t;  dv'_t = dS_t^T k_t
        b_dk = tl.sum(b_dh * (b_betaf * b_r)[None, :], 1)
        b_dvn = tl.sum(b_dh * b_kf[:, None], 0)
        if BETA_PER_CHANNEL:
            tl.store(dbeta + i_tok * V + o_v, (b_dvn * b_r).to(dbeta.dtype.element_ty), mask=m_v)
        else:
            tl.store(dbeta + i_tok * NV_SLOTS + i_v, tl.sum(b_dvn * b_r))
        b_dv = b_betaf * b_dvn
        tl.store(dv + i_tok * V + o_v, b_dv.to(dv.dtype.element_ty), mask=m_v)
        tl.store(dp + i_tok * V + o_v, -b_dv, mask=m_v)
        add_row(dk + i_tok * K + o_k, b_dk, m_k, NV)
        # dS_{t-1} = dS_t + k_t dp_t^T
        b_dh -= b_kf[:, None] * b_dv[None, :]
        b_q, b_k, b_r, b_do, b_beta, i_tok = n_q, n_k, n_r, n_do, n_beta, i_nxt
    if STORE_INITIAL_STATE_GRADIENT:
        tl.store(dh0 + o_h, b_dh, mask=m_h)


@triton.heuristics({
    'USE_INITIAL_STATE': lambda a: a['h0'] is not None,
    'IS_VARLEN': lambda a: a['cu_seqlens'] is not None,
})
# autotuning runs the kernel once per config: dq's atomic sum starts at zero, dk at sweep (a)'s
@triton.autotune(configs=BWD_CONFIGS, key=['K', 'V', 'NH_BUCKET', 'BETA_PER_CHANNEL'],
                 reset_to_zero=['dq'], restore_value=['dk'])
@triton.jit(do_not_specialize=['T'])
def fused_recurrent_delta_rule_bwd_dqk_kernel(
    k, r, beta, do, dp, h0, dq, dk, cu_seqlens, scale, T, NH_BUCKET,
    H: tl.constexpr, K: tl.constexpr, V: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
    BETA_PER_CHANNEL: tl.constexpr, USE_INITIAL_STATE: tl.constexpr, IS_VARLEN: tl.constexpr,
):
    """(b) the forward sweep rebuilding S: dq_t = scale S_t do_t, dk_t += S_{t-1} dp_t."""
    i_v, i_nh = tl.program_id(0), tl.program_id(1)
    i_n, i_h = i_nh // H, i_nh % H
    NV: tl.constexpr = (V + BV - 1) // BV
    bos, eos = seq_bounds(cu_seqlens, i_n, T, IS_VARLEN)
    o_k = tl.arange(0, BK)
    o_v = i_v * BV + tl.arange(0, BV)
    m_k, m_v = o_k < K, o_v < V
    m_h = m_k[:, None] & m_v[None, :]

    # S [BK, BV]
    b_h = tl.zeros([BK, BV], dtype=tl.float32)
    if USE_INITIAL_STATE:
        b_h += tl.load(h0 + i_nh.to(tl.int64) * K * V + o_k[:, None] * V + o_v[None, :],
                       mask=m_h, other=0.)
    L = eos - bos
    ok = L > 0
    i_tok = bos * H + i_h
    # token t's rows, loaded a step ahead
    b_k, b_r = _row(k, i_tok, o_k, m_k & ok, K), _row(r, i_tok, o_v, m_v & ok, V)
    b_do, b_dp = _row(do, i_tok, o_v, m_v & ok, V), _row(dp, i_tok, o_v, m_v & ok, V)
    b_beta = _beta(beta, i_tok, o_v, m_v, ok, V, BETA_PER_CHANNEL)
    for i_t in range(0, L):
        i_nxt = (bos + tl.minimum(i_t + 1, L - 1)) * H + i_h
        n_k, n_r = _row(k, i_nxt, o_k, m_k, K), _row(r, i_nxt, o_v, m_v, V)
        n_do, n_dp = _row(do, i_nxt, o_v, m_v, V), _row(dp, i_nxt, o_v, m_v, V)
        n_beta = _beta(beta, i_nxt, o_v, m_v, ok, V, BETA_PER_CHANNEL)
        # dk_t += S_{t-1} dp_t
        tl.atomic_add(dk + i_tok * K + o_k, tl.sum(b_h * b_dp[None, :], 1), mask=m_k,
                      sem="relaxed")
        # S_t = S_{t-1} + k_t (beta_t r_t)^T;  dq_t = scale S_t do_t
        b_h += b_k.to(tl.float32)[:, None] * (b_beta.to(tl.float32) * b_r)[None, :]
        b_dq = tl.sum(b_h * b_do.to(tl.float32)[None, :], 1) * scale
        add_row(dq + i_tok * K + o_k, b_dq, m_k, NV)
        b_k, b_r, b_do, b_dp, b_beta, i_tok = n_k, n_r, n_do, n_dp, n_beta, i_nxt


def _num_sequences(B: int, cu_seqlens: torch.Tensor | None) -> int:
    return B if cu_seqlens is None else cu_seqlens.numel() - 1


def fused_recurrent_delta_rule_fwd(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, beta: torch.Tensor, scale: float,
    initial_state: torch.Tensor | None, output_final_state: bool, use_qk_l2norm: bool = False,
    cu_seqlens: torch.Tensor | None = None, save_r: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """Launch the forward kernel on contiguous inputs; returns o, r (if save_r) and the final state."""
    B, T, H, K = q.shape
    V = v.shape[-1]
    N = _num_sequences(B, cu_seqlens)
    BK = triton.next_power_of_2(K)
    o = torch.empty_like(v)
    r = torch.empty(B, T, H, V, dtype=torch.float32, device=v.device) if save_r else None
    ht = torch.empty(N, H, K, V, dtype=torch.float32, device=v.device) if output_final_state else None
    grid = lambda meta: (triton.cdiv(V, meta['BV']), N * H)  # noqa: E731
    fused_recurrent_delta_rule_fwd_kernel[grid](
        q, k, v, beta, o, r, initial_state, ht, cu_seqlens, scale, T,
        nh_bucket(N, H), H=H, K=K, V=V, BK=BK,
        BETA_PER_CHANNEL=beta.dim() == 4, USE_QK_L2NORM=use_qk_l2norm,
    )
    return o, r, ht


def fused_recurrent_delta_rule_bwd(
    q: torch.Tensor, k: torch.Tensor, r: torch.Tensor, beta: torch.Tensor, scale: float,
    initial_state: torch.Tensor | None, do: torch.Tensor, dht: torch.Tensor | None,
    cu_seqlens: torch.Tensor | None = None,
) -> tuple[torch.Tensor, ...]:
    """Both backward sweeps. Returns dq, dk (float32, normalised q/k's gradients), dv, dbeta
    (their inputs' dtypes) and d(initial_state) (float32, or None without an initial state)."""
    B, T, H, K = q.shape
    V = r.shape[-1]
    N = _num_sequences(B, cu_seqlens)
    BK, slots = triton.next_power_of_2(K), triton.cdiv(V, MIN_BV)
    per_channel = beta.dim() == 4
    dp = torch.empty_like(r)
    # dq, dk: float32 sums over the value tiles (zeroed: atomic adds when there are several);
    # per-token dbeta: one float32 slot per value tile (as many as the narrowest tiling has)
    dq = torch.zeros(B, T, H, K, dtype=torch.float32, device=q.device)
    dk = torch.zeros(B, T, H, K, dtype=torch.float32, device=q.device)
    dv = torch.empty_like(do)
    dbeta = torch.empty_like(beta) if per_channel else \
        torch.zeros(B, T, H, slots, dtype=torch.float32, device=q.device)
    dh0 = torch.empty_like(initial_state, dtype=torch.float32) if initial_state is not None else None
    grid = lambda meta: (triton.cdiv(V, meta['BV']), N * H)  # noqa: E731
    bucket = nh_bucket(N, H)
    fused_recurrent_delta_rule_bwd_dh_kernel[grid](
        q, k, r, beta, do, dht, dh0, dp, dk, dv, dbeta, cu_seqlens, scale, T, bucket,
        H=H, K=K, V=V, BK=BK, NV_SLOTS=slots, BETA_PER_CHANNEL=per_channel,
    )
    fused_recurrent_delta_rule_bwd_dqk_kernel[grid](
        k, r, beta, do, dp, initial_state, dq, dk, cu_seqlens, scale, T, bucket,
        H=H, K=K, V=V, BK=BK, BETA_PER_CHANNEL=per_channel,
    )
    dbeta = dbeta if per_channel else dbeta.sum(-1).to(beta.dtype)
    return dq, dk, dv, dbeta, dh0


class FusedRecurrentDeltaRuleFunction(torch.autograd.Function):

    @staticmethod
    def forward(ctx, q, k, v, beta, scale, initial_state, output_final_state, use_qk_l2norm,
                cu_seqlens):
        q_rstd = k_rstd = None
        if use_qk_l2norm:
            (q, q_rstd), (k, k_rstd) = l2norm_fwd(q), l2norm_fwd(k)
        o, r, ht = fused_recurrent_delta_rule_fwd(q, k, v, beta, scale, initial_state,
                                                  output_final_state, False, cu_seqlens, True)
        # the normalised q, k (and 1/||x||), beta, r and initial_state rebuild every S_t
        ctx.save_for_backward(q, k, q_rstd, k_rstd, r, beta, initial_state, cu_seqlens)
        ctx.scale, ctx.v_dtype = scale, v.dtype
        return o, ht

    @staticmethod
    def backward(ctx, do, dht):
        q, k, q_rstd, k_rstd, r, beta, initial_state, cu_seqlens = ctx.saved_tensors
        do = do.contiguous().to(ctx.v_dtype)
        dht = None if dht is None else dht.contiguous().float()
        dq, dk, dv, dbeta, dh0 = fused_recurrent_delta_rule_bwd(
            q, k, r, beta, ctx.scale, initial_state, do, dht, cu_seqlens)
        if q_rstd is not None:
            dq, dk = l2norm_bwd(q, q_rstd, dq), l2norm_bwd(k, k_rstd, dk)
        return dq.to(q.dtype), dk.to(k.dtype), dv, dbeta, None, dh0, None, None, None


def fused_recurrent_delta_rule(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    beta: torch.Tensor,
    scale: float | None = None,
    initial_state: torch.Tensor | None = None,
    output_final_state: bool = False,
    use_qk_l2norm_in_kernel: bool = False,
    cu_seqlens: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    r"""The delta rule, one pass over time with the state on chip (docs/operators.md section 1).

    Args:
        q, k: ``[B, T, H, K]``, K <= 256.  v: ``[B, T, H, V]`` (q, k, v share one dtype).
        beta: ``[B, T, H]`` (per token) or ``[B, T, H, V]`` (per value channel).
        scale: multiplies q before the read-out; ``None`` means ``K ** -0.5``.
        initial_state: ``[N, H, K, V]`` float32 (N = B, or the number of sequences).
        output_final_state: also return the state after the last token, ``[N, H, K, V]`` float32.
        use_qk_l2norm_in_kernel: normalise q and k to unit L2 norm along K first.
        cu_seqlens: ``[N + 1]`` int64 offsets of packed sequences (then B == 1).

    Returns:
        ``o [B, T, H, V]`` in v's dtype, and the final state or None.
    """
    dims = DELTA_RULE.validate(locals())  # the call's own arguments, before anything else
    check_launchable("fused_recurrent_delta_rule", q)
    if dims["K"] > MAX_D:
        raise ValueError(f"fused_recurrent_delta_rule: K={dims['K']} exceeds {MAX_D} (the state "
                         f"tile [K, BV] is held in registers)")
    scale = DELTA_RULE.resolve_scale(scale, dims)
    q, k, v, beta = (x.contiguous() for x in (q, k, v, beta))
    if initial_state is not None:
        initial_state = initial_state.contiguous()
    if cu_seqlens is not None:
        cu_seqlens = cu_seqlens.contiguous()
    tensors = (q, k, v, beta, initial_state)
    if torch.is_grad_enabled() and any(x is not None and x.requires_grad for x in tensors):
        return FusedRecurrentDeltaRuleFunction.apply(
            q, k, v, beta, scale, initial_state, output_final_state, use_qk_l2norm_in_kernel,
            cu_seqlens)
    # no gradients (e.g. decoding T = 1 with a carried state): one launch, l2norm fused
    o, _, ht = fused_recurrent_delta_rule_fwd(q, k, v, beta, scale, initial_state,
                                              output_final_state, use_qk_l2norm_in_kernel,
                                              cu_seqlens)
    return o, ht
