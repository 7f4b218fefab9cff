#!/usr/bin/env bash
# Session f, the bench call (H200): the harness sweep of every operator's available
# implementations (ours, fla-core 0.6.0's, SDPA) into reports/bench, compiled first in 12
# processes. Run from the repository root on the device (carry .whl); what it wrote comes back
# as $OUT/bench.tgz. An unfinished sweep continues with the same command plus --resume.
set -u
export PYTHONUNBUFFERED=1
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD
timeout 500 python3 -m harness bench delta_rule gla ttt titans log_linear_attn \
    --seq-len 2048,4096,8192,16384,32768 --mode fwd,fwdbwd --baseline sdpa --out reports/bench \
    --prewarm 12 --timeout 150 --max-time 430 ${RESUME:-} 2>&1 | tee /tmp/bench.log | grep -v "^prewarm"
timeout 40 python3 -m harness report reports/bench 2>&1 | tail -3
cp /tmp/bench.log reports/bench/logs/sweep.log 2>/dev/null
tar czf $OUT/bench.tgz reports/bench
ls -la $OUT
