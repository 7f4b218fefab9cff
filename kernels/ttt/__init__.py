"""TTT-Linear kernels, docs/operators.md section 3."""

from kernels.ttt.fused_chunk import fused_chunk_ttt_linear

__all__ = ["fused_chunk_ttt_linear"]
