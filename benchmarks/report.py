"""Turn a pytest-benchmark JSON (--benchmark-json=FILE) into the markdown comparison table,
and with --plot into a figure.

    python benchmarks/report.py results.json [--plot out.png]

One row per workload; per implementation the median time in ms, the rate
(TFLOP/s, or TB/s for decode), the peak memory of one call and the host time
of one call (the fresh-call groups) where measured; then varattn's best time
against the fastest anchor (torch's varlen_attn, torch NestedTensor SDPA,
torch padded + mask, torch's efficient SDPA backend, FlexAttention) and
against torch's varlen_attn alone: "x0.50" means varattn takes half the
anchor's time.

--plot draws one panel per kind of group (forward, forward + backward,
masked, decode, fresh calls): a bar per workload and implementation, in
TFLOP/s (TB/s for decode) where every bar of the panel has a rate, else the
median time.
"""
from __future__ import annotations

import argparse
import json
import textwrap

ANCHORS = ("torch-varlen", "torch-nested", "torch-padded", "torch-efficient", "flex", "torch-jagged", "torch-strided")
PANELS = ("forward", "forward + backward", "masked", "decode", "fresh calls")


def collect(results: dict) -> dict[str, dict[str, dict]]:
    """group -> impl -> the benchmark's extra_info and its median time."""
    rows: dict[str, dict[str, dict]] = {}
    for bench in results["benchmarks"]:
        info = bench.get("extra_info", {})
        if "impl" in info:
            rows.setdefault(bench["group"], {})[info["impl"]] = dict(median=bench["stats"]["median"], **info)
    return rows


def ordered(impls) -> list[str]:
    """varattn's implementations first, then the anchors."""
    return sorted(set(impls), key=lambda i: (i in ANCHORS, i))


def ratio(ours: list[float], anchors: list[float]) -> str:
    return f"x{min(ours) / min(anchors):.2f}" if ours and anchors else "–"


def devices(rows) -> str:
    return ", ".join(sorted({r.get("device", "?") for row in rows.values() for r in row.values()}))


def table(results: dict) -> str:
    rows = collect(results)
    impls = ordered(impl for row in rows.values() for impl in row)
    lines = ["| workload | " + " | ".join(impls) + " | varattn / fastest anchor | varattn / torch-varlen |",
             "|---|" + "---|" * (len(impls) + 2)]
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
        varlen = [row["torch-varlen"]["median"]] if "torch-varlen" in row else []
        lines.append(f"| {group} | " + " | ".join(cells) + f" | {ratio(ours, anchors)} | {ratio(ours, varlen)} |")
    date = results.get("datetime", "")[:10]
    return f"Device: {devices(rows)}; {date}\n\n" + "\n".join(lines)


def panel(group: str, row: dict) -> str:
    entries = row.values()
    if any("host_us" in r for r in entries):
        return "fresh calls"
    if any("tbps" in r for r in entries):
        return "decode"
    if any(r.get("mask", "document") != "document" for r in entries):
        return "masked"
    return "forward + backward" if group.endswith("fwd+bwd") else "forward"


def plot(results: dict, path: str) -> None:
    # Imported here: the table needs no matplotlib.
    import matplotlib
    from matplotlib.figure import Figure
    from matplotlib.patches import Patch

    rows = collect(results)
    panels: dict[str, dict[str, dict]] = {}
    for group in sorted(rows):
        panels.setdefault(panel(group, rows[group]), {})[group] = rows[group]
    names = [name for name in PANELS if name in panels]
    # One colour per implementation over all panels, the first panels' (packed calls, ten or so)
    # taking tab10's distinct colours.
    first = {}
    for n, name in enumerate(names):
        for row in panels[name].values():
            for impl in row:
                first.setdefault(impl, n)
    palette = matplotlib.colormaps["tab10"].colors + matplotlib.colormaps["tab20"].colors
    colors = {impl: palette[n % len(palette)]
              for n, impl in enumerate(sorted(first, key=lambda i: (first[i], i in ANCHORS, i)))}
    figure = Figure(figsize=(14, 4.2 * len(names)), layout="constrained")
    commit, when = results.get("commit_info", {}), results.get("datetime", "")  # pytest-benchmark writes UTC
    title = " · ".join(part for part in (
        "varattn benchmarks", devices(rows), f"{when[:16].replace('T', ' ')} UTC" if when else "",
        f"commit {commit['id'][:8]}{' (dirty)' if commit.get('dirty') else ''}" if commit.get("id") else "") if part)
    figure.suptitle(title)
    for axes, name in zip(figure.subplots(len(names), 1, squeeze=False)[:, 0], names):
        groups = panels[name]
        entries = [r for row in groups.values() for r in row.values()]
        if all("tbps" in r for r in entries):
            key, scale, unit = "tbps", 1, "TB/s (higher is better)"
        elif all("tflops" in r for r in entries):
            key, scale, unit = "tflops", 1, "TFLOP/s (higher is better)"
        else:
            short = max(r["median"] for r in entries) < 1e-3
            key, scale, unit = "median", 1e6 if short else 1e3, f"median time, {'us' if short else 'ms'} (lower is better)"
        # Each group's bars side by side, only the implementations it measured.
        slot = max(len(row) for row in groups.values())
        width = 0.8 / slot
        for x, row in enumerate(groups.values()):
            impls = ordered(row)
            for n, impl in enumerate(impls):
                bar = axes.bar(x + (n - (len(impls) - 1) / 2) * width, row[impl][key] * scale, width,
                               color=colors[impl])
                axes.bar_label(bar, fmt="%.3g", fontsize=7, rotation=90, padding=2)
        axes.set_xticks(range(len(groups)),
                        [textwrap.fill(g.removesuffix(", fwd+bwd") if name == "forward + backward" else g, 24)
                         for g in groups], fontsize=8)
        axes.set_title(name)
        axes.set_ylabel(unit)
        axes.margins(y=0.15)
        axes.grid(axis="y", alpha=0.3)
        axes.legend(handles=[Patch(color=colors[i], label=i) for i in ordered(i for row in groups.values() for i in row)],
                    fontsize=8, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    figure.savefig(path, dpi=120)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("results", help="pytest-benchmark JSON (--benchmark-json=FILE)")
    parser.add_argument("--plot", metavar="OUT.png", help="also draw the comparison into this image")
    arguments = parser.parse_args()
    with open(arguments.results) as handle:
        results = json.load(handle)
    print(table(results))
    if arguments.plot:
        plot(results, arguments.plot)
