"""Which of Titans' walks needs the bits of its products with a state, in float64 on the CPU
(no kernel, no GPU).

chunk_titans_linear takes two kinds of product of a mini-batch's rows with a float32 state as
chunk.WALK_MIXED's modes say: the forward walk's Z = K M0, and the split backward walk's
K dM', K dS' (dM', dS' the gradients of the memory and momentum a mini-batch hands on). This
runs the matrix form of references/titans.py in float64 with autograd, the inputs rounded to
bfloat16 as `harness check` rounds them, and rounds only the state side of those products as a
mode would (the forward's in Z, the backward's in the gradient that reaches the updates'
second operand), everything else exact; the gradients of bfloat16 inputs come back in bfloat16
as a kernel's do. It prints each quantity's error against the float64 truth as a share of
`harness check`'s tolerance (the same truth, upstream gradients and tolerance as the check):

    python tools/walk_rounding.py --seq-len 4096 --forward split_trunc --backward split_trunc \
        --forward split_trunc --backward tf32x2 ...

(each --forward pairs with the --backward at the same place; "" is exact). The long family's
cases: seeds 1000 + i for T = 1024, 4096, 16384, 65536 (harness.cases.long_cases).
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
import typer

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from harness.cases import long_cases, sample  # noqa: E402
from harness.check.engine import compare, run, truths  # noqa: E402
from harness.check.tolerances import tolerance  # noqa: E402
from references._common import segprod  # noqa: E402
from references._layernorm import ln_recon_grad, ln_residual  # noqa: E402

MODES = ("", "split_trunc", "split", "split3", "tf32", "tf32x2")


def _bf16_truncated(x32: torch.Tensor) -> torch.Tensor:
    """float32 values with their lower 16 bits cleared: bfloat16's value by truncation."""
    return (x32.view(torch.int32) & ~0xFFFF).view(torch.float32)


def _tf32(x32: torch.Tensor) -> torch.Tensor:
    """float32 values rounded to TF32's 10 mantissa bits (to nearest, ties away)."""
    return ((x32.view(torch.int32) + 0x1000) & ~0x1FFF).view(torch.float32)


def rounded(x: torch.Tensor, mode: str) -> torch.Tensor:
    """The state operand as a product under ``mode`` sees it (float64 in, float64 out): the
    float32 state, then "split_trunc" its truncated bfloat16 high half plus the rest rounded to
    bfloat16, "split" the same with the high half rounded, "split3" two truncated bfloat16
    parts and the rest rounded, "tf32" its TF32 value, "tf32x2" its TF32 head plus the rest's
    TF32 value; "" the value itself."""
    if not mode:
        return x
    x32 = x.float()
    if mode in ("split_trunc", "split"):
        hi = _bf16_truncated(x32) if mode == "split_trunc" else x32.bfloat16().float()
        return (hi.double() + (x32 - hi).bfloat16().double())
    if mode == "split3":
        hi = _bf16_truncated(x32)
        mid = _bf16_truncated(x32 - hi)
        return hi.double() + mid.double() + (x32 - hi - mid).bfloat16().double()
    head = _tf32(x32)
    if mode == "tf32":
        return head.double()
    return head.double() + _tf32(x32 - head).double()


class StateProduct(torch.autograd.Function):
    """Z = K @ M with M as ``mode`` rounds it; the backward exact."""

    @staticmethod
    def forward(ctx, K, M, mode):
        ctx.save_for_backward(K, M)
        return K @ rounded(M, mode)

    @staticmethod
    def backward(ctx, dZ):
        K, M = ctx.saved_tensors
        return dZ @ M.transpose(-1, -2), K.transpose(-1, -2) @ dZ, None


class UpdateProduct(torch.autograd.Function):
    """Y = Kt @ X (an update K^T (c o G)); its backward's K dY with dY (the gradient of the
    state handed on) as ``mode`` rounds it: the backward walk's K dM', K dS'."""

    @staticmethod
    def forward(ctx, Kt, X, mode):
        ctx.save_for_backward(Kt, X)
        ctx.mode = mode
        return Kt @ X

    @staticmethod
    def backward(ctx, dY):
        Kt, X = ctx.saved_tensors
        return dY @ X.transpose(-1, -2), Kt.transpose(-1, -2) @ rounded(dY, ctx.mode), None


