"""NestedTensors <-> the packed form, and `attention` on NestedTensors.

A jagged NestedTensor already is the packed form: its values with the ragged
dimension first, its offsets as cu_seqlens and, when lengths leave holes
between sequences, those lengths as seqused. A strided NestedTensor keeps its
components in one buffer; when they share strides (as
`torch.nested.nested_tensor([...])` and views of it do) that buffer is viewed
as the packed form, without a copy. Outputs come back as NestedTensors of the
caller's layout.

Eagerly, the jagged subclass's fields are read directly and outputs are made
as its constructor makes them, without torch's per-op dispatch (tens of
microseconds for each `values()`, `transpose` or `nested_tensor_from_jagged`),
and gradients flow through run.py's autograd Function, which takes the
NestedTensors themselves: tests/test_torch_private.py guards each private
piece of torch used here. Under torch.compile only public, traceable ops are
used.
"""
from __future__ import annotations

import functools
import threading
from dataclasses import dataclass, field

import numpy
import torch
from torch._C import DispatchKey, DispatchKeySet
from torch._library import simple_registry
from torch.nested._internal.nested_tensor import NestedTensor as Jagged

from .. import checks
from .. import params as params_
from .. import run
from ..recent import Recent
from . import ragged
from .ragged import Ragged

# What torch's jagged constructor marks for torch.compile on a new NestedTensor
# and its values (the ragged dimension as dynamic); which of these a torch
# version sets is read off the NestedTensor an output is made like.
_COMPILE_MARKS = ("_dynamo_weak_dynamic_indices", "_dynamo_propagated_dynamic_indices")
_JAGGED_KEYS = DispatchKeySet(DispatchKey.NestedTensor).add(DispatchKey.AutogradNestedTensor)


def is_nested(x) -> bool:
    """Whether `x` is a NestedTensor (jagged or strided), read without torch's
    torch-function layer (a property through it costs microseconds)."""
    return isinstance(x, Jagged) or (isinstance(x, torch.Tensor) and x.is_nested)


def jagged_like(values: torch.Tensor, like, ragged_idx: int):
    """A jagged NestedTensor over `values` (ragged at dim ragged_idx - 1) with
    the sequences of jagged `like`: what torch's
    NestedTensor(values, like._offsets, lengths=like._lengths, _ragged_idx=ragged_idx,
    _metadata_cache=like._metadata_cache) makes, without the registry lookup
    and the compile marks that cost it some 60 microseconds a call."""
    r = ragged_idx - 1
    ragged_size = like._size[like._ragged_idx]
    shape = values.shape
    size = (like._size[0], *shape[:r], ragged_size, *shape[r + 1:])
    stride = values.stride()
    strides = (_times(ragged_size, stride[r]), *stride)
    nt = torch.Tensor._make_wrapper_subclass(
        Jagged, size, strides, 0, torch.contiguous_format, values.dtype, torch.jagged, values.device, False, False,
        "sizes", False, True, _JAGGED_KEYS, storage_size=values.untyped_storage().size())
    nt._ragged_idx, nt._size, nt._strides = ragged_idx, size, strides
    nt._values, nt._offsets, nt._lengths, nt._metadata_cache = values, like._offsets, like._lengths, like._metadata_cache
    marked, marked_values = like.__dict__, like._values.__dict__
    for mark in _COMPILE_MARKS:
        if mark in marked:
            setattr(nt, mark, {ragged_idx})
        if mark in marked_values:
            setattr(values, mark, {r})
    return nt


def _times(ragged_size, step: int):
    """ragged_size (a nested int) * step, as torch's constructor computes a
    stride, kept for reuse: symbolic arithmetic costs some 8 microseconds."""
    key = (id(ragged_size), step)
    found = _products.get(key)
    if found is None or found[0] is not ragged_size:
        found = (ragged_size, ragged_size * step)  # holding ragged_size keeps its id its own
        _products.put(key, found)
    return found[1]


_products = Recent(256)


