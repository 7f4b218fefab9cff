"""TTT-Linear kernels, docs/operators.md section 3."""

from kernels.ttt.chunk import chunk_ttt_linear
from kernels.ttt.fused_chunk import fused_chunk_ttt_linear

__all__ = ["chunk_ttt_linear", "fused_chunk_ttt_linear"]
