"""TTT-Linear, docs/operators.md section 3: the exact references.

The inner model of one (sequence, head) is ``z = x W + hb`` (``W: [D, D]``, ``hb: [1, D]``),
trained at test time on the reconstruction loss ``0.5 * ||w * LN(k W + hb) + b - (v - k)||^2``
with one gradient step per mini-batch of ``chunk_size`` tokens, the gradients of the whole
mini-batch taken at the weights ``W, hb`` held at its start. For the tokens j of a mini-batch

    z_j  = k_j W + hb
    g_j  = d(0.5 ||w * LN(z_j) + b - (v_j - k_j)||^2) / d z_j          (references._layernorm)

and for each token i of it (sums over j <= i inside the mini-batch)

    W_i  = W  - eta_i * sum_j k_j^T g_j
    hb_i = hb - eta_i * sum_j g_j
    u_i  = (scale q_i) W_i + hb_i
    o_i  = u_i + w * LN(u_i) + b

then ``W, hb <- W_last, hb_last``. The last mini-batch of a sequence holds only its real tokens.

``naive_ttt_linear`` is this, token by token: the ground truth. ``chunk_ttt_linear_ref`` is the
dual form, one mini-batch of C tokens at a time with matrix products. Stack the mini-batch's
rows: ``Q, K, V, G: [C, D]``, ``eta: [C, 1]``, and write ``Q~ = scale Q``. Since the g_j
depend only on ``W, hb`` (not on the W_i), all of them come at once:

    Z = K W + 1 hb,    G = ln_recon_grad(Z, V - K)

Substituting ``W_i`` and ``hb_i`` into ``u_i``:

    u_i = q~_i W + hb - eta_i * sum_{j<=i} (q~_i . k_j) g_j - eta_i * sum_{j<=i} g_j
        = q~_i W + hb - eta_i * sum_j (tril(Q~ K^T) + tril(1))[i, j] g_j

so that, with ``tril(1)`` the lower-triangular matrix of ones (which forms the running sums
of the bias gradients) and ``eta`` broadcast along the rows,

    U   = Q~ W + 1 hb - eta * ((tril(Q~ K^T) + tril(1)) @ G)
    O   = U + w * LN(U) + b
    W  <- W  - eta_last * K^T G
    hb <- hb - eta_last * 1^T G

The W_i, each ``[D, D]``, are never formed: memory is O(C^2 + D^2) per mini-batch.
"""

from __future__ import annotations

import torch

from references.operators import TTT
from references._common import map_sequences, per_chunk, per_step, state_dtype
from references._layernorm import ln_recon_grad, ln_residual

__all__ = ["naive_ttt_linear", "chunk_ttt_linear_ref"]


def _prepare(q, k, v, w, b, eta, scale, eps, chunk_size, initial_state, initial_state_bias,
             output_final_state, cu_seqlens):
    args = dict(
        q=q, k=k, v=v, w=w, b=b, eta=eta, scale=scale, eps=eps, chunk_size=chunk_size,
        initial_state=initial_state, initial_state_bias=initial_state_bias,
        output_final_state=output_final_state, cu_seqlens=cu_seqlens,
    )
    dims = TTT.validate(args)
    TTT.check_values(args)  # the values' domains too (positive log gates...)
    acc = state_dtype(v.dtype)
    return dims, TTT.resolve_scale(scale, dims), acc, w.to(acc), b.to(acc)


def _initial(st, H, D, acc, device):
    """The weights ``W: [H, D, D]`` and bias ``hb: [H, D]`` a sequence starts from."""
    W = torch.zeros(H, D, D, dtype=acc, device=device) if st["W"] is None else st["W"].to(acc)
    hb = torch.zeros(H, D, dtype=acc, device=device) if st["hb"] is None else st["hb"].to(acc)[:, 0]
    return W, hb


def _run(one_sequence, dims, q, k, v, eta, initial_state, initial_state_bias,
         output_final_state, cu_seqlens):
    o, finals = map_sequences(one_sequence, dims["B"], dims["T"], cu_seqlens,
                              {"q": q, "k": k, "v": v, "eta": eta},
                              {"W": initial_state, "hb": initial_state_bias})
    if not output_final_state:
        return o.to(v.dtype), None, None
    return o.to(v.dtype), finals["W"], finals["hb"].unsqueeze(2)  # hb: [N, H, 1, D]


