"""The one-screen table of every bench's figures, floors, ratios and targets (run it last).

    .venv/bin/python bench/summary.py
"""

from __future__ import annotations

import os

from table import RESULTS, read


def main() -> None:
    rows = [r for r in read() if "note" not in r]
    notes = [r for r in read() if "note" in r]
    if not rows:
        print(f"no results in {RESULTS}: run the benches first (`make bench`)")
        return
    print(f"ubertool benches, {os.cpu_count()} cores (figures are medians; floors measured in the same run)")
    print(f"{'figure':<40} {'value':>10} {'floor':>10} {'ratio':>7}  {'target':<16} met  floor is")
    for r in rows:
        value, floor, unit = r["value"], r["floor"], r["unit"]
        if floor is None:
            target, ratio, met = f"<= {r['slack']:g} {unit}", "", value <= r["slack"]
            floor_text = ""
        else:
            target = f"<= {r['ratio']:g}x" + (f" + {r['slack']:g} {unit}" if r["slack"] else "")
            ratio, met = f"{value / floor:6.2f}x", value <= r["ratio"] * floor + r["slack"]
            floor_text = f"{floor:10.2f}"
        print(f"{r['figure']:<40} {value:10.2f} {floor_text:>10} {ratio:>7}  {target:<16} "
              f"{'yes' if met else 'NO ':<4} {r['floor_name']}")
    print(f"(units: {', '.join(sorted({r['unit'] for r in rows}))})")
    for r in notes:
        print(f"note: {r['figure']}: {r['value']:.2f} {r['unit']}; {r['note']}")


if __name__ == "__main__":
    main()