class _MetadataRules(threading.local):
    """While a thread is inside it, the metadata autograd reads of each
    jagged NestedTensor an autograd.Function takes or returns (its sizes,
    strides, dim and layout) are answered straight from its fields.

    torch before 2.12 answers them through the subclass's generic op table,
    which checks a schema per query: some 15 to 25 microseconds each, and a
    call with gradients makes about ten. The rules, registered once through
    torch's open registration of __torch_dispatch__ rules, return what
    torch's kernels return (newer torch answers them the same way, ahead of
    its table), and outside varattn's calls hand every query to torch's
    own __torch_dispatch__. A rule someone else registered for these ops is
    left in place.
    """

    _OPS = {
        torch.ops.aten.sym_size.default: lambda nt: nt._size,
        torch.ops.aten.sym_stride.default: lambda nt: nt._strides,
        torch.ops.aten.dim.default: lambda nt: len(nt._size),
        torch.ops.prim.layout.default: lambda nt: torch.jagged,
    }
    _registered = False
    _registering = threading.Lock()
    depth = 0  # per thread: how many varattn calls it is inside

    def __enter__(self):
        if not _MetadataRules._registered:
            self._register()
        self.depth += 1

    def __exit__(self, *exc):
        self.depth -= 1

    @classmethod
    def _register(cls):
        with cls._registering:
            if cls._registered:
                return
            for op, answer in cls._OPS.items():
                rules = simple_registry.singleton.find(op.__qualname__).torch_dispatch_rules
                if rules.find(Jagged) is None:
                    rules.register(Jagged, cls._rule(answer))
            cls._registered = True

    @staticmethod
    def _rule(answer):
        def rule(cls, func, types, args, kwargs):
            if metadata_rules.depth and len(args) == 1 and not kwargs and type(args[0]) is Jagged:
                return answer(args[0])
            return cls.__torch_dispatch__(func, types, args, kwargs)
        return rule


metadata_rules = _MetadataRules()


# ---------------------------------------------------------------------------
# One NestedTensor's side of a call: its packed rows, and NestedTensors of its
# structure made from packed rows (outputs, gradients).

class JaggedSide:
    """A jagged NestedTensor ragged in dim `ragged_dim` (1 or 2), read and made
    without autograd: gradients reach it through an autograd.Function
    (run.py's, or _ToRows / _FromRows below)."""

    differentiable = False  # whether rows() and nested() are differentiable torch ops

    def __init__(self, nt, ragged_dim: int, name: str):
        if nt._ragged_idx != ragged_dim:
            raise ValueError(f"{name} is a jagged NestedTensor ragged in dim {nt._ragged_idx}, expected dim {ragged_dim}")
        self.nt, self.ragged_dim = nt, ragged_dim

    def rows(self, same: Ragged | None = None) -> Ragged:
        """The packed rows; `same`: the rows of a side with the same sequences, whose lengths serve."""
        nt = self.nt
        values = nt._values if self.ragged_dim == 1 else nt._values.transpose(0, 1)
        if same is not None:
            return Ragged(values, same.cu_seqlens, same.seqused, same.max_seqlen)
        lengths = nt._lengths
        return Ragged(values, ragged.as_int32(nt._offsets), None if lengths is None else ragged.as_int32(lengths),
                      nt._get_max_seqlen())  # kept by torch; computed (a sync) only when it is not

    def same_sequences(self, other) -> bool:
        """Whether `other` holds its sequences by the very same offsets and lengths tensors."""
        return (isinstance(other, JaggedSide) and other.nt._offsets is self.nt._offsets
                and other.nt._lengths is self.nt._lengths)

    def nested(self, rows: torch.Tensor):
        """A NestedTensor of this structure over packed `rows` (rows, *features)."""
        return jagged_like(rows if self.ragged_dim == 1 else rows.transpose(0, 1), self.nt, self.ragged_dim)

    def rows_of(self, nt) -> torch.Tensor:
        """The packed rows of `nt`, a NestedTensor of this structure (a gradient)."""
        return nt._values if self.ragged_dim == 1 else nt._values.transpose(0, 1)

    def same_rows(self, other: JaggedSide) -> bool:
        mine, theirs = self.nt, other.nt
        for a, b in ((mine._offsets, theirs._offsets), (mine._lengths, theirs._lengths)):
            if a is b:
                continue
            # Separately built NestedTensors: compare contents (a sync on CUDA, only in this case).
            if a is None or b is None or a.shape != b.shape or not torch.equal(a, b):
                return False
        return True


