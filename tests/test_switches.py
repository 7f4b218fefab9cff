"""harness.switches: the `LABEL:module.NAME=VALUE` form tools/switch_compare.py and
tools/kernel_profile.py take, and the context that sets a switch for a block only."""

import pytest

from harness.switches import parse_set, switched
from kernels.gla import chunk_bwd


def test_parse_set_reads_labels_and_literals():
    got = parse_set("split off:kernels.gla.chunk_bwd.STATE_DOTS_SPLIT=False, a.B=64")
    assert got == {"what": "split off",
                   "set": {"kernels.gla.chunk_bwd.STATE_DOTS_SPLIT": False, "a.B": 64}}


@pytest.mark.parametrize("text, says", [("no assignments", "LABEL:module.NAME=VALUE"),
                                        ("x:a.B=notaliteral", "'notaliteral'")])
def test_parse_set_names_what_is_wrong(text, says):
    with pytest.raises(ValueError, match=says):
        parse_set(text)


def test_switched_sets_a_constant_for_the_block_only():
    before = chunk_bwd.STATE_DOTS_SPLIT
    with switched({"set": {"kernels.gla.chunk_bwd.STATE_DOTS_SPLIT": not before}}):
        assert chunk_bwd.STATE_DOTS_SPLIT is (not before)
    assert chunk_bwd.STATE_DOTS_SPLIT is before
