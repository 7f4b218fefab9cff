"""Every gradient of a mini-batch walk (TTT-Linear, Titans: a kernel or a reference), for
tests/test_kernels_ttt.py and tests/test_kernels_titans.py."""

import torch


def grads(fn, names, x, st, cu, chunk_size, dtype, seed=1):
    """Every gradient of <o, dO> plus each final state's inner product with a fixed random
    gradient (drawn in the outputs' order and shapes), the inputs ``x[names]`` and the initial
    states ``st`` as leaves in ``dtype`` (None: as given)."""
    leaves = {n: t.detach().clone().to(dtype or t.dtype).requires_grad_() for n, t in x.items()}
    leaves.update({n: t.detach().clone().to(dtype or t.dtype).requires_grad_()
                   for n, t in st.items() if t is not None})
    outs = fn(*(leaves[n] for n in names), **{n: leaves.get(n) for n in st},
              chunk_size=chunk_size, output_final_state=True, cu_seqlens=cu)
    g = torch.Generator().manual_seed(seed)
    sum((y.double() * torch.randn(y.shape, generator=g, dtype=torch.float64)).sum()
        for y in outs).backward()
    return {n: t.grad for n, t in leaves.items()}


def grads_and_o(fn, names, x, st, cu, chunk_size, dtype=None, seed=1):
    """``grads``, and the output o of the call they were taken from (detached, as "o")."""
    kept = {}

    def keep(*args, **kw):
        out = fn(*args, **kw)
        kept["o"] = out[0].detach()
        return out

    return {**grads(keep, names, x, st, cu, chunk_size, dtype, seed), **kept}
