"""Turn a pytest-benchmark JSON (--benchmark-json=FILE) into the markdown comparison table.

    python benchmarks/report.py results.json

One row per workload; per implementation the median time in ms, the rate
(TFLOP/s, or TB/s for decode), the peak memory of one call and the host time
of one call (the fresh-call groups) where measured; then varattn's best time
against the fastest anchor (torch NestedTensor SDPA, torch padded + mask,
torch's efficient SDPA backend, FlexAttention): "x0.50" means varattn takes
half the anchor's time.
"""
from __future__ import annotations

import json
import sys

ANCHORS = ("torch-nested", "torch-padded", "torch-efficient", "flex", "torch-jagged", "torch-strided")


def table(results: dict) -> str:
    rows: dict[str, dict[str, dict]] = {}
    for bench in results["benchmarks"]:
        info = bench.get("extra_info", {})
        if "impl" in info:
            rows.setdefault(bench["group"], {})[info["impl"]] = dict(median=bench["stats"]["median"], **info)
    impls = sorted({impl for row in rows.values() for impl in row}, key=lambda i: (i in ANCHORS, i))
    lines = ["| workload | " + " | ".join(impls) + " | varattn / fastest anchor |",
             "|---|" + "---|" * (len(impls) + 1)]
    for group in sorted(rows):
        row = rows[group]
        cells = []
        for impl in impls:
            if impl not in row:
                cells.append("–")
                continue
            r = row[impl]
            notes = [f"{r['tbps']:.2f} TB/s" if "tbps" in r else f"{r['tflops']:.0f} TFLOP/s" if "tflops" in r else "",
                     f"{r['peak_mib']:.0f} MiB" if "peak_mib" in r else "",
                     f"host {r['host_us']:.0f} us" if "host_us" in r else ""]
            notes = ", ".join(n for n in notes if n)
            cells.append(f"{r['median'] * 1e3:.3f} ms" + (f" ({notes})" if notes else ""))
        ours = [r["median"] for i, r in row.items() if i.startswith("varattn")]
        anchors = [r["median"] for i, r in row.items() if i in ANCHORS]
        ratio = f"x{min(ours) / min(anchors):.2f}" if ours and anchors else "–"
        lines.append(f"| {group} | " + " | ".join(cells) + f" | {ratio} |")
    devices = sorted({r.get("device", "?") for row in rows.values() for r in row.values()})
    date = results.get("datetime", "")[:10]
    return f"Device: {', '.join(devices)}; {date}\n\n" + "\n".join(lines)


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit(__doc__)
    with open(sys.argv[1]) as handle:
        print(table(json.load(handle)))