def mini_batch(Q, Kc, Vc, th, al, et, M, S, scale, w_, b_, eps, fwd, bwd):
    """references.titans.mini_batch with its state products rounded as above."""
    Kt = Kc.transpose(1, 2)
    G = 2 * ln_recon_grad(StateProduct.apply(Kc, M, fwd), Vc - Kc, w_, b_, eps)
    pad = torch.ones(Q.shape[0], 1, dtype=Q.dtype)
    A = segprod(torch.cat([pad, 1 - al], -1))
    E = segprod(torch.cat([pad, et], -1))
    P = A[:, 1:, 1:] @ E[:, 1:, :]
    Qs = scale * Q
    U = (A[:, 1:, :1] * (Qs @ M) + P[:, :, :1] * (Qs @ S)
         - ((P[:, :, 1:] * th[:, None, :]) * (Qs @ Kt)) @ G)
    return (ln_residual(U, w_, b_, eps),
            A[:, -1, 0, None, None] * M + P[:, -1, 0, None, None] * S
            - UpdateProduct.apply(Kt, (P[:, -1, 1:] * th)[..., None] * G, bwd),
            E[:, -1, 0, None, None] * S
            - UpdateProduct.apply(Kt, (E[:, -1, 1:] * th)[..., None] * G, bwd))


def emulated(fwd: str, bwd: str):
    """A chunk_titans_linear-like callable (one sequence a batch row, no varlen) that runs the
    rounded matrix form in float64 and returns o in v's dtype, the final states in float32."""

    def fn(q, k, v, w, b, theta, alpha, eta, scale=None, eps=1e-6, chunk_size=16,
           initial_state=None, initial_momentum=None, output_final_state=False,
           cu_seqlens=None):
        B, T, H, D = q.shape
        scale = D ** -0.5 if scale is None else scale
        w_, b_ = w.double()[:, None], b.double()[:, None]
        outs, Ms, Ss = [], [], []
        for i in range(B):
            M = (initial_state[i].double() if initial_state is not None
                 else torch.zeros(H, D, D, dtype=torch.float64))
            S = (initial_momentum[i].double() if initial_momentum is not None
                 else torch.zeros(H, D, D, dtype=torch.float64))
            rows = []
            for t0 in range(0, T, chunk_size):
                part = [x[i, t0:t0 + chunk_size].double().transpose(0, 1)
                        for x in (q, k, v, theta, alpha, eta)]
                o, M, S = mini_batch(*part, M, S, scale, w_, b_, eps, fwd, bwd)
                rows.append(o)
            outs.append(torch.cat(rows, 1).transpose(0, 1))
            Ms.append(M)
            Ss.append(S)
        o = torch.stack(outs).to(v.dtype)
        if not output_final_state:
            return o, None, None
        return o, torch.stack(Ms).float(), torch.stack(Ss).float()

    return fn


def main(seq_len: int = typer.Option(4096, help="T of the long family's case"),
         forward: list[str] = typer.Option(..., help="the forward walk's Z mode"),
         backward: list[str] = typer.Option(..., help="the backward walk's K dM' mode"),
         dtype: str = typer.Option("bfloat16")) -> None:
    if len(forward) != len(backward) or not set(forward + backward) <= set(MODES):
        raise typer.BadParameter(f"--forward and --backward: as many of each, from {MODES}")
    case = [c for c in long_cases("titans", "cuda") if c.dims["T"] == seq_len]
    if not case:
        raise typer.BadParameter("--seq-len: the long family has T = 1024, 4096, 16384, 65536")
    case = case[0]
    truth = truths(case, ["chunk"], [dtype], "cpu", "long")[dtype]
    for fwd, bwd in zip(forward, backward):
        res = run(emulated(fwd, bwd), sample(case, "cpu"), case, getattr(torch, dtype),
                  truth.douts)
        if res.error:
            raise RuntimeError(res.error)
        errors = compare(res, truth.truth)
        shares = {q: 100 * e / tolerance(dtype, truth.ref_errors.get(q, 0.0))
                  for q, e in errors.items()}
        print(f"T={seq_len} forward {fwd or 'exact'} / backward {bwd or 'exact'}: " + ", ".join(
            f"{q} {shares[q]:.0f}%" for q in sorted(shares, key=shares.get, reverse=True)[:6]))


if __name__ == "__main__":
    typer.run(main)
