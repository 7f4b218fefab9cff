"""Delta rule (DeltaNet), docs/operators.md section 1: the exact references.

    v'_t = beta_t * (v_t - S_{t-1}^T k_t)
    S_t  = S_{t-1} + k_t v'_t^T
    o_t  = S_t^T (scale * q_t)

``naive_recurrent_delta_rule`` is the step-by-step recurrence, the ground truth.
``chunk_delta_rule_ref`` is the chunkwise (WY / UT transform) form in pure PyTorch: O(T)
memory and T/C sequential steps, for sequences too long for the step loop. Within a chunk of
C tokens with state S_0 at its start, unrolling the recurrence gives

    U = A^{-1} diag(beta) (V - K S_0),   A = I + tril(diag(beta) K K^T, -1)
    O = (scale Q) S_0 + tril(scale Q K^T) U
    S_C = S_0 + K^T U

where U stacks the v'_t of the chunk. (Per-channel beta [.., V] makes A differ per value
channel: the same algebra with one triangular system per channel.)
"""

from __future__ import annotations

import torch

from references.operators import DELTA_RULE
from references._common import l2norm, map_sequences, per_chunk, per_step, state_dtype

__all__ = ["naive_recurrent_delta_rule", "chunk_delta_rule_ref"]


def _prepare(q, k, v, beta, scale, initial_state, output_final_state, use_qk_l2norm_in_kernel, cu_seqlens):
    args = dict(
        q=q, k=k, v=v, beta=beta, scale=scale, initial_state=initial_state,
        output_final_state=output_final_state,
        use_qk_l2norm_in_kernel=use_qk_l2norm_in_kernel, cu_seqlens=cu_seqlens,
    )
    dims = DELTA_RULE.validate(args)
    DELTA_RULE.check_values(args)  # the values' domains too (positive log gates...)
    if use_qk_l2norm_in_kernel:
        q, k = l2norm(q), l2norm(k)
    return dims, q, k, DELTA_RULE.resolve_scale(scale, dims)


def _finish(o, finals, v, output_final_state):
    return o.to(v.dtype), (finals["S"] if output_final_state else None)


def naive_recurrent_delta_rule(
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
    """The delta rule one token at a time. q, k: [B,T,H,K]; v: [B,T,H,V]; beta: [B,T,H] or
    [B,T,H,V]; initial_state: [N,H,K,V]. Returns o [B,T,H,V] and the final state [N,H,K,V]."""
    dims, q, k, scale = _prepare(q, k, v, beta, scale, initial_state, output_final_state,
                                 use_qk_l2norm_in_kernel, cu_seqlens)
    H, K, V = dims["H"], dims["K"], dims["V"]
    acc = state_dtype(v.dtype)

    def one_sequence(x, st):
        S = torch.zeros(H, K, V, dtype=acc, device=v.device) if st["S"] is None else st["S"].to(acc)
        outs = []
        x = per_step(x)
        for t in range(len(x["v"])):
            q_t, k_t, v_t = x["q"][t].to(acc), x["k"][t].to(acc), x["v"][t].to(acc)  # [H,K],[H,K],[H,V]
            b_t = x["beta"][t].to(acc)
            b_t = b_t[:, None] if b_t.dim() == 1 else b_t  # [H,1] or [H,V]
            v_new = b_t * (v_t - torch.einsum("hkv,hk->hv", S, k_t))  # v'_t
            S = S + torch.einsum("hk,hv->hkv", k_t, v_new)  # S_t = S_{t-1} + k_t v'_t^T
            outs.append(torch.einsum("hkv,hk->hv", S, scale * q_t))  # o_t = S_t^T (scale q_t)
        o = torch.stack(outs, 0) if outs else v.new_zeros(0, H, V, dtype=acc)
        return o, {"S": S}

    o, finals = map_sequences(one_sequence, dims["B"], dims["T"], cu_seqlens,
                              {"q": q, "k": k, "v": v, "beta": beta}, {"S": initial_state})
    return _finish(o, finals, v, output_final_state)


def chunk_delta_rule_ref(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    beta: torch.Tensor,
    scale: float | None = None,
    initial_state: torch.Tensor | None = None,
    output_final_state: bool = False,
    use_qk_l2norm_in_kernel: bool = False,
    cu_seqlens: torch.Tensor | None = None,
    chunk_size: int = 64,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The chunkwise (WY / UT) form; same arguments and results as the recurrence."""
    dims, q, k, scale = _prepare(q, k, v, beta, scale, initial_state, output_final_state,
                                 use_qk_l2norm_in_kernel, cu_seqlens)
    H, K, V = dims["H"], dims["K"], dims["V"]
    acc = state_dtype(v.dtype)
    per_channel = beta.dim() == 4

    def one_sequence(x, st):
        S = torch.zeros(H, K, V, dtype=acc, device=v.device) if st["S"] is None else st["S"].to(acc)
        outs = []
        x = per_chunk(x, chunk_size)
        for c in range(len(x["v"])):
            Q, Kc, Vc, b = (x[n][c].to(acc).transpose(0, 1) for n in ("q", "k", "v", "beta"))
            C = Vc.shape[1]  # Q, Kc: [H,C,K]; Vc: [H,C,V]; b: [H,C] or [H,C,V]
            KK = Kc @ Kc.transpose(1, 2)  # [H,C,C]
            eye = torch.eye(C, dtype=acc, device=v.device)
            R = Vc - Kc @ S  # v_t - S_0^T k_t
            if per_channel:
                # one system per value channel: A_v = I + tril(diag(beta[:, v]) K K^T, -1)
                A = eye + (b.permute(0, 2, 1)[..., :, None] * KK[:, None]).tril(-1)  # [H,V,C,C]
                rhs = (b * R).permute(0, 2, 1)[..., None]  # [H,V,C,1]
                U = torch.linalg.solve_triangular(A, rhs, upper=False, unitriangular=True)
                U = U[..., 0].permute(0, 2, 1)  # [H,C,V]
            else:
                A = eye + (b[..., None] * KK).tril(-1)  # [H,C,C]
                U = torch.linalg.solve_triangular(A, b[..., None] * R, upper=False, unitriangular=True)
            Qs = scale * Q
            outs.append(Qs @ S + (Qs @ Kc.transpose(1, 2)).tril(0) @ U)  # [H,C,V]
            S = S + Kc.transpose(1, 2) @ U  # S_C = S_0 + K^T U
        o = torch.cat(outs, 1).transpose(0, 1) if outs else v.new_zeros(0, H, V, dtype=acc)
        return o, {"S": S}

    o, finals = map_sequences(one_sequence, dims["B"], dims["T"], cu_seqlens,
                              {"q": q, "k": k, "v": v, "beta": beta}, {"S": initial_state})
    return _finish(o, finals, v, output_final_state)
