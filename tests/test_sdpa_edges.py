"""The SDPA drop-in at torch's edges (issue 16), against torch 2.13's own
scaled_dot_product_attention: empty sizes, the argument types torch takes,
masks that broadcast and CausalBias of matching lengths."""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch.nn.attention.bias import causal_lower_right, causal_upper_left

import reference
import varattn

DTYPE = torch.float64


def leaves(gen, *shapes, dtype=DTYPE):
    return [reference.randn(gen, *shape, dtype=dtype).requires_grad_() for shape in shapes]


def run_both(inputs, grad=True, **options):
    """(out, grads) of torch's and varattn's SDPA on copies of `inputs`."""
    results = []
    for sdpa in (F.scaled_dot_product_attention, varattn.scaled_dot_product_attention):
        copies = [x.detach().clone().requires_grad_(x.requires_grad) for x in inputs]
        out = sdpa(*copies, **options)
        grads = None
        if grad:
            # a gradient of ones where the output has elements, the loss otherwise (the empty sum)
            out.backward(torch.ones_like(out))
            grads = [x.grad for x in copies]
        results.append((out, grads))
    return results


# ---------------------------------------------------------------------------
# 1. Empty sizes: the output torch gives, and gradients (zeros or empty) to every input.

EMPTY = {
    "Lq=0": ((2, 4, 0, 8), (2, 4, 5, 8), (2, 4, 5, 8)),
    "Lk=0": ((2, 4, 5, 8), (2, 4, 0, 8), (2, 4, 0, 8)),
    "E=0": ((2, 4, 5, 0), (2, 4, 6, 0), (2, 4, 6, 8)),
    "Ev=0": ((2, 4, 5, 8), (2, 4, 6, 8), (2, 4, 6, 0)),
    "E=Ev=0": ((2, 4, 5, 0), (2, 4, 6, 0), (2, 4, 6, 0)),
    "H=0": ((2, 0, 5, 8), (2, 0, 6, 8), (2, 0, 6, 8)),
    "N=0": ((0, 4, 5, 8), (0, 4, 6, 8), (0, 4, 6, 8)),
    "Lq=Lk=0": ((2, 4, 0, 8), (2, 4, 0, 8), (2, 4, 0, 8)),
    "3-D Lk=0": ((4, 5, 8), (4, 0, 8), (4, 0, 8)),
    "5-D Lq=0": ((2, 3, 4, 0, 8), (2, 3, 4, 5, 8), (2, 3, 4, 5, 8)),
    "GQA E=0": ((2, 4, 5, 0), (2, 2, 6, 0), (2, 2, 6, 8)),
}


