"""Dropout: the Philox generator against its published answers, the keep
rate, reproducibility under torch.manual_seed, and the math backend (CPU)
against the float64 reference given the same mask, forward and backward."""
from __future__ import annotations

import math

import pytest
import torch

import reference
import varattn
from varattn import dropout
from varattn.backends import Backend
from varattn.params import build_params

M = 0xFFFFFFFF


@pytest.mark.parametrize("counter, key, expected", [
    ((0, 0, 0, 0), (0, 0), (0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8)),
    ((M, M, M, M), (M, M), (0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD)),
    ((0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344), (0xA4093822, 0x299F31D0),
     (0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1)),
])
def test_philox_known_answers(counter, key, expected):
    # Random123's known-answer vectors for Philox-4x32-10
    assert tuple(int(word) for word in dropout.philox4x32(counter, key)) == expected


@pytest.mark.parametrize("p", [0.1, 0.5, 0.9])
def test_keep_rate(p):
    state = (0x0123456789ABCDEF, 12)
    kept = dropout.keep(state, p, 4, torch.arange(1000, 1256), 509)
    n = kept.numel()
    assert abs(kept.float().mean().item() - (1 - p)) < 5 * math.sqrt(p * (1 - p) / n)


def test_streams_differ_by_head_row_key_and_offset():
    state = (7, 0)
    kept = dropout.keep(state, 0.5, 2, torch.arange(64), 64)
    assert not torch.equal(kept[0], kept[1])
    assert not torch.equal(kept[0, :32], kept[0, 32:])
    assert not torch.equal(kept[0, :, :32], kept[0, :, 32:])
    assert not torch.equal(kept, dropout.keep((7, 4), 0.5, 2, torch.arange(64), 64))
    # a key's element does not depend on how many keys are asked for
    assert torch.equal(kept[..., :13], dropout.keep(state, 0.5, 2, torch.arange(64), 13))


def packed(gen, dtype=torch.float64, heads=(4, 2), head_dim=8):
    lengths_q = [0, 1, 7, 12, 5]
    lengths_k = [3, 1, 9, 12, 0]
    return reference.packed_inputs(gen, lengths_q, lengths_k, *heads, head_dim, dtype=dtype)


def drawn_keep(seed, q, k, v, cu_q, cu_k, p, **options):
    """The mask a call made right after torch.manual_seed(seed) uses."""
    torch.manual_seed(seed)
    return dropout.keep_mask(dropout.drawn(build_params(q, k, v, cu_q, cu_k, dropout_p=p, **options)))


def test_same_seed_same_output_and_calls_advance(gen):
    q, k, v, cu_q, cu_k = packed(gen)
    torch.manual_seed(3)
    first = varattn.varlen_attention(q, k, v, cu_q, cu_k, dropout_p=0.3)
    second = varattn.varlen_attention(q, k, v, cu_q, cu_k, dropout_p=0.3)
    torch.manual_seed(3)
    again = varattn.varlen_attention(q, k, v, cu_q, cu_k, dropout_p=0.3)
    assert torch.equal(first, again)
    assert not torch.equal(first, second)


@pytest.mark.parametrize("options", [dict(), dict(causal=True), dict(causal=True, causal_align="lower_right"),
                                     dict(window=(2, 1))], ids=str)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_forward_and_grads_match_reference_with_the_same_mask(gen, options, dtype):
    p = 0.4
    q, k, v, cu_q, cu_k = packed(gen, dtype)
    keep = drawn_keep(11, q, k, v, cu_q, cu_k, p, **options)
    leaves = [x.clone().requires_grad_() for x in (q, k, v)]
    torch.manual_seed(11)
    out = varattn.varlen_attention(*leaves, cu_q, cu_k, dropout_p=p, **options)
    grad_out = reference.randn(gen, *out.shape, dtype=dtype)
    out.backward(grad_out)

    expected_leaves = [x.detach().double().requires_grad_() for x in (q, k, v)]
    expected, _ = reference.attention(*expected_leaves, cu_q, cu_k, dropout_p=p, dropout_keep=keep, **options)
    expected.backward(grad_out.double())
    tolerance = 1e-10 if dtype == torch.float64 else 3e-5
    assert reference.relative_error(out, expected) <= tolerance
    for name, got, want in zip("qkv", leaves, expected_leaves):
        assert reference.relative_error(got.grad, want.grad) <= tolerance, name


