"""Gated linear attention, docs/operators.md section 2: the exact references.

    S_t = diag(exp(gk_t)) S_{t-1} diag(exp(gv_t)) + k_t v_t^T
    o_t = S_t^T (scale * q_t)

``naive_recurrent_gla`` is the step-by-step recurrence (the ground truth), with the arguments
of ``fused_recurrent_gla``; ``reverse=True`` runs it from the last token to the first.
``chunk_gla_ref`` is the chunkwise form in pure PyTorch. In a chunk with state S_0 at its
start, write D_k[i, j] = exp(sum_{j < r <= i} gk_r[k]) for j <= i (and D_v likewise) and
c_k[i] = exp(sum_{r <= i} gk_r[k]). Then

    o_i[v]  = sum_k scale q_i[k] c_k[i] S_0[k, v] c_v[i]
            + sum_{j <= i} (sum_k scale q_i[k] k_j[k] D_k[i, j]) D_v[i, j] v_j[v]
    S_C     = diag(c_k[C]) S_0 diag(c_v[C]) + sum_j diag(D_k[C, j]) k_j v_j^T diag(D_v[C, j])

Every exponent is a sum of log gates <= 0 over a segment (``segsum``), never a difference of
cumulative sums, so the form stays exact when the cumulative gate leaves the float range.
"""

from __future__ import annotations

import torch

from references.operators import GLA
from references._common import map_sequences, per_chunk, per_step, segsum, state_dtype

__all__ = ["naive_recurrent_gla", "chunk_gla_ref"]


def _prepare(q, k, v, gk, gv, scale, initial_state, output_final_state, reverse, cu_seqlens):
    args = dict(
        q=q, k=k, v=v, gk=gk, gv=gv, scale=scale, initial_state=initial_state,
        output_final_state=output_final_state, reverse=reverse, cu_seqlens=cu_seqlens,
    )
    dims = GLA.validate(args)
    GLA.check_values(args)  # the values' domains too (positive log gates...)
    return dims, GLA.resolve_scale(scale, dims)


def _run(one_sequence, dims, q, k, v, gk, gv, initial_state, output_final_state, reverse, cu_seqlens):
    def directed(x, st):
        if not reverse:
            return one_sequence(x, st)
        # reverse: the same recurrence over the sequence read backwards
        o, final = one_sequence({n: None if t is None else t.flip(0) for n, t in x.items()}, st)
        return o.flip(0), final

    o, finals = map_sequences(directed, dims["B"], dims["T"], cu_seqlens,
                              {"q": q, "k": k, "v": v, "gk": gk, "gv": gv}, {"S": initial_state})
    return o.to(v.dtype), (finals["S"] if output_final_state else None)


