#!/usr/bin/env bash
# Session f, call 3 (H200): the bench sweep of call 2 continued (--resume: the 47 rows its
# --max-time left), then the cuda-sm90 baseline of the gpu suite's GLA, TTT, Titans and
# log-linear entries (references only; the delta rule's was recorded on the H100 in session e).
# Run from the repository root with reports/bench as call 2 left it (carry .whl).
set -u
export PYTHONUNBUFFERED=1
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
(export PYTHONPATH=/tmp/site:$PWD
 timeout 300 python3 -m harness bench delta_rule gla ttt titans log_linear_attn --seq-len 2048,4096,8192,16384,32768 --mode fwd,fwdbwd --baseline sdpa --out reports/bench --prewarm 12 --timeout 100 --max-time 250 --resume 2>&1 | tee /tmp/bench2.log | grep -E "^(ttt|titans|log_linear|rank|--max)"
 timeout 30 python3 -m harness report reports/bench 2>&1 | tail -2
 cp /tmp/bench2.log reports/bench/logs/sweep_resume.log; tar czf $OUT/bench.tgz reports/bench)
export PYTHONPATH=$PWD
timeout 270 python3 -m harness gate --suite gpu --op gla,ttt,titans,log_linear_attn -j 10 --update --out /tmp/gate 2>&1 | tee $OUT/gate_others.txt | tail -25
cp suites/baselines/cuda-sm90.json $OUT/
