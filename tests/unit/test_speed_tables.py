"""benchmarks/speed.py's tables from a result: the end-to-end rows show the three new-mask paths, and mark a refit
that was built instead (the benchmark's device calls are few; a table that fails to render would lose one)."""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))

import speed  # noqa: E402


def result(refit_taken: bool) -> dict:
    sparse = {"mask_area": 0.05, "shape": "rect", "step_ms_eager": 30.0, "step_ms_graph": 8.0, "step_ms": 8.0,
              "bytes_uploaded_per_step": 48 * 2**20, "bytes_resident_per_step": 0,
              "step_ms_refit": 9.25 if refit_taken else None}
    e2e = {"edit_size": 0.05, "mask_area": 0.051, "seconds": 0.55, "speedup": 1.45, "peak_bytes": 2**30,
           "seconds_refit": 0.41, "speedup_refit": 1.95, "refit_taken": refit_taken, "seconds_same_mask": 0.40,
           "speedup_same_mask": 2.0}
    row = {"model": "sd21v", "size": 768, "steps": 20, "stock_step_ms": 36.7, "unet_eager_ms": 50.2,
           "unet_graph_ms": 20.5, "cache_bytes_per_step": 530 * 2**20, "sparse": [sparse], "e2e": [e2e],
           "stock_e2e_s": 0.8, "stock_peak_bytes": 2 * 2**30, "resident_bytes": 0, "resident_budget_bytes": 2**34}
    return {"gpu": "NVIDIA H100", "setup": "setup", "rows": [row]}


def test_the_per_step_table_shows_the_refitted_step():
    rows = [x for x in speed.markdown(result(True)).splitlines() if x.startswith("| sd21v@768 | 36.7 |")]
    assert len(rows) == 1 and rows[0].endswith("| 530 MiB | 9.2 |")
    header = next(x for x in speed.markdown(result(True)).splitlines() if "rectangle's maps" in x)
    assert header.count("|") == rows[0].count("|")
    assert speed.markdown(result(False)).count("| not refitted |") == 1


def test_the_end_to_end_table_shows_the_built_refitted_and_kept_edits():
    table = speed.markdown(result(True))
    line = next(x for x in table.splitlines() if x.startswith("| sd21v@768 | 0.80 |"))
    assert "| 0.55 | 1.45 | 0.41 | 1.95 | 0.40 | 2.00 |" in line and "(built)" not in line
    header = next(x for x in table.splitlines() if "new mask refitted, s" in x)
    assert header.count("|") == line.count("|")
    assert "0.41 | 1.95 (built) |" in speed.markdown(result(False))
