#!/usr/bin/env bash
# Session f, call 5 (H200): the new defaults (bf16 forward walk "round", the forward's w, h, v'
# saved, Ai freed in inference) through the delta rule's gpu-suite gate (no --update: against
# the baseline recorded on the H100), and chunk's extra peak memory beside it.
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD
(timeout 230 python3 -m harness gate --suite gpu --op delta_rule -j 12 --out /tmp/g \
    > $OUT/gate_delta_round.txt 2>&1; echo "gate rc=$?" >> $OUT/gate_delta_round.txt) &
LINATTN_AUTOTUNE=0 timeout 150 python3 reports/delta_rule/h200_2026-12-01/peak.py > $OUT/peak.txt 2>&1
wait
cat $OUT/peak.txt; grep -v "^case " $OUT/gate_delta_round.txt | tail -40
