"""Titans with a linear memory: the chunked Triton kernel (forward), kernels/titans/chunk.py."""

from kernels.titans.chunk import chunk_titans_linear

__all__ = ["chunk_titans_linear"]
