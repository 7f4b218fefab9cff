"""Replay one check case on chunk_delta_rule alone, stage by stage, to find a faulting kernel.

    CUDA_LAUNCH_BLOCKING=1 PYTHONPATH=$PWD python3 reports/delta_rule/fault_repro.py DTYPE 'CASE_JSON'

Runs the forward, then the backward of o (and of the final state if the case has one),
synchronising after each, and prints the traceback of the first error; with
CUDA_LAUNCH_BLOCKING=1 the innermost frame is the launch that faulted. Without a GPU it runs on
the interpreter (float32/float16 only).
"""
import sys
import traceback

import torch

from harness.cases import Case, sample
from harness.check import cast_args
from kernels.delta_rule.chunk import chunk_delta_rule

dtype, case = getattr(torch, sys.argv[1]), Case.from_json(sys.argv[2])
dev = "cuda" if torch.cuda.is_available() else "cpu"
args = cast_args(sample(case, dev), case, dtype, grad=True)
stage = "forward"
try:
    o, ht = chunk_delta_rule(**args)
    torch.cuda.synchronize() if dev == "cuda" else None
    stage = "backward"
    loss = o.float().square().sum() + (ht.square().sum() if ht is not None else 0)
    loss.backward()
    torch.cuda.synchronize() if dev == "cuda" else None
    print(f"{sys.argv[1]}: ok, |o| = {o.float().norm():.4g}, |dq| = {args['q'].grad.float().norm():.4g}")
except Exception:
    print(f"{sys.argv[1]}: error in the {stage}")
    traceback.print_exc()
