"""benchmarks/e2e_phases.py on the CPU with the small SD1.5 test architecture: it runs an edit end to end, splits
both runs into phases and prints every model call of the edit."""
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_e2e_phases_reports_phases_and_calls(host):
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "e2e_phases.py"), "--model", "sd15-small@64",
                           "--steps", "5", "--profile"], capture_output=True, text=True, timeout=600, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = proc.stdout
    assert re.search(r"stock regenerate \+ decode: [\d.]+ s  sample [\d.]+, decode [\d.]+", out), out[:2000]
    for name in ("new mask", "new mask, refitted", "the last edit's mask"):
        assert re.search(rf"FISEdit edit, {name}: [\d.]+ s \([\d.]+x\)  mask \(probe\) [\d.]+, probe inside "
                         r"[\d.]+, sparse sampling [\d.]+, decode [\d.]+", out), out[:2000]
    # the edit with FISEDIT_REFIT=0 says why it built: the line that shows a refit's failure on a device
    assert "  FISEdit: not reusing the sparse steps kept from the last edit: built for another mask (FISEDIT_REFIT=0)" \
        in out, out[:3000]
    calls = re.findall(r"model calls during the edit \((\d+);", out)
    # the probe's 1 step (20% of 5) and the 5 sampling steps, the first of them replayed from the probe
    assert len(calls) == 3 and all(int(n) >= 5 for n in calls), out[:2000]
    for control in ("on", "off"):
        # and the probe's model calls (one probe step: the call it stops inside raises before it is timed)
        assert re.search(rf"FISEditDifferenceMask alone, attention control {control}: [\d.]+ s \(probe [\d.]+ s, "
                         r"[\d.]+ ms per probe step; model calls, synchronised: [\d.]+( [\d.]+)* ms\)", out), out[:3000]
    assert re.search(r"FISEditDifferenceMask alone, otsu along the original image's edges \(vae\): [\d.]+ s \(probe "
                     r"[\d.]+ s; the edge filter over 64x64 pixels alone [\d.]+ ms\)", out), out[:3000]
    assert "Ordered by: cumulative time" in out and "Ordered by: internal time" in out
