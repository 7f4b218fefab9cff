"""Log-linear attention (Fenwick-tree hierarchy of states), docs/operators.md section 5: the exact
references.

    o_t = sum_{s <= t} level_scales[t, lvl(t, s)] * exp(G_t - G_s) * scale * <q_t, k_s> * v_s
    G_t = sum_{r <= t} g_r,   lvl(t, t) = 0,   lvl(t, s) = bit_length(t XOR s) for s < t

(positions within the sequence; q and k have G groups, value head h reads group h // (H/G)).

``naive_log_linear_attn`` is the definition written out: one T x T weight matrix per head,
the ground truth for T up to a few thousand. ``chunk_log_linear_attn_ref`` is the chunked
Fenwick form: O(T log T) work, O(T) memory beyond one [H, K, V] state per level.

Derivation of the chunked form. Cut the sequence into chunks of C = 2^c positions, chunk n
holding t = nC .. nC + C - 1 (the last one may be partial). Write t = nC + i, s = mC + j.

* Same chunk (m = n): the high bits of t and s agree, so lvl(t, s) = bit_length(i XOR j),
  and the chunk's own part is the definition applied to the chunk alone, with the decays
  exp(G_t - G_s) = exp(segsum(g)[i, j]) (sums of g over s < r <= t, never a difference of
  cumulative sums).
* Earlier chunk (m < n): t XOR s = ((n XOR m) << c) + (i XOR j) with i XOR j < 2^c, so
  lvl(t, s) = c + bit_length(n XOR m) = c + l depends on (t, s) only through l and the
  level weight of t. Group the earlier chunks by l: S_l = sum over chunks m with
  bit_length(n XOR m) = l, over their s, of exp(G_{nC-1} - G_s) k_s v_s^T (decayed to the
  start of chunk n). Then their contribution to o_t is, for each l >= 1,

      level_scales[t, c + l] * exp(G_t - G_{nC-1}) * scale * S_l^T q_t,

  with G_t - G_{nC-1} = sum of g over the chunk up to and including t.
* Which chunks form S_l: m < n with bit_length(n XOR m) = l means m agrees with n above bit
  l - 1 and has a 0 there where n has a 1. So S_l is non-empty exactly when bit l - 1 of n is
  set, and then holds the 2^(l-1) chunks just below n with bits 0 .. l-1 cleared (the Fenwick
  buckets). Going from n to n + 1, with p = trailing zeros of n + 1: bits 0 .. p-1 of n are 1
  and bit p is 0; in n + 1 bits 0 .. p-1 are 0 and bit p is 1. So levels 1 .. p of n + 1 are
  empty, level p + 1 holds exactly the chunks of levels 1 .. p of n plus chunk n itself, and
  levels above p + 1 are unchanged. Hence after chunk n: decay every state by
  exp(sum of g over chunk n), add chunk n's own sum_s exp(G_end - G_s) k_s v_s^T, merge it
  with levels 1 .. p into level p + 1 and clear levels 1 .. p.

Every exponential is of a sum of log gates over a segment (<= 0): segment sums inside a chunk,
sums over the chunk up to t, and the chunk total. A non-empty S_l at chunk n means some pair
(t, s) has lvl(t, s) = c + l <= bit_length(T - 1) < L, so the level read always exists.
"""

from __future__ import annotations

import torch

from references.operators import LOG_LINEAR
from references._common import map_sequences, per_chunk, segsum, state_dtype

__all__ = ["naive_log_linear_attn", "chunk_log_linear_attn_ref"]


def _prepare(q, k, v, g, level_scales, initial_state, output_final_state, cu_seqlens, scale):
    args = dict(
        q=q, k=k, v=v, g=g, level_scales=level_scales, initial_state=initial_state,
        output_final_state=output_final_state, cu_seqlens=cu_seqlens, scale=scale,
    )
    dims = LOG_LINEAR.validate(args)
    LOG_LINEAR.check_values(args)  # the values' domains too (positive log gates...)
    group = torch.arange(dims["H"], device=v.device) // (dims["H"] // dims["G"])  # head -> group
    return dims, group, LOG_LINEAR.resolve_scale(scale, dims)


def _run(one_sequence, dims, q, k, v, g, level_scales, cu_seqlens):
    o, _ = map_sequences(one_sequence, dims["B"], dims["T"], cu_seqlens,
                         {"q": q, "k": k, "v": v, "g": g, "ls": level_scales}, {})
    return o.to(v.dtype), None


def _bit_length(x: torch.Tensor) -> torch.Tensor:
    """bit_length of every element of a non-negative integer tensor."""
    n = torch.zeros_like(x)
    while bool((x > 0).any()):
        n = n + (x > 0).to(x.dtype)
        x = x >> 1
    return n


