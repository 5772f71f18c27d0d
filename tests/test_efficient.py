"""The efficient backend on CUDA against the float64 reference, forward and
backward: bool masks (rows fully masked among them) and additive biases with
their gradients, read in place in padded form; fp16, bf16 and fp32 (with and
without TF32); head dims that are any multiple of 8 up to 256; causal both
ways, windows, GQA/MQA, Lq != Lk, empty sequences and the LSE; dropout
against the reference given the same mask. Calls run under
use_backends("efficient"), so no other backend can have run them."""
from __future__ import annotations

import math

import pytest
import torch

import reference
import varattn
from conftest import LSE_TOLERANCE, TOLERANCE, allow_tf32
from test_dropout import drawn_keep
from test_grad import GRAD_TOLERANCE, check_grads, finite
from varattn import Backend
from varattn.backends import efficient
from varattn.params import build_params

pytestmark = pytest.mark.gpu

# fp32 with TF32 allowed: products of 10-bit mantissas.
TF32 = dict(out=5e-3, lse=5e-3, grad=1e-2)


def tolerances(dtype, tf32):
    if dtype == torch.float32 and tf32:
        return TF32
    return dict(out=TOLERANCE[dtype], lse=LSE_TOLERANCE[dtype], grad=GRAD_TOLERANCE[dtype])


def make_bias(gen, kind, shape, dtype):
    """A bias of `shape` on the GPU. "bool": True where attention happens,
    about a quarter hidden, and every seventh query row hidden entirely;
    "additive": N(0, 1) in a view whose rows are not contiguous (the kernels
    read it by its strides)."""
    if kind == "bool":
        mask = torch.rand(shape, generator=gen) > 0.25
        mask[:, :, ::7] = False
        return mask.cuda()
    wide = reference.randn(gen, *shape[:3], shape[3] + 5, dtype=dtype, device="cuda")
    return wide[..., :shape[3]]


def skip_if_too_big(*args, **kwargs):
    """Skip where this device's shared memory cannot hold the instance (fp32 at head_dim 256 before sm_90)."""
    why = [r for r in efficient.reasons(build_params(*args, **kwargs)) if "shared memory" in r]
    if why:
        pytest.skip(why[0])


def check(gen, dtype, head_dim, *, heads=(4, 2), batch=6, longest=150, bias=None, broadcast="bh", grad=True,
          tf32=False, **options):
    """One random call's out and lse and, with `grad`, the gradients of q, k,
    v (and an additive bias) from a loss on out and lse, against the reference.
    `broadcast`: the bias's batch and head dimensions, "b" and "h" full, else 1."""
    heads_q, heads_kv = heads
    lengths_q = reference.lengths(gen, batch, longest)
    lengths_k = reference.lengths(gen, batch, longest + 37)
    max_q, max_k = max(lengths_q), max(lengths_k)
    q, k, v, cu_q, cu_k = reference.packed_inputs(gen, lengths_q, lengths_k, heads_q, heads_kv, head_dim, dtype=dtype,
                                                  device="cuda")
    attn_bias = None
    if bias is not None:  # the bool mask as long as the longest sequences, the bias longer
        grow = (3, 2) if bias == "additive" else (0, 0)
        shape = (batch if "b" in broadcast else 1, heads_q if "h" in broadcast else 1, max_q + grow[0], max_k + grow[1])
        attn_bias = make_bias(gen, bias, shape, dtype)
    leaves = [q, k, v] + ([attn_bias] if bias == "additive" else [])
    leaves = [x.detach().requires_grad_(grad) for x in leaves]
    call = dict(attn_bias=leaves[3] if bias == "additive" else attn_bias, **options)
    skip_if_too_big(*leaves[:3], cu_q, cu_k, max_q, max_k, **call)
    grad_out = reference.randn(gen, *q.shape, dtype=dtype, device="cuda")
    grad_lse = reference.randn(gen, heads_q, q.shape[0], dtype=torch.float64)
    with varattn.use_backends("efficient"), allow_tf32(tf32):
        out, lse = varattn.varlen_attention(*leaves[:3], cu_q, cu_k, max_q, max_k, return_lse=True, **call)
        if grad:
            ((out.double() * grad_out.double()).sum() + (finite(lse).double().cpu() * grad_lse).sum()).backward()

    expected_leaves = [x.detach().cpu().double().requires_grad_(grad) for x in leaves]
    expected, expected_lse = reference.attention(
        *expected_leaves[:3], cu_q, cu_k, attn_bias=expected_leaves[3] if bias == "additive" else attn_bias, **options)
    bound = tolerances(dtype, tf32)
    assert out.dtype == dtype and out.shape == expected.shape
    assert reference.relative_error(out, expected) <= bound["out"]
    assert reference.lse_error(lse, expected_lse) <= bound["lse"]
    if bias == "bool":  # rows the mask hides entirely: exactly zero, lse -inf
        hidden = torch.cat([torch.arange(n) % 7 == 0 for n in lengths_q]).cuda()
        assert torch.equal(out[hidden], torch.zeros_like(out[hidden])) and torch.isneginf(lse[:, hidden]).all()
    if grad:
        ((expected * grad_out.cpu().double()).sum() + (finite(expected_lse) * grad_lse).sum()).backward()
        for name, got, want in zip(("dq", "dk", "dv", "dbias"), leaves, expected_leaves):
            assert got.grad.dtype == dtype and got.grad.shape == want.shape, name
            assert reference.relative_error(got.grad, want.grad) <= bound["grad"], name


