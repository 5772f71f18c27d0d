"""One side (queries, or keys/values) of a batch in the packed form, and the
small int32 tensors of lengths the front ends put on the device.

Lengths that arrive on the host (a strided NestedTensor's, a padded batch's
list) are copied from pinned memory without a sync, and jagged offsets (int64)
are converted to the kernels' int32: some 10 to 15 microseconds each. A model
hands the same lengths to every layer of a step, so both are kept for reuse:
the host-made ones by their contents in a bounded cache, the converted
offsets by the caller's offsets tensor, weakly, for as long as it lives. Each
is made on a stream and reused only there. varattn never writes them.
"""
from __future__ import annotations

import collections
import threading
from dataclasses import dataclass

import numpy
import torch
from torch.utils.weak import WeakIdKeyDictionary


@dataclass(slots=True)
class Ragged:
    values: torch.Tensor            # (rows, *features): sequence b at rows [cu[b], cu[b] + length_b)
    cu_seqlens: torch.Tensor        # (B + 1,) int32 on values' device
    seqused: torch.Tensor | None     # (B,) int32 lengths when a slot holds more rows than its sequence
    max_seqlen: int


HOST_MADE_LIMIT = 256  # entries of the cache of lengths copied from the host
_host_made: collections.OrderedDict = collections.OrderedDict()
_converted = WeakIdKeyDictionary()
_lock = threading.Lock()


def _stream(device: torch.device) -> int:
    return torch._C._cuda_getCurrentRawStream(device.index)


def device_int32(host: numpy.ndarray, device: torch.device) -> torch.Tensor:
    """Host ints (a NumPy array) as an int32 tensor on `device`, without a sync;
    the same contents on the same device and stream give the same tensor."""
    host = numpy.ascontiguousarray(host, dtype=numpy.int32)
    if device.type == "cpu":
        return torch.from_numpy(host)
    key = (host.tobytes(), device.index, _stream(device))
    with _lock:
        found = _host_made.get(key)
        if found is not None:
            _host_made.move_to_end(key)
            return found
    # A copy from pageable memory would wait for the device; from pinned memory
    # with non_blocking it is queued on the current stream.
    made = torch.from_numpy(host).pin_memory().to(device, non_blocking=True)
    with _lock:
        _host_made[key] = made
        if len(_host_made) > HOST_MADE_LIMIT:
            _host_made.popitem(last=False)
    return made


def slots(batch: int, length: int, device: torch.device) -> torch.Tensor:
    """cu_seqlens of `batch` slots of `length` rows each: [0, L, 2L, ...]."""
    return device_int32(numpy.arange(batch + 1, dtype=numpy.int64) * length, device)


def as_int32(x: torch.Tensor) -> torch.Tensor:
    """A caller's integer tensor on its device (jagged offsets or lengths) as
    int32: itself when it is already, else a conversion kept while `x` lives
    and is not changed in place."""
    if x.dtype == torch.int32:
        return x
    if x.device.type == "cpu":
        return x.to(torch.int32)
    stream = _stream(x.device)
    found = _converted.get(x)
    if found is not None and found[0] == x._version and found[1] == stream:
        return found[2]
    made = x.to(torch.int32)
    _converted[x] = (x._version, stream, made)
    return made


def clear_caches() -> None:
    """Drop every length tensor kept for reuse (for tests of memory use)."""
    with _lock:
        _host_made.clear()
    _converted.clear()
