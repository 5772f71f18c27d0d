"""The math backend on CUDA: the three kernels of kernels_cu/math.cu over chunks of query rows."""
from __future__ import annotations

import torch

from .. import kernel_params, loader

STORAGE_TYPES = {torch.float16: "half_t", torch.bfloat16: "bf16_t", torch.float32: "float", torch.float64: "double"}
KERNELS = ("math_scores", "math_softmax", "math_weighted_sum")
THREADS = 128  # kernels_cu/math.cu: THREADS

loader.register_family("math", [f"{k}<{t}>" for k in KERNELS for t in STORAGE_TYPES.values()])


def forward(params, chunk: int):
    """(out, lse), materialising scores for `chunk` query rows at a time."""
    out, lse = params.new_out(), params.new_lse()
    if params.total_q == 0 or params.num_heads == 0:
        return out, lse
    scores = torch.empty(chunk * params.num_heads * max(params.max_seqlen_k, 1),
                         dtype=params.lse_dtype, device=params.device)
    packed = kernel_params.pack(params, out, lse)
    kernels = [loader.kernel("math", f"{name}<{STORAGE_TYPES[params.dtype]}>", params.device)
               for name in KERNELS]
    for first in range(0, params.total_q, chunk):
        rows = min(chunk, params.total_q - first)
        args = loader.Args(packed, loader.int64(first), loader.pointer(scores))
        for kernel in kernels:
            loader.launch(kernel, (rows, params.num_heads), (THREADS,), args)
    return out, lse
