"""One side (queries, or keys/values) of a batch in the packed form."""
from __future__ import annotations

from dataclasses import dataclass

import numpy
import torch


@dataclass(frozen=True)
class Ragged:
    values: torch.Tensor            # (rows, *features): sequence b at rows [cu[b], cu[b] + length_b)
    cu_seqlens: torch.Tensor        # (B + 1,) int32 on values' device
    seqused: torch.Tensor | None     # (B,) int32 lengths when a slot holds more rows than its sequence
    max_seqlen: int


def to_device_int32(values, device) -> torch.Tensor:
    """Host ints (a list or a NumPy array) as an int32 tensor on `device`, without a sync.

    A copy from pageable memory would wait for the device; from pinned
    memory with non_blocking it is queued on the current stream.
    """
    host = torch.from_numpy(numpy.asarray(values, dtype=numpy.int32))
    if device.type == "cpu":
        return host
    return host.pin_memory().to(device, non_blocking=True)
