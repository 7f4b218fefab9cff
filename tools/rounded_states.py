"""What storing Titans' per-mini-batch states in half precision does to its outputs, in float64
on the CPU (no kernel, no GPU).

chunk_titans_linear's HALF_STATES stores the memory M0 and momentum S0 each mini-batch starts
from in the inputs' dtype, and its outputs kernel forms G and U from those rounded states while
the walk carries them on in float32. This runs the matrix form of references/titans.py in
float64 twice on a gpu-suite case, inputs rounded to --dtype as a kernel receives them: once
exactly, once with each mini-batch's outputs formed from M0, S0 rounded to --state-dtype (the
states carried on exactly), and prints o's relative error against the exact form, beside the
error of rounding o alone to --dtype:

    python tools/rounded_states.py --case gate-saturated --case basic
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
import typer

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from harness.cases import sample  # noqa: E402
from harness.check.engine import rel_error  # noqa: E402
from harness.gate.suites import load_suite  # noqa: E402
from references._common import per_chunk  # noqa: E402
from references.titans import mini_batch  # noqa: E402

NAMES = ("q", "k", "v", "w", "b", "theta", "alpha", "eta")
TOKENS = ("q", "k", "v", "theta", "alpha", "eta")


def outputs(x: dict, M: torch.Tensor, S: torch.Tensor, scale: float, eps: float, C: int,
            rounded: torch.dtype | None) -> torch.Tensor:
    """o [T, H, D] of one sequence (x's tensors [T, H, ...], float64) from states M, S [H, D, D]:
    each mini-batch's outputs from its M0, S0 rounded to ``rounded`` (None: exact), the states
    carried on exactly (references.titans.mini_batch for both)."""
    w_, b_ = x["w"][:, None], x["b"][:, None]
    chunks = per_chunk({n: x[n] for n in TOKENS}, C)
    outs = []
    for c in range(len(chunks["v"])):
        rows = tuple(chunks[n][c].transpose(0, 1) for n in TOKENS)
        o, M_next, S_next = mini_batch(*rows, M, S, scale, w_, b_, eps)
        if rounded is not None:
            o, _, _ = mini_batch(*rows, M.to(rounded).double(), S.to(rounded).double(), scale,
                                 w_, b_, eps)
        outs.append(o)
        M, S = M_next, S_next
    return torch.cat(outs, 1).transpose(0, 1)


def main(case: list[str] = typer.Option(["gate-saturated"], help="gpu-suite Titans case ids"),
         dtype: str = typer.Option("bfloat16", help="the inputs' dtype"),
         state_dtype: str = typer.Option("bfloat16", help="the stored states' dtype")) -> None:
    suite = load_suite("gpu")
    for cid in case:
        found = [sc.case for sc in suite.cases if sc.op == "titans" and sc.id == cid]
        if not found:
            raise typer.BadParameter(f"the gpu suite has no titans case {cid!r}")
        c = found[0]
        if c.seqlens is not None:
            raise typer.BadParameter(f"case {cid!r} is varlen; this tool takes fixed lengths")
        a = sample(c, "cpu")
        x = {n: (a[n].to(getattr(torch, dtype)).double() if n in "qkv" else a[n].double())
             for n in NAMES}
        D, H = c.dims["D"], c.dims["H"]
        scale = a.get("scale") or D ** -0.5
        eps, C = a.get("eps", 1e-6), c.options.get("chunk_size", 16)
        zeros = torch.zeros(H, D, D, dtype=torch.float64)
        exact, half = [], []
        for i in range(c.dims["B"]):
            xi = {n: (t[i] if t.dim() > 2 else t) for n, t in x.items()}
            M0 = a["initial_state"][i].double() if a.get("initial_state") is not None else zeros
            S0 = (a["initial_momentum"][i].double() if a.get("initial_momentum") is not None
                  else zeros)
            exact.append(outputs(xi, M0, S0, scale, eps, C, None))
            half.append(outputs(xi, M0, S0, scale, eps, C, getattr(torch, state_dtype)))
        ref, got = torch.stack(exact), torch.stack(half)
        dt = getattr(torch, dtype)
        print(f"{cid}: o from {state_dtype} states {rel_error(got.to(dt).double(), ref):.3g}, "
              f"o rounded to {dtype} alone {rel_error(ref.to(dt).double(), ref):.3g}")


if __name__ == "__main__":
    typer.run(main)
