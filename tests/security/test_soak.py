"""The short soak CI runs (the long one is `make soak`: 32 sessions for 5 minutes)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

SOAK = Path(__file__).resolve().parents[2] / "bench" / "soak.py"


def test_short_soak_loses_nothing() -> None:
    done = subprocess.run([sys.executable, str(SOAK), "--sessions", "6", "--seconds", "12"],
                          capture_output=True, text=True, timeout=300)
    summary = json.loads(done.stdout.strip().splitlines()[-1])
    assert done.returncode == 0, done.stdout
    assert summary["server_alive"]
    assert summary["sent"] == summary["answered"] > 50
    assert (summary["lost"], summary["state_errors"]) == (0, 0)
    assert {"ok", "error", "timeout"} <= set(summary["statuses"])