# fp16 / bf16: every head-dim bucket (8 runs as 32, 40 as 64, 72 as 96, 160
# as 192), each with its own mask, bias and GQA shape.
HALF = [
    (torch.float16, 8, (4, 2), "bool", "b", dict(causal=True)),
    (torch.bfloat16, 40, (6, 1), "additive", "h", dict()),
    (torch.float16, 64, (4, 4), "bool", "h", dict(causal=True, causal_align="lower_right")),
    (torch.bfloat16, 72, (4, 2), "additive", "bh", dict(window=(17, 5))),
    (torch.float16, 128, (6, 1), "additive", "b", dict(causal=True, causal_align="lower_right")),
    (torch.bfloat16, 128, (4, 2), "bool", "bh", dict(causal=True, window=(40, -1))),
    (torch.bfloat16, 160, (4, 4), "bool", "b", dict()),
    (torch.float16, 256, (4, 2), "additive", "h", dict(causal=True)),
    (torch.bfloat16, 256, (6, 1), None, "", dict(window=(-1, 9), causal_align="lower_right")),
]


@pytest.mark.parametrize("dtype, head_dim, heads, bias, broadcast, options", HALF, ids=str)
def test_half(gen, dtype, head_dim, heads, bias, broadcast, options):
    check(gen, dtype, head_dim, heads=heads, bias=bias, broadcast=broadcast, **options)


FP32 = [
    (32, "bool", "bh", dict(causal=True)),
    (72, "additive", "b", dict(window=(5, 20), scale=-0.3)),  # any scale: applied before the softmax
    (128, "additive", "h", dict(causal=True, causal_align="lower_right")),
    (256, "bool", "h", dict()),
]


@pytest.mark.parametrize("tf32", [False, True], ids=["fp32", "tf32"])
@pytest.mark.parametrize("head_dim, bias, broadcast, options", FP32, ids=str)
def test_fp32(gen, head_dim, bias, broadcast, options, tf32):
    check(gen, torch.float32, head_dim, heads=(6, 2), longest=100, bias=bias, broadcast=broadcast, tf32=tf32,
          **options)


