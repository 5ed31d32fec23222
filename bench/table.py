"""The benches' shared table: each bench records its figures here, `bench/summary.py` prints them.

A row is one figure beside its floor measured in the same run, and its target: met when
`value <= ratio * floor + slack` (a target with no floor is an absolute bound: `value <= slack`).
A note is a figure with no target that explains others (`note`): printed under the table.
Rows go to `bench/results/summary.jsonl` (`make bench` empties it first), or to the file
`UBERTOOL_BENCH_RESULTS` names.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

# UBERTOOL_BENCH_RESULTS: another file, e.g. to keep two runs' tables apart.
RESULTS = Path(os.environ.get("UBERTOOL_BENCH_RESULTS")
               or Path(__file__).with_name("results") / "summary.jsonl")


def record(figure: str, value: float, floor: float | None, floor_name: str, *, ratio: float = 1.0,
           slack: float = 0.0, unit: str = "ms") -> None:
    """Append one row (replacing an earlier row of the same figure)."""
    _put({"figure": figure, "value": value, "floor": floor, "floor_name": floor_name,
          "ratio": ratio, "slack": slack, "unit": unit})


def note(figure: str, value: float, says: str, *, unit: str = "ms") -> None:
    """Append one note (replacing an earlier one of the same figure): a measured figure with no
    target, and what it explains."""
    _put({"figure": figure, "value": value, "note": says, "unit": unit})


def _put(row: dict) -> None:
    RESULTS.parent.mkdir(exist_ok=True)
    rows = [r for r in read() if r["figure"] != row["figure"]]
    rows.append(row)
    RESULTS.write_text("".join(json.dumps(r) + "\n" for r in rows))


def read() -> list[dict]:
    if not RESULTS.exists():
        return []
    return [json.loads(line) for line in RESULTS.read_text().splitlines() if line.strip()]
