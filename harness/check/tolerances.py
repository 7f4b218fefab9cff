"""Every tolerance the checks use, in one place, each with its reason.

The rule (flash-attention's ``check_tensor_vs_ref``): an implementation run in a dtype passes
a quantity when its error against the float64 truth is at most

    FACTOR * (error of the references evaluated in that same dtype) + FLOOR[dtype]

both errors being ``||x - truth|| / ||truth||`` in float64 on the same (dtype-rounded) inputs.
A reference "in a dtype" takes its inputs in that dtype and keeps its state in float32 (as
every kernel must), so its error is what the dtype's arithmetic and rounding the outputs cost.
Both references (the step loop and the chunked form) are run and the worse error is taken:
they are equally honest algorithms and round differently (over 1K tokens of Titans in float32
the step loop's gradients are up to 8x further from exact than the chunked form's). A kernel
may reorder sums differently again (chunks, tiles), so it gets a factor of a few, not 1.
"""

from __future__ import annotations

# 3x: chunked kernels reassociate sums over up to T terms and run the triangular solve in
# another order; measured peers (fla-core 0.6.0) sit at 1.5-2.5x of the same-dtype reference in
# bf16. 3 leaves room for that without admitting an error of a different kind, which shows up
# as 10x or more.
FACTOR = 3.0

# The floor covers quantities for which the same-dtype reference happens to be almost exact.
# float64: the two float64 references differ only by reassociation, ~1e-15 per operation, grown
#   by the conditioning of the triangular solves and the length of the sums: 1e-10 is 5 orders
#   above what they show and 6 below any real bug.
# float32: unit roundoff 6e-8; sums over T <= 64K terms of well-scaled values keep ~1e-6.
# float16 / bfloat16: half a unit in the last place of the output (2^-11, 2^-8).
FLOOR = {
    "float64": 1e-10,
    "float32": 1e-6,
    "float16": 2.0**-11,
    "bfloat16": 2.0**-8,
}


def tolerance(dtype: str, reference_error: float) -> float:
    """The largest error that passes, given the same-dtype reference's own error."""
    return FACTOR * reference_error + FLOOR[dtype]