def test_dropout_with_seqused_and_a_bias_that_requires_grad(gen):
    p = 0.25
    q, k, v, cu_q, cu_k = packed(gen, torch.float64)
    used = dict(seqused_q=torch.tensor([0, 1, 5, 12, 2], dtype=torch.int32),
                seqused_k=torch.tensor([3, 1, 4, 7, 0], dtype=torch.int32))
    bias = reference.randn(gen, 5, 1, 12, 12, dtype=torch.float64)
    keep = drawn_keep(2, q, k, v, cu_q, cu_k, p, attn_bias=bias, **used)
    leaves = [x.clone().requires_grad_() for x in (q, k, v, bias)]
    torch.manual_seed(2)
    out = varattn.varlen_attention(*leaves[:3], cu_q, cu_k, attn_bias=leaves[3], dropout_p=p, **used)
    grad_out = reference.randn(gen, *out.shape, dtype=torch.float64)
    out.backward(grad_out)

    expected_leaves = [x.detach().clone().requires_grad_() for x in (q, k, v, bias)]
    expected, _ = reference.attention(*expected_leaves[:3], cu_q, cu_k, attn_bias=expected_leaves[3], dropout_p=p,
                                      dropout_keep=keep, **used)
    expected.backward(grad_out)
    assert reference.relative_error(out, expected) <= 1e-10
    for name, got, want in zip(("dq", "dk", "dv", "dbias"), leaves, expected_leaves):
        assert reference.relative_error(got.grad, want.grad) <= 1e-10, name


def test_gradcheck_with_dropout(gen):
    q, k, v, cu_q, cu_k = reference.packed_inputs(gen, [0, 1, 3, 4], [2, 0, 3, 5], 2, 1, 4, dtype=torch.float64)

    def attention(q, k, v):
        torch.manual_seed(0)  # the same mask on every evaluation
        return varattn.varlen_attention(q, k, v, cu_q, cu_k, dropout_p=0.3, causal=True)
    assert torch.autograd.gradcheck(attention, [x.requires_grad_() for x in (q, k, v)])


def test_self_attention_drops_only_in_training(gen):
    torch.manual_seed(0)
    block = varattn.nn.SelfAttention(num_heads=2, embed_dimension=16, bias=False, is_causal=True, dropout=0.5)
    x = torch.nested.nested_tensor([reference.randn(gen, n, 16) for n in (3, 6)], layout=torch.jagged)
    block.eval()
    assert torch.equal(block(x).values(), block(x).values())
    block.train()
    torch.manual_seed(1)
    dropped = block(x).values()
    torch.manual_seed(2)
    assert not torch.equal(dropped, block(x).values())


@pytest.mark.gpu
def test_cuda_dropout_goes_to_efficient_with_reasons(gen):
    q, k, v, cu_q, cu_k = reference.packed_inputs(gen, [5, 9], [5, 9], 2, 2, 64, dtype=torch.bfloat16, device="cuda")
    explanation = varattn.explain(q, k, v, cu_q, cu_k, dropout_p=0.1)
    assert explanation.chosen == Backend.EFFICIENT
    assert any("dropout" in why for why in explanation.reasons[Backend.MATH])
    assert any("dropout" in why for why in explanation.reasons[Backend.FLASH])


def test_compiled_dropout_matches_eager(gen):
    q, k, v, cu_q, cu_k = packed(gen, torch.float32)

    def loss(q, k, v):
        return varattn.varlen_attention(q, k, v, cu_q, cu_k, 12, 12, dropout_p=0.3, causal=True).square().sum()
    compiled = torch.compile(loss, fullgraph=True, backend="aot_eager")
    grads = []
    for fn in (loss, compiled):
        leaves = [x.clone().requires_grad_() for x in (q, k, v)]
        torch.manual_seed(4)
        fn(*leaves).backward()
        grads.append([x.grad for x in leaves])
    for eager, traced in zip(*grads):
        assert torch.equal(eager, traced)
