"""One side (queries, or keys/values) of a batch in the packed form, and the
small int32 tensors of lengths the front ends put on the device.

Lengths that arrive on the host (a strided NestedTensor's, a padded batch's
list) are copied from pinned memory without a sync, and jagged offsets (int64)
are converted to the kernels' int32: some 10 to 15 microseconds each. A model
hands the same lengths to every layer of a step, so both are kept for reuse:
the host-made ones by their contents in a bounded cache, the converted
offsets on the caller's offsets tensor itself (and the lengths of a CUDA
key_padding_mask on the mask), so that they go with it, for as long as it
is not changed in place. Each is made on a stream and reused only there, and
none is kept when made during CUDA graph capture (it holds its values only
once the graph replays). varattn never writes them: `memo()` gives the
backends a place to keep what they derive from them (tile plans), on the
tensors themselves, so that it goes with them.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy
import torch

from ..recent import Recent


@dataclass(slots=True)
class Ragged:
    values: torch.Tensor            # (rows, *features): sequence b at rows [cu[b], cu[b] + length_b)
    cu_seqlens: torch.Tensor        # (B + 1,) int32 on values' device
    seqused: torch.Tensor | None     # (B,) int32 lengths when a slot holds more rows than its sequence
    max_seqlen: int


HOST_MADE_LIMIT = 256
_host_made = Recent(HOST_MADE_LIMIT)  # (contents, device, stream) -> tensors copied from the host
# On a caller's tensor: (its version, stream, what was made of it).
_INT32, _MASK_LENGTHS = "_varattn_int32", "_varattn_mask_lengths"
# The tensors made here carry `_varattn_memos`: {the call's other lengths: memo
# dict} (cheaper to reach than a weak dictionary, and theirs alone).


def stream_of(device: torch.device) -> int | None:
    """The current stream of a CUDA device (None for the CPU)."""
    if device.type == "cpu":
        return None
    return torch._C._cuda_getCurrentRawStream(torch.cuda.current_device() if device.index is None else device.index)


def device_int32(*hosts: numpy.ndarray, device: torch.device) -> tuple[torch.Tensor, ...]:
    """Host ints (NumPy arrays) as int32 tensors on `device`, one per array,
    without a sync; the same contents on the same device and stream give
    the same tensors."""
    host = numpy.concatenate(hosts).astype(numpy.int32) if len(hosts) > 1 else hosts[0].astype(numpy.int32)
    if device.type == "cpu":
        made = torch.from_numpy(host)
    else:
        key = (host.tobytes(), tuple(len(h) for h in hosts), device.index, stream_of(device))
        found = _host_made.get(key)
        if found is not None:
            return found
        # A copy from pageable memory would wait for the device; from pinned
        # memory with non_blocking it is queued on the current stream.
        made = torch.from_numpy(host).pin_memory().to(device, non_blocking=True)
    parts = tuple(made.split([len(h) for h in hosts])) if len(hosts) > 1 else (made,)
    if device.type != "cpu" and not torch.cuda.is_current_stream_capturing():
        for part in parts:
            part._varattn_memos = {}
        _host_made.put(key, parts)
    return parts


def slots(batch: int, length: int, device: torch.device) -> torch.Tensor:
    """cu_seqlens of `batch` slots of `length` rows each: [0, L, 2L, ...],
    device_int32's, found by (batch, length) without making the host array."""
    key = (batch, length, device.type, device.index, stream_of(device))
    found = _slots.get(key)
    if found is None:
        found = device_int32(numpy.arange(batch + 1, dtype=numpy.int64) * length, device=device)[0]
        if device.type != "cpu" and not torch.cuda.is_current_stream_capturing():
            _slots.put(key, found)
    return found


_slots = Recent(HOST_MADE_LIMIT)


def as_int32(x: torch.Tensor) -> torch.Tensor:
    """A caller's integer tensor on its device (jagged offsets or lengths) as
    int32: itself when it is already, else a conversion kept while `x` lives
    and is not changed in place."""
    if x.dtype == torch.int32:
        return x
    if not x.is_cuda:
        return x.to(torch.int32)
    return _kept(x, _INT32, lambda offsets: offsets.to(torch.int32))


