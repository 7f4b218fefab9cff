"""tools/sass_loop.py: the main loop of a kernel's SASS and its instruction mix."""

import importlib.util
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
spec = importlib.util.spec_from_file_location("sass_loop", ROOT / "tools" / "sass_loop.py")
sass_loop = importlib.util.module_from_spec(spec)
spec.loader.exec_module(sass_loop)

# nvdisasm's form: a short inner loop, then the wide outer one (its branch back to .L_x_0)
SASS = """
        /*0000*/                   MOV R1, c[0x0][0x28] ;
.L_x_0:
        /*0010*/                   LDG.E R2, desc[UR4][R4.64] ;
        /*0020*/                   BAR.SYNC.DEFER_BLOCKING 0x0 ;
.L_x_1:
	//## File "/src/k.py", line 7
        /*0030*/                   FFMA R3, R2, R2, R3 ;
        /*0040*/              @P0  BRA `(.L_x_1) ;
	//## File "/src/k.py", line 9
        /*0050*/                   HMMA.16816.F32.BF16 R8, R12, R16, R8 ;
        /*0060*/                   STS.128 [R5], R8 ;
        /*0070*/                   LDSM.16.M88.4 R12, [R6] ;
        /*0080*/              @!P1 BRA `(.L_x_0) ;
        /*0090*/                   EXIT ;
"""


def test_the_widest_backward_branch_is_the_loop():
    loop = sass_loop.main_loop(SASS)
    assert loop[0].startswith("LDG") and loop[-1].startswith("@!P1 BRA")
    counts = sass_loop.mix(loop)
    assert counts == {"instructions": 8, "BAR": 1, "LDS": 1, "STS": 1, "SHFL": 0, "HMMA": 1,
                      "HGMMA": 0, "LDG": 1, "STG": 0, "F32": 1, "CVT": 0}


def test_no_backward_branch_no_loop():
    straight = "\n".join(line for line in SASS.splitlines() if "BRA" not in line)
    assert sass_loop.main_loop(straight) == []


def test_loop_instructions_by_source_line():
    # an instruction counts for the last source line named before it; the loop's first two
    # (before any line comment) for None; EXIT, past the loop, for none
    lines = sass_loop.loop_lines(SASS)
    assert {k: dict(v) for k, v in lines.items()} == {
        None: {"LDG": 1, "BAR": 1},
        ("/src/k.py", 7): {"FFMA": 1, "BRA": 1},
        ("/src/k.py", 9): {"HMMA": 1, "STS": 1, "LDSM": 1, "BRA": 1}}