def _quadratic(Q, Kh, Vs, g, ls, scale):
    """The definition on one stretch of positions 0 .. n-1 (a whole sequence, or one chunk, whose
    levels are those of its local positions). Q, Kh: [n,H,K]; Vs: [n,H,V]; g: [n,H]; ls: [n,H,L]
    (all in the compute dtype). Returns o [n,H,V]."""
    n, H = g.shape
    pos = torch.arange(n, device=g.device)
    lvl = _bit_length(pos[:, None] ^ pos[None, :])  # [n, n]: lvl(t, s), 0 on the diagonal
    w_lvl = torch.gather(ls.transpose(0, 1), 2, lvl.expand(H, n, n))  # [H,t,s]: level_scales[t, lvl]
    decay = torch.exp(segsum(g.transpose(0, 1)))  # [H,t,s]: exp(G_t - G_s), 0 for s > t
    A = scale * torch.einsum("thk,shk->hts", Q, Kh) * decay * w_lvl
    return torch.einsum("hts,shv->thv", A, Vs)


def naive_log_linear_attn(
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
    """The definition, O(T^2) per sequence and head. q, k: [B,T,G,K]; v: [B,T,H,V]; g: [B,T,H]
    (log forget gate); level_scales: [B,T,H,L]. Returns o [B,T,H,V] and None."""
    dims, group, scale = _prepare(q, k, v, g, level_scales, initial_state, output_final_state,
                                  cu_seqlens, scale)
    acc = state_dtype(v.dtype)

    def one_sequence(x, st):
        Q, Kh = x["q"].to(acc)[:, group], x["k"].to(acc)[:, group]  # [n,H,K]
        return _quadratic(Q, Kh, x["v"].to(acc), x["g"].to(acc), x["ls"].to(acc), scale), {}

    return _run(one_sequence, dims, q, k, v, g, level_scales, cu_seqlens)


def chunk_log_linear_attn_ref(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor,
    level_scales: torch.Tensor,
    initial_state: torch.Tensor | None = None,
    output_final_state: bool = False,
    cu_seqlens: torch.Tensor | None = None,
    scale: float | None = 1.0,
    chunk_size: int = 64,
) -> tuple[torch.Tensor, None]:
    """The chunked Fenwick form (module docstring); same arguments and results as the
    definition. chunk_size must be a power of two; it never changes the result."""
    dims, group, scale = _prepare(q, k, v, g, level_scales, initial_state, output_final_state,
                                  cu_seqlens, scale)
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1 \
            or chunk_size & (chunk_size - 1):
        raise ValueError(f"log_linear_attn: 'chunk_size' must be a power of two, got {chunk_size!r}")
    c = chunk_size.bit_length() - 1  # C = 2^c
    acc = state_dtype(v.dtype)

    def one_sequence(x, st):
        n_tok = x["v"].shape[0]
        states: dict[int, torch.Tensor] = {}  # level l >= 1 -> S_l [H,K,V], decayed to the chunk start
        outs = []
        x = per_chunk(x, chunk_size)
        for n, i in enumerate(range(0, n_tok, chunk_size)):
            Q, Kh = x["q"][n].to(acc)[:, group], x["k"][n].to(acc)[:, group]  # [C,H,K]
            Vc, gc, ls = x["v"][n].to(acc), x["g"][n].to(acc), x["ls"][n].to(acc)
            o = _quadratic(Q, Kh, Vc, gc, ls, scale)  # the chunk's own tokens
            cum = torch.cumsum(gc, 0)  # [C,H]: G_t - G_{nC-1}, a sum of gates <= 0
            for l, S in states.items():  # earlier chunks at level c + l
                w = ls[:, :, c + l] * torch.exp(cum)  # [C,H]
                o = o + (scale * w)[..., None] * torch.einsum("chk,hkv->chv", Q, S)
            outs.append(o)
            if i + chunk_size >= n_tok:
                break
            # advance to chunk n + 1: decay to the chunk end, merge levels 1 .. p into p + 1
            decay = torch.exp(cum[-1])[:, None, None]  # exp(sum of g over the chunk): [H,1,1]
            to_end = torch.exp(segsum(gc.transpose(0, 1))[:, -1, :])  # [H,C]: exp(G_end - G_s)
            merged = torch.einsum("shk,hs,shv->hkv", Kh, to_end, Vc)
            p = ((n + 1) & -(n + 1)).bit_length() - 1  # trailing zeros of n + 1
            for l in range(1, p + 1):
                merged = merged + decay * states.pop(l)
            states = {l: decay * S for l, S in states.items()}
            states[p + 1] = merged
        o = torch.cat(outs, 0) if outs else v.new_zeros(0, dims["H"], dims["V"], dtype=acc)
        return o, {}

    return _run(one_sequence, dims, q, k, v, g, level_scales, cu_seqlens)
