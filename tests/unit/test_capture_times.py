"""How an edit's summary splits a CUDA graph's capture (graphs.CaptureTimes): the parts add up, and where torch ends
and instantiates in one call (before 2.8) the summary says so instead of a zero instantiation."""
from fisedit_engine.graphs import CaptureTimes


def test_a_kept_graph_reports_each_part():
    t = CaptureTimes(0.0704, 0.0004, 0.0031, segments=14, segment_bytes=180 * 2**20)
    assert abs(t.total - 0.0739) < 1e-12
    assert t.describe() == "74 ms: recording 70 (allocating 14 segments, 180 MiB), ending 0, instantiating 3"


def test_a_graph_instantiated_by_capture_end_reports_both_together():
    t = CaptureTimes(0.070, 0.006, None)
    assert abs(t.total - 0.076) < 1e-12
    assert t.describe() == "76 ms: recording 70 (allocating 0 segments, 0 MiB), ending and instantiating 6"
