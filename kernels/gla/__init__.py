"""Gated linear attention (GLA) kernels, docs/operators.md section 2."""

from kernels.gla.fused_recurrent import fused_recurrent_gla

__all__ = ["fused_recurrent_gla"]
