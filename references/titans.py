"""Titans (neural long-term memory, linear memory), docs/operators.md section 4: the exact references.

The memory ``M: [D, D]`` of one (sequence, head) is trained at test time on
``l_t(M) = ||w * LN(k_t M) + b - (v_t - k_t)||^2`` with momentum S and forgetting; the gradient
of every token is taken at ``M'``, the memory held at the start of its mini-batch:

    grad_t = 2 * k_t^T g_t,   g_t = d(0.5 ||w * LN(z) + b - (v_t - k_t)||^2) / dz at z = k_t M'
    S_t    = eta_t * S_{t-1} - theta_t * grad_t
    M_t    = (1 - alpha_t) * M_{t-1} + S_t
    u_t    = (scale q_t) M_t
    o_t    = u_t + w * LN(u_t) + b

(g_t is TTT's LayerNorm backward, ``references._layernorm``; the inner model has no bias.)

``naive_titans_linear`` is this, token by token: the ground truth. ``chunk_titans_linear_ref``
is the matrix form of one mini-batch. Number the mini-batch's tokens 1..C and let position 0
hold the state carried in, ``M_0 = M'`` and ``S_0``. With ``a_r = 1 - alpha_r``, define

    A[t, s] = prod_{s < r <= t} a_r,     E[s, j] = prod_{j < r <= s} eta_r     (0 <= j, s, t <= C)

(lower triangular, ones on the diagonal: ``segprod`` over C + 1 positions with a dummy factor
at position 0, which no product uses). Unrolling the two recurrences:

    S_s = E[s, 0] S_0 - sum_{1<=j<=s} E[s, j] theta_j grad_j
    M_t = A[t, 0] M_0 + sum_{1<=s<=t} A[t, s] S_s
        = A[t, 0] M_0 + P[t, 0] S_0 - sum_{1<=j<=t} P[t, j] theta_j grad_j

with ``P[t, j] = sum_{1<=s<=t} A[t, s] E[s, j]``, i.e. ``P = A[1:, 1:] @ E[1:, :]`` (E[s, j] = 0
for s < j, so the sum runs over j <= s <= t). All the grad_j come at once, since they are taken
at M_0: stacking rows ``Q~ = scale Q``, ``K``, and ``G`` (rows ``2 g_j``, so grad_j = k_j^T G_j),

    Z = K M_0,   G = 2 * ln_recon_grad(Z, V - K)
    U = A[1:, 0] * (Q~ M_0) + P[:, 0] * (Q~ S_0) - ((P[:, 1:] * theta^T) ⊙ (Q~ K^T)) @ G
    O = U + w * LN(U) + b
    M <- A[C, 0] M_0 + P[C, 0] S_0 - K^T diag(P[C, 1:] * theta) G
    S <- E[C, 0] S_0 - K^T diag(E[C, 1:] * theta) G

where ``A[1:, 0]`` and ``P[:, 0]`` scale the rows. (P[:, 1:] is lower triangular, so no mask
is needed.) docs/operators.md asks the chunked form to keep the gate products out of 0/0 and
overflow ("log space"); ``segprod`` meets that by multiplying the factors themselves, never
dividing cumulative products: products underflow to an exact 0, and a factor of exactly 0
(alpha = 1 or eta = 0) keeps a finite, correct gradient where a log would give nan.
"""

from __future__ import annotations

import torch

from references.operators import TITANS
from references._common import map_sequences, per_chunk, per_step, segprod, state_dtype
from references._layernorm import ln_recon_grad, ln_residual

__all__ = ["naive_titans_linear", "chunk_titans_linear_ref"]

_TOKENS = ("q", "k", "v", "theta", "alpha", "eta")


def _prepare(q, k, v, w, b, theta, alpha, eta, scale, eps, chunk_size, initial_state,
             initial_momentum, output_final_state, cu_seqlens):
    args = dict(
        q=q, k=k, v=v, w=w, b=b, theta=theta, alpha=alpha, eta=eta, scale=scale, eps=eps,
        chunk_size=chunk_size, initial_state=initial_state, initial_momentum=initial_momentum,
        output_final_state=output_final_state, cu_seqlens=cu_seqlens,
    )
    dims = TITANS.validate(args)
    TITANS.check_values(args)  # the values' domains too (positive log gates...)
    acc = state_dtype(v.dtype)
    return dims, TITANS.resolve_scale(scale, dims), acc, w.to(acc), b.to(acc)


def _initial(st, H, D, acc, device):
    """The memory M and momentum S, each ``[H, D, D]``, a sequence starts from."""
    return tuple(
        torch.zeros(H, D, D, dtype=acc, device=device) if st[n] is None else st[n].to(acc)
        for n in ("M", "S")
    )


def _run(one_sequence, dims, tokens, v, initial_state, initial_momentum, output_final_state,
         cu_seqlens):
    o, finals = map_sequences(one_sequence, dims["B"], dims["T"], cu_seqlens, tokens,
                              {"M": initial_state, "S": initial_momentum})
    if not output_final_state:
        return o.to(v.dtype), None, None
    return o.to(v.dtype), finals["M"], finals["S"]


