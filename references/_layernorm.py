"""The LayerNorm pieces TTT-Linear and Titans share (docs/operators.md sections 3 and 4), written once.

    LN(z) = (z - mean(z)) / sigma,   sigma = sqrt(var(z) + eps)      over the last axis, var biased

The inner model's reconstruction error of a token with key k and value v is

    r = w * LN(z) + b - (v - k)

and its gradient with respect to z (the LayerNorm backward, ``x = LN(z)``, ``gx = w * r``):

    g = d(0.5 * ||r||^2) / dz = (D * gx - sum(gx) - x * sum(gx * x)) / (D * sigma)

All functions broadcast over leading axes; ``w`` and ``b`` must broadcast against ``z``
(``[H, D]`` for one token per head, ``[H, 1, D]`` for a mini-batch ``[H, C, D]``).
"""

from __future__ import annotations

import torch

__all__ = ["layer_norm", "ln_residual", "ln_recon_grad"]


def layer_norm(z: torch.Tensor, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """``(LN(z), sigma)``: the normalised z and its standard deviation (keepdim)."""
    mean = z.mean(-1, keepdim=True)
    zc = z - mean
    sigma = torch.sqrt((zc * zc).mean(-1, keepdim=True) + eps)
    return zc / sigma, sigma


def ln_residual(u: torch.Tensor, w: torch.Tensor, b: torch.Tensor, eps: float) -> torch.Tensor:
    """The output of both operators: ``o = u + w * LN(u) + b``."""
    return u + w * layer_norm(u, eps)[0] + b


def ln_recon_grad(
    z: torch.Tensor, target: torch.Tensor, w: torch.Tensor, b: torch.Tensor, eps: float
) -> torch.Tensor:
    """``g = d(0.5 * ||w * LN(z) + b - target||^2) / dz``, the LayerNorm backward written out.

    ``target`` is ``v - k``. Titans' loss has no 0.5, so its gradient is ``2 * g``.
    """
    D = z.shape[-1]
    x, sigma = layer_norm(z, eps)
    r = w * x + b - target  # reconstruction error
    gx = w * r  # d(0.5 ||r||^2) / dx
    return (D * gx - gx.sum(-1, keepdim=True) - x * (gx * x).sum(-1, keepdim=True)) / (D * sigma)
