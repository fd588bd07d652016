"""`bench/soak.py` is minutes long and not part of CI; this 2-second run keeps it from rotting."""

from __future__ import annotations

import json
import subprocess
import sys

from helpers import ROOT


def test_soak_smoke(mlp_model_file, tmp_path):
    out = tmp_path / "soak.json"
    run = subprocess.run(
        [
            sys.executable,
            "-m",
            "bench.soak",
            "--model",
            str(mlp_model_file),
            "--duration",
            "2",
            "--concurrency",
            "4",
            "--interval",
            "0.5",
            "--warmup",
            "0.5",
            "--json",
            str(out),
            "--server-arg=--max-batch-size=4",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert run.returncode == 0, run.stdout + run.stderr
    assert "server RSS" in run.stdout and "PASS" in run.stdout, run.stdout
    result = json.loads(out.read_text())
    assert result["calls"] > 0 and result["error_count"] == 0 and result["server_exit_code"] == 0
    assert result["rss_start_mib"] > 0 and result["rss_growth_mib"] is not None and len(result["intervals"]) >= 3
