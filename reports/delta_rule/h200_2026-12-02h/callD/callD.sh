#!/usr/bin/env bash
# Session h, call D: the long family of `harness check delta_rule` at its default lengths on a
# GPU (1K, 4K, 16K, 64K) in one process, so that every kernel compiles once, beside more random
# cases under a cap. Logs straight to $OUT. (Call C, this session's first, ran each T in its own
# process: 1K and 4K passed in 320 s each, 16K and 64K printed nothing in 540 s; the float64
# chunked reference's backward was O(T^2), fixed before this call.)
set -u
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD OMP_NUM_THREADS=8
W=/tmp/D; mkdir -p $W
CHECK="python3 -m harness check delta_rule --impl chunk,fused_recurrent,parallel --dtype bfloat16,float32"
timeout 470 $CHECK --family long --out $W/long > $OUT/long.txt 2>&1 &
timeout 470 $CHECK --family random --examples 40 --max-time 300 --out $W/random > $OUT/random.txt 2>&1 &
wait
tar czf $OUT/D.tgz -C $W . 2>/dev/null
echo done
