"""The math backend: the reference and the fallback, on CPU (torch ops) and CUDA (kernels_cu/math.cu).

It takes every dtype including fp64 and every feature the packed form has,
forward and backward (deterministic: no atomics), dropout on the CPU only.
On the CPU, what torch's fused CPU attention can express runs through it
(fused_cpu.py says what it declines); the rest, and everything on CUDA,
materialises scores for a chunk of query rows at a time within
WORKSPACE_BYTES, so memory stays bounded whatever the batch.
"""
from __future__ import annotations

import os

from .. import checks, paged
from ..cuda import loader
from . import capabilities, math_cpu, math_cuda

CAPABILITIES = capabilities.Capabilities(
    devices=("cpu", "cuda"),
    dtypes=checks.SUPPORTED_DTYPES,
    max_head_dim=512,
    bias=True,
    dropout=True,  # on the CPU (reasons() says so for CUDA)
    window=True,
    head_dim_v_differs=True,
    backward=True,
    paged_kv=True,  # forward only: the pages are gathered into a contiguous call (varattn/paged.py)
)

# Scores of one chunk of query rows: rows * heads * max_seqlen_k accumulators.
WORKSPACE_BYTES = int(os.environ.get("VARATTN_MATH_WORKSPACE_MB", "256")) * 2**20


def reasons(params) -> list[str]:
    found = capabilities.reasons(CAPABILITIES, params)
    if params.device.type == "cuda":
        missing = loader.cupy_missing_reason()
        if missing:
            found.append(missing)
        if params.num_heads > 65535:
            found.append(f"{params.num_heads} heads > 65535 (one grid dimension per head)")
        if params.dropout_p > 0:
            found.append("dropout_p > 0 runs on the CPU only (math's CUDA kernels have no dropout; efficient's do)")
    return found


# Dropout's Philox words for a chunk (varattn/dropout.py): int64 words, a
# quarter as many as scores, their temporaries and the stacked words take
# about six float32 score matrices at once; counted with room to spare.
DROPOUT_MATRICES = 8


def rows_per_chunk(params, matrices: int = 1) -> int:
    """How many query rows' scores fit in the workspace at once, `matrices` score-sized tensors per row."""
    if params.dropout_p > 0:
        matrices += DROPOUT_MATRICES
    row_bytes = matrices * params.num_heads * max(params.max_seqlen_k, 1) * params.lse_dtype.itemsize
    return max(1, min(params.total_q, WORKSPACE_BYTES // row_bytes))


def forward(params):
    """(out, lse) of the call; its dropout stream must be drawn (run.py does). A paged call runs as
    the contiguous one paged.gathered makes of it."""
    if params.block_table is not None:
        params = paged.gathered(params)
    return (math_cpu if params.device.type == "cpu" else math_cuda).forward(params, rows_per_chunk(params))


def backward(params, out, lse, grad_out, grad_lse, bias_grad):
    """(dq, dk, dv, dbias) of the call whose forward gave `out` and `lse`; see math_cpu.backward."""
    if params.device.type == "cuda":
        return math_cuda.backward(params, out, lse, grad_out, grad_lse, bias_grad)
    # scores, probabilities, dP and dS of a chunk live at once
    return math_cpu.backward(params, out, lse, grad_out, grad_lse, bias_grad, rows_per_chunk(params, matrices=4))
