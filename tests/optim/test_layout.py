"""segment_runs: the one iterator over a state layout's segments (local slice, group phase and
scale slice of each non-empty segment)."""

import pytest

from flashoptim_dist import layout as lay

G = 8


def _layout(segments, numel):
    return lay.state_layout(numel, segments, None, group_size=G, quantize=True, master_weight_bits=None)


def test_whole_tensor_is_one_run():
    lo = _layout([lay.Segment(0, 20, 0)], 20)
    (run,) = lay.segment_runs(lo)
    assert run.index == 0 and run.segment is lo.segments[0]
    assert (run.start, run.stop, run.phase) == (0, 20, 0)
    assert run.local == slice(0, 20) and run.scales == slice(0, 3) and run.n_groups == 3


def test_segment_starting_mid_group():
    """A flat shard [13, 30) of a parameter: it starts at element 5 of group 1 and ends inside
    group 3, so it touches groups 1, 2, 3 and keeps one scale for each."""
    lo = _layout([lay.Segment(0, 17, 13)], 17)
    (run,) = lay.segment_runs(lo)
    assert run.phase == 13 % G == 5
    assert run.local == slice(0, 17)
    assert run.n_groups == 3 == lay.num_groups(17, 5, G)
    assert run.scales == slice(0, 3)


def test_empty_segments_are_skipped_but_keep_their_index():
    """An empty segment (an FSDP shard without rows, an empty fragment) yields nothing and
    holds no scales; the runs after it keep their position in layout.segments."""
    segs = [lay.Segment(0, 0, 40), lay.Segment(0, 6, 3, "a"), lay.Segment(6, 0, 9, "b"), lay.Segment(6, 10, 20, "c")]
    lo = _layout(segs, 16)
    runs = list(lay.segment_runs(lo))
    assert [r.index for r in runs] == [1, 3]
    assert [r.segment.key for r in runs] == ["a", "c"]
    a, c = runs
    # "a": [3, 9) of its parameter: phase 3, groups 0 and 1
    assert (a.start, a.stop, a.phase, a.scale_start, a.scale_stop) == (0, 6, 3, 0, 2)
    # "c": [20, 30): phase 4, groups 2 and 3; its scales follow "a"'s
    assert (c.start, c.stop, c.phase, c.scale_start, c.scale_stop) == (6, 16, 4, 2, 4)
    assert c.scale_stop == lo.n_scales


def test_only_empty_segments_yield_nothing():
    lo = _layout([lay.Segment(0, 0, 0)], 0)
    assert list(lay.segment_runs(lo)) == []
    assert lo.n_scales == 0


@pytest.mark.parametrize("phase", range(G))
def test_runs_tile_the_local_storage_and_the_scales(phase):
    """Consecutive segments of arbitrary phases: the runs cover the local elements and the
    scale vector exactly once, in order, with scale counts from num_groups."""
    segs, local = [], 0
    for k, n in enumerate((1, 7, 8, 9, 0, 31)):
        segs.append(lay.Segment(local, n, 13 * G * k + phase))
        local += n
    lo = _layout(segs, local)
    runs = list(lay.segment_runs(lo))
    assert [r.index for r in runs] == [0, 1, 2, 3, 5]
    assert runs[0].start == 0 and runs[-1].stop == local
    assert runs[0].scale_start == 0 and runs[-1].scale_stop == lo.n_scales
    for prev, nxt in zip(runs, runs[1:]):
        assert prev.stop == nxt.start and prev.scale_stop == nxt.scale_start
    for r in runs:
        assert r.phase == phase
        assert r.n_groups == r.segment.n_groups(G)
        assert r.scale_start == lo.scale_offsets[r.index]