class TracedJaggedSide(JaggedSide):
    """A jagged NestedTensor under torch.compile: public, traced ops only;
    max_seqlen stays symbolic, so batches of other lengths reuse the graph."""

    differentiable = True

    def rows(self, same: Ragged | None = None) -> Ragged:
        nt, r = self.nt, self.ragged_dim - 1
        lengths = nt.lengths()
        return Ragged(values=nt.values().movedim(r, 0), cu_seqlens=nt.offsets().to(torch.int32),
                      seqused=None if lengths is None else lengths.to(torch.int32), max_seqlen=nt._get_max_seqlen())

    def nested(self, rows: torch.Tensor):
        nt = self.nt
        made = torch.nested.nested_tensor_from_jagged(rows, offsets=nt.offsets(), lengths=nt.lengths(),
                                                      max_seqlen=nt._get_max_seqlen())
        return made.transpose(1, 2) if self.ragged_dim == 2 else made


@dataclass(eq=False)
class StridedLayout:
    """Where a strided NestedTensor's components lie, from its metadata alone."""
    seq: int                                 # the sequence dim within a component
    features: tuple[int, ...]                # a component's other sizes
    lengths: numpy.ndarray
    starts: numpy.ndarray                    # the packed row of each component's first
    rows: int                                # packed rows in all
    view: tuple | None                       # (storage offset of row 0, row strides) of the packed view; None: copy
    back_to_back: bool                       # sequences follow each other from row 0
    _templates: dict = field(default_factory=dict, repr=False)
    key: tuple = field(default=(), repr=False)   # the metadata's contents it is kept by (strided_layout)
    _on_device: dict = field(default_factory=dict, repr=False)
    described: dict = field(default_factory=dict, repr=False)  # calls with this layout's query: see _call

    @functools.cached_property
    def rows_key(self) -> bytes:
        """Where the sequences lie in the packed rows, as bytes (layouts of views of one buffer differ in offsets only)."""
        return self.starts.tobytes() + self.lengths.tobytes()

    def lengths_on(self, device: torch.device):
        """(cu_seqlens, seqused or None) on `device`, made once per device and stream."""
        key = (device.index, ragged.stream_of(device))
        found = self._on_device.get(key)
        if found is None:
            cu = numpy.append(self.starts, self.rows)
            if self.back_to_back:
                found = (ragged.device_int32(cu, device=device)[0], None)
            else:
                found = ragged.device_int32(cu, self.lengths, device=device)
            if not torch.cuda.is_available() or not torch.cuda.is_current_stream_capturing():
                self._on_device[key] = found
        return found

    @property
    def max_seqlen(self) -> int:
        return int(self.lengths.max())

    def nested_metadata(self, features, element_strides):
        """(sizes, strides, offsets) of a strided NestedTensor whose component b is
        rows starts[b]... of a (rows, *features) tensor of `element_strides`."""
        batch = len(self.lengths)
        sizes = numpy.insert(numpy.broadcast_to(numpy.array(features, dtype=numpy.int64), (batch, len(features))),
                             self.seq, self.lengths, axis=1)
        strides = numpy.insert(numpy.broadcast_to(numpy.array(element_strides[1:], dtype=numpy.int64),
                                                  (batch, len(features))), self.seq, element_strides[0], axis=1)
        offsets = self.starts.astype(numpy.int64) * element_strides[0]
        return torch.from_numpy(sizes), torch.from_numpy(strides), torch.from_numpy(offsets)

    def template(self, features: tuple[int, ...]):
        """A strided NestedTensor of these components over contiguous packed rows
        (rows, *features), on the host and never touched, whose `empty_like` gives
        an output NestedTensor in a few microseconds (viewing a buffer as one costs
        about two per sequence); None where torch does not keep its layout."""
        found = self._templates.get(features)
        if found is None:
            strides = tuple(int(numpy.prod(features[i:])) for i in range(1, len(features) + 1))
            metadata = self.nested_metadata(features, (int(numpy.prod(features)), *strides[:-1], 1))
            buffer = torch.empty(self.rows * int(numpy.prod(features)), dtype=torch.uint8)
            made = torch._nested_view_from_buffer(buffer, *metadata)
            probe = torch.empty_like(made)  # empty_like keeps strides and offsets: checked once rather than trusted
            kept = all(torch.equal(a, b) for a, b in zip(metadata, (
                probe._nested_tensor_size(), probe._nested_tensor_strides(), probe._nested_tensor_storage_offsets())))
            found = self._templates[features] = made if kept else False
        return None if found is False else found


