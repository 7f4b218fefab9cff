"""The project's implementations, one module per operator (``harness.impls.<op>``), each with
a list ``IMPLEMENTATIONS``: its references, its Triton kernels, the peers adapted to its
arguments and the speed baselines. ``harness.registry`` registers them; adding an operator adds
one module here. Shared pieces (the two references of every operator, the fla-core adapters'
plumbing, the softmax baseline) are in ``harness.impls.common``."""
