#!/usr/bin/env bash
# Session g, call B (H200, the last 397 s of device time): parallel_delta_rule new against its
# commit-18875ad version (accuracy, then speed), then chunk with the output fused into the walk
# beside today's chunk and fla. Our kernels with LINATTN_AUTOTUNE=0 (first config only: no
# tuning compiles in this short call); logs straight to $OUT, each step under its own timeout.
set -u
export PYTHONUNBUFFERED=1 LINATTN_AUTOTUNE=0
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl
export PYTHONPATH=/tmp/site:$PWD
timeout 150 python3 reports/delta_rule/parallel_bench.py acc,bench 2048,8192,32768 > $OUT/parallel.txt 2>&1
timeout 140 python3 reports/delta_rule/experiment.py bench chunk,chunk_fusedo,fla_chunk 8192,32768 > $OUT/fusedo.txt 2>&1
echo done
