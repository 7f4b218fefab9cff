#!/usr/bin/env bash
# Session g, call A (H200), after call 1 ran past its 595 s with nothing saved (the check's
# --max-time only stops new cases; its output was to be copied at the end). Every log goes
# straight to $OUT and every job has its own timeout, so what ran comes back:
#   harness check delta_rule, long family (1K-64K) and random family, at once, beside
#   the delta rule's gpu-suite gate with --update (the new parallel kernel moves its entries).
set -u
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD
W=/tmp/A; mkdir -p $W
CHECK="python3 -m harness check delta_rule --impl chunk,fused_recurrent,parallel --dtype bfloat16,float32"
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader > $OUT/check_long.txt
timeout 510 $CHECK --family long --out $W/check_long >> $OUT/check_long.txt 2>&1 &
timeout 510 $CHECK --family random --max-time 330 --out $W/check_random > $OUT/check_random.txt 2>&1 &
(timeout 510 python3 -m harness gate --suite gpu --op delta_rule -j 6 --update --out $W/gate \
    > $OUT/gate.txt 2>&1; echo "gate rc=$?" >> $OUT/gate.txt; cp suites/baselines/cuda-sm90.json $OUT/) &
wait
tar czf $OUT/A.tgz -C $W . 2>/dev/null
echo done
