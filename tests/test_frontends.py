"""The front ends: NestedTensors, padded batches, the SDPA drop-in and nn.SelfAttention,
each against the float64 reference per sequence, on the CPU and (marked gpu) on CUDA."""
from __future__ import annotations

import gc
import math
import weakref

import pytest
import torch
import torch.nn.functional as F
from torch.nn.attention.bias import causal_lower_right, causal_upper_left

import reference
import varattn
from conftest import TOLERANCE
from varattn.frontends import nested, padded

DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)]
HEADS, HEAD_DIM = 4, 16


def dtype_on(device):
    return torch.float64 if device == "cpu" else torch.float16


def per_sequence_reference(parts_q, parts_k, parts_v, **options):
    """Reference outputs of a list of (L, H, D) sequences."""
    cu_q = reference.cu_seqlens([p.shape[0] for p in parts_q])
    cu_k = reference.cu_seqlens([p.shape[0] for p in parts_k])
    out, lse = reference.attention(torch.cat(parts_q), torch.cat(parts_k), torch.cat(parts_v), cu_q, cu_k, **options)
    return out.split([p.shape[0] for p in parts_q]), lse.split([p.shape[0] for p in parts_q], dim=1)


def nested_batch(gen, lengths, device, layout):
    """The tutorial's way: a (B, j, H * D) NestedTensor viewed as (B, H, j, D); also its parts (L, H, D)."""
    parts = [reference.randn(gen, n, HEADS * HEAD_DIM, dtype=dtype_on(device), device=device) for n in lengths]
    nt = torch.nested.nested_tensor(parts, layout=layout).view(len(lengths), -1, HEADS, HEAD_DIM).transpose(1, 2)
    return nt, [p.view(-1, HEADS, HEAD_DIM) for p in parts]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("layout", [torch.jagged, torch.strided], ids=["jagged", "strided"])
@pytest.mark.parametrize("options", [dict(), dict(causal=True), dict(causal=True, causal_align="lower_right")], ids=str)
def test_nested(gen, device, layout, options):
    lengths_q = reference.lengths(gen, 5, 13)
    lengths_k = reference.lengths(gen, 5, 17)
    q, parts_q = nested_batch(gen, lengths_q, device, layout)
    k, parts_k = nested_batch(gen, lengths_k, device, layout)
    v, parts_v = nested_batch(gen, lengths_k, device, layout)
    if layout == torch.jagged:  # key and value share their ragged structure
        v = torch.nested.nested_tensor_from_jagged(v.values().transpose(0, 1), k.offsets(),
                                                   max_seqlen=max(lengths_k)).transpose(1, 2)
    out, lse = varattn.attention(q, k, v, return_lse=True, **options)
    assert out.is_nested and out.layout == layout and lse.layout == layout
    expected, expected_lse = per_sequence_reference(parts_q, parts_k, parts_v, **options)
    for got, want, got_lse, want_lse in zip(out.unbind(), expected, lse.unbind(), expected_lse):
        assert got.shape == (HEADS, want.shape[0], HEAD_DIM)
        assert reference.relative_error(got.transpose(0, 1), want) <= TOLERANCE[got.dtype]
        assert reference.lse_error(got_lse, want_lse) <= 1e-3


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("layout", [torch.jagged, torch.strided], ids=["jagged", "strided"])
def test_nested_repeated_calls(gen, device, layout):
    """Calls on the same NestedTensors each get a fresh output, see changed
    data and follow changed options."""
    lengths = reference.lengths(gen, 4, 11)
    q, parts_q = nested_batch(gen, lengths, device, layout)
    k, parts_k = nested_batch(gen, lengths, device, layout)
    first = varattn.attention(q, k, k)
    again = varattn.attention(q, k, k)
    assert again.values().data_ptr() != first.values().data_ptr()
    for options in (dict(causal=True), dict(), dict(causal=True, causal_align="lower_right")):
        q.values().mul_(-0.5)  # in place: the same NestedTensor, new data
        parts_q = [x * -0.5 for x in parts_q]
        out = varattn.attention(q, k, k, **options)
        expected, _ = per_sequence_reference(parts_q, parts_k, parts_k, **options)
        for got, want in zip(out.unbind(), expected):
            assert reference.relative_error(got.transpose(0, 1), want) <= TOLERANCE[got.dtype]
    for got, want in zip(first.unbind(), per_sequence_reference([x * -8 for x in parts_q], parts_k, parts_k)[0]):
        assert reference.relative_error(got.transpose(0, 1), want) <= TOLERANCE[got.dtype]  # untouched since
    with varattn.use_backends("math"):
        assert varattn.explain(q, k, k).chosen == varattn.Backend.MATH
        varattn.attention(q, k, k)


