"""`python -m varattn precompile`: compile kernel instances into the on-disk
cache (varattn/cuda/loader.py's cache_dir()) ahead of first use, for
container images and CI warm-up. Needs no GPU when --arch is given.

Each instance is compiled in its own process (NVRTC compiles one program on
one thread), as many at once as the machine has cores.
"""
from __future__ import annotations

import argparse
import concurrent.futures
import multiprocessing
import os
import re
import sys
import time

from .. import backends  # noqa: F401  (registers every kernel family's instances with the loader)
from ..cuda import loader

# The families each backend's kernels live in; "_hopper" families build for sm_90a only.
BACKEND_FAMILIES = {
    "decode": ("decode", "paged_append"),
    "flash": ("flash_fwd", "flash_fwd_hopper", "flash_bwd", "flash_bwd_hopper"),
    "efficient": ("efficient_fwd", "efficient_bwd"),
    "math": ("math",),
}
# --dtype names -> the storage types the kernels' first template argument names
DTYPES = {"float16": "half_t", "bfloat16": "bf16_t", "float32": "float", "float64": "double"}


def template_arguments(name_expression: str) -> list[str]:
    """'flash_fwd<bf16_t, 128, 128, 32>' -> ['bf16_t', '128', '128', '32']; a plain kernel's name -> []."""
    arguments = re.fullmatch(r"\w+(?:<(.*)>)?", name_expression).group(1)
    return [] if arguments is None else [a.strip() for a in arguments.split(",")]


def instances(archs, dtypes=None, head_dims=None, backends_=None) -> list[tuple[str, str, str]]:
    """(family, name expression, arch) of every instance the filters keep.

    A kernel's first template argument is its storage type and the second,
    where it has one, its head dim (tests/test_cli.py checks every registered
    instance keeps to this); plan kernels, whose first argument (if any) is
    a tile size, serve every dtype and head dim."""
    storage = None if dtypes is None else {DTYPES[d] for d in dtypes}
    families = [f for b in (backends_ or BACKEND_FAMILIES) for f in BACKEND_FAMILIES[b]]
    found = []
    for arch in archs:
        for family in families:
            if family.endswith("_hopper") and arch != "sm_90a":
                continue
            for expression in loader.FAMILIES[family]:
                arguments = template_arguments(expression)
                if arguments and arguments[0] in DTYPES.values():
                    if storage is not None and arguments[0] not in storage:
                        continue
                    if head_dims is not None and len(arguments) > 1 and int(arguments[1]) not in head_dims:
                        continue
                found.append((family, expression, arch))
    return found


def _compile(family: str, expression: str, arch: str) -> float:
    started = time.perf_counter()
    loader.cached_cubin(family, expression, arch)
    return time.perf_counter() - started


def _progress(total: int):
    """tqdm's bar when it is installed, else a line per instance."""
    try:
        from tqdm import tqdm
    except ImportError:
        done = 0

        def advance(label):
            nonlocal done
            done += 1
            print(f"[{done}/{total}] {label}", flush=True)
        return advance, lambda: None
    bar = tqdm(total=total, unit="kernel")
    return (lambda label: (bar.set_postfix_str(label, refresh=False), bar.update())), bar.close


def cache_size() -> tuple[int, int]:
    """(files, bytes) in the kernel cache."""
    files = [p for p in loader.cache_dir().glob("*.cubin")] if loader.cache_dir().is_dir() else []
    return len(files), sum(p.stat().st_size for p in files)


def _device_archs() -> list[str]:
    import torch
    if not torch.cuda.is_available():
        return []
    return sorted({loader.arch_of(torch.device("cuda", i)) for i in range(torch.cuda.device_count())})


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m varattn precompile", description=__doc__.split("\n\n")[0])
    parser.add_argument("--arch", action="append", help="sm_80, sm_90a, ... (repeatable; default: this machine's GPUs)")
    parser.add_argument("--dtype", action="append", choices=sorted(DTYPES))
    parser.add_argument("--head-dim", action="append", type=int)
    parser.add_argument("--backend", action="append", choices=sorted(BACKEND_FAMILIES))
    parser.add_argument("--jobs", type=int, default=os.cpu_count(), help="processes compiling at once")
    args = parser.parse_args(argv)
    missing = loader.cupy_missing_reason()
    if missing:
        print(f"cannot compile: {missing}", file=sys.stderr)
        return 1
    archs = args.arch or _device_archs()
    if not archs:
        print("no GPU here: say which architectures to build for with --arch (e.g. --arch sm_90a)", file=sys.stderr)
        return 2
    todo = instances(archs, args.dtype, args.head_dim and set(args.head_dim), args.backend)
    print(f"compiling {len(todo)} kernel instances for {', '.join(archs)} into {loader.cache_dir()}")
    advance, close = _progress(len(todo))
    started = time.perf_counter()
    # spawn: a worker needs nothing of this process, and a fork of one running torch's threads can hang
    with concurrent.futures.ProcessPoolExecutor(max(1, args.jobs),
                                                mp_context=multiprocessing.get_context("spawn")) as pool:
        running = {pool.submit(_compile, *item): item for item in todo}
        failed = []
        for future in concurrent.futures.as_completed(running):
            family, expression, arch = running[future]
            try:
                future.result()
            except loader.KernelCompileError as error:
                failed.append(f"{expression} ({arch}): {error}")
            advance(f"{expression} {arch}")
    close()
    files, size = cache_size()
    print(f"done in {time.perf_counter() - started:.1f} s; the cache holds {files} kernels, {size / 2**20:.1f} MiB")
    for failure in failed:
        print(f"failed: {failure}", file=sys.stderr)
    return 1 if failed else 0
