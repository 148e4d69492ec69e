"""benchmarks/device_check.sh --dry-run: every step's code path on the CPU, outputs written."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.skipif(shutil.which("bash") is None or shutil.which("timeout") is None,
                    reason="needs bash and coreutils timeout")
def test_device_check_dry_run_writes_every_step(tmp_path):
    out = tmp_path / "out"
    res = subprocess.run(["bash", str(ROOT / "benchmarks" / "device_check.sh"), "--dry-run", str(out)],
                         capture_output=True, text=True, timeout=300, env={"PYTHON": sys.executable, "PATH": "/usr/bin:/bin"})
    summary = json.loads((out / "summary.json").read_text())
    assert res.returncode == 0, summary
    assert summary["dry_run"] and summary["ok"]
    assert [s["step"] for s in summary["steps"]] == ["curve", "curve135", "demo", "cuda"]
    assert all(s["status"] == "ok" for s in summary["steps"])
    curve = json.loads((out / "curve.json").read_text())["curve"]
    assert [p["width"] for p in curve["points"]][:3] == [1, 6, 12] and not curve["cuda_graphs"]
    curve135 = json.loads((out / "curve135.json").read_text())["curve"]
    assert curve135["preset"] == "smollm2-135m" and [p["width"] for p in curve135["points"]] == [1, 6, 4]
    demo = json.loads((out / "demo.json").read_text())["demo"]
    assert demo[0]["block_size"] == 2 and demo[0]["equal_to_ar"]
    md = (out / "summary.md").read_text()
    assert "not a measurement" in md and "## curve" in md and "## demo" in md