@pytest.mark.parametrize("device", DEVICES)
def test_jagged_described_calls_follow_what_changes(gen, device):
    """Calls on new views of one jagged batch reuse the description kept on
    its offsets, and follow what it does not cover: the values, other
    options, gradients, the offsets changed in place."""
    lengths, dtype = [6, 3, 0, 5], dtype_on(device)
    parts = [reference.randn(gen, n, 3 * HEADS * HEAD_DIM, dtype=dtype, device=device) for n in lengths]
    x = torch.nested.nested_tensor(parts, layout=torch.jagged)

    def views(grad=False):
        base = x.detach().requires_grad_(grad)
        return base, [t.unflatten(-1, [HEADS, HEAD_DIM]).transpose(1, 2) for t in base.chunk(3, -1)]

    def check(out, options, grad_out=None, base=None):
        """out (and base.grad from grad_out) against the reference on x's sequences as its offsets say now."""
        offsets = x.offsets().tolist()
        rows = x.values().view(-1, 3, HEADS, HEAD_DIM)
        q, k, v = ([rows[a:b, i].double().requires_grad_() for a, b in zip(offsets, offsets[1:])] for i in range(3))
        expected, _ = per_sequence_reference(q, k, v, **options)
        for got, want in zip(out.unbind(), expected):
            assert reference.relative_error(got.transpose(0, 1), want) <= TOLERANCE[dtype]
        if grad_out is not None:
            torch.autograd.backward(expected, [g.transpose(0, 1).double().to(e.device) for g, e in zip(grad_out.unbind(), expected)])
            grads = [torch.stack([t.grad if t.grad is not None else torch.zeros_like(t) for t in ts], 1)
                     for ts in zip(q, k, v)]
            want = torch.cat(grads)
            assert reference.relative_error(base.grad.values().view_as(want), want) <= TOLERANCE[dtype]

    for options in (dict(), dict(), dict(causal=True), dict(causal=True, causal_align="lower_right"), dict()):
        _, (q, k, v) = views()
        check(varattn.attention(q, k, v, **options), options)
    assert len(getattr(x.offsets(), nested._DESCRIBED)) == 3
    for _ in range(2):
        base, (q, k, v) = views(grad=True)
        out = varattn.attention(q, k, v, causal=True)
        grad_out = torch.nested.nested_tensor_from_jagged(
            reference.randn(gen, sum(lengths), HEADS, HEAD_DIM, dtype=dtype, device=device),
            x.offsets()).transpose(1, 2)
        out.backward(grad_out)
        check(out, dict(causal=True), grad_out, base)
    assert len(getattr(x.offsets(), nested._DESCRIBED)) == 4
    x.offsets().copy_(torch.tensor([0, 3, 9, 9, 14], device=device))  # lengths 3, 6, 0, 5: the longest stays 6
    _, (q, k, v) = views()
    check(varattn.attention(q, k, v), {})


@pytest.mark.parametrize("device", DEVICES)
def test_jagged_with_holes(gen, device):
    """torch.nested.narrow leaves holes between sequences; they are read in place."""
    base = reference.randn(gen, 4, 12, HEADS * HEAD_DIM, dtype=dtype_on(device), device=device)
    starts, lengths = torch.tensor([0, 3, 1, 5]), torch.tensor([7, 0, 11, 1])
    nt = torch.nested.narrow(base, 1, starts.to(device), lengths.to(device), layout=torch.jagged)
    nt = nt.view(4, -1, HEADS, HEAD_DIM).transpose(1, 2)
    ragged = nested.side(nt, 2, "q", False).rows()
    assert ragged.seqused is not None and ragged.values.data_ptr() == base.data_ptr()  # no copy
    out = varattn.attention(nt, nt, nt, causal=True)
    parts = [base[b, s:s + n].view(n, HEADS, HEAD_DIM) for b, (s, n) in enumerate(zip(starts.tolist(), lengths.tolist()))]
    expected, _ = per_sequence_reference(parts, parts, parts, causal=True)
    for got, want in zip(out.unbind(), expected):
        assert reference.relative_error(got.transpose(0, 1), want) <= TOLERANCE[got.dtype]


