"""The private pieces of torch that varattn's front ends rely on, each checked
against torch's own public behaviour, so that a torch upgrade that changes
one fails here, loudly, rather than making varattn silently wrong.

Used in varattn/frontends/nested.py and params.py: the jagged subclass's
fields (_values, _offsets, _lengths, _ragged_idx, _size, _strides,
_metadata_cache, _get_max_seqlen), its constructor's work (jagged_like makes
the same tensor), autograd.Function over jagged NestedTensors, the strided
layout's metadata (_nested_tensor_size / _strides / _storage_offsets,
_nested_view_from_buffer, empty_like keeping a layout) and
torch._C.DisableTorchFunctionSubclass, and the registry of __torch_dispatch__
rules (torch._library.simple_registry) that metadata_rules go through; in
frontends/ragged.py and the CUDA backends, torch._C._cuda_getCurrentRawStream;
in dispatch.py, the attribute torch.compiler.assume_constant_result sets.
"""
from __future__ import annotations

import pytest
import torch
from torch.nested._internal.nested_tensor import NestedTensor

import reference
from varattn.frontends import nested

B, H, D = 4, 3, 8


def jagged_batch(gen, lengths, ragged_dim, requires_grad=False):
    """A (B, j, H, D) jagged NestedTensor, transposed to (B, H, j, D) for ragged_dim 2."""
    parts = [reference.randn(gen, n, H * D) for n in lengths]
    nt = torch.nested.nested_tensor(parts, layout=torch.jagged, requires_grad=requires_grad)
    nt = nt.unflatten(-1, [H, D])
    return (nt.transpose(1, 2) if ragged_dim == 2 else nt), parts


@pytest.mark.parametrize("ragged_dim", [1, 2])
def test_jagged_fields_are_the_packed_form(gen, ragged_dim):
    """_values holds the sequences' rows with the ragged dim at ragged_idx - 1,
    _offsets their starts, _get_max_seqlen the longest: what the public API says."""
    lengths = [3, 0, 5, 1]
    nt, parts = jagged_batch(gen, lengths, ragged_dim)
    assert isinstance(nt, NestedTensor) and nt._ragged_idx == ragged_dim
    assert torch.equal(nt._values, nt.values()) and nt._values.shape == nt.values().shape
    assert nt._offsets is nt.offsets() and nt._lengths is nt.lengths() is None
    assert nt._offsets.tolist() == [0, 3, 3, 8, 9]
    assert nt._get_max_seqlen() == 5
    rows = nested.side(nt, ragged_dim, "q", False).rows()
    assert torch.equal(rows.values.reshape(-1, H * D), torch.cat(parts))
    assert len(nt._size) == 4 and nt._size[0] == B and nt._size == tuple(nt.shape)


@pytest.mark.parametrize("ragged_dim", [1, 2])
@pytest.mark.parametrize("holes", [False, True])
def test_jagged_like_is_what_the_constructor_makes(gen, ragged_dim, holes):
    """jagged_like skips torch's constructor: every attribute and dispatch key
    of what it makes must match the constructor's, on this torch."""
    if holes:
        base = reference.randn(gen, B, 6, H * D)
        like = torch.nested.narrow(base, 1, torch.tensor([0, 1, 2, 0]), torch.tensor([4, 0, 3, 6]), layout=torch.jagged)
        like = like.unflatten(-1, [H, D])
        like = like.transpose(1, 2) if ragged_dim == 2 else like
    else:
        like, _ = jagged_batch(gen, [3, 0, 5, 1], ragged_dim)
    rows = reference.randn(gen, like._values.shape[ragged_dim - 1], H, 5)
    values = rows if ragged_dim == 1 else rows.movedim(0, 1)
    ours = nested.jagged_like(values, like, ragged_dim)
    theirs = NestedTensor(values.clone(), like._offsets, lengths=like._lengths, _ragged_idx=ragged_dim,
                          _metadata_cache=like._metadata_cache)
    def same(a, b):
        return a is b or (not isinstance(a, torch.Tensor) and a == b)
    assert set(ours.__dict__) == set(theirs.__dict__)
    for name, value in theirs.__dict__.items():
        if name != "_values":
            assert same(getattr(ours, name), value), name
    assert set(ours._values.__dict__) == set(theirs._values.__dict__)
    for name, value in theirs._values.__dict__.items():
        assert same(getattr(ours._values, name), value), name
    assert torch._C._dispatch_keys(ours) == torch._C._dispatch_keys(theirs)
    assert ours.shape == theirs.shape and ours.dtype == theirs.dtype and ours.layout == torch.jagged
    assert ours.stride() == theirs.stride() and not ours.requires_grad
    for a, b in zip(ours.unbind(), theirs.unbind()):  # and it behaves as one
        assert torch.equal(a, b)
    assert torch.equal((ours * 2).values(), theirs.values() * 2)


