"""Tensor maps for the Hopper kernels' bulk tensor copies (TMA, kernels_cu/tma.cuh).

A tensor map describes a packed (rows, heads, head_dim) tensor to the copy
engine: its address, sizes and strides, and the box one copy brings into
shared memory or stores from it (64 columns = 128 bytes, `box_heads`
heads, `box_rows` rows: box_heads x box_rows rows of 128 bytes,
row-major), 128-byte swizzled as the wgmma operands want it. The driver
encodes it on the host (cuTensorMapEncodeTiled); the kernel takes its 128
bytes by value.
"""
from __future__ import annotations

import ctypes
import functools

import torch

_DATA_TYPES = {torch.float16: 6, torch.bfloat16: 9}   # CU_TENSOR_MAP_DATA_TYPE_FLOAT16 / _BFLOAT16
_INTERLEAVE_NONE, _SWIZZLE_128B, _L2_PROMOTION_256B, _OOB_FILL_ZEROS = 0, 3, 3, 0
SIZE = 128


class TensorMapError(RuntimeError):
    """The driver would not describe a tensor for the copy engine."""


@functools.lru_cache(maxsize=None)
def _encode_tiled():
    encode = ctypes.CDLL("libcuda.so.1").cuTensorMapEncodeTiled
    encode.restype = ctypes.c_int
    encode.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_uint32, ctypes.c_void_p,
                       ctypes.POINTER(ctypes.c_uint64), ctypes.POINTER(ctypes.c_uint64),
                       ctypes.POINTER(ctypes.c_uint32), ctypes.POINTER(ctypes.c_uint32),
                       ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_int]
    return encode


def rows(x: torch.Tensor, box_rows: int, box_heads: int = 1) -> bytes:
    """The tensor map of packed `x` (rows, heads, head_dim), copied in boxes of
    64 columns x `box_heads` heads x `box_rows` rows; rows and columns past
    the end read as zeros and are not written. Raises TensorMapError where
    the driver refuses (e.g. an address that is not 16-byte aligned)."""
    return _encoded(x.data_ptr(), tuple(x.shape), x.stride(), x.dtype, box_rows, box_heads)


# A map depends only on these values; the same tensors (or the caching
# allocator handing out the same blocks) come back call after call.
@functools.lru_cache(maxsize=256)
def _encoded(address: int, shape, strides, dtype, box_rows: int, box_heads: int) -> bytes:
    count, heads, dim = shape
    item = torch.finfo(dtype).bits // 8
    # Strides of size-1 dimensions mean nothing to torch but must be valid here.
    head_stride = strides[1] if heads > 1 else dim
    row_stride = strides[0] if count > 1 else heads * head_stride
    storage = ctypes.create_string_buffer(SIZE + 64)  # the map must be 64-byte aligned
    aligned = ctypes.addressof(storage) + (-ctypes.addressof(storage)) % 64
    status = _encode_tiled()(
        aligned, _DATA_TYPES[dtype], 3, address,
        (ctypes.c_uint64 * 3)(dim, heads, max(count, 1)),
        (ctypes.c_uint64 * 2)(head_stride * item, row_stride * item),
        (ctypes.c_uint32 * 3)(64, box_heads, box_rows), (ctypes.c_uint32 * 3)(1, 1, 1),
        _INTERLEAVE_NONE, _SWIZZLE_128B, _L2_PROMOTION_256B, _OOB_FILL_ZEROS)
    if status != 0:
        raise TensorMapError(f"cuTensorMapEncodeTiled failed (CUresult {status}) for a {shape} tensor "
                             f"with strides {strides}")
    return ctypes.string_at(aligned, SIZE)