@pytest.mark.parametrize("stale", ["query", "key"])
def test_stale_max_seqlen_of_a_nested_tensor_is_named(gen, stale):
    """A max_seqlen torch keeps on a jagged NestedTensor, and smaller than its
    longest sequence: the error says it came from that NestedTensor, since the
    caller passed no max_seqlen."""
    def batch(max_seqlen):
        values = reference.randn(gen, 9, HEADS, HEAD_DIM)
        return torch.nested.nested_tensor_from_jagged(values, torch.tensor([0, 3, 9]), max_seqlen=max_seqlen)
    q, kv = (batch(2), batch(6)) if stale == "query" else (batch(6), batch(2))
    which = "q" if stale == "query" else "k"
    with pytest.raises(ValueError, match=f"max_seqlen_{which} is 2 .* kept on {stale}'s jagged NestedTensor"):
        varattn.attention(q.transpose(1, 2), kv.transpose(1, 2), kv.transpose(1, 2))


@pytest.mark.parametrize("layout", [torch.jagged, torch.strided], ids=["jagged", "strided"])
def test_nested_round_trip(gen, layout):
    nt, parts = nested_batch(gen, [3, 0, 8, 1], "cpu", layout)
    side = nested.side(nt, 2, "q", False)
    ragged = side.rows()
    assert ragged.values.data_ptr() == nt.values().data_ptr()  # zero-copy view
    rebuilt = side.nested(ragged.values.clone())
    for a, b in zip(rebuilt.unbind(), nt.unbind()):
        assert torch.equal(a, b)


def test_strided_chunks_of_one_projection_are_views(gen):
    """q, k, v chunked from one projection (the tutorial's block) need no copy."""
    x = torch.nested.nested_tensor([reference.randn(gen, n, 3 * HEADS * HEAD_DIM, dtype=torch.float64) for n in (4, 0, 6)])
    q, k, v = (t.view(3, -1, HEADS, HEAD_DIM).transpose(1, 2) for t in x.chunk(3, -1))
    for name, t in (("q", q), ("k", k), ("v", v)):
        ragged = nested.side(t, 2, name, False).rows()
        assert ragged.values.untyped_storage().data_ptr() == x.values().untyped_storage().data_ptr()


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("layout", ["bhld", "blhd"])
@pytest.mark.parametrize("lengths_as", ["list", "tensor", "mask"])
def test_padded(gen, device, layout, lengths_as):
    batch, length = 4, 11
    lengths = [11, 0, 5, 1]
    dtype = dtype_on(device)
    q, k, v = (reference.randn(gen, batch, length, HEADS, HEAD_DIM, dtype=dtype, device=device) for _ in range(3))
    as_layout = (lambda x: x.transpose(1, 2)) if layout == "bhld" else (lambda x: x)
    argument = {"list": dict(lengths=lengths), "tensor": dict(lengths=torch.tensor(lengths, device=device)),
                "mask": dict(key_padding_mask=torch.arange(length, device=device)[None, :] >=
                             torch.tensor(lengths, device=device)[:, None])}[lengths_as]
    out = varattn.attention(as_layout(q), as_layout(k), as_layout(v), layout=layout, causal=True, **argument)
    out = as_layout(out)  # back to (B, L, H, D)
    expected, _ = per_sequence_reference([q[b, :n] for b, n in enumerate(lengths)], [k[b, :n] for b, n in enumerate(lengths)],
                                         [v[b, :n] for b, n in enumerate(lengths)], causal=True)
    for b, n in enumerate(lengths):
        assert reference.relative_error(out[b, :n], expected[b]) <= TOLERANCE[dtype] or n == 0
        assert torch.equal(out[b, n:], torch.zeros_like(out[b, n:]))


