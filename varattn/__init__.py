"""varattn: exact attention over batches of variable-length sequences, without padding.

Front ends:
    varlen_attention              packed (total, H, D) tensors + cu_seqlens (FlashAttention's convention)
    attention                     NestedTensors (jagged or strided) or padded batches + lengths / masks
    scaled_dot_product_attention  torch.nn.functional.scaled_dot_product_attention's signature
    nn.SelfAttention              the SDPA tutorial's attention block
Dispatch:
    Backend, use_backends(...), explain(...)
"""
from . import nn
from .backends import Backend
from .checks import set_device_checks
from .dispatch import Explanation, NoBackendError, use_backends
from .explain import explain
from .frontend import attention
from .loader import KernelCompileError
from .sdpa import scaled_dot_product_attention
from .varlen import varlen_attention

__version__ = "0.1.0"

__all__ = [
    "Backend", "Explanation", "KernelCompileError", "NoBackendError", "attention", "explain", "nn",
    "scaled_dot_product_attention", "set_device_checks", "use_backends", "varlen_attention",
]
