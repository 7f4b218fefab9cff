#!/usr/bin/env bash
# For the next session with a device (not run in session g: 151 s of device time were left):
# the long family of `harness check delta_rule` with every T in its own process, at once (the
# 64K case alone may take minutes: call A's single long process, 1K-64K in order, ran past
# 510 s), each printing its cases as they end (`harness check` writes <out>/<op>_cases.jsonl
# too), beside more random cases under a cap. Logs straight to $OUT.
set -u
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD
W=/tmp/C; mkdir -p $W
CHECK="python3 -m harness check delta_rule --impl chunk,fused_recurrent,parallel --dtype bfloat16,float32"
for T in 1024 4096 16384 65536; do
    timeout 540 $CHECK --family long --long-t $T --out $W/long_$T > $OUT/long_$T.txt 2>&1 &
done
timeout 540 $CHECK --family random --examples 40 --max-time 380 --out $W/random > $OUT/random.txt 2>&1 &
wait
tar czf $OUT/C.tgz -C $W . 2>/dev/null
echo done
