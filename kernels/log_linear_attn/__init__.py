"""Log-linear attention: the chunked Triton kernel (forward), kernels/log_linear_attn/chunk.py."""

from kernels.log_linear_attn.chunk import chunk_log_linear_attn

__all__ = ["chunk_log_linear_attn"]
