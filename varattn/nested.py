"""NestedTensor <-> packed form.

A jagged NestedTensor already is the packed form: its `values()` with the
ragged dimension first, `offsets()` as cu_seqlens and, when `lengths()`
leaves holes between sequences, those lengths as seqused. A strided
NestedTensor keeps its components in one buffer; when they share strides (as
`torch.nested.nested_tensor([...])` and views of it do) that buffer is viewed
as the packed form, without a copy. Outputs come back as a NestedTensor of
the same layout over a fresh buffer.
"""
from __future__ import annotations

import itertools
from dataclasses import dataclass

import torch

from .ragged import Ragged, to_device_int32


@dataclass(frozen=True)
class NestedForm:
    """How to rebuild a NestedTensor like the caller's from packed rows."""
    jagged: bool
    ragged_dim: int                     # 1 or 2 in the NestedTensor's dims (batch is 0)
    offsets: torch.Tensor | None = None   # jagged: the caller's, so outputs share its ragged size
    lengths: torch.Tensor | None = None
    max_seqlen: int = 0
    starts: tuple[int, ...] = ()        # strided: first row of each component
    seq_lengths: tuple[int, ...] = ()

    def rebuild(self, values: torch.Tensor) -> torch.Tensor:
        """values: (rows, *features) -> NestedTensor with the ragged dim back in place."""
        if self.jagged:
            nested = torch.nested.nested_tensor_from_jagged(
                values, offsets=self.offsets, lengths=self.lengths, max_seqlen=self.max_seqlen)
            return nested.transpose(1, 2) if self.ragged_dim == 2 else nested
        return _strided_view(values, self.ragged_dim - 1, self.starts, self.seq_lengths)


def is_nested(x) -> bool:
    return isinstance(x, torch.Tensor) and x.is_nested


def unpack(nt: torch.Tensor, ragged_dim: int, name: str) -> tuple[Ragged, NestedForm]:
    """The packed form of `nt`, whose sequence dimension is `ragged_dim`."""
    if ragged_dim not in (1, 2) or nt.dim() <= ragged_dim:
        raise ValueError(f"{name} must be a NestedTensor ragged in dim 1 or 2 of at least {ragged_dim + 1} dims; "
                         f"got ragged dim {ragged_dim} of {nt.dim()}")
    if nt.layout == torch.jagged:
        return _unpack_jagged(nt, ragged_dim, name)
    return _unpack_strided(nt, ragged_dim, name)


def _unpack_jagged(nt, ragged_dim, name):
    if nt._ragged_idx != ragged_dim:
        raise ValueError(
            f"{name} is a jagged NestedTensor ragged in dim {nt._ragged_idx}, expected dim {ragged_dim}")
    values = nt.values().movedim(ragged_dim - 1, 0)
    offsets, lengths = nt.offsets(), nt.lengths()
    max_seqlen = nt._get_max_seqlen()   # cached by torch; computed (a sync) only when it is not
    ragged = Ragged(
        values=values,
        cu_seqlens=offsets.to(torch.int32),
        seqused=None if lengths is None else lengths.to(torch.int32),
        max_seqlen=int(max_seqlen),
    )
    return ragged, NestedForm(jagged=True, ragged_dim=ragged_dim, offsets=offsets, lengths=lengths,
                              max_seqlen=int(max_seqlen))


def _unpack_strided(nt, ragged_dim, name):
    # Metadata of a strided NestedTensor lives on the host: reading it costs no sync.
    sizes = nt._nested_tensor_size().tolist()
    strides = nt._nested_tensor_strides().tolist()
    offsets = nt._nested_tensor_storage_offsets().tolist()
    seq = ragged_dim - 1
    feature_dims = [d for d in range(nt.dim() - 1) if d != seq]
    if not sizes:
        raise ValueError(f"{name} is an empty NestedTensor (batch size 0)")
    features = [sizes[0][d] for d in feature_dims]
    for size in sizes:
        if [size[d] for d in feature_dims] != features:
            raise ValueError(
                f"{name}: components differ outside the sequence dim {ragged_dim}: "
                f"{[tuple(s) for s in sizes]}")
    lengths = [size[seq] for size in sizes]
    layout = _shared_buffer_layout(strides, offsets, lengths, seq)
    device = nt.device
    if layout is None:  # components laid out unevenly (or all empty): gather them, a copy
        values = torch.cat([c.movedim(seq, 0) for c in nt.unbind()]) if any(lengths) else \
            torch.empty(0, *features, dtype=nt.dtype, device=device)
        starts = list(itertools.accumulate(lengths, initial=0))[:-1]
    else:
        first, starts = layout
        template = next(s for s, n in zip(strides, lengths) if n)
        buffer = nt.values()
        values = buffer.as_strided((starts[-1] + lengths[-1], *features),
                                   (template[seq], *[template[d] for d in feature_dims]),
                                   buffer.storage_offset() + first)
    dense = list(itertools.accumulate(lengths, initial=0))
    contiguous = dense[:-1] == starts
    ragged = Ragged(
        values=values,
        cu_seqlens=to_device_int32(starts + [starts[-1] + lengths[-1]], device),
        seqused=None if contiguous else to_device_int32(lengths, device),
        max_seqlen=max(lengths),
    )
    form = NestedForm(jagged=False, ragged_dim=ragged_dim, starts=tuple(starts), seq_lengths=tuple(lengths))
    return ragged, form


def _shared_buffer_layout(strides, offsets, lengths, seq):
    """(offset of row 0, first row of each component) when the non-empty
    components share one layout with unit stride on the last dim and follow
    each other in the buffer without overlap, as views of one (rows, ...)
    tensor do (chunks of a projection included); else None."""
    present = [(s, o) for s, o, n in zip(strides, offsets, lengths) if n]
    if not present:
        return None
    template = present[0][0]
    row_stride = template[seq]
    if template[-1] != 1 or row_stride <= 0 or any(s != template for s, _ in present):
        return None
    first = present[0][1] % row_stride
    if any((o - first) % row_stride for _, o in present):
        return None
    starts, end = [], 0
    for o, n in zip(offsets, lengths):
        start = (o - first) // row_stride if n else end
        if start < end:
            return None
        starts.append(start)
        end = start + n
    return first, starts


def _strided_view(values, seq, starts, lengths):
    """A strided NestedTensor whose component b is rows [starts[b], +lengths[b]) of `values`,
    with the sequence at component dim `seq`."""
    base = values if values.is_contiguous() else values.transpose(0, 1)  # lse comes as (H, rows).T
    if not base.is_contiguous():
        values = base = values.contiguous()
    features = list(values.shape[1:])
    feature_strides = list(values.stride()[1:])
    row_stride = values.stride(0)
    sizes, strides = [], []
    for n in lengths:
        size = features[:seq] + [n] + features[seq:]
        stride = feature_strides[:seq] + [row_stride] + feature_strides[seq:]
        sizes.append(size)
        strides.append(stride)
    offsets = [start * row_stride for start in starts]
    return torch._nested_view_from_buffer(
        base.reshape(-1), torch.tensor(sizes, dtype=torch.int64), torch.tensor(strides, dtype=torch.int64),
        torch.tensor(offsets, dtype=torch.int64))
