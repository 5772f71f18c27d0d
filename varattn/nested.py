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

import dataclasses
from dataclasses import dataclass, field

import numpy
import torch
from torch.utils.weak import WeakIdKeyDictionary

from .ragged import Ragged, to_device_int32


@dataclass(frozen=True)
class NestedForm:
    """How to rebuild a NestedTensor like the caller's from packed rows."""
    jagged: bool
    ragged_dim: int                     # 1 or 2 in the NestedTensor's dims (batch is 0)
    offsets: torch.Tensor | None = None   # jagged: the caller's, so outputs share its ragged size
    lengths: torch.Tensor | None = None
    max_seqlen: int = 0
    starts: numpy.ndarray | None = None       # strided: first row of each component
    seq_lengths: numpy.ndarray | None = None
    rows_key: bytes = b""                     # strided: starts and lengths, to compare forms quickly
    back_to_back: bool = False                # strided: sequences follow each other from row 0
    _metadata: dict = field(default_factory=dict, compare=False, repr=False)  # strided outputs' layouts

    def rebuild(self, values: torch.Tensor) -> torch.Tensor:
        """values: (rows, *features) -> NestedTensor with the ragged dim back in place."""
        if self.jagged:
            nested = torch.nested.nested_tensor_from_jagged(
                values, offsets=self.offsets, lengths=self.lengths, max_seqlen=self.max_seqlen)
            return nested.transpose(1, 2) if self.ragged_dim == 2 else nested
        if torch.is_grad_enabled() and values.requires_grad:
            # torch's backward of a view of a buffer reads the gradient as laid out like the view,
            # which gradients made elsewhere are not: components copied out keep autograd exact.
            seq = self.ragged_dim - 1
            return torch.nested.as_nested_tensor(
                [values[start:start + n].movedim(0, seq) for start, n in zip(self.starts.tolist(), self.seq_lengths.tolist())])
        base = values if values.is_contiguous() else values.transpose(0, 1)  # lse comes as (H, rows).T
        if not base.is_contiguous():
            values = base = values.contiguous()
        key = (values.shape[1:], values.stride())
        metadata = self._metadata.get(key)
        if metadata is None:
            metadata = self._metadata[key] = _strided_metadata(values.shape[1:], values.stride(),
                                                               self.ragged_dim - 1, self.starts, self.seq_lengths)
        return torch._nested_view_from_buffer(base.reshape(-1), *metadata)

    def new_output(self, features: tuple[int, ...], dtype, device):
        """(packed (rows, *features) tensor, the NestedTensor over it) for a
        strided form whose sequences lie back to back; (None, None) otherwise,
        and the output is then rebuilt around the packed result.

        Viewing a fresh buffer as a strided NestedTensor costs about a
        microsecond per sequence in torch; `empty_like` of a template with the
        output's layout costs a few in all, so the template is made once per
        form and feature shape (over host memory that is never touched).
        """
        if self.jagged or not self.back_to_back:
            return None, None
        template = self._metadata.get(("template", features))
        if template is None:
            template = self._metadata[("template", features)] = self._output_template(features)
        if template is False:
            return None, None
        nested = torch.empty_like(template, dtype=dtype, device=device)
        return nested.values().view(-1, *features), nested

    def _output_template(self, features):
        rows = int(self.seq_lengths.sum())
        strides = tuple(int(numpy.prod(features[i + 1:])) for i in range(len(features)))
        metadata = _strided_metadata(features, (int(numpy.prod(features)), *strides), self.ragged_dim - 1,
                                     self.starts, self.seq_lengths)
        buffer = torch.empty(rows * int(numpy.prod(features)), dtype=torch.uint8)
        template = torch._nested_view_from_buffer(buffer, *metadata)
        # empty_like keeps a NestedTensor's strides and offsets: check once rather than trust.
        probe = torch.empty_like(template)
        kept = all(torch.equal(a, b) for a, b in zip(metadata, (probe._nested_tensor_size(), probe._nested_tensor_strides(),
                                                               probe._nested_tensor_storage_offsets())))
        return template if kept else False