def lengths_of_padding_mask(mask: torch.Tensor) -> torch.Tensor:
    """The lengths (B,) int32 of a CUDA key_padding_mask (B, L), True at the
    padding after each sequence's tokens, kept while `mask` lives and is not
    changed in place: a model hands one mask to every layer of a step."""
    return _kept(mask, _MASK_LENGTHS, lambda m: m.shape[1] - m.sum(1, dtype=torch.int32))


def _kept(x: torch.Tensor, attribute: str, make) -> torch.Tensor:
    """make(x), a tensor on x's GPU, kept on x as `attribute` (so that it
    lives as long as x, and no longer) while x keeps its version, and reused
    on the same stream."""
    stream = torch._C._cuda_getCurrentRawStream(x.get_device())
    found = getattr(x, attribute, None)
    if found is not None and found[0] == x._version and found[1] == stream:
        return found[2]
    made = make(x)
    if not torch.cuda.is_current_stream_capturing():
        setattr(x, attribute, (x._version, stream, made))
        made._varattn_memos = {}
    return made


def memo(cu_seqlens_q, seqused_q, cu_seqlens_k, seqused_k) -> dict | None:
    """A dict kept with these four length tensors (None allowed) for what the
    backends derive from them, when all are made here (so their contents
    never change); else None (so always under torch.compile, which traces
    them). It lives as long as cu_seqlens_q does."""
    if torch.compiler.is_compiling():
        return None
    entries = getattr(cu_seqlens_q, "_varattn_memos", None)
    if entries is None:
        return None
    if cu_seqlens_k is cu_seqlens_q and seqused_q is None and seqused_k is None:  # the common case, keyed cheaply
        found = entries.get(_SELF)
        if found is None:
            found = entries[_SELF] = {}
        return found
    others = (seqused_q, cu_seqlens_k, seqused_k)
    if any(t is not None and not hasattr(t, "_varattn_memos") for t in others):
        return None
    # The other three, held by the entry (so their ids stay theirs while it
    # lives), except where one is cu_seqlens_q itself, which would hold itself.
    others = tuple(_SELF if t is cu_seqlens_q else t for t in others)
    key = tuple(map(id, others))
    found = entries.get(key)
    if found is None or any(a is not b for a, b in zip(found[0], others)):
        found = entries[key] = (others, {})
    return found[1]


_SELF = object()


def structure(q, k, v, cu_seqlens_q, seqused_q, cu_seqlens_k, seqused_k, requires_grad: bool,
              options: tuple) -> tuple | None:
    """build_params' `structure` key of a call on packed rows q, k and v
    with these lengths and `options` (the values of build_params' keywords,
    always in one order); None under torch.compile, which traces the call."""
    if torch.compiler.is_compiling():
        return None
    lengths_q = (_lengths_key(cu_seqlens_q), _lengths_key(seqused_q))
    shared = cu_seqlens_k is cu_seqlens_q and seqused_k is seqused_q
    lengths_k = None if shared else (_lengths_key(cu_seqlens_k), _lengths_key(seqused_k))
    return (_rows_key(q), _rows_key(k), _rows_key(v), lengths_q, lengths_k, requires_grad, *options)


def _rows_key(x: torch.Tensor) -> tuple:
    return type(x), x.dtype, x.device, x.shape[1:], x.stride()


def _lengths_key(x: torch.Tensor | None):
    if x is None:
        return None
    if hasattr(x, "_varattn_memos"):  # made here: int32, contiguous, on a GPU
        return x.shape[0], x.get_device()
    return type(x), x.dtype, x.device, x.shape, x.stride()


def clear_caches() -> None:
    """Drop every length tensor kept for reuse by its contents and what was
    derived from them, and every other Recent cache (for tests of memory
    use); those kept on a caller's tensor go with it."""
    for cache in Recent.made:
        cache.clear()