_layouts = Recent(32)  # metadata's contents -> StridedLayout


def strided_layout(nt, seq: int, name: str) -> StridedLayout:
    """The layout of strided `nt` with sequence dim `seq` in its components;
    the metadata of a strided NestedTensor lives on the host, so reading it
    costs no sync. Recent layouts are kept by their metadata's contents."""
    sizes = nt._nested_tensor_size().numpy()
    strides = nt._nested_tensor_strides().numpy()
    offsets = nt._nested_tensor_storage_offsets().numpy()
    key = (seq, sizes.tobytes(), strides.tobytes(), offsets.tobytes(), sizes.shape)
    found = _layouts.get(key)
    if found is None:
        found = _strided_layout(sizes, strides, offsets, seq, name)
        found.key = key
        _layouts.put(key, found)
    return found


def _strided_layout(sizes, strides, offsets, seq, name) -> StridedLayout:
    if sizes.shape[0] == 0:
        raise ValueError(f"{name} is an empty NestedTensor (batch size 0)")
    features = numpy.delete(sizes, seq, axis=1)
    if (features != features[0]).any():
        raise ValueError(f"{name}: components differ outside the sequence dim {seq + 1}: {sizes.tolist()}")
    lengths = sizes[:, seq].copy()
    view = _shared_buffer_view(strides, offsets, lengths, seq)
    if view is None:  # components laid out unevenly (or all empty): gathered one after another, a copy
        starts = numpy.concatenate([[0], numpy.cumsum(lengths)[:-1]]).astype(numpy.int64)
        rows, back_to_back = int(lengths.sum()), True
    else:
        first_offset, starts, row_strides = view
        rows = int(starts[-1] + lengths[-1])
        back_to_back = bool(starts[0] == 0 and (starts[1:] == numpy.cumsum(lengths)[:-1]).all())
        view = (first_offset, row_strides)
    return StridedLayout(seq=seq, features=tuple(features[0].tolist()), lengths=lengths, starts=starts, rows=rows,
                         view=view, back_to_back=back_to_back)


def _shared_buffer_view(strides, offsets, lengths, seq):
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


