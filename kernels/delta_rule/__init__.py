"""Delta rule (DeltaNet) kernels, docs/operators.md section 1."""

from kernels.delta_rule.chunk import chunk_delta_rule
from kernels.delta_rule.fused_recurrent import fused_recurrent_delta_rule
from kernels.delta_rule.parallel import parallel_delta_rule

__all__ = ["chunk_delta_rule", "fused_recurrent_delta_rule", "parallel_delta_rule"]
