"""Gated linear attention (GLA) kernels, docs/operators.md section 2."""

from kernels.gla.chunk import chunk_gla
from kernels.gla.fused_chunk import fused_chunk_gla
from kernels.gla.fused_recurrent import fused_recurrent_gla

__all__ = ["chunk_gla", "fused_chunk_gla", "fused_recurrent_gla"]
