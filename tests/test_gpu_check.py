"""benchmarks/gpu_check.py, the one command a lent GPU runs first, at tiny shapes on the CPU: every
check runs (so the script cannot rot between GPU runs), records a result and writes the table."""
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_gpu_check_smoke_runs_every_check(tmp_path):
    result = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu_check.py"), "--smoke", "--out",
                             str(tmp_path / "check")], capture_output=True, text=True, cwd=tmp_path, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads((tmp_path / "check" / "gpu_check.json").read_text())
    checks = report["checks"]
    assert list(checks) == ["pretrain", "fsdp", "flex", "decode", "long"]
    assert all(c["ok"] for c in checks.values()), {k: c.get("error") for k, c in checks.items()}
    assert checks["fsdp"]["loss_first"] == checks["pretrain"]["loss_first"]  # FSDP on one process: the same step
    assert checks["flex"]["loss_difference"] < 1e-5 and checks["decode"]["batch8"]["same_tokens"] == 1.0
    assert checks["decode"]["batch8"]["compiled_is_greedy"]
    assert "| pretrain | yes |" in (tmp_path / "check" / "gpu_check.md").read_text()
