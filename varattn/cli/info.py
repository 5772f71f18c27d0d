"""`python -m varattn info`: what varattn finds on this machine: versions, the
GPUs and their architectures, the kernel cache, and which backend would run
a typical call on each device, with every other backend's reasons."""
from __future__ import annotations

import argparse
import importlib.metadata
import platform

import torch

import varattn
from ..backends import REGISTRY
from ..cuda import loader
from ..frontends.explain import explain
from .precompile import cache_size


def _version(distribution: str) -> str:
    try:
        return importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def _cupy_versions() -> list[tuple[str, str]]:
    missing = loader.cupy_missing_reason()
    if missing:
        return [("cupy", missing)]
    import cupy
    major, minor = loader.nvrtc_version()
    return [("cupy", cupy.__version__), ("nvrtc", f"{major}.{minor}")]


def _typical_call(device: torch.device, dtype: torch.dtype, head_dim: int):
    """q, k, v of two sequences (5 and 3 rows) with 4 heads, packed, and its cu_seqlens."""
    q, k, v = (torch.randn(8, 4, head_dim, device=device, dtype=dtype) for _ in range(3))
    cu = torch.tensor([0, 5, 8], dtype=torch.int32, device=device)
    return q, k, v, cu


def report() -> str:
    lines = [f"varattn {varattn.__version__}", f"python {platform.python_version()}", f"torch {torch.__version__}",
             f"torch CUDA runtime {torch.version.cuda or 'none (a CPU build)'}"]
    lines += [f"{name} {version}" for name, version in _cupy_versions()]
    devices = [torch.device("cpu")]
    if torch.cuda.is_available():
        for index in range(torch.cuda.device_count()):
            device = torch.device("cuda", index)
            devices.append(device)
            lines.append(f"cuda:{index} {torch.cuda.get_device_name(index)}, {loader.arch_of(device)}, "
                         f"{torch.cuda.get_device_properties(index).total_memory / 2**30:.0f} GiB")
    else:
        lines.append("no CUDA device")
    files, size = cache_size()
    lines.append(f"kernel cache {loader.cache_dir()}: {files} kernels, {size / 2**20:.1f} MiB")
    lines.append("backends: " + ", ".join(b.value for b in REGISTRY))
    for device in devices:
        for dtype, head_dim in ((torch.float32, 64),) if device.type == "cpu" else ((torch.bfloat16, 128),):
            q, k, v, cu = _typical_call(device, dtype, head_dim)
            chosen = explain(q, k, v, cu_seqlens_q=cu, cu_seqlens_k=cu, max_seqlen_q=5, max_seqlen_k=5, causal=True)
            lines.append(f"{device}, {str(dtype).removeprefix('torch.')} head_dim {head_dim} causal: "
                         + str(chosen).replace("\n", "\n    "))
    return "\n".join(lines)


def main(argv=None) -> int:
    argparse.ArgumentParser(prog="python -m varattn info", description=__doc__.split("\n\n")[0]).parse_args(argv)
    print(report())
    return 0