def naive_titans_linear(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    w: torch.Tensor,
    b: torch.Tensor,
    theta: torch.Tensor,
    alpha: torch.Tensor,
    eta: torch.Tensor,
    scale: float | None = None,
    eps: float = 1e-6,
    chunk_size: int = 16,
    initial_state: torch.Tensor | None = None,
    initial_momentum: torch.Tensor | None = None,
    output_final_state: bool = False,
    cu_seqlens: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """Titans token by token. q, k, v: [B,T,H,D]; w, b: [H,D]; theta, alpha, eta: [B,T,H];
    initial_state, initial_momentum: [N,H,D,D]. Returns o [B,T,H,D] and the final memory and
    momentum [N,H,D,D] (None, None unless output_final_state)."""
    dims, scale, acc, w, b = _prepare(q, k, v, w, b, theta, alpha, eta, scale, eps, chunk_size,
                                      initial_state, initial_momentum, output_final_state,
                                      cu_seqlens)
    H, D = dims["H"], dims["D"]

    def one_sequence(x, st):
        M, S = _initial(st, H, D, acc, v.device)
        steps = per_step({n: x[n].to(acc) for n in _TOKENS})
        q_, k_, v_, theta_, alpha_, eta_ = (steps[n] for n in _TOKENS)  # T_n x [H,D] / [H]
        outs = []
        for start in range(0, len(v_), chunk_size):
            M_start = M  # M': the gradients of this mini-batch are taken here
            for t in range(start, min(start + chunk_size, len(v_))):
                z_t = torch.einsum("hk,hkd->hd", k_[t], M_start)
                g_t = ln_recon_grad(z_t, v_[t] - k_[t], w, b, eps)
                grad_t = 2 * torch.einsum("hk,hd->hkd", k_[t], g_t)
                S = eta_[t][:, None, None] * S - theta_[t][:, None, None] * grad_t
                M = (1 - alpha_[t])[:, None, None] * M + S
                u_t = torch.einsum("hk,hkd->hd", scale * q_[t], M)
                outs.append(ln_residual(u_t, w, b, eps))  # o_t = u_t + w * LN(u_t) + b
        o = torch.stack(outs, 0) if outs else v.new_zeros(0, H, D, dtype=acc)
        return o, {"M": M, "S": S}

    return _run(one_sequence, dims, dict(zip(_TOKENS, (q, k, v, theta, alpha, eta))), v,
                initial_state, initial_momentum, output_final_state, cu_seqlens)


def mini_batch(Q, Kc, Vc, th, al, et, M, S, scale, w_, b_, eps):
    """One mini-batch of the matrix form: (its outputs [H, C, D], the memory and momentum after
    it), from rows Q, Kc, Vc [H, C, D], gates th, al, et [H, C] and the M, S [H, D, D] it
    starts from; w_, b_ [H, 1, D]."""
    Kt = Kc.transpose(1, 2)
    G = 2 * ln_recon_grad(Kc @ M, Vc - Kc, w_, b_, eps)  # grad_j = k_j^T G_j, at M_0
    # position 0: the carried state
    pad = torch.ones(Q.shape[0], 1, dtype=Q.dtype, device=Q.device)
    A = segprod(torch.cat([pad, 1 - al], -1))  # [H, C+1, C+1]
    E = segprod(torch.cat([pad, et], -1))
    P = A[:, 1:, 1:] @ E[:, 1:, :]  # [H, C, C+1]
    Qs = scale * Q
    U = (A[:, 1:, :1] * (Qs @ M) + P[:, :, :1] * (Qs @ S)
         - ((P[:, :, 1:] * th[:, None, :]) * (Qs @ Kt)) @ G)
    return (ln_residual(U, w_, b_, eps),
            A[:, -1, 0, None, None] * M + P[:, -1, 0, None, None] * S
            - Kt @ ((P[:, -1, 1:] * th)[..., None] * G),
            E[:, -1, 0, None, None] * S - Kt @ ((E[:, -1, 1:] * th)[..., None] * G))


def chunk_titans_linear_ref(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    w: torch.Tensor,
    b: torch.Tensor,
    theta: torch.Tensor,
    alpha: torch.Tensor,
    eta: torch.Tensor,
    scale: float | None = None,
    eps: float = 1e-6,
    chunk_size: int = 16,
    initial_state: torch.Tensor | None = None,
    initial_momentum: torch.Tensor | None = None,
    output_final_state: bool = False,
    cu_seqlens: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """The matrix form, one mini-batch at a time; same arguments and results as the naive form."""
    dims, scale, acc, w, b = _prepare(q, k, v, w, b, theta, alpha, eta, scale, eps, chunk_size,
                                      initial_state, initial_momentum, output_final_state,
                                      cu_seqlens)
    H, D = dims["H"], dims["D"]
    w_, b_ = w[:, None], b[:, None]  # [H, 1, D], broadcast over the mini-batch

    def one_sequence(x, st):
        M, S = _initial(st, H, D, acc, v.device)
        outs = []
        x = per_chunk(x, chunk_size)
        for c in range(len(x["v"])):
            # Q, Kc, Vc: [H, C, D]; th, al, et: [H, C]
            rows = tuple(x[n][c].to(acc).transpose(0, 1) for n in _TOKENS)
            o, M, S = mini_batch(*rows, M, S, scale, w_, b_, eps)
            outs.append(o)
        o = torch.cat(outs, 1).transpose(0, 1) if outs else v.new_zeros(0, H, D, dtype=acc)
        return o, {"M": M, "S": S}

    return _run(one_sequence, dims, dict(zip(_TOKENS, (q, k, v, theta, alpha, eta))), v,
                initial_state, initial_momentum, output_final_state, cu_seqlens)
