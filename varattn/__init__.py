"""varattn: exact attention over batches of variable-length sequences, without padding.

Front ends:
    varlen_attention              packed (total, H, D) tensors + cu_seqlens (FlashAttention's convention);
                                  with block_table, k and v are the pages of a paged KV cache
    append_paged_kv               new keys and values into a paged KV cache
    attention                     NestedTensors (jagged or strided) or padded batches + lengths / masks
    scaled_dot_product_attention  torch.nn.functional.scaled_dot_product_attention's signature
    nn.SelfAttention              the SDPA tutorial's attention block
Dispatch:
    Backend, use_backends(...), explain(...)
"""
from .backends import Backend
from .checks import set_device_checks
from .cuda.loader import KernelCompileError
from .dispatch import Explanation, NoBackendError, use_backends
from .frontends import nn
from .frontends.batched import attention
from .frontends.explain import explain
from .frontends.packed import varlen_attention
from .frontends.sdpa import scaled_dot_product_attention
from .frontends.varlen_attn import varlen_attn
from .frontends.paged_kv import append_paged_kv

__version__ = "0.2.0"

__all__ = [
    "Backend", "Explanation", "KernelCompileError", "NoBackendError", "append_paged_kv", "attention", "explain", "nn",
    "scaled_dot_product_attention", "set_device_checks", "use_backends", "varlen_attention", "varlen_attn",
]
