"""tools/ncu_stalls.py: an Nsight Compute source page's samples by stall reason and opcode."""

import importlib.util
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
spec = importlib.util.spec_from_file_location("ncu_stalls", ROOT / "tools" / "ncu_stalls.py")
ncu_stalls = importlib.util.module_from_spec(spec)
spec.loader.exec_module(ncu_stalls)

# ncu -i R --page source --csv --print-source sass: the kernel's name, then one row per
# instruction (a predicated one, a thousands separator)
PAGE = ('"Kernel Name","walk_kernel",\n'
        '"Address","Source","Warp Stall Sampling (All Samples)","Instructions Executed",'
        '"stall_wait","stall_barrier","stall_barrier (Not Issued)"\n')
PAGE += '''"0x10","HMMA.16816.F32.BF16 R8, R12, R16, R8","1,000","64","900","100","7"
"0x20","@!P1 BAR.SYNC.DEFER_BLOCKING 0x0","600","64","0","600","7"
"0x30","FADD R1, R2, R3","400","128","400","0","0"
'''


def test_samples_shared_by_reason_and_opcode():
    df = ncu_stalls.read_source_page(PAGE)
    assert list(df["opcode"]) == ["HMMA", "BAR", "FADD"]
    assert ncu_stalls.stall_columns(df) == ["stall_wait", "stall_barrier"]
    by_reason, by_opcode = ncu_stalls.shares(df)
    assert by_reason.to_dict() == pytest.approx({"stall_wait": 0.65, "stall_barrier": 0.35})
    assert list(by_opcode.index) == ["HMMA", "BAR", "FADD"]
    assert by_opcode["HMMA"] == pytest.approx(0.5)
