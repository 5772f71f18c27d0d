"""What a backend supports, declared once, and the reasons a call falls outside it."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..cuda import loader


@dataclass(frozen=True)
class Capabilities:
    devices: tuple[str, ...]                   # torch device types: "cpu", "cuda"
    dtypes: tuple[torch.dtype, ...]
    max_head_dim: int
    head_dims: tuple[int, ...] | None = None   # the exact list, or None for any up to max_head_dim
    min_compute_capability: tuple[int, int] = (0, 0)
    bias: bool = False                         # attn_bias: bool mask or additive float
    dropout: bool = False
    window: bool = False
    head_dim_v_differs: bool = False           # D_v != D
    backward: bool = False
    paged_kv: bool = False                     # k, v as page pools read through a block_table


def reasons(caps: Capabilities, params) -> list[str]:
    found = []
    device = params.device
    if device.type not in caps.devices:
        found.append(f"runs on {'/'.join(caps.devices)}, inputs are on {device.type}")
    elif device.type == "cuda":
        capability = loader.compute_capability(device.index)
        if capability < caps.min_compute_capability:
            need = "sm_%d%d" % caps.min_compute_capability
            found.append(f"needs {need} or newer, device is sm_{capability[0]}{capability[1]}")
    if params.dtype not in caps.dtypes:
        found.append(f"dtype {params.dtype} not in {', '.join(str(d) for d in caps.dtypes)}")
    for what, dim in (("head_dim", params.head_dim), ("head_dim_v", params.head_dim_v)):
        if caps.head_dims is not None and dim not in caps.head_dims:
            found.append(f"{what} {dim} not in {caps.head_dims}")
        elif dim > caps.max_head_dim:
            found.append(f"{what} {dim} > {caps.max_head_dim}")
    if params.head_dim_v != params.head_dim and not caps.head_dim_v_differs:
        found.append(f"head_dim_v {params.head_dim_v} differs from head_dim {params.head_dim}")
    if params.attn_bias is not None and not caps.bias:
        found.append(f"attn_bias ({params.bias_kind}) not supported")
    if params.dropout_p > 0 and not caps.dropout:
        found.append("dropout_p > 0 not supported")
    if params.has_window and not caps.window:
        found.append("sliding window not supported")
    if params.block_table is not None and not caps.paged_kv:
        found.append("paged KV cache: not yet in this backend")
    if params.requires_grad and not caps.backward:
        found.append("inputs require grad but this backend has no backward yet")
    return found
