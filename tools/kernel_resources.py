"""The resource tables at the top of the flash kernel files, generated.

For every main instance of a family in TABLES, NVRTC compiles it for each of
the family's architectures with ptxas' verbose report, and the registers,
spills, stack and shared memory it reports (with the dynamic shared memory
the host launches it with) replace the lines between the family's
`// resources:` and `// end of resources` markers. The table names the NVRTC that made it;
tests/test_kernel_resources.py rebuilds it with the same NVRTC and fails when
the file differs, so a kernel change that moves a number cannot land without
the table.

    python tools/kernel_resources.py          # rewrite the tables
    python tools/kernel_resources.py --check  # exit 1 when one is stale
"""
from __future__ import annotations

import argparse
import concurrent.futures
import multiprocessing
import os
import re
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from varattn.backends import decode, flash  # noqa: E402  (registers the families)
from varattn.cuda import loader  # noqa: E402

BEGIN, END = "// resources:", "// end of resources"
_REPORT = re.compile(
    r"(?P<stack>\d+) bytes stack frame, (?P<stores>\d+) bytes spill stores, (?P<loads>\d+) bytes spill loads\s*\n"
    r"ptxas info\s*: Used (?P<registers>\d+) registers(?:[^\n]*?(?P<smem>\d+) bytes smem)?")


def _forward_shared_mem(kernels) -> dict[str, int]:
    return {kernel.instance(dtype): kernel.shared_mem for kernel in kernels for dtype in flash.STORAGE_TYPES}


def _backward_shared_mem() -> dict[str, int]:
    return {f"flash_bwd<{dtype}, {head_dim}, {mode}>": flash.backward_shared_mem(head_dim)
            for head_dim in flash.BACKWARD_HEAD_DIMS for dtype in flash.STORAGE_TYPES.values()
            for mode in ("false", "true")}


def _hopper_backward_shared_mem() -> dict[str, int]:
    return {f"flash_bwd_hopper<{dtype}, {head_dim}, {mode}>": flash.hopper_backward_shared_mem(head_dim)
            for head_dim in flash.HOPPER_BACKWARD_HEAD_DIMS for dtype in flash.STORAGE_TYPES.values()
            for mode in ("false", "true")}


# family -> (the architectures it runs on, the instances the table lists
# (the main kernels; their small helper kernels are left out) with the
# dynamic shared memory of each)
TABLES = {
    "flash_fwd": (("sm_80", "sm_90a"), lambda: _forward_shared_mem(flash.MMA_SYNC.values())),
    "flash_fwd_hopper": (("sm_90a",), lambda: _forward_shared_mem(flash.HOPPER_KERNELS)),
    "flash_bwd": (("sm_80", "sm_90a"), _backward_shared_mem),
    "flash_bwd_hopper": (("sm_90a",), _hopper_backward_shared_mem),
    "decode": (("sm_80", "sm_90a"), lambda: decode.INSTANCES),
}


def report(family: str, instance: str, arch: str) -> dict[str, int]:
    """ptxas' figures for one instance."""
    compiled = loader.compile_for_arch(loader.source(family), [instance], arch, ("-Xptxas=-v",))
    log = compiled.log
    found = _REPORT.search(log[log.index(f"Function properties for {compiled.lowered[instance]}"):])
    return {key: int(value or 0) for key, value in found.groupdict().items()}  # smem: none reported is 0


def table(family: str, version: str, pool) -> list[str]:
    """The comment lines of `family`'s table, markers included: a row per
    instance and architecture."""
    arches, listed = TABLES[family]
    shared = listed()
    instances = sorted(shared, key=lambda name: [int(x) if x.isdigit() else x for x in re.split(r"(\d+)", name)])
    rows = [(name, arch) for name in instances for arch in arches]
    figures = pool.map(report, [family] * len(rows), *zip(*rows))
    width = max(len(name) for name in instances)
    lines = [f"{BEGIN} NVRTC {version}, -Xptxas -v (tools/kernel_resources.py writes this table)",
             f"//   {'instance':<{width}}  arch    registers  spill stores / loads  stack  shared: static + dynamic"]
    for (name, arch), f in zip(rows, figures):
        spills = f"{f['stores']} / {f['loads']} B"
        lines.append(f"//   {name:<{width}}  {arch:<6}  {f['registers']:>9}  {spills:>20}  {f['stack']:>3} B  "
                     f"{f['smem']} B + {shared[name] / 1024:.1f} KB")
    return lines + [END]


def rewritten(family: str, lines: list[str]) -> tuple[Path, str, str]:
    """(the family's file, its text, its text with `lines` as the table)."""
    path = loader.SOURCE_DIR / f"{family}.cu"
    text = path.read_text()
    begin, end = text.find(BEGIN), text.find(END)
    if begin < 0 or end < begin:
        raise SystemExit(f"{path}: no '{BEGIN}' ... '{END}' block to fill")
    return path, text, text[:begin] + "\n".join(lines) + text[end + len(END):]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="exit 1 when a table differs from the code")
    args = parser.parse_args(argv)
    version = "%d.%d" % loader.nvrtc_version()
    stale = []
    with concurrent.futures.ProcessPoolExecutor(os.cpu_count(), mp_context=multiprocessing.get_context("spawn")) as pool:
        for family in TABLES:
            path, text, new = rewritten(family, table(family, version, pool))
            if new != text:
                stale.append(path.name)
                if not args.check:
                    path.write_text(new)
    if stale:
        print(("stale: " if args.check else "rewrote: ") + ", ".join(stale))
    return 1 if stale and args.check else 0


if __name__ == "__main__":
    sys.exit(main())