@pytest.mark.gpu
@pytest.mark.parametrize("layout", ["bhld", "blhd"])
@pytest.mark.parametrize("head_dim", [64, 128, 256])
@pytest.mark.parametrize("causal", [False, True])
def test_padded_flash_ignores_what_padding_holds(gen, layout, head_dim, causal):
    """Padding may hold anything, NaN included: the flash kernels, whose copies
    bring whole tiles, never let it into a sequence's output."""
    lengths = [200, 77, 130]
    q, k, v = (reference.randn(gen, 3, 200, 4, head_dim, dtype=torch.bfloat16, device="cuda") for _ in range(3))
    for x in (q, k, v):
        for b, n in enumerate(lengths):
            x[b, n:] = math.nan
    as_layout = (lambda x: x.transpose(1, 2)) if layout == "bhld" else (lambda x: x)
    args = (as_layout(q), as_layout(k), as_layout(v))
    assert varattn.explain(*args, layout=layout, lengths=lengths, causal=causal).chosen == varattn.Backend.FLASH
    out = as_layout(varattn.attention(*args, layout=layout, lengths=lengths, causal=causal))
    expected, _ = per_sequence_reference([q[b, :n] for b, n in enumerate(lengths)], [k[b, :n] for b, n in enumerate(lengths)],
                                         [v[b, :n] for b, n in enumerate(lengths)], causal=causal)
    for b, n in enumerate(lengths):
        assert reference.relative_error(out[b, :n], expected[b]) <= TOLERANCE[torch.bfloat16]
        assert torch.equal(out[b, n:], torch.zeros_like(out[b, n:]))


@pytest.mark.gpu
def test_padding_mask_changed_in_place_is_read_again(gen):
    """A CUDA key_padding_mask's lengths are kept with the mask object; the
    mask changed in place (a new version) gives its new lengths, and a
    mask garbage-collected takes them along."""
    batch, length = 3, 9
    q, k, v = (reference.randn(gen, batch, length, HEADS, HEAD_DIM, dtype=torch.float16, device="cuda")
               for _ in range(3))
    positions = torch.arange(length, device="cuda")[None, :]
    mask = positions >= torch.tensor([9, 4, 1], device="cuda")[:, None]
    for lengths in ([9, 4, 1], [2, 9, 0], [2, 9, 0]):
        mask.copy_(positions >= torch.tensor(lengths, device="cuda")[:, None])
        out = varattn.attention(q, k, v, layout="blhd", key_padding_mask=mask)
        expected, _ = per_sequence_reference([q[b, :n] for b, n in enumerate(lengths)],
                                             [k[b, :n] for b, n in enumerate(lengths)],
                                             [v[b, :n] for b, n in enumerate(lengths)])
        for b, n in enumerate(lengths):
            assert n == 0 or reference.relative_error(out[b, :n], expected[b]) <= TOLERANCE[torch.float16]
            assert torch.equal(out[b, n:], torch.zeros_like(out[b, n:]))
    kept = weakref.ref(mask)
    del mask
    gc.collect()
    assert kept() is None


def test_padded_separate_kv_lengths_and_mask(gen):
    q = reference.randn(gen, 3, HEADS, 6, HEAD_DIM, dtype=torch.float64)
    k, v = (reference.randn(gen, 3, HEADS, 9, HEAD_DIM, dtype=torch.float64) for _ in range(2))
    mask = torch.rand(3, 1, 6, 9, generator=gen) > 0.4
    lengths, kv_lengths = [6, 2, 0], [9, 4, 3]
    out, lse = varattn.attention(q, k, v, lengths=lengths, kv_lengths=kv_lengths, attn_mask=mask, return_lse=True)
    assert lse.shape == (3, HEADS, 6)
    expected, _ = per_sequence_reference([q[b, :, :n].transpose(0, 1) for b, n in enumerate(lengths)],
                                         [k[b, :, :n].transpose(0, 1) for b, n in enumerate(kv_lengths)],
                                         [v[b, :, :n].transpose(0, 1) for b, n in enumerate(kv_lengths)],
                                         attn_bias=mask)
    for b, n in enumerate(lengths):
        if n:
            assert reference.relative_error(out[b, :, :n].transpose(0, 1), expected[b]) <= 1e-10
        assert torch.equal(out[b, :, n:], torch.zeros_like(out[b, :, n:]))


def test_padded_round_trip(gen):
    x = reference.randn(gen, 3, 5, HEADS, HEAD_DIM, dtype=torch.float64)
    for layout, given in (("blhd", x), ("bhld", x.transpose(1, 2))):
        ragged = padded.unpack(given, layout, None)
        assert ragged.values.data_ptr() == x.data_ptr()  # (B, L) merge without a copy
        assert torch.equal(padded.repack(ragged.values, 3, 5, layout), given)


# ---------------------------------------------------------------------------
# The SDPA drop-in, against torch's own SDPA.