def test_long_sequences_with_a_block_mask(gen):
    """W8's kind of mask: half of each sequence's 64 x 64 blocks hidden, many tiles per sequence."""
    lengths = [1100, 0, 517, 64, 1]
    q, k, v, cu_q, cu_k = reference.packed_inputs(gen, lengths, lengths, 4, 2, 128, dtype=torch.bfloat16, device="cuda")
    blocks = -(-max(lengths) // 64)
    hidden = torch.rand(len(lengths), 1, blocks, blocks, generator=gen) < 0.5
    hidden &= ~torch.eye(blocks, dtype=torch.bool)  # the diagonal kept: no row hidden entirely
    mask = (~hidden).repeat_interleave(64, 2).repeat_interleave(64, 3)[..., :max(lengths), :max(lengths)].cuda()
    leaves = [x.requires_grad_() for x in (q, k, v)]
    grad_out = reference.randn(gen, *q.shape, dtype=torch.bfloat16, device="cuda")
    with varattn.use_backends("efficient"):
        out = varattn.varlen_attention(*leaves, cu_q, cu_k, max(lengths), max(lengths), attn_bias=mask)
        out.backward(grad_out)
    expected_leaves = [x.detach().cpu().double().requires_grad_() for x in leaves]
    expected, _ = reference.attention(*expected_leaves, cu_q, cu_k, attn_bias=mask)
    expected.backward(grad_out.cpu().double())
    assert reference.relative_error(out, expected) <= TOLERANCE[torch.bfloat16]
    for name, got, want in zip(("dq", "dk", "dv"), leaves, expected_leaves):
        assert reference.relative_error(got.grad, want.grad) <= GRAD_TOLERANCE[torch.bfloat16], name


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_rows_past_seqused_are_never_read(gen, dtype):
    """NaN in q, k, v and the output gradient past each sequence's used rows, an additive bias broadcast over the batch."""
    check_grads(gen, dtype, "cuda", "efficient", heads=(4, 2), head_dim=64, batch=5, longest=130, seqused=True,
                poison=True, bias=True, causal=True)


def test_padded_front_end_ignores_what_padding_holds(gen):
    """fp32 padded batch with a key_padding_mask: dispatch picks efficient, NaN padding stays out."""
    lengths = [90, 0, 33, 1]
    q, k, v = (reference.randn(gen, 4, 90, 4, 40, device="cuda") for _ in range(3))
    for x in (q, k, v):
        for b, n in enumerate(lengths):
            x[b, n:] = math.nan
    padding = torch.arange(90, device="cuda")[None] >= torch.tensor(lengths, device="cuda")[:, None]
    assert varattn.explain(q, k, v, layout="blhd", key_padding_mask=padding, causal=True).chosen == Backend.EFFICIENT
    out = varattn.attention(q, k, v, layout="blhd", key_padding_mask=padding, causal=True)
    rows = lambda x: torch.cat([x[b, :n] for b, n in enumerate(lengths)])  # noqa: E731
    cu = reference.cu_seqlens(lengths)
    expected, _ = reference.attention(rows(q), rows(k), rows(v), cu, cu, causal=True)
    assert reference.relative_error(rows(out), expected) <= TOLERANCE[torch.float32]
    for b, n in enumerate(lengths):
        assert torch.equal(out[b, n:], torch.zeros_like(out[b, n:]))


# ---------------------------------------------------------------------------
# Dropout.

@pytest.mark.parametrize("p", [0.2, 0.7])
def test_dropout_mask_is_the_python_generators(gen, p):
    """With equal scores and v the identity, each output row is the row's keep
    mask scaled by 1 / ((1 - p) Lk): the kernel's mask is, bit for bit,
    dropout.keep_mask's, and keeps about 1 - p."""
    heads, length_k = 4, 64
    lengths_q = [300, 0, 1, 129]
    q = torch.zeros(sum(lengths_q), heads, 64, dtype=torch.float16, device="cuda")
    k = reference.randn(gen, length_k * len(lengths_q), heads, 64, dtype=torch.float16, device="cuda")
    v = torch.eye(64, dtype=torch.float16, device="cuda").repeat(len(lengths_q), 1)[:, None].repeat(1, heads, 1)
    cu_q, cu_k = reference.cu_seqlens(lengths_q, "cuda"), reference.cu_seqlens([length_k] * len(lengths_q), "cuda")
    keep = drawn_keep(5, q, k, v, cu_q, cu_k, p)
    torch.manual_seed(5)
    with varattn.use_backends("efficient"):
        out, lse = varattn.varlen_attention(q, k, v, cu_q, cu_k, 300, length_k, dropout_p=p, return_lse=True)
    kept = torch.cat([keep[b, :, :n].transpose(0, 1) for b, n in enumerate(lengths_q)])  # (total_q, H, Lk)
    assert torch.equal(out.cpu() > 0, kept)
    assert torch.allclose(out[kept.cuda()].float(), torch.tensor(1 / ((1 - p) * length_k), device="cuda"), rtol=2e-3)
    assert abs(kept.float().mean().item() - (1 - p)) < 5 * math.sqrt(p * (1 - p) / kept.numel())
    assert torch.allclose(lse, torch.full_like(lse, math.log(length_k)))  # of the probabilities before dropout


def test_dropout_is_reproducible_and_advances(gen):
    q, k, v, cu_q, cu_k = reference.packed_inputs(gen, [40, 0, 77], [50, 3, 77], 4, 2, 64, dtype=torch.bfloat16,
                                                  device="cuda")
    with varattn.use_backends("efficient"):
        torch.manual_seed(3)
        first = varattn.varlen_attention(q, k, v, cu_q, cu_k, 77, 77, dropout_p=0.3)
        second = varattn.varlen_attention(q, k, v, cu_q, cu_k, 77, 77, dropout_p=0.3)
        torch.manual_seed(3)
        again = varattn.varlen_attention(q, k, v, cu_q, cu_k, 77, 77, dropout_p=0.3)
    assert torch.equal(first, again)
    assert not torch.equal(first, second)


@pytest.mark.parametrize("dtype, options", [
    (torch.float16, dict(bias="additive", causal=True)),
    (torch.float32, dict(bias="bool", window=(9, 3), causal_align="lower_right")),
], ids=str)
def test_dropout_forward_and_backward_match_reference_with_the_same_mask(gen, dtype, options):
    p, options = 0.3, dict(options)
    bias = options.pop("bias")
    lengths_q, lengths_k = reference.lengths(gen, 5, 120), reference.lengths(gen, 5, 140)
    q, k, v, cu_q, cu_k = reference.packed_inputs(gen, lengths_q, lengths_k, 4, 2, 64, dtype=dtype, device="cuda")
    attn_bias = make_bias(gen, bias, (5, 1, max(lengths_q), max(lengths_k)), dtype)
    leaves = [x.detach().requires_grad_() for x in (q, k, v, attn_bias) if x.dtype != torch.bool]
    keep = drawn_keep(11, q, k, v, cu_q, cu_k, p, **options)
    grad_out = reference.randn(gen, *q.shape, dtype=dtype, device="cuda")
    torch.manual_seed(11)
    with varattn.use_backends("efficient"):
        out, lse = varattn.varlen_attention(*leaves[:3], cu_q, cu_k, max(lengths_q), max(lengths_k), return_lse=True,
                                            attn_bias=leaves[3] if bias == "additive" else attn_bias, dropout_p=p,
                                            **options)
        ((out.double() * grad_out.double()).sum()).backward()

    expected_leaves = [x.detach().cpu().double().requires_grad_() for x in leaves]
    expected, expected_lse = reference.attention(
        *expected_leaves[:3], cu_q, cu_k, attn_bias=expected_leaves[3] if bias == "additive" else attn_bias,
        dropout_p=p, dropout_keep=keep, **options)
    expected.backward(grad_out.cpu().double())
    bound = tolerances(dtype, False)
    assert reference.relative_error(out, expected) <= bound["out"]
    assert reference.lse_error(lse, expected_lse) <= bound["lse"]
    for name, got, want in zip(("dq", "dk", "dv", "dbias"), leaves, expected_leaves):
        # the draw differs by process: the message says which one failed
        assert reference.relative_error(got.grad, want.grad) <= bound["grad"], (
            f"{name}; generator seed {gen.initial_seed()}, lengths_q={lengths_q}, lengths_k={lengths_k}")


def test_repeated_nested_calls_draw_new_masks(gen):
    """Calls on the same NestedTensors each draw their own dropout stream."""
    parts = [reference.randn(gen, n, 2 * 32, device="cuda") for n in (30, 1, 75)]
    x = torch.nested.nested_tensor(parts, layout=torch.jagged).view(3, -1, 2, 32).transpose(1, 2)
    assert varattn.explain(x, x, x, dropout_p=0.4).chosen == Backend.EFFICIENT
    torch.manual_seed(8)
    first = varattn.attention(x, x, x, dropout_p=0.4).values()
    second = varattn.attention(x, x, x, dropout_p=0.4).values()
    torch.manual_seed(8)
    again = varattn.attention(x, x, x, dropout_p=0.4).values()
    assert torch.equal(first, again) and not torch.equal(first, second)
