"""The multi-process harness (tests/dist_utils.py) reports where every rank was when a run fails.

CI once timed out in a gloo barrier on one rank with no trace of the other; these tests check that
a failure or a hang now carries the stack of each rank that was stopped.
"""

from __future__ import annotations

import time

import pytest

from dist_utils import run_distributed


def _rank0_raises_rank1_stuck(rank, world):
    if rank == 0:
        time.sleep(0.5)
        raise ValueError("rank 0 failed on purpose")
    time.sleep(600)  # what CI saw: one rank raised (a barrier timeout), the other was stuck elsewhere


def _rank1_sleeps(rank, world):
    import torch.distributed as dist

    if rank == 1:
        time.sleep(600)  # a rank stuck outside any collective
    dist.barrier()


def test_a_failing_rank_reports_where_the_other_was_stuck():
    with pytest.raises(Exception) as info:
        run_distributed(_rank0_raises_rank1_stuck, 2, timeout=60, pg_timeout_s=30)
    assert "rank 0 failed on purpose" in str(info.value)
    notes = "\n".join(info.value.__notes__)
    assert "in _rank0_raises_rank1_stuck" in notes.split("--- rank 1:")[1], notes


def test_a_hang_reports_every_ranks_stack():
    with pytest.raises(TimeoutError) as info:
        run_distributed(_rank1_sleeps, 2, timeout=8, pg_timeout_s=60)
    notes = "\n".join(info.value.__notes__)
    assert "in _rank1_sleeps" in notes.split("--- rank 1:")[1], notes
    assert "in _rank1_sleeps" in notes.split("--- rank 0:")[1].split("--- rank 1:")[0], notes
