"""Titans' forward walk and replay in one launch (kernels.titans.chunk.REPLAY_OVERLAP) against
the two launches: the same values bit for bit, and the time of each by the number of walks.

    python tools/titans_overlap.py [--warps 8] [--time/--no-time] [--device cuda | cpu]

Each case runs the forward without a backward (the replay's path) twice on the same inputs:
the walk kernel and then the segment kernel, and the one launch, all at ``--warps`` warps
(WALK_WARPS, REPLAY_WARPS and OVERLAP_WARPS, so that both forms issue the same products),
three times on a GPU, o and both final states compared with ``torch.equal``; a case whose
call did not take the one launch fails.
The cases are what the check families do not reach: more walks than stay resident (varlen with 60
sequences, empty and one-token ones among them, at H = 16: 960 walks; B = 8, H = 32), D = 100
and 128, float16. ``--time`` then times both forms (``do_bench`` median) at D = 64 for N H
from 32 to 512 walks against the device's SMs, the measurement behind chunk.OVERLAP_SHARE
(the launch is taken where N H is at most that share of the SMs; here it is set to take it
always), the two launches with the walk at its default warps (WALK_WARPS None). On the CPU
(``--device cpu``, Triton's interpreter) two small cases run instead, one of them varlen.
Needs bfloat16 or float16 inputs: the replay's dtypes (chunk.REPLAY).
"""

from __future__ import annotations

import typer
from rich.console import Console

console = Console(width=150)
NAMES = ("q", "k", "v", "w", "b", "theta", "alpha", "eta")


def inputs(B, T, H, D, dtype, N, device, seed=0):
    import torch

    g = torch.Generator(device=device).manual_seed(seed)

    def normal(*shape):
        return torch.randn(*shape, generator=g, device=device)

    def uniform(*shape):
        return torch.rand(*shape, generator=g, device=device)

    x = {n: normal(B, T, H, D).to(dtype) for n in "qkv"}
    x.update(w=1 + 0.1 * normal(H, D), b=0.1 * normal(H, D), theta=0.05 * uniform(B, T, H),
             alpha=0.1 * uniform(B, T, H), eta=0.5 + 0.5 * uniform(B, T, H))
    states = {"initial_state": 0.1 * normal(N, H, D, D),
              "initial_momentum": 0.1 * normal(N, H, D, D)}
    return x, states


def varlen(count: int, longest: int, seed: int = 1) -> list[int]:
    """cu_seqlens of ``count`` sequences of 0 to longest - 1 tokens, the 4th empty, the 8th one
    token long."""
    import torch

    lens = torch.randint(0, longest, (count,), generator=torch.Generator().manual_seed(seed))
    lens[3], lens[7] = 0, 1
    return [0, *torch.cumsum(lens, 0).tolist()]


class Counted:
    """A kernel that counts its launches (kernel[grid] calls)."""

    def __init__(self, kernel):
        self.kernel, self.launches = kernel, 0

    def __getitem__(self, grid):
        self.launches += 1
        return self.kernel[grid]


def forward(chunk, x, states, cu, overlap: bool):
    import torch

    from kernels.titans import chunk_titans_linear

    chunk.REPLAY_OVERLAP = overlap
    with torch.no_grad():
        return chunk_titans_linear(*(x[n] for n in NAMES), **states, output_final_state=True,
                                   cu_seqlens=cu)


def compare(chunk, name, B, T, H, D, dtype, cu, device, runs) -> bool:
    import torch

    N = B if cu is None else len(cu) - 1
    x, states = inputs(B, T, H, D, dtype, N, device)
    cu = None if cu is None else torch.tensor(cu, dtype=torch.int32, device=device)
    two = forward(chunk, x, states, cu, False)
    same = True
    for rep in range(runs):
        before = chunk.chunk_titans_linear_fwd_overlap_kernel.launches
        one = forward(chunk, x, states, cu, True)
        if chunk.chunk_titans_linear_fwd_overlap_kernel.launches == before:
            console.print(f"{name}: the call did not take the one launch")
            return False
        equal = [torch.equal(a, b) for a, b in zip(one, two)]
        diff = max(float((a.float() - b.float()).abs().max()) for a, b in zip(one, two))
        console.print(f"{name}: run {rep}: o, final state, final momentum equal {equal}, "
                      f"largest difference {diff:.3g}")
        same = same and all(equal)
    return same


