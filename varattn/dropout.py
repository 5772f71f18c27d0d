"""Dropout on the attention probabilities: which (head, query row, key)
elements keep their probability, from a counter-based generator
(Philox-4x32-10), so that any kernel, tile by tile, and the backward
regenerate the same mask without storing it.

A call's stream is `(seed, offset)`, drawn from torch's generator of the
inputs' device when the call runs: on CUDA torch's Philox seed and offset,
the offset then advanced past the call, so that `torch.manual_seed` governs
it as it does torch SDPA's dropout; on the CPU a seed drawn from torch's CPU
generator, offset 0. Element (h, i, j), head h, packed query row i and key j
of the row's sequence (counted from its first key), takes word j % 4 of

    Philox-4x32-10(key = (seed low, seed high),
                   counter = (j // 4, i, (offset + h) low, (offset + h) high))

and is kept when that word is at least p * 2^32 (probability 1 - p); kept
probabilities are scaled by 1 / (1 - p).
"""
from __future__ import annotations

import dataclasses

import torch

_MASK32 = 0xFFFFFFFF
_MULTIPLIERS = (0xD2511F53, 0xCD9E8D57)
_KEY_STEPS = (0x9E3779B9, 0xBB67AE85)
ROUNDS = 10


def _mul_hi_lo(a: int, x: torch.Tensor):
    """(high, low) 32-bit halves of a * x, for x holding uint32 values in int64,
    without leaving int64: x is split into 16-bit halves."""
    low_part = a * (x & 0xFFFF)
    high_part = a * (x >> 16)
    t = low_part + ((high_part & 0xFFFF) << 16)
    return (high_part >> 16) + (t >> 32), t & _MASK32


def philox4x32(counter, key):
    """Philox-4x32-10 of `counter` (four int64 tensors or ints holding uint32
    values, broadcast together) under `key` (two ints): four int64 tensors."""
    c0, c1, c2, c3 = (torch.as_tensor(c, dtype=torch.int64) for c in counter)
    k0, k1 = key
    for round_ in range(ROUNDS):
        if round_:
            k0, k1 = (k0 + _KEY_STEPS[0]) & _MASK32, (k1 + _KEY_STEPS[1]) & _MASK32
        hi0, lo0 = _mul_hi_lo(_MULTIPLIERS[0], c0)
        hi1, lo1 = _mul_hi_lo(_MULTIPLIERS[1], c2)
        c0, c1, c2, c3 = hi1 ^ c1 ^ k0, lo1, hi0 ^ c3 ^ k1, lo0
    return c0, c1, c2, c3


def threshold(p: float) -> int:
    """Words below this drop their element: floor(p * 2^32)."""
    return int(p * 2**32)


def keep(state: tuple[int, int], p: float, heads: int, rows: torch.Tensor, len_k: int) -> torch.Tensor:
    """(heads, len(rows), len_k) bool: which elements of packed query rows
    `rows` and keys 0..len_k-1 of their sequence keep their probability."""
    seed, offset = state
    counters = offset + torch.arange(heads, dtype=torch.int64)[:, None, None]
    words = philox4x32((torch.arange((len_k + 3) // 4, dtype=torch.int64)[None, None, :], rows.to(torch.int64)[None, :, None],
                        counters & _MASK32, counters >> 32), (seed & _MASK32, (seed >> 32) & _MASK32))
    # word j % 4 of group j // 4, groups in order
    word_of_key = torch.stack(torch.broadcast_tensors(*words), dim=-1).flatten(-2)[..., :len_k]
    return word_of_key >= threshold(p)


def draw(device: torch.device, heads: int) -> tuple[int, int]:
    """A new (seed, offset) for one call on `device`, advancing torch's generator.
    Refused under CUDA-graph capture: the numbers would be baked into the
    graph, and every replay would drop the same elements."""
    if device.type == "cuda":
        if torch.cuda.is_current_stream_capturing():
            raise RuntimeError("varattn: dropout_p > 0 is not supported under CUDA graph capture (its seed and "
                               "offset would be fixed in the graph, so every replay would drop the same "
                               "elements); capture with dropout_p=0")
        generator = torch.cuda.default_generators[device.index if device.index is not None else torch.cuda.current_device()]
        offset = generator.get_offset()
        generator.set_offset(offset + -(-heads // 4) * 4)  # torch advances its Philox offset in fours
        return generator.initial_seed() & (2**64 - 1), offset
    return int(torch.randint(0, 2**62, (), dtype=torch.int64)), 0


def drawn(params):
    """`params` with its dropout stream, drawn now unless it has one or needs none."""
    if params.dropout_p == 0 or params.dropout_state is not None:
        return params
    return dataclasses.replace(params, dropout_state=draw(params.device, params.num_heads))


def keep_mask(params) -> torch.Tensor:
    """The whole mask of a call with its stream, padded: (B, H, max_seqlen_q,
    max_seqlen_k) bool, True where kept (False past each sequence's end). For
    tests and for checking a kernel against the math backend."""
    mask = torch.zeros(params.batch_size, params.num_heads, params.max_seqlen_q, params.max_seqlen_k, dtype=torch.bool)
    starts_q = params.cu_seqlens_q[:-1].tolist()
    lengths_q = (params.cu_seqlens_q.diff() if params.seqused_q is None else params.seqused_q).tolist()
    lengths_k = (params.cu_seqlens_k.diff() if params.seqused_k is None else params.seqused_k).tolist()
    for b, (start, len_q, len_k) in enumerate(zip(starts_q, lengths_q, lengths_k)):
        rows = torch.arange(start, start + len_q)
        mask[b, :, :len_q, :len_k] = keep(params.dropout_state, params.dropout_p, params.num_heads, rows, len_k)
    return mask