class StridedSide:
    """A strided NestedTensor whose components hold the sequence in dim
    ragged_dim - 1, read and made without autograd."""

    differentiable = False

    def __init__(self, nt, ragged_dim: int, name: str):
        self.nt, self.ragged_dim = nt, ragged_dim
        self.layout = strided_layout(nt, ragged_dim - 1, name)

    def rows(self, same: Ragged | None = None) -> Ragged:
        """The packed rows (`same` is for jagged sides; a layout keeps its lengths)."""
        layout = self.layout
        values = _rows_in_layout(self.nt, layout)
        cu, used = layout.lengths_on(values.device)
        return Ragged(values=values, cu_seqlens=cu, seqused=used, max_seqlen=layout.max_seqlen)

    def new_nested(self, features: tuple[int, ...], dtype, device):
        """(packed rows (rows, *features), a NestedTensor of this structure over
        them) for an output to be written into; None unless the sequences lie
        back to back."""
        template = self.layout.template(features) if self.layout.back_to_back else None
        if template is None:
            return None
        made = torch.empty_like(template, dtype=dtype, device=device)
        return made.values().view(self.layout.rows, *features), made

    def nested(self, rows: torch.Tensor):
        """A NestedTensor of this structure holding packed `rows` (rows, *features)."""
        made = self.new_nested(tuple(rows.shape[1:]), rows.dtype, rows.device)
        if made is not None:
            made[0].copy_(rows)
            return made[1]
        rows = rows.contiguous()
        return torch._nested_view_from_buffer(rows.view(-1), *self.layout.nested_metadata(rows.shape[1:], rows.stride()))

    def same_rows(self, other: StridedSide) -> bool:
        return self.layout is other.layout or self.layout.rows_key == other.layout.rows_key

    def same_sequences(self, other) -> bool:
        return False

    def copied(self, rows: torch.Tensor):
        """A NestedTensor of this structure with packed `rows` copied in, by
        differentiable torch ops (as_nested_tensor, whose backward takes a
        gradient of any layout): torch's autograd.Function takes no strided
        NestedTensors."""
        seq, layout = self.layout.seq, self.layout
        parts = [rows[start:start + n] for start, n in zip(layout.starts.tolist(), layout.lengths.tolist())]
        made = torch.nested.as_nested_tensor(parts)
        return made.transpose(1, seq + 1) if seq else made


class GradStridedSide(StridedSide):
    """A strided NestedTensor that a gradient must reach, converted both ways
    by differentiable torch ops: in, a view of its buffer (values() and
    as_strided); out, `copied`."""

    differentiable = True

    def new_nested(self, features, dtype, device):
        return None

    def nested(self, rows: torch.Tensor):
        return self.copied(rows)


def _rows_in_layout(nt, layout: StridedLayout) -> torch.Tensor:
    """The packed rows of strided `nt`: a view of its buffer, or its components gathered."""
    if layout.view is not None:
        buffer = nt.values()
        first_offset, row_strides = layout.view
        return buffer.as_strided((layout.rows, *layout.features), row_strides, buffer.storage_offset() + first_offset)
    if not layout.rows:  # from the buffer still, so that autograd connects it
        return nt.values()[:0].view(0, *layout.features)
    return torch.cat([c.movedim(layout.seq, 0) for c in nt.unbind()])


def side(nt, ragged_dim: int, name: str, requires_grad: bool):
    """The side of NestedTensor `nt` ragged in dim `ragged_dim`, in a call that
    needs gradients or not."""
    if isinstance(nt, Jagged):
        if len(nt._size) <= ragged_dim:
            raise ValueError(f"{name} must be a NestedTensor of at least {ragged_dim + 1} dims; got {len(nt._size)}")
        return (TracedJaggedSide if torch.compiler.is_compiling() else JaggedSide)(nt, ragged_dim, name)
    if ragged_dim not in (1, 2) or nt.dim() <= ragged_dim:
        raise ValueError(f"{name} must be a NestedTensor ragged in dim 1 or 2 of at least {ragged_dim + 1} dims; "
                         f"got ragged dim {ragged_dim} of {nt.dim()}")
    return (GradStridedSide if requires_grad else StridedSide)(nt, ragged_dim, name)


# ---------------------------------------------------------------------------
# `attention` on NestedTensors.

class NestedForm:
    """run.Form of a call on NestedTensors: outputs like the query, gradients like each input."""

    def __init__(self, q_side, k_side, v_side, out=None):
        self.sides, self.out = (q_side, k_side, v_side), out  # out: (rows, NestedTensor) made before the forward

    def outputs(self, out, lse):
        q_side = self.sides[0]
        result = self.out[1] if self.out is not None and out is self.out[0] else q_side.nested(out)
        return result, None if lse is None else q_side.nested(lse.transpose(0, 1))

    def grad_outputs(self, grad_out, grad_lse):
        q_side = self.sides[0]
        rows_lse = None if grad_lse is None else q_side.rows_of(grad_lse).transpose(0, 1)
        return None if grad_out is None else q_side.rows_of(grad_out), rows_lse

    def input_grads(self, dq, dk, dv):
        return tuple(s.nested(d) for s, d in zip(self.sides, (dq, dk, dv)))