def naive_recurrent_gla(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    gk: torch.Tensor | None = None,
    gv: torch.Tensor | None = None,
    scale: float | None = None,
    initial_state: torch.Tensor | None = None,
    output_final_state: bool = False,
    reverse: bool = False,
    cu_seqlens: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """GLA one token at a time. q, k, gk: [B,T,H,K]; v, gv: [B,T,H,V] (gates in log space);
    initial_state: [N,H,K,V]. Returns o [B,T,H,V] and the final state [N,H,K,V]."""
    dims, scale = _prepare(q, k, v, gk, gv, scale, initial_state, output_final_state, reverse, cu_seqlens)
    H, K, V = dims["H"], dims["K"], dims["V"]
    acc = state_dtype(v.dtype)

    def one_sequence(x, st):
        S = torch.zeros(H, K, V, dtype=acc, device=v.device) if st["S"] is None else st["S"].to(acc)
        outs = []
        x = per_step(x)
        for t in range(len(x["v"])):
            if x["gk"] is not None:
                S = S * torch.exp(x["gk"][t].to(acc))[:, :, None]  # diag(exp(gk_t)) S
            if x["gv"] is not None:
                S = S * torch.exp(x["gv"][t].to(acc))[:, None, :]  # S diag(exp(gv_t))
            S = S + torch.einsum("hk,hv->hkv", x["k"][t].to(acc), x["v"][t].to(acc))
            outs.append(torch.einsum("hkv,hk->hv", S, scale * x["q"][t].to(acc)))
        o = torch.stack(outs, 0) if outs else v.new_zeros(0, H, V, dtype=acc)
        return o, {"S": S}

    return _run(one_sequence, dims, q, k, v, gk, gv, initial_state, output_final_state, reverse, cu_seqlens)


def chunk_gla_ref(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    gk: torch.Tensor | None = None,
    gv: torch.Tensor | None = None,
    scale: float | None = None,
    initial_state: torch.Tensor | None = None,
    output_final_state: bool = False,
    reverse: bool = False,
    cu_seqlens: torch.Tensor | None = None,
    chunk_size: int = 64,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The chunkwise form; same arguments and results as the recurrence."""
    dims, scale = _prepare(q, k, v, gk, gv, scale, initial_state, output_final_state, reverse, cu_seqlens)
    H, K, V = dims["H"], dims["K"], dims["V"]
    acc = state_dtype(v.dtype)

    def gates(g, C, n):  # log gates [C, H, n] (or None) -> segment sums [H, n, C, C]
        if g is None:
            return torch.zeros(H, n, C, C, dtype=acc, device=v.device).masked_fill(
                ~torch.ones(C, C, dtype=torch.bool, device=v.device).tril(), float("-inf"))
        return segsum(g.to(acc).permute(1, 2, 0))

    def one_sequence(x, st):
        S = torch.zeros(H, K, V, dtype=acc, device=v.device) if st["S"] is None else st["S"].to(acc)
        outs = []
        x = per_chunk(x, chunk_size)
        for c in range(len(x["v"])):
            Q, Kc, Vc = (x[n][c].to(acc).transpose(0, 1) for n in ("q", "k", "v"))
            C = Vc.shape[1]
            ck, cv = (None if x[n] is None else x[n][c] for n in ("gk", "gv"))
            Dk = torch.exp(gates(ck, C, K))  # [H,K,C,C]: D_k[i, j]
            Dv = torch.exp(gates(cv, C, V))  # [H,V,C,C]
            # c_k[i] = exp(sum_{r <= i} gk_r): the segment sums from a virtual position -1
            Ck = torch.exp(gates(_pad_front(ck), C + 1, K)[..., 1:, 0]).transpose(1, 2)  # [H,C,K]
            Cv = torch.exp(gates(_pad_front(cv), C + 1, V)[..., 1:, 0]).transpose(1, 2)  # [H,C,V]
            Qs = scale * Q
            A = torch.einsum("hik,hjk,hkij->hij", Qs, Kc, Dk)  # [H,C,C], zero above the diagonal
            o_intra = torch.einsum("hij,hvij,hjv->hiv", A, Dv, Vc)
            o_inter = ((Qs * Ck) @ S) * Cv
            outs.append(o_intra + o_inter)
            k_dec = Kc * Dk[:, :, -1, :].transpose(1, 2)  # k_j * D_k[C, j]: [H,C,K]
            v_dec = Vc * Dv[:, :, -1, :].transpose(1, 2)  # v_j * D_v[C, j]: [H,C,V]
            S = Ck[:, -1, :, None] * S * Cv[:, -1, None, :] + k_dec.transpose(1, 2) @ v_dec
        o = torch.cat(outs, 1).transpose(0, 1) if outs else v.new_zeros(0, H, V, dtype=acc)
        return o, {"S": S}

    return _run(one_sequence, dims, q, k, v, gk, gv, initial_state, output_final_state, reverse, cu_seqlens)


def _pad_front(g: torch.Tensor | None) -> torch.Tensor | None:
    """Prepend one zero log gate, so segment sums from that position are cumulative sums."""
    return None if g is None else torch.cat([torch.zeros_like(g[:1]), g], 0)