@pytest.mark.parametrize("case", [
    dict(), dict(is_causal=True), dict(mask="bool2d"), dict(mask="bool4d"), dict(mask="float3d"),
    dict(mask=causal_upper_left), dict(mask=causal_lower_right), dict(enable_gqa=True), dict(scale=0.2),
], ids=str)
@pytest.mark.parametrize("shape", [(2, 4, 7, 9), (4, 7, 9), (2, 3, 4, 5, 6)], ids=str)
def test_sdpa_matches_torch(gen, case, shape):
    *batch, heads, length_q, length_k = shape
    head_dim = 8
    q = reference.randn(gen, *batch, heads, length_q, head_dim, dtype=torch.float64)
    heads_kv = heads // 2 if case.get("enable_gqa") and heads % 2 == 0 else heads
    k = reference.randn(gen, *batch, heads_kv, length_k, head_dim, dtype=torch.float64)
    v = reference.randn(gen, *batch, heads_kv, length_k, head_dim, dtype=torch.float64)
    mask = case.get("mask")
    if mask == "bool2d":
        mask = torch.rand(length_q, length_k, generator=gen) > 0.3
    elif mask == "bool4d":
        mask = torch.rand(*([1] * len(batch)), 1, length_q, length_k, generator=gen) > 0.3
    elif mask == "float3d":
        mask = reference.randn(gen, heads, length_q, length_k, dtype=torch.float64)
    elif callable(mask):
        mask = mask(length_q, length_k)
    options = dict(attn_mask=mask, is_causal=case.get("is_causal", False), scale=case.get("scale"),
                   enable_gqa=heads_kv != heads)
    expected = F.scaled_dot_product_attention(q, k, v, **options)
    got = varattn.scaled_dot_product_attention(q, k, v, **options)
    assert got.shape == expected.shape
    # torch gives NaN where a bool mask hides a whole row; varattn gives 0 (DESIGN.md)
    assert reference.relative_error(got, expected.nan_to_num(0.0)) <= 1e-10


@pytest.mark.parametrize("layout", [torch.jagged, torch.strided], ids=["jagged", "strided"])
def test_sdpa_nested(gen, layout):
    q, parts = nested_batch(gen, [5, 1, 9], "cpu", layout)
    out = varattn.scaled_dot_product_attention(q, q, q, is_causal=True)
    for got, part in zip(out.unbind(), parts):
        expected = F.scaled_dot_product_attention(part.transpose(0, 1), part.transpose(0, 1), part.transpose(0, 1),
                                                  is_causal=True)
        assert reference.relative_error(got, expected) <= 1e-10


def test_sdpa_dropout_follows_the_seed(gen):
    q = reference.randn(gen, 1, 2, 4, 8)
    outs = []
    for seed in (5, 5, 6):
        torch.manual_seed(seed)
        outs.append(varattn.scaled_dot_product_attention(q, q, q, dropout_p=0.5))
    assert torch.equal(outs[0], outs[1]) and not torch.equal(outs[0], outs[2])


def test_sdpa_mask_and_is_causal_are_exclusive(gen):
    q = reference.randn(gen, 1, 2, 4, 8)
    with pytest.raises(ValueError, match="is_causal"):
        varattn.scaled_dot_product_attention(q, q, q, attn_mask=torch.ones(4, 4, dtype=torch.bool), is_causal=True)


# ---------------------------------------------------------------------------
# Attention blocks: the tutorial's CausalSelfAttention with varattn's SDPA, and varattn.nn.SelfAttention.

class TutorialCausalSelfAttention(torch.nn.Module):
    """The PyTorch SDPA tutorial's block, with F.scaled_dot_product_attention swapped for varattn's."""

    def __init__(self, num_heads, embed_dimension, is_causal):
        super().__init__()
        self.c_attn = torch.nn.Linear(embed_dimension, 3 * embed_dimension, bias=False)
        self.c_proj = torch.nn.Linear(embed_dimension, embed_dimension, bias=False)
        self.num_heads, self.is_causal = num_heads, is_causal

    def forward(self, x):
        query_projected = self.c_attn(x)
        batch_size = query_projected.size(0)
        embed_dim = query_projected.size(2)
        head_dim = embed_dim // (self.num_heads * 3)
        query, key, value = query_projected.chunk(3, -1)
        query = query.view(batch_size, -1, self.num_heads, head_dim).transpose(1, 2)
        key = key.view(batch_size, -1, self.num_heads, head_dim).transpose(1, 2)
        value = value.view(batch_size, -1, self.num_heads, head_dim).transpose(1, 2)
        y = varattn.scaled_dot_product_attention(query, key, value, attn_mask=None, dropout_p=0.0,
                                                 is_causal=self.is_causal)
        y = y.transpose(1, 2).view(batch_size, -1, self.num_heads * head_dim)
        return self.c_proj(y)


