"""No cache in varattn keeps a caller's tensors alive: inputs and outputs of
every front end are freed once the caller drops them (with and without
gradients, after the backward too), and on CUDA the memory allocated comes
back to where it was after calls on fresh batches. varattn's own caches of
small length tensors (frontends/ragged.py) are bounded, and those of a
jagged batch go with it."""
from __future__ import annotations

import gc
import weakref

import numpy
import pytest
import torch

import reference
import varattn
from varattn.frontends import ragged

DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)]
H, D = 2, 16


def dtype_on(device):
    return torch.float32 if device == "cpu" else torch.float16


def projection_views(gen, lengths, layout, device, grad):
    """The tutorial's way: q, k, v chunked from one projection of a NestedTensor."""
    x = torch.nested.nested_tensor([reference.randn(gen, n, 3 * H * D, dtype=dtype_on(device), device=device)
                                    for n in lengths], layout=layout, requires_grad=grad)
    if layout == torch.strided and grad:  # torch has no backward for chunk on strided NestedTensors,
        lengths = sorted(lengths, reverse=True)  # nor for view when the first component is empty
        x = torch.nested.nested_tensor([reference.randn(gen, n, H * D, dtype=dtype_on(device), device=device)
                                        for n in lengths], requires_grad=True)
        return x, [x.view(len(lengths), -1, H, D).transpose(1, 2)] * 3
    parts = x.chunk(3, -1)
    if layout == torch.jagged:
        return x, [p.unflatten(-1, [H, D]).transpose(1, 2) for p in parts]
    return x, [p.view(len(lengths), -1, H, D).transpose(1, 2) for p in parts]


def loss_of(out):
    return sum(part.float().square().sum() for part in (out.unbind() if out.is_nested else (out,)))


def call(kind, gen, device, grad):
    """Run front end `kind` on fresh inputs; (weak references to every tensor
    the caller made or got back)."""
    lengths = reference.lengths(gen, 4, 9)
    held = []
    if kind in ("jagged", "strided"):
        leaf, (q, k, v) = projection_views(gen, lengths, torch.jagged if kind == "jagged" else torch.strided,
                                           device, grad)
        out, lse = varattn.attention(q, k, v, causal=True, return_lse=True)
        held += [leaf, q, k, v, out, lse]
    elif kind == "padded":
        leaves = [reference.randn(gen, 4, 9, H, D, dtype=dtype_on(device), device=device).requires_grad_(grad)
                  for _ in range(3)]
        mask = torch.arange(9, device=device)[None] >= torch.tensor(lengths, device=device)[:, None]
        out = varattn.attention(*leaves, layout="blhd", key_padding_mask=mask)
        held += [*leaves, mask, out]
    elif kind == "packed":
        q, k, v, cu_q, cu_k = reference.packed_inputs(gen, lengths, lengths, H, H, D, dtype=dtype_on(device),
                                                      device=device)
        leaves = [x.requires_grad_(grad) for x in (q, k, v)]
        out = varattn.varlen_attention(*leaves, cu_q, cu_k, 9, 9, causal=True)
        held += [*leaves, cu_q, cu_k, out]
    elif kind == "sdpa":
        q = reference.randn(gen, 2, H, 7, D, dtype=dtype_on(device), device=device).requires_grad_(grad)
        out = varattn.scaled_dot_product_attention(q, q, q, is_causal=True)
        held += [q, out]
    elif kind in ("block-jagged", "block-strided"):
        block = varattn.nn.SelfAttention(H, H * D).to(device, dtype_on(device))
        x = torch.nested.nested_tensor([reference.randn(gen, n, H * D, dtype=dtype_on(device), device=device)
                                        for n in lengths], layout=torch.jagged if kind == "block-jagged" else torch.strided,
                                       requires_grad=grad)
        out = block(x)
        held += [x, out]
    if grad:
        loss_of(held[-2] if kind in ("jagged", "strided") else held[-1]).backward()
    # and what a jagged NestedTensor holds: its values and offsets
    held += [inner for t in held if t.is_nested and t.layout == torch.jagged for inner in (t._values, t._offsets)]
    return [weakref.ref(t) for t in held]


KINDS = ["jagged", "strided", "padded", "packed", "sdpa", "block-jagged", "block-strided"]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("grad", [False, True], ids=["no-grad", "grad"])
@pytest.mark.parametrize("kind", KINDS)
def test_inputs_and_outputs_are_freed(gen, device, grad, kind):
    refs = call(kind, gen, device, grad)
    gc.collect()
    alive = [r() for r in refs if r() is not None]
    assert not alive, f"{len(alive)} of the caller's tensors still alive: {[type(t).__name__ for t in alive]}"


@pytest.mark.gpu
@pytest.mark.parametrize("grad", [False, True], ids=["no-grad", "grad"])
def test_cuda_memory_comes_back_after_fresh_batches(gen, grad):
    """100 calls on fresh batches of new lengths through every front end: the
    memory allocated returns to its baseline, with varattn's bounded cache of
    host-made lengths (padded, strided) emptied; jagged batches need no emptying."""
    for kind in KINDS:  # compile kernels, warm torch's allocator
        call(kind, gen, "cuda", grad)
    gc.collect()
    ragged.clear_caches()
    torch.cuda.synchronize()
    baseline = torch.cuda.memory_allocated()
    for step in range(100):
        call("jagged", gen, "cuda", grad)
    gc.collect()
    torch.cuda.synchronize()
    assert torch.cuda.memory_allocated() == baseline
    for step in range(100):
        call(KINDS[step % len(KINDS)], gen, "cuda", grad)
    gc.collect()
    ragged.clear_caches()
    torch.cuda.synchronize()
    assert torch.cuda.memory_allocated() == baseline


@pytest.mark.gpu
def test_host_made_lengths_are_bounded():
    """The cache of lengths copied from the host holds at most its limit, whatever the calls."""
    device = torch.device("cuda")
    for n in range(ragged.HOST_MADE_LIMIT + 50):
        assert ragged.device_int32(numpy.array([0, n]), device=device)[0].tolist() == [0, n]
    assert len(ragged._host_made) == ragged.HOST_MADE_LIMIT