@pytest.mark.parametrize("is_causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("shapes", EMPTY.values(), ids=EMPTY.keys())
def test_empty_sizes_match_torch(gen, shapes, is_causal):
    gqa = shapes[0][-3] != shapes[1][-3] if len(shapes[0]) >= 3 else False
    (want, want_grads), (got, got_grads) = run_both(leaves(gen, *shapes), is_causal=is_causal, enable_gqa=gqa)
    assert got.shape == want.shape and got.dtype == want.dtype
    assert not got.isnan().any()
    assert reference.relative_error(got, want) <= 1e-10
    for g, w in zip(got_grads, want_grads):
        assert g is not None and g.shape == w.shape
        assert reference.relative_error(g, w) <= 1e-10


@pytest.mark.parametrize("mask", ["bool", "additive", "hidden row", "causal_lower_right", "causal_upper_left"])
def test_head_dim_zero_takes_the_mask(gen, mask):
    """E == 0: every score is 0, so the weights are softmax(mask) (uniform over the keys a row sees)."""
    q, k, v = leaves(gen, (2, 4, 5, 0), (2, 4, 6, 0), (2, 4, 6, 8))
    if mask == "bool":
        attn_mask = torch.rand(5, 6, generator=gen) > 0.3
        attn_mask[:, 0] = True  # every row sees a key: torch's NaN rows are not the point here
    elif mask == "additive":
        attn_mask = reference.randn(gen, 4, 5, 6, dtype=DTYPE).requires_grad_()
    elif mask == "hidden row":
        attn_mask = torch.ones(5, 6, dtype=torch.bool)
        attn_mask[2] = False  # torch gives 0 for it at E == 0, as varattn does everywhere
    else:
        attn_mask = {"causal_lower_right": causal_lower_right, "causal_upper_left": causal_upper_left}[mask](5, 6)
    inputs = [q, k, v] + ([attn_mask] if mask == "additive" else [])
    options = {} if mask == "additive" else dict(attn_mask=attn_mask)
    (want, want_grads), (got, got_grads) = run_both(inputs, **options)
    assert reference.relative_error(got, want) <= 1e-10
    for g, w in zip(got_grads, want_grads):
        assert g.shape == w.shape and reference.relative_error(g, w) <= 1e-10


def test_head_dim_zero_with_a_scale(gen):
    q, k, v = leaves(gen, (1, 2, 3, 0), (1, 2, 4, 0), (1, 2, 4, 8))
    (want, _), (got, _) = run_both([q, k, v], grad=False, scale=3.0, is_causal=True)
    assert reference.relative_error(got, want) <= 1e-10


def test_empty_output_has_the_mask_gradient(gen):
    q, k, v = leaves(gen, (2, 4, 0, 8), (2, 4, 5, 8), (2, 4, 5, 8))
    mask = reference.randn(gen, 2, 4, 0, 5, dtype=DTYPE).requires_grad_()
    out = varattn.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    out.sum().backward()
    assert out.shape == (2, 4, 0, 8)
    assert mask.grad is not None and mask.grad.shape == mask.shape
    assert torch.equal(k.grad, torch.zeros_like(k))


def test_empty_output_without_grad(gen):
    q = reference.randn(gen, 2, 4, 0, 8)
    out = varattn.scaled_dot_product_attention(q, q, q)
    assert out.shape == (2, 4, 0, 8) and out.dtype == torch.float32 and not out.requires_grad


@pytest.mark.parametrize("lengths", [[0, 0], [3, 0], [0, 4]], ids=str)
@pytest.mark.parametrize("layout", [torch.jagged, torch.strided], ids=["jagged", "strided"])
def test_nested_empty_sequences(gen, layout, lengths):
    """NestedTensors whose sequences are all or partly empty: empty rows out, zeros where no key is seen."""
    parts = [reference.randn(gen, n, 2 * 8, dtype=DTYPE) for n in lengths]
    x = torch.nested.nested_tensor(parts, layout=layout).view(len(lengths), -1, 2, 8).transpose(1, 2)
    for out in (varattn.scaled_dot_product_attention(x, x, x, is_causal=True), varattn.attention(x, x, x)):
        assert [tuple(o.shape) for o in out.unbind()] == [(2, n, 8) for n in lengths]


@pytest.mark.parametrize("where", ["padded", "packed"])
def test_other_front_ends_at_zero_lengths(gen, where):
    q = reference.randn(gen, 2, 4, 5, 8, dtype=DTYPE)
    if where == "padded":
        assert varattn.attention(q[:, :, :0], q, q).shape == (2, 4, 0, 8)
        assert torch.equal(varattn.attention(q, q[:, :, :0], q[:, :, :0]), torch.zeros_like(q))
        assert varattn.attention(q, q, q, lengths=[0, 0]).abs().max() == 0
    else:
        empty = torch.zeros(2, dtype=torch.int32)
        rows = q[0].transpose(0, 1)
        assert varattn.varlen_attention(rows[:0], rows[:0], rows[:0], empty, empty).shape == (0, 4, 8)


# ---------------------------------------------------------------------------
# 2. The argument types torch takes give torch's answer.

ACCEPTED_NUMBERS = [True, False, 1, 0, 0.5, np.bool_(True), np.int64(1), np.int64(0), np.float32(0.5),
                    np.float64(0.25), np.float16(0.5), torch.tensor(0.5), torch.tensor(1), torch.tensor(True),
                    torch.tensor(0.5, dtype=torch.float64)]


@pytest.mark.parametrize("value", ACCEPTED_NUMBERS, ids=repr)
def test_scale_types_torch_takes(gen, value):
    q, k, v = (reference.randn(gen, 2, 4, 5, 8, dtype=DTYPE) for _ in range(3))
    (want, _), (got, _) = run_both([q, k, v], grad=False, scale=value)
    assert reference.relative_error(got, want) <= 1e-10


@pytest.mark.parametrize("value", [v for v in ACCEPTED_NUMBERS if 0 <= float(v) < 1], ids=repr)
def test_dropout_types_torch_takes(gen, value):
    """Taken as float(value): the same draw as with the plain float (varattn's dropout stream, not torch's)."""
    q = reference.randn(gen, 1, 2, 6, 8)
    outs = []
    for p in (value, float(value)):
        torch.manual_seed(3)
        outs.append(varattn.scaled_dot_product_attention(q, q, q, dropout_p=p))
    assert torch.equal(outs[0], outs[1])


@pytest.mark.parametrize("front_end", ["attention", "varlen_attention"])
@pytest.mark.parametrize("value", [np.float32(0.25), torch.tensor(0.25), 1], ids=repr)
def test_varattn_front_ends_take_torch_numbers(gen, front_end, value):
    q = reference.randn(gen, 2, 4, 5, 8, dtype=DTYPE)
    if front_end == "attention":
        call = lambda scale: varattn.attention(q, q, q, scale=scale, causal=True)  # noqa: E731
    else:
        rows, cu = q.transpose(1, 2).reshape(10, 4, 8), torch.tensor([0, 5, 10], dtype=torch.int32)
        call = lambda scale: varattn.varlen_attention(rows, rows, rows, cu, cu, 5, 5, scale=scale)  # noqa: E731
    assert torch.equal(call(value), call(float(value)))


# ---------------------------------------------------------------------------
# 3. Masks that broadcast, and CausalBias of the call's lengths.

@pytest.mark.parametrize("shape", [(5, 6), (1, 6), (5, 1), (1, 1), (4, 1, 6), (2, 1, 5, 6), (1, 4, 1, 1),
                                   (2, 4, 5, 6)], ids=str)
@pytest.mark.parametrize("kind", ["bool", "additive"])
def test_broadcast_masks_match_torch(gen, shape, kind):
    q, k, v = leaves(gen, (2, 4, 5, 8), (2, 4, 6, 8), (2, 4, 6, 8))
    if kind == "bool":
        mask = torch.rand(shape, generator=gen) > 0.3
        mask[..., 0] = True  # no row hides every key (torch's NaN rows are tested in test_frontends)
    else:
        mask = reference.randn(gen, *shape, dtype=DTYPE)
    (want, want_grads), (got, got_grads) = run_both([q, k, v], attn_mask=mask)
    assert reference.relative_error(got, want) <= 1e-10
    for g, w in zip(got_grads, want_grads):
        assert reference.relative_error(g, w) <= 1e-10


@pytest.mark.parametrize("shape", [(), (6,)], ids=str)
def test_masks_of_fewer_than_two_dims_broadcast(gen, shape):
    """torch's math backend takes these (its CPU flash kernel raises IndexError); varattn broadcasts them."""
    q, k = (reference.randn(gen, 2, 4, n, 8, dtype=DTYPE) for n in (5, 6))
    mask = torch.randn(shape, generator=gen, dtype=DTYPE)
    got = varattn.scaled_dot_product_attention(q, k, k, attn_mask=mask)
    want = varattn.scaled_dot_product_attention(q, k, k, attn_mask=mask.expand(5, 6))
    assert torch.equal(got, want)


@pytest.mark.parametrize("lengths", [(5, 6), (5, 5), (6, 5)], ids=str)
@pytest.mark.parametrize("bias", [causal_lower_right, causal_upper_left], ids=["lower_right", "upper_left"])
def test_causal_bias_of_the_call_lengths_matches_torch(gen, bias, lengths):
    length_q, length_k = lengths
    q, k, v = leaves(gen, (2, 4, length_q, 8), (2, 4, length_k, 8), (2, 4, length_k, 8))
    (want, want_grads), (got, got_grads) = run_both([q, k, v], attn_mask=bias(length_q, length_k))
    # lower-right with Lq > Lk hides the first rows: torch gives NaN there, varattn 0
    assert reference.relative_error(got, want.nan_to_num(0.0)) <= 1e-10
    for g, w in zip(got_grads, want_grads):
        assert reference.relative_error(g, w.nan_to_num(0.0)) <= 1e-10


def test_upper_left_bias_of_other_lengths_is_taken_as_torch_does(gen):
    """torch runs any causal_upper_left bias as is_causal=True, whatever lengths it was made for."""
    q, k = (reference.randn(gen, 2, 4, n, 8, dtype=DTYPE) for n in (5, 6))
    (want, _), (got, _) = run_both([q, k, k], grad=False, attn_mask=causal_upper_left(3, 4))
    assert reference.relative_error(got, want) <= 1e-10
