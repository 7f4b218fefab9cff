#!/usr/bin/env bash
# Session f, call 1 (H200): compile every variant in parallel beside `harness check delta_rule`
# (long family, then random cases, both capped), then accuracy and speed of our delta-rule
# kernels beside fla-core 0.6.0 in one process, then a per-kernel profile at T = 32768.
# Run from the repository root on the device: bash reports/delta_rule/h200_2026-12-01/call1.sh
# (carry .whl). Logs in $OUT: call1.tgz (everything) and the text files the report quotes.
set -u
export PYTHONUNBUFFERED=1
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD
W=/tmp/call1
mkdir -p $W
T0=$(date +%s)
stamp() { echo "[$(( $(date +%s) - T0 )) s] $*"; }
IMPLS=chunk,chunk_recompute,chunk_round,fla_chunk,fused_recurrent,fla_fused_recurrent
CHECK="python3 -m harness check delta_rule --impl chunk,fused_recurrent,parallel --dtype bfloat16,float32"

body() {
    nvidia-smi --query-gpu=name,memory.total,clocks.max.sm,clocks.max.mem,driver_version --format=csv
    python3 -c "import torch, triton, fla; print(torch.__version__, triton.__version__, fla.__version__, torch.cuda.get_device_name(), torch.cuda.get_device_capability())"
    stamp "warm ($IMPLS, one process each) beside the check"
    (echo $IMPLS | tr , '\n' | ACC_DTYPES=bfloat16,float32 xargs -P 6 -I{} \
        python3 reports/delta_rule/experiment.py warm {} 2048 > $W/warm.txt 2>&1) &
    local warm=$!
    ($CHECK --family long --max-time 110 --out $W/check_long > $W/check_long.txt 2>&1
     $CHECK --family random --max-time 110 --out $W/check_random > $W/check_random.txt 2>&1) &
    local check=$!
    wait $warm; stamp "warm done"; grep "^warm" $W/warm.txt
    wait $check; stamp "check done"
    OUT=$W ACC_DTYPES=bfloat16,float32 python3 reports/delta_rule/experiment.py acc,bench $IMPLS \
        2048,8192,16384,32768 2>&1 | tee $W/experiment.txt | grep -E "^(acc|bench)"
    stamp "experiment done"
    OUT=$W python3 reports/delta_rule/experiment.py prof chunk,chunk_recompute,fla_chunk 32768 \
        > $W/prof.txt 2>&1
    stamp "prof done"
}
export -f body stamp
export W T0 IMPLS CHECK
timeout 530 bash -c body 2>&1 | tee $W/call1.log
cp $W/experiment.txt $W/check_long.txt $W/check_random.txt $W/prof.txt $W/call1.log $OUT/ 2>/dev/null
tar czf $OUT/call1.tgz -C $W . 2>/dev/null
ls -la $OUT
