"""Find the delta rule case and kernel that make an illegal memory access: one implementation
per process, CUDA_LAUNCH_BLOCKING=1, every case printed before it runs.

    CUDA_LAUNCH_BLOCKING=1 LINATTN_AUTOTUNE=0 PYTHONPATH=$PWD python3 reports/delta_rule/case_sweep.py IMPL N_DRAWN DTYPES

(IMPL: chunk, fused_recurrent, parallel; N_DRAWN hypothesis cases at seed 0 as `harness check`
draws them, then the gpu suite's delta rule cases; DTYPES e.g. bfloat16,float32.)
"""
import os, sys, time, traceback
assert os.environ.get("CUDA_LAUNCH_BLOCKING") == "1"
from hypothesis import given, settings, seed as hseed, HealthCheck
import harness.builtin  # noqa
from harness.cases import case_strategy, Case
from harness.check import evaluate
from harness.registry import get
from harness.suites import load_suite
name = sys.argv[1]
drawn = []
@settings(max_examples=int(sys.argv[2]), deadline=None, database=None, suppress_health_check=list(HealthCheck))
@hseed(0)
@given(case=case_strategy("delta_rule", "cuda"))
def draw(case):
    drawn.append(case)
draw()
cases = drawn + [sc.case for sc in load_suite("gpu").cases if sc.op == "delta_rule" and sc.family == "random"]
impl = get("delta_rule", name)
t0 = time.time()
for dtype in sys.argv[3].split(","):
    for case in cases:
        if impl.supports is not None and impl.supports(case):
            continue
        print(f"[{time.time() - t0:5.1f}s] {name} {dtype} {case.to_json()}", flush=True)
        try:
            rows = evaluate(case, [impl], [dtype], "cuda", "random")
            bad = [r for r in rows if not r["passed"]]
            if bad:
                print("   FAILED TOLERANCE:", [(r["quantity"], r["error"]) for r in bad][:6], flush=True)
        except Exception:
            traceback.print_exc()
            print(f"CRASH {name} {dtype} {case.to_json()}", flush=True)
            sys.exit(1)
print(f"ALL OK {name}", flush=True)