def ragged_dim(query, layout) -> int:
    """The sequence dim of the query NestedTensor: 2 for (B, H, j, D), 1 for (B, j, H, D)."""
    if layout is not None and layout not in ("bhld", "blhd"):
        raise ValueError(f"layout must be 'bhld' or 'blhd' for NestedTensors, got {layout!r}")
    if isinstance(query, Jagged):
        inferred = query._ragged_idx
        if layout is not None and inferred != {"bhld": 2, "blhd": 1}[layout]:
            raise ValueError(f"layout={layout!r} but query is ragged in dim {inferred}")
        return inferred
    return 1 if layout == "blhd" else 2


def call(query, key, value, layout, attn_mask, options):
    """(AttentionParams, NestedForm, the caller's q, k, v) of a call on NestedTensors."""
    if attn_mask is not None or type(query) is not Jagged or torch.compiler.is_compiling():
        return _call(query, key, value, layout, attn_mask, options)
    key_ = _jagged_key(query, key, value, layout, options)
    if key_ is None:
        return _call(query, key, value, layout, attn_mask, options)
    found = getattr(query._offsets, _DESCRIBED, {}).get(key_)
    if found is not None:
        return _jagged_described_call(found, query, key, value)
    made = _call(query, key, value, layout, attn_mask, options)
    _describe_jagged(query, key_, made[0])
    return made


def _call(query, key, value, layout, attn_mask, options):
    dim = ragged_dim(query, layout)
    q_rank = len(query._size) if isinstance(query, Jagged) else query.dim()
    if q_rank != 4:
        raise ValueError(f"query must be a 4-D NestedTensor (B, H, j, D), got {q_rank} dims")
    requires_grad = params_.needs_grad(query, key, value, attn_mask)
    jagged = isinstance(query, Jagged)
    if isinstance(key, Jagged) is not jagged or isinstance(value, Jagged) is not jagged:
        raise TypeError("query, key and value must all be jagged or all be strided NestedTensors")
    sides = (side(query, dim, "query", requires_grad), side(key, dim, "key", requires_grad),
             side(value, dim, "value", requires_grad))
    if not sides[1].same_rows(sides[2]):
        raise ValueError("key and value must have the same sequence lengths and layout")
    described_key = None
    if isinstance(sides[0], StridedSide) and attn_mask is None:
        described_key = _strided_key(sides, query, key, value, options, requires_grad)
        found = sides[0].layout.described.get(described_key)
        if found is not None:
            return _strided_described_call(found, sides, (query, key, value))
    # Differentiable sides are converted by torch ops that autograd records; the
    # others are read without it, and run.py's Function takes the NestedTensors.
    differentiable = sides[0].differentiable
    if requires_grad and not differentiable:
        with torch.no_grad():
            q, k, v = _rows(sides)
    else:
        q, k, v = _rows(sides)
    out = None
    if isinstance(sides[0], StridedSide):
        out = sides[0].new_nested((q.values.shape[1], v.values.shape[-1]), q.values.dtype, q.values.device)
    values = params_.option_values(options)
    memo = ragged.memo(q.cu_seqlens, q.seqused, k.cu_seqlens, k.seqused)
    structure = None if attn_mask is not None else ragged.structure(
        q.values, k.values, v.values, q.cu_seqlens, q.seqused, k.cu_seqlens, k.seqused, requires_grad, values)
    params = params_.checked_params(structure, q.values, k.values, v.values, q.cu_seqlens, k.cu_seqlens, q.seqused,
                                    k.seqused, q.max_seqlen, k.max_seqlen, values, requires_grad, memo,
                                    None if out is None else out[0])
    if params is None:
        try:
            params = params_.build_params(
                q.values, k.values, v.values, q.cu_seqlens, k.cu_seqlens, q.max_seqlen, k.max_seqlen,
                seqused_q=q.seqused, seqused_k=k.seqused, attn_bias=attn_mask, bias_name="attn_mask",
                requires_grad=requires_grad, out=None if out is None else out[0], memo=memo, structure=structure,
                **options)
        except ValueError as error:
            raise _named_max_seqlen(error) from None
    if described_key is not None:
        _describe(sides[0].layout.described, described_key, params)
    return params, NestedForm(*sides, out=out), (None if differentiable else (query, key, value))