def test_autograd_function_over_jagged_nested_tensors(gen):
    """run.py's Function takes jagged NestedTensors in and gives them out; its
    gradients, made by jagged_like, reach leaves through torch's own ops."""
    x = torch.nested.nested_tensor([reference.randn(gen, n, H, D) for n in (3, 0, 5, 1)], layout=torch.jagged,
                                   requires_grad=True)
    q = x.transpose(1, 2)  # a view, as a model's q

    class Double(torch.autograd.Function):
        @staticmethod
        def forward(ctx, nt):
            return nested.jagged_like(nt._values * 2, nt, nt._ragged_idx)

        @staticmethod
        def backward(ctx, grad):
            return nested.jagged_like(grad._values * 2, grad, grad._ragged_idx)

    out = Double.apply(q)
    assert isinstance(out, NestedTensor) and out.requires_grad
    out.transpose(1, 2).values().sum().backward()
    assert torch.equal(x.grad.values(), torch.full_like(x.values(), 2.0))


def test_metadata_rules_answer_as_torch(gen):
    """Inside metadata_rules, the sizes, strides, dim and layout of a jagged
    NestedTensor (what autograd asks of a Function's NestedTensors) come
    from the rules, through torch's registry of __torch_dispatch__ rules,
    and equal torch's own answers; outside, torch's __torch_dispatch__
    answers, as it does when no rule is registered."""
    from torch._library import simple_registry
    nt, _ = jagged_batch(gen, [3, 0, 5, 1], 2)
    ops = (torch.ops.aten.sym_size.default, torch.ops.aten.sym_stride.default, torch.ops.aten.dim.default,
           torch.ops.prim.layout.default)
    outside = [op(nt) for op in ops]
    asked = []
    original = NestedTensor.__dict__["__torch_dispatch__"]

    def spy(cls, func, types, args=(), kwargs=None):
        asked.append(func)
        return original.__func__(cls, func, types, args, kwargs)

    with nested.metadata_rules:
        NestedTensor.__torch_dispatch__ = classmethod(spy)
        try:
            inside = [op(nt) for op in ops]
        finally:
            NestedTensor.__torch_dispatch__ = original
    assert not asked  # answered by the rules
    assert inside == outside and inside[:3] == [list(nt._size), list(nt._strides), 4]
    assert tuple(nt.shape) == nt._size and nt.stride() == nt._strides and nt.layout == torch.jagged
    for op in ops:
        assert simple_registry.singleton.find(op.__qualname__).torch_dispatch_rules.find(NestedTensor) is not None
    NestedTensor.__torch_dispatch__ = classmethod(spy)
    try:
        assert [op(nt) for op in ops] == outside
    finally:
        NestedTensor.__torch_dispatch__ = original
    assert asked == list(ops)  # outside varattn's calls, torch's own dispatch answers


def test_strided_metadata_and_views(gen):
    """A strided NestedTensor's metadata lives on the host and describes its
    buffer; _nested_view_from_buffer views a buffer by such metadata, and
    empty_like keeps strides and offsets (frontends/nested.py checks this
    once per layout too, and falls back when it does not hold)."""
    parts = [reference.randn(gen, n, 3 * H * D) for n in (3, 0, 5)]
    x = torch.nested.nested_tensor(parts)
    q = x.chunk(3, -1)[0].view(3, -1, H, D).transpose(1, 2)
    sizes, strides, offsets = q._nested_tensor_size(), q._nested_tensor_strides(), q._nested_tensor_storage_offsets()
    assert sizes.device.type == strides.device.type == offsets.device.type == "cpu"
    assert sizes.tolist() == [[H, n, D] for n in (3, 0, 5)]
    buffer = q.values()
    for component, size, stride, offset in zip(q.unbind(), sizes.tolist(), strides.tolist(), offsets.tolist()):
        assert torch.equal(component, buffer.as_strided(size, stride, offset))
    view = torch._nested_view_from_buffer(buffer, sizes, strides, offsets)
    assert all(torch.equal(a, b) for a, b in zip(view.unbind(), q.unbind()))
    made = torch.empty_like(view, dtype=torch.float16)
    assert torch.equal(made._nested_tensor_strides(), strides) and torch.equal(made._nested_tensor_storage_offsets(), offsets)


def test_torch_function_can_be_bypassed(gen):
    """needs_grad and is_nested read NestedTensors' properties with torch's
    torch-function layer off; the answers must be the layer's."""
    for requires_grad in (False, True):
        nt, _ = jagged_batch(gen, [2, 4], 2, requires_grad=requires_grad)
        with torch._C.DisableTorchFunctionSubclass():
            assert nt.requires_grad == requires_grad
        assert nt.requires_grad == requires_grad and nested.is_nested(nt)
    assert not nested.is_nested(torch.zeros(2)) and nested.is_nested(torch.nested.nested_tensor([torch.ones(2)]))


@pytest.mark.gpu
def test_current_raw_stream_is_torch_current_stream():
    stream = torch.cuda.Stream()
    with torch.cuda.stream(stream):
        assert torch._C._cuda_getCurrentRawStream(torch.cuda.current_device()) == stream.cuda_stream
    assert torch._C._cuda_getCurrentRawStream(torch.cuda.current_device()) == torch.cuda.current_stream().cuda_stream


def test_assume_constant_result_is_the_marker_dispatch_sets():
    """varattn.dispatch marks allowed_names constant for torch.compile by
    setting the attribute torch.compiler.assume_constant_result sets (the
    decorator itself imports torch._dynamo): the two must stay the same."""
    from varattn import dispatch

    def probe():
        return 0

    marked = torch.compiler.assume_constant_result(probe)
    assert vars(marked) == {"_dynamo_marked_constant": True}
    assert dispatch.allowed_names._dynamo_marked_constant is True