def is_nested(x) -> bool:
    return isinstance(x, torch.Tensor) and x.is_nested


# A NestedTensor's layout never changes, so its packed form is computed once
# per object: repeated calls on the same batch pay no host work for it.
_unpacked = WeakIdKeyDictionary()


def unpack(nt: torch.Tensor, ragged_dim: int, name: str) -> tuple[Ragged, NestedForm]:
    """The packed form of `nt`, whose sequence dimension is `ragged_dim`.

    When a gradient must reach `nt`, the packed rows are taken from it again
    in this call (the cached ones may come from a call without grad), so that
    autograd records the way back to it.
    """
    tracing = torch.compiler.is_compiling()  # torch.compile traces through the unpacking; no cache then
    found = None if tracing else _unpacked.get(nt)
    if found is not None and found[0] == ragged_dim:
        ragged, form = found[1], found[2]
        if torch.is_grad_enabled() and nt.requires_grad:
            ragged = dataclasses.replace(ragged, values=_rows_again(nt, ragged, ragged_dim))
        return ragged, form
    if ragged_dim not in (1, 2) or nt.dim() <= ragged_dim:
        raise ValueError(f"{name} must be a NestedTensor ragged in dim 1 or 2 of at least {ragged_dim + 1} dims; "
                         f"got ragged dim {ragged_dim} of {nt.dim()}")
    if nt.layout == torch.jagged:
        ragged, form = _unpack_jagged(nt, ragged_dim, name)
    else:
        ragged, form = _unpack_strided(nt, ragged_dim, name)
    if not tracing:
        _unpacked[nt] = (ragged_dim, ragged, form)
    return ragged, form


def _rows_again(nt, ragged: Ragged, ragged_dim: int) -> torch.Tensor:
    """`ragged.values`, made again from `nt` by the same views (or copy)."""
    if nt.layout == torch.jagged:
        return nt.values().movedim(ragged_dim - 1, 0)
    rows, buffer = ragged.values, nt.values()
    if rows.untyped_storage().data_ptr() == buffer.untyped_storage().data_ptr():  # a view of the components' buffer
        return buffer.as_strided(rows.shape, rows.stride(), rows.storage_offset())
    return _gathered(nt, ragged_dim - 1, rows.shape[1:])  # components laid out unevenly: a copy


def _gathered(nt, seq: int, features) -> torch.Tensor:
    """The components of strided `nt` one after another, sequence dim `seq` first (a copy)."""
    if not any(c.shape[seq] for c in nt.unbind()):
        return torch.empty(0, *features, dtype=nt.dtype, device=nt.device)
    return torch.cat([c.movedim(seq, 0) for c in nt.unbind()])


def _unpack_jagged(nt, ragged_dim, name):
    if nt._ragged_idx != ragged_dim:
        raise ValueError(
            f"{name} is a jagged NestedTensor ragged in dim {nt._ragged_idx}, expected dim {ragged_dim}")
    values = nt.values().movedim(ragged_dim - 1, 0)
    offsets, lengths = nt.offsets(), nt.lengths()
    max_seqlen = nt._get_max_seqlen()   # cached by torch; computed (a sync) only when it is not
    if not torch.compiler.is_compiling():
        max_seqlen = int(max_seqlen)    # traced, it stays symbolic: torch.compile keeps it dynamic
    ragged = Ragged(
        values=values,
        cu_seqlens=offsets.to(torch.int32),
        seqused=None if lengths is None else lengths.to(torch.int32),
        max_seqlen=max_seqlen,
    )
    return ragged, NestedForm(jagged=True, ragged_dim=ragged_dim, offsets=offsets, lengths=lengths,
                              max_seqlen=max_seqlen)