# Calls of a structure described before. A model makes new views of its
# projections in every layer and step, of one batch: a call keeps its
# description (params without tensors, checked) for the next call of its
# structure, keyed by everything the description and the checks depend on
# besides the tensors' addresses (the lengths' contents included, which the
# CPU and varattn.set_device_checks check at every call of a new description).
# Jagged: a call whose query, key and value share their offsets and lengths
# keeps it on the offsets tensor (so that it goes with them), keyed by the
# ragged dims, the values' dtypes, devices, sizes and strides, the offsets'
# and lengths' versions (changed in place: described again), the stream
# (their int32 copies are made on one) and the longest length; not where the
# description would hold the offsets or lengths themselves (int32 ones, which
# the kernels take as they are), which would keep them alive through
# themselves. Strided: on the query's layout (kept by its metadata's
# contents), keyed by the key's and value's layouts' contents (the layouts
# themselves would make a cycle: the query's own, in self-attention),
# dtypes and devices.
# Both also by the options, whether a backward follows, torch's
# deterministic setting and the stream.
_DESCRIBED, _DESCRIBED_LIMIT = "_varattn_described", 16


def _jagged_key(query, key, value, layout, options) -> tuple | None:
    """The key of a jagged call's description, or None when it is not kept."""
    offsets, lengths = query._offsets, query._lengths
    if (type(key) is not Jagged or type(value) is not Jagged or key._offsets is not offsets
            or value._offsets is not offsets or key._lengths is not lengths or value._lengths is not lengths
            or checks.device_checks_enabled()):
        return None
    qv, kv, vv = query._values, key._values, value._values
    return (layout, query._ragged_idx, key._ragged_idx, value._ragged_idx, qv.dtype, kv.dtype, vv.dtype,
            qv.get_device(), kv.get_device(), vv.get_device(), qv.shape, kv.shape, vv.shape, qv.stride(),
            kv.stride(), vv.stride(), params_.option_values(options), params_.needs_grad(query, key, value),
            torch.are_deterministic_algorithms_enabled(), offsets._version,
            None if lengths is None else lengths._version, ragged.stream_of(offsets.device), query._get_max_seqlen())


def _strided_key(sides, query, key, value, options, requires_grad) -> tuple | None:
    """The key of a strided call's description (its sides made), or None when it is not kept."""
    if checks.device_checks_enabled():
        return None
    device = query.device
    return (type(sides[0]), sides[1].layout.key, sides[2].layout.key, query.dtype, key.dtype, value.dtype, device,
            key.device, value.device, params_.option_values(options), requires_grad,
            torch.are_deterministic_algorithms_enabled(), ragged.stream_of(device))


def _describe(described: dict, key_: tuple, params) -> None:
    """Keep the description of call `params` under key_ in `described`."""
    if params.structure is None or params.q.is_cuda and torch.cuda.is_current_stream_capturing():
        return
    if len(described) >= _DESCRIBED_LIMIT:
        described.clear()
    described[key_] = params.with_tensors(None, None, None, None)


def _describe_jagged(query, key_: tuple, params) -> None:
    offsets = query._offsets
    if params.cu_seqlens_q is offsets or params.seqused_q is not None and params.seqused_q is query._lengths:
        return
    described = getattr(offsets, _DESCRIBED, None)
    if described is None:
        described = {}
        setattr(offsets, _DESCRIBED, described)
    _describe(described, key_, params)


