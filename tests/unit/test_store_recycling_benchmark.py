"""benchmarks/store_recycling.py runs end to end on a small store (its timings on a CI machine mean nothing)."""
import importlib.util
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_store_recycling_benchmark_smoke(capsys):
    spec = importlib.util.spec_from_file_location("store_recycling", ROOT / "benchmarks" / "store_recycling.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert module.main(["--mib", "8", "--steps", "4", "--repeat", "1"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert [line.split(":")[0].strip() for line in lines[1:]] == ["fresh block", "spare block"] * 2
    assert all("seal" in line for line in lines[1:])
