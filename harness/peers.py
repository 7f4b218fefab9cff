"""Peers: other libraries' kernels adapted to our API, registered like our own.

fla-core (flash-linear-attention) when ``fla`` imports. Its delta rule functions take our
arguments unchanged ([B, T, H, ...] layout, same names); its chunk kernel refuses float32.
"""

from __future__ import annotations

import importlib.util

from harness.registry import Implementation, register


def _fla_available() -> str | None:
    if importlib.util.find_spec("fla") is None:
        return "fla-core is not installed (pip install 'linattn-harness[peers]')"
    return None


FLA = [
    # (operator, our name, fla target, dtypes, has a backward)
    ("delta_rule", "fla_chunk", "fla.ops.delta_rule:chunk_delta_rule", ("float16", "bfloat16"), True),
    ("delta_rule", "fla_fused_recurrent", "fla.ops.delta_rule:fused_recurrent_delta_rule",
     ("float32", "float16", "bfloat16"), True),
]


def _no_per_channel_beta(case) -> str | None:
    return "per-channel beta" if case.options.get("beta_per_channel") else None


for op, name, target, dtypes, backward in FLA:
    register(Implementation(
        op=op, name=name, kind="peer", target=target, devices=("cuda",), dtypes=dtypes,
        description=f"fla-core {target.split(':')[1]}", backward=backward,
        available=_fla_available, supports=_no_per_channel_beta if name == "fla_chunk" else None,
    ))