def _jagged_described_call(described, query, key, value):
    """`call`'s result for a jagged call of a described structure."""
    dim = query._ragged_idx
    sides = (JaggedSide(query, dim, "query"), JaggedSide(key, dim, "key"), JaggedSide(value, dim, "value"))
    # (gradients reach the NestedTensors through run.py's Function, whatever
    # autograd records of these views: values made by torch's ops have none)
    q, k, v = (s.rows_of(s.nt) for s in sides)
    return described.with_tensors(q, k, v, None), NestedForm(*sides), (query, key, value)


def _strided_described_call(described, sides, inputs):
    """`call`'s result for a strided call of a described structure, its sides made."""
    q, k, v = (_rows_in_layout(s.nt, s.layout) for s in sides)
    out = sides[0].new_nested((q.shape[1], v.shape[-1]), q.dtype, q.device)
    params = described.with_tensors(q, k, v, None, None if out is None else out[0])
    return params, NestedForm(*sides, out=out), (None if sides[0].differentiable else inputs)


def _rows(sides) -> tuple[Ragged, Ragged, Ragged]:
    """The packed rows of the query, key and value sides, each sharing the lengths of the one before where it can."""
    q_side, k_side, v_side = sides
    q = q_side.rows()
    k = k_side.rows(q if q_side.same_sequences(k_side) else None)
    return q, k, v_side.rows(k)


def _named_max_seqlen(error: ValueError) -> ValueError:
    """`error`, saying where a wrong max_seqlen came from when it is one: the
    caller passed none, it is what torch keeps on a jagged NestedTensor
    (strided ones have theirs counted from their sizes)."""
    for which, name in (("q", "query"), ("k", "key")):
        if str(error).startswith(f"max_seqlen_{which} is "):
            return ValueError(
                f"{error}: max_seqlen_{which} is the max_seqlen kept on {name}'s jagged NestedTensor "
                f"(given to nested_tensor_from_jagged or carried over by the op that made it), and it "
                f"is smaller than its longest sequence; make {name} with the right max_seqlen, or none")
    return error


def attend(params, form: NestedForm, inputs):
    """run.attention of a call made by `call`: under metadata_rules when
    run.py's Function takes the caller's NestedTensors."""
    if inputs is not None and params.requires_grad:
        with metadata_rules:
            return run.attention(params, form, inputs)
    return run.attention(params, form, inputs)


# ---------------------------------------------------------------------------
# Differentiable conversions for blocks that work on the packed rows between
# (varattn.nn.SelfAttention): NestedTensor -> rows -> NestedTensor.

class _ToRows(torch.autograd.Function):
    """NestedTensor `nt` -> its packed rows `values` (read from it without autograd)."""

    @staticmethod
    def forward(ctx, nt, side_, values):
        ctx.side = side_
        return values.detach()  # not the input itself, which autograd would treat as a view

    @staticmethod
    def backward(ctx, grad_rows):
        return ctx.side.nested(grad_rows), None, None


class _FromRows(torch.autograd.Function):
    """Packed rows -> a NestedTensor of `side_`'s structure over them."""

    @staticmethod
    def forward(ctx, rows, side_):
        ctx.side = side_
        return side_.nested(rows)

    @staticmethod
    def backward(ctx, grad_nested):
        return ctx.side.rows_of(grad_nested), None


def rows(nt, ragged_dim: int, name: str):
    """(Ragged, side) of NestedTensor `nt`: its packed rows, which a gradient
    reaching them takes back to `nt`."""
    requires_grad = params_.needs_grad(nt)
    s = side(nt, ragged_dim, name, requires_grad)
    if s.differentiable or not requires_grad:
        return s.rows(), s
    with torch.no_grad():
        packed = s.rows()
    with metadata_rules:
        packed.values = _ToRows.apply(nt, s, packed.values)
    return packed, s


def nested(rows_: torch.Tensor, side_):
    """A NestedTensor of `side_`'s structure over packed rows (rows, *features), differentiable."""
    if side_.differentiable or not params_.needs_grad(rows_):
        return side_.nested(rows_)
    if isinstance(side_, StridedSide):
        return side_.copied(rows_)
    with metadata_rules:
        return _FromRows.apply(rows_, side_)