def _unpack_strided(nt, ragged_dim, name):
    # Metadata of a strided NestedTensor lives on the host: reading it costs no sync.
    sizes = nt._nested_tensor_size().numpy()
    strides = nt._nested_tensor_strides().numpy()
    offsets = nt._nested_tensor_storage_offsets().numpy()
    if sizes.shape[0] == 0:
        raise ValueError(f"{name} is an empty NestedTensor (batch size 0)")
    seq = ragged_dim - 1
    features = numpy.delete(sizes, seq, axis=1)
    if (features != features[0]).any():
        raise ValueError(f"{name}: components differ outside the sequence dim {ragged_dim}: {sizes.tolist()}")
    features = features[0].tolist()
    lengths = sizes[:, seq]
    layout = _shared_buffer_layout(strides, offsets, lengths, seq)
    if layout is None:  # components laid out unevenly (or all empty): gather them, a copy
        values = _gathered(nt, seq, features)
        starts = numpy.concatenate([[0], numpy.cumsum(lengths)[:-1]])
        contiguous = True
    else:
        first_offset, starts, row_strides = layout
        buffer = nt.values()
        values = buffer.as_strided((int(starts[-1] + lengths[-1]), *features), row_strides,
                                   buffer.storage_offset() + first_offset)
        contiguous = bool(starts[0] == 0 and (starts[1:] == numpy.cumsum(lengths)[:-1]).all())
    ends = starts + lengths
    # cu_seqlens (and lengths when slots hold more rows than their sequence) in one copy to the device
    host = numpy.concatenate([starts, ends[-1:]] + ([] if contiguous else [lengths]))
    device_values = to_device_int32(host, nt.device)
    batch = len(lengths)
    ragged = Ragged(
        values=values,
        cu_seqlens=device_values[:batch + 1],
        seqused=None if contiguous else device_values[batch + 1:],
        max_seqlen=int(lengths.max()),
    )
    return ragged, NestedForm(jagged=False, ragged_dim=ragged_dim, starts=starts, seq_lengths=lengths,
                              rows_key=starts.tobytes() + lengths.tobytes(), back_to_back=contiguous)


def _shared_buffer_layout(strides, offsets, lengths, seq):
    """(offset of row 0, first row of each component, strides of the packed view)
    when the non-empty components share one layout with unit stride on the
    last dim and follow each other in the buffer without overlap, as views of
    one (rows, ...) tensor do (chunks of a projection included); else None."""
    present = lengths > 0
    if not present.any():
        return None
    template = strides[present][0]
    row_stride = int(template[seq])
    if template[-1] != 1 or row_stride <= 0 or (strides[present] != template).any():
        return None
    first_offset = int(offsets[present][0] % row_stride)
    if ((offsets[present] - first_offset) % row_stride).any():
        return None
    starts = (offsets - first_offset) // row_stride
    # an empty component starts where the one before it ends
    ends = numpy.where(present, starts + lengths, 0)
    previous_end = numpy.concatenate([[0], numpy.maximum.accumulate(ends)[:-1]])
    starts = numpy.where(present, starts, previous_end)
    if starts[0] < 0 or (starts[1:] < (starts + lengths)[:-1]).any():
        return None
    return first_offset, starts, (row_stride, *numpy.delete(template, seq).tolist())


def _strided_metadata(features, strides, seq, starts, lengths):
    """(sizes, strides, offsets) of a strided NestedTensor whose component b is
    rows [starts[b], starts[b] + lengths[b]) of a (rows, *features) tensor of
    `strides`, the sequence at component dim `seq`."""
    batch = len(lengths)
    features = numpy.array(features, dtype=numpy.int64)
    feature_strides = numpy.array(strides[1:], dtype=numpy.int64)
    sizes = numpy.insert(numpy.broadcast_to(features, (batch, len(features))), seq, lengths, axis=1)
    strides_ = numpy.insert(numpy.broadcast_to(feature_strides, (batch, len(features))), seq, strides[0], axis=1)
    offsets = numpy.asarray(starts, dtype=numpy.int64) * strides[0]
    return torch.from_numpy(sizes), torch.from_numpy(strides_), torch.from_numpy(offsets)
