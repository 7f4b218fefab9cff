"""What the delta-rule localisation scripts share (tile_sweep.py, bwd_localize.py,
stage_bisect.py): the sweep's case, and kernel variants forced from the environment.

    VARIANT=min32                 every kernel's tiles 32 wide where the head dim allows
                                  (utils.MIN_TILE = 32: the tiling before session i, which
                                  Triton 3.6 miscompiled)
    VARIANT=warps8:NAME[,NAME]    those @triton.jit kernels (names in chunk_output, wy or
                                  chunk_state, e.g. wy_bwd_kernel) with 8 warps instead of 4

Session h's tile_sweep "warps8" is "warps8:chunk_fwd_o_kernel" here; session i's call B ran
today's default tiling as "min64".
"""
import os

import triton

import kernels.common.chunk_output as co
import kernels.common.chunk_state as cs
import kernels.common.utils as ut
import kernels.delta_rule.wy as wy
from harness.cases import Case

VARIANT = os.environ.get("VARIANT", "")


def sweep_case(K: int, V: int, T: int = 200) -> Case:
    """B=1 H=2, initial and final state, seed 11: the case every sweep line is measured on."""
    return Case(op="delta_rule", dims=dict(B=1, T=T, H=2, K=K, V=V), initial_state=True,
                output_final_state=True, seed=11)


def force_warps(kernels, num_warps: int) -> None:
    """Pin each autotuned kernel (its @triton.jit name, or the object) to one config of
    ``num_warps`` warps, keeping the first config's meta-parameters."""
    for kern in kernels:
        if isinstance(kern, str):
            kern = getattr(next(m for m in (co, wy, cs) if hasattr(m, kern)), kern)
        while not isinstance(kern, triton.runtime.autotuner.Autotuner):
            kern = kern.fn
        kern.configs = [triton.Config(dict(kern.configs[0].kwargs), num_warps=num_warps)]
        kern.cache = {}


if VARIANT == "min32":
    ut.MIN_TILE = 32
elif VARIANT.startswith("warps8:"):
    force_warps(VARIANT.split(":", 1)[1].split(","), 8)
elif VARIANT:
    raise ValueError(f"VARIANT: expected 'min32' or 'warps8:NAME[,NAME]', got {VARIANT!r}")