def naive_ttt_linear(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    w: torch.Tensor,
    b: torch.Tensor,
    eta: torch.Tensor,
    scale: float | None = None,
    eps: float = 1e-6,
    chunk_size: int = 16,
    initial_state: torch.Tensor | None = None,
    initial_state_bias: torch.Tensor | None = None,
    output_final_state: bool = False,
    cu_seqlens: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """TTT-Linear token by token. q, k, v: [B,T,H,D]; w, b: [H,D]; eta: [B,T,H,1];
    initial_state: [N,H,D,D]; initial_state_bias: [N,H,1,D]. Returns o [B,T,H,D] and the
    final weights [N,H,D,D] and bias [N,H,1,D] (None, None unless output_final_state)."""
    dims, scale, acc, w, b = _prepare(q, k, v, w, b, eta, scale, eps, chunk_size, initial_state,
                                      initial_state_bias, output_final_state, cu_seqlens)
    H, D = dims["H"], dims["D"]

    def one_sequence(x, st):
        W, hb = _initial(st, H, D, acc, v.device)
        steps = per_step({n: x[n].to(acc) for n in ("q", "k", "v", "eta")})
        q_, k_, v_, eta_ = (steps[n] for n in ("q", "k", "v", "eta"))  # T_n x [H,D], eta [H,1]
        outs = []
        for start in range(0, len(v_), chunk_size):
            batch = range(start, min(start + chunk_size, len(v_)))
            # the gradients of the mini-batch, all at the weights W, hb held at its start
            g = {}
            for j in batch:
                z_j = torch.einsum("hk,hkd->hd", k_[j], W) + hb  # z_j = k_j W + hb
                g[j] = ln_recon_grad(z_j, v_[j] - k_[j], w, b, eps)
            sum_kg = torch.zeros_like(W)  # sum_{j<=i} k_j^T g_j
            sum_g = torch.zeros_like(hb)  # sum_{j<=i} g_j
            for i in batch:
                sum_kg = sum_kg + torch.einsum("hk,hd->hkd", k_[i], g[i])
                sum_g = sum_g + g[i]
                W_i = W - eta_[i][..., None] * sum_kg
                hb_i = hb - eta_[i] * sum_g
                u_i = torch.einsum("hk,hkd->hd", scale * q_[i], W_i) + hb_i
                outs.append(ln_residual(u_i, w, b, eps))  # o_i = u_i + w * LN(u_i) + b
            W, hb = W_i, hb_i
        o = torch.stack(outs, 0) if outs else v.new_zeros(0, H, D, dtype=acc)
        return o, {"W": W, "hb": hb}

    return _run(one_sequence, dims, q, k, v, eta, initial_state, initial_state_bias,
                output_final_state, cu_seqlens)


def chunk_ttt_linear_ref(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    w: torch.Tensor,
    b: torch.Tensor,
    eta: torch.Tensor,
    scale: float | None = None,
    eps: float = 1e-6,
    chunk_size: int = 16,
    initial_state: torch.Tensor | None = None,
    initial_state_bias: torch.Tensor | None = None,
    output_final_state: bool = False,
    cu_seqlens: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """The dual form, one mini-batch at a time; same arguments and results as the naive form."""
    dims, scale, acc, w, b = _prepare(q, k, v, w, b, eta, scale, eps, chunk_size, initial_state,
                                      initial_state_bias, output_final_state, cu_seqlens)
    H, D = dims["H"], dims["D"]
    w_, b_ = w[:, None], b[:, None]  # [H, 1, D], broadcast over the mini-batch

    def one_sequence(x, st):
        W, hb = _initial(st, H, D, acc, v.device)
        outs = []
        x = per_chunk(x, chunk_size)
        for c in range(len(x["v"])):
            # [H, C, D] each; e: [H, C, 1]
            Q, Kc, Vc, e = (x[n][c].to(acc).transpose(0, 1) for n in ("q", "k", "v", "eta"))
            C = Vc.shape[1]
            Z = Kc @ W + hb[:, None]  # Z = K W + 1 hb
            G = ln_recon_grad(Z, Vc - Kc, w_, b_, eps)  # [H, C, D]
            Qs = scale * Q
            ones = torch.ones(C, C, dtype=acc, device=v.device).tril()
            U = Qs @ W + hb[:, None] - e * (((Qs @ Kc.transpose(1, 2)).tril() + ones) @ G)
            outs.append(ln_residual(U, w_, b_, eps))
            e_last = e[:, -1]  # [H, 1]
            W = W - e_last[..., None] * (Kc.transpose(1, 2) @ G)  # W - eta_last K^T G
            hb = hb - e_last * G.sum(1)  # hb - eta_last 1^T G
        o = torch.cat(outs, 1).transpose(0, 1) if outs else v.new_zeros(0, H, D, dtype=acc)
        return o, {"W": W, "hb": hb}

    return _run(one_sequence, dims, q, k, v, eta, initial_state, initial_state_bias,
                output_final_state, cu_seqlens)