def main(
    warps: int = typer.Option(8, help="the walk's and the one launch's warps"),
    time: bool = typer.Option(True, "--time/--no-time", help="also time both forms (GPU)"),
    device: str = typer.Option("cuda", help="cuda, or cpu (Triton's interpreter: two small "
                               "cases)"),
) -> None:
    from harness.cli.common import select_device

    device = select_device(device)  # on the CPU: TRITON_INTERPRET=1 before triton is imported
    import torch

    from kernels.titans import chunk

    defaults = {"WALK_WARPS": chunk.WALK_WARPS, "REPLAY_WARPS": chunk.REPLAY_WARPS}
    chunk.WALK_WARPS = chunk.REPLAY_WARPS = chunk.OVERLAP_WARPS = warps
    chunk.OVERLAP_SHARE = float("inf")
    chunk.chunk_titans_linear_fwd_overlap_kernel = Counted(
        chunk.chunk_titans_linear_fwd_overlap_kernel)
    bf16, f16 = torch.bfloat16, torch.float16
    cases = [("bf16 B=2 T=2048 H=16 D=64", 2, 2048, 16, 64, bf16, None)]
    if device == "cpu":
        cu = varlen(12, 40)
        cases = [("f16 B=1 T=200 H=2 D=16", 1, 200, 2, 16, f16, None),
                 ("f16 varlen 12 sequences H=2 D=16", 1, cu[-1], 2, 16, f16, cu)]
    else:
        cu = varlen(60, 200)
        cases += [("f16 B=2 T=2048 H=16 D=64", 2, 2048, 16, 64, f16, None),
                  ("bf16 B=2 T=1000 H=16 D=128", 2, 1000, 16, 128, bf16, None),
                  ("bf16 B=1 T=777 H=4 D=100", 1, 777, 4, 100, bf16, None),
                  ("f16 B=8 T=1024 H=32 D=64 (256 walks)", 8, 1024, 32, 64, f16, None),
                  ("bf16 varlen 60 sequences H=16 D=64 (960 walks)", 1, cu[-1], 16, 64, bf16,
                   cu),
                  ("f16 varlen 60 sequences H=16 D=128 (960 walks)", 1, cu[-1], 16, 128, f16,
                   cu)]
    runs = 1 if device == "cpu" else 3  # the GPU's programs race; the interpreter's do not
    failed = [case[0] for case in cases if not compare(chunk, *case, device, runs)]
    if device == "cuda" and time:
        from triton.testing import do_bench

        console.print(f"SMs: {torch.cuda.get_device_properties(0).multi_processor_count}")
        for name, value in defaults.items():  # the two launches as the defaults run them
            setattr(chunk, name, value)
        for B, H, T in ((2, 16, 4096), (4, 16, 4096), (2, 48, 4096), (4, 32, 4096),
                        (8, 32, 2048), (16, 32, 1024)):
            x, states = inputs(B, T, H, 64, bf16, B, device)
            ms = [do_bench(lambda: forward(chunk, x, states, None, overlap), warmup=50,
                           rep=200, return_mode="median") for overlap in (False, True)]
            console.print(f"B={B} H={H} T={T} D=64 bfloat16, {B * H} walks: apart "
                          f"{ms[0]:.3f} ms, one launch {ms[1]:.3f} ms")
    console.print("all equal" if not failed else f"failed: {failed}")
    raise typer.Exit(1 if failed else 0)


if __name__ == "__main__":
    typer.run(main)
