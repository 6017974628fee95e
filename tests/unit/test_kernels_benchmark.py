"""benchmarks/kernels.py runs end to end (on tiny shapes, the kernels under Triton's interpreter, in a subprocess):
the H100 run it is written for should not be the first time its code runs. Timings on the CPU mean nothing."""
import json
import os
import subprocess
import sys
from pathlib import Path

import kernel_checks

kernel_checks.require_triton()

ROOT = Path(__file__).resolve().parents[2]


def test_kernel_benchmark_smoke(tmp_path):
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "kernels.py"), "--device", "cpu", "--dtypes",
                           "fp16", "--fractions", "0.3", "--models", "sd21@768", "--maps", "channels_last", "--sweep",
                           "--out", str(tmp_path)],
                          env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    result = json.loads((tmp_path / "kernels-cpu-interpreter.json").read_text())
    assert result["correctness"] and all(r["ok"] for r in result["correctness"])
    ops = {r["op"] for r in result["timing"]}
    assert ops == {"gather_norm", "gather_norm_conv", "scatter_bias", "scatter_residual", "tokens_norm",
                   "tokens_scatter", "resblock"}
    assert all(r["reference_eager_us"] > 0 and r["triton_eager_us"] > 0 for r in result["timing"])
    assert {r["maps"] for r in result["timing"]} == {"channels_last"}
    assert len(result["sweep"]) == 1 and "gather_norm 64x32" in result["sweep"][0]  # one level, one fraction
    assert "## Timing" in (tmp_path / "kernels-cpu-interpreter.md").read_text()