def block_reference(block, parts, is_causal):
    """Per sequence, float64, with the block's weights."""
    outputs = []
    for x in parts:
        q, k, v = (x.double() @ block.c_attn.weight.double().T).chunk(3, -1)
        heads = block.num_heads
        q, k, v = (t.view(t.shape[0], heads, -1).transpose(0, 1) for t in (q, k, v))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=is_causal) if x.shape[0] else q
        outputs.append(y.transpose(0, 1).reshape(x.shape[0], -1) @ block.c_proj.weight.double().T)
    return outputs


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("layout", [torch.jagged, torch.strided], ids=["jagged", "strided"])
@pytest.mark.parametrize("block_kind", ["tutorial", "varattn"])
def test_attention_blocks_on_nested(gen, device, layout, block_kind):
    dtype = dtype_on(device)
    embed, heads = 64, 4
    block = (TutorialCausalSelfAttention(heads, embed, True) if block_kind == "tutorial"
             else varattn.nn.SelfAttention(heads, embed, is_causal=True)).to(device, dtype).eval()
    parts = [reference.randn(gen, n, embed, dtype=dtype, device=device) for n in (7, 1, 12, 3)]
    x = torch.nested.nested_tensor(parts, layout=layout)
    with torch.no_grad():
        y = block(x)
    assert y.is_nested and y.layout == layout
    for got, want in zip(y.unbind(), block_reference(block, parts, True)):
        assert reference.relative_error(got, want) <= TOLERANCE[dtype] * 5


@pytest.mark.parametrize("device", DEVICES)
def test_self_attention_padded(gen, device):
    dtype = dtype_on(device)
    block = varattn.nn.SelfAttention(4, 64, bias=True, is_causal=True).to(device, dtype).eval()
    lengths = [9, 0, 4]
    x = reference.randn(gen, 3, 9, 64, dtype=dtype, device=device)
    with torch.no_grad():
        y = block(x, lengths=lengths)
        expected = [block(torch.nested.nested_tensor([x[b, :n]], layout=torch.jagged)).unbind()[0]
                    for b, n in enumerate(lengths) if n]
    position = 0
    for b, n in enumerate(lengths):
        if n:
            assert reference.relative_error(y[b, :n], expected[position]) <= TOLERANCE[dtype]
            position += 1
        assert torch.equal(y[b, n:], torch.zeros_like(y[b, n:]))


# ---------------------------------------------------------------------------
# CUDA specifics.

@pytest.mark.gpu
def test_runs_on_the_current_stream(gen):
    q, k, v, cu_q, cu_k = reference.packed_inputs(gen, [300, 7], [250, 9], 4, 2, 64, dtype=torch.float16, device="cuda")
    expected, _ = reference.attention(q, k, v, cu_q, cu_k, causal=True)
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        out = varattn.varlen_attention(q, k, v, cu_q, cu_k, 300, 250, causal=True)
    stream.synchronize()
    assert reference.relative_error(out, expected) <= TOLERANCE[torch.float16]


@pytest.mark.gpu
def test_cu_seqlens_on_another_device_is_an_error(gen):
    q, k, v, cu_q, cu_k = reference.packed_inputs(gen, [5], [5], 2, 2, 16, dtype=torch.float16, device="cuda")
    with pytest.raises(ValueError, match="cu_seqlens_q"):
        varattn.varlen_attention(q, k, v, cu_q.cpu(), cu_k, 5, 5)


@pytest.mark.gpu
def test_device_checks_read_lengths_from_the_gpu(gen):
    q, k, v, cu_q, cu_k = reference.packed_inputs(gen, [5, 6], [5, 6], 2, 2, 16, dtype=torch.float16, device="cuda")
    varattn.set_device_checks(True)
    with pytest.raises(ValueError, match="max_seqlen_q"):
        varattn.varlen_attention(q, k, v, cu_q, cu_k, 4, 6)
    assert math.isfinite(varattn.varlen_attention(q, k, v, cu_q, cu_k, 6, 6).float().norm().item())
