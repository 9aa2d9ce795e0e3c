"""train.memory.peak_report: the replay of an allocator trace finds the peak and what is alive there."""

from __future__ import annotations

from flashoptim_dist.train.memory import peak_report

MiB = 2**20


def _ev(action, addr, size):
    return {"action": action, "addr": addr, "size": size, "frames": []}


def test_peak_report_replays_the_trace():
    trace = [
        _ev("alloc", 1, 100 * MiB),
        _ev("alloc", 2, 50 * MiB),
        _ev("free_requested", 1, 100 * MiB),  # requested, not completed (another stream): still alive
        _ev("alloc", 3, 30 * MiB),  # peak: 1 + 2 + 3 = 180 MiB
        _ev("free_completed", 1, 100 * MiB),
        _ev("alloc", 4, 120 * MiB),  # 200 - 100 + ... = 50 + 30 + 120 = 200 MiB: the new peak
        _ev("free_completed", 4, 120 * MiB),
        _ev("free_completed", 99, 7 * MiB),  # allocated before the recording: ignored
        _ev("alloc", 5, 10 * MiB),
    ]
    text = peak_report({"device_traces": [trace]}, 0, top=2, title="test")
    lines = text.splitlines()
    assert lines[0].startswith("# peak report test: +0.195 GiB above the start of the recording, at event 5 of 9")
    assert [ln.split()[1] for ln in lines[1:3]] == ["120.0", "50.0"]  # largest first, top=2
    assert lines[3] == "#   ... 3 live, 0.195 GiB in all"
