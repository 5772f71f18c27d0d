"""Gradients: every backend against the float64 reference's autograd, gradcheck
on the math backend, deterministic backward runs, and the front ends."""
from __future__ import annotations

import math

import pytest
import torch

import reference
import varattn
from test_varlen import FLASH_MASKS, MASKS, ROUTE_MASKS, ROUTES, force_route, kernel_calls  # noqa: F401 (a fixture)
from varattn import run
from varattn.backends import flash

# Gradients accumulate over a whole sequence and pass through P and dS in
# the inputs' precision, so they get a looser bound than the forward.
GRAD_TOLERANCE = {torch.float64: 1e-10, torch.float32: 3e-5, torch.float16: 4e-3, torch.bfloat16: 2e-2}
DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)]


def finite(lse):
    """lse with its -inf (rows that see no key) as 0, so a loss on it stays finite."""
    return torch.where(torch.isfinite(lse), lse, torch.zeros((), dtype=lse.dtype, device=lse.device))


def poison_past(x, cu_seqlens, used):
    """x with its rows past each sequence's `used` length set to NaN: no kernel may read them."""
    x = x.detach().clone()
    for start, end, n in zip(cu_seqlens[:-1].tolist(), cu_seqlens[1:].tolist(), used.tolist()):
        x[start + n:end] = math.nan
    return x


def check_grads(gen, dtype, device, backend, *, heads=(4, 2), head_dim=16, batch=6, longest=19, bias=False,
                seqused=False, poison=False, with_lse=True, deterministic=False, lengths=None, bool_mask=False,
                repeats=1, **options):
    """Gradients of q, k, v (and an additive bias) through varlen_attention,
    out and lse both in the loss, against the reference's autograd. With
    `poison`, the rows past seqused of q, k, v and the output gradient are NaN.
    lengths: (lengths_q, lengths_k), default drawn (0, 1 and `longest` among them).
    bool_mask: a random bool attn_bias (B, 1, Lq, Lk), True = take part, for both.
    repeats: forward and backward that many times, every run's gradients the
    same bits as the first's (for deterministic=True)."""
    heads_q, heads_kv = heads
    if lengths is not None:
        lengths_q, lengths_k = lengths
    else:
        lengths_q = reference.lengths(gen, batch, longest)
        lengths_k = reference.lengths(gen, batch, longest + 5)
    q, k, v, cu_q, cu_k = reference.packed_inputs(gen, lengths_q, lengths_k, heads_q, heads_kv, head_dim,
                                                  dtype=dtype, device=device)
    used = {}
    if seqused:
        used = dict(seqused_q=torch.tensor([n // 2 for n in lengths_q], dtype=torch.int32, device=device),
                    seqused_k=torch.tensor([(n + 1) // 2 for n in lengths_k], dtype=torch.int32, device=device))
    grad_out = reference.randn(gen, q.shape[0], heads_q, head_dim, dtype=dtype, device=device)
    if poison:
        q, grad_out = (poison_past(x, cu_q, used["seqused_q"]) for x in (q, grad_out))
        k, v = (poison_past(x, cu_k, used["seqused_k"]) for x in (k, v))
    leaves = [q, k, v]
    if bias:  # broadcast over the batch: its gradient sums over the sequences
        leaves.append(reference.randn(gen, 1, heads_q, max(lengths_q) + 2, max(lengths_k), dtype=dtype, device=device))
    leaves = [x.requires_grad_() for x in leaves]
    grad_lse = reference.randn(gen, heads_q, q.shape[0], dtype=torch.float64)
    mask = None
    if bool_mask:
        mask = (torch.rand(len(lengths_q), 1, max(lengths_q), max(lengths_k), generator=gen) > 0.3).to(device)
    first = None
    for _ in range(repeats):
        for x in leaves:
            x.grad = None
        with varattn.use_backends(backend):
            out, lse = varattn.varlen_attention(*leaves[:3], cu_q, cu_k, max(lengths_q), max(lengths_k),
                                                attn_bias=leaves[3] if bias else mask, return_lse=True,
                                                deterministic=deterministic, **used, **options)
        loss = (out.double() * grad_out.double()).sum() + (finite(lse).double().cpu() * grad_lse).sum() * with_lse
        loss.backward()
        if first is None:
            first = [x.grad for x in leaves]
        for name, got, want in zip(("dq", "dk", "dv", "dbias"), leaves, first):
            assert torch.equal(got.grad, want), f"{name} differs from the first run's"

    expected_leaves = [x.detach().cpu().double().requires_grad_() for x in leaves]
    expected, expected_lse = reference.attention(*expected_leaves[:3], cu_q, cu_k,
                                                 attn_bias=expected_leaves[3] if bias else mask, **used, **options)
    expected_loss = (expected * grad_out.cpu().double()).sum() + (finite(expected_lse) * grad_lse).sum() * with_lse
    expected_loss.backward()
    for name, got, want in zip(("dq", "dk", "dv", "dbias"), leaves, expected_leaves):
        assert got.grad.dtype == dtype and got.grad.shape == want.shape, name
        assert reference.relative_error(got.grad, want.grad) <= GRAD_TOLERANCE[dtype], name


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("mask", MASKS, ids=str)
def test_math_cpu(gen, dtype, mask):
    heads = [(4, 4), (4, 2), (6, 1)][hash(str(mask)) % 3]
    check_grads(gen, dtype, "cpu", "math", heads=heads, **mask)


@pytest.mark.parametrize("route", ROUTES)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("mask", ROUTE_MASKS, ids=str)
def test_math_cpu_routes(gen, kernel_calls, monkeypatch, route, dtype, mask):
    """torch's fused backward (no gradient reaching lse) and math_cpu's own,
    on lengths 0, 1, Lq != Lk, GQA and MQA; GQA's key/value gradients sum over the group."""
    force_route(monkeypatch, route)
    heads = [(4, 4), (4, 2), (6, 1)][hash(str(mask)) % 3]
    check_grads(gen, dtype, "cpu", "math", heads=heads, head_dim=32, batch=8, longest=40, with_lse=False, **mask)
    assert (kernel_calls["backward"] > 0) == (route == "fused")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("lengths", [(33, 33), (40, 17), (17, 40), (1, 9)], ids=str)
@pytest.mark.parametrize("mask", ROUTE_MASKS, ids=str)
def test_math_cpu_fused_dense_batch(gen, kernel_calls, dtype, lengths, mask):
    """A dense batch: one fused forward and one fused backward, on views."""
    len_q, len_k = lengths
    check_grads(gen, dtype, "cpu", "math", heads=(4, 2), head_dim=32, lengths=([len_q] * 3, [len_k] * 3),
                with_lse=False, **mask)
    assert kernel_calls == {"forward": 1, "backward": 1}


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
@pytest.mark.parametrize("mask", ROUTE_MASKS, ids=str)
def test_math_cpu_fused_bool_mask(gen, kernel_calls, dtype, mask):
    """A bool mask (rows it hides entirely among them): fused both ways."""
    check_grads(gen, dtype, "cpu", "math", heads=(4, 2), head_dim=32, batch=8, longest=30, with_lse=False,
                bool_mask=True, **mask)
    assert kernel_calls["forward"] > 0 and kernel_calls["backward"] > 0


def test_math_cpu_bias_gradient_keeps_math_backward(gen, kernel_calls):
    """An additive bias that requires grad: the forward fused, the backward
    math_cpu's (torch's gives no bias gradient)."""
    check_grads(gen, torch.float64, "cpu", "math", bias=True, causal=True, with_lse=False)
    assert kernel_calls["forward"] > 0 and kernel_calls["backward"] == 0


def test_math_cpu_lse_gradient_keeps_math_backward(gen, kernel_calls):
    """A gradient reaching lse: the forward fused, the backward math_cpu's (torch's takes none)."""
    check_grads(gen, torch.float32, "cpu", "math", lengths=([9, 0, 4], [9, 3, 0]), causal=True, with_lse=True)
    assert kernel_calls == {"forward": 1, "backward": 0}  # the sequence of 9 rows (the 4 rows see no key)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("options", [dict(), dict(causal=True, causal_align="lower_right", seqused=True)], ids=str)
def test_math_bias_grad(gen, device, options):
    check_grads(gen, torch.float64, device, "math", bias=True, **options)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("head_dim", [16, 40, 128, 512])
@pytest.mark.parametrize("mask", MASKS[:4], ids=str)
def test_math_cuda(gen, dtype, head_dim, mask):
    check_grads(gen, dtype, "cuda", "math", head_dim=head_dim, heads=(6, 2), longest=40, **mask)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("head_dim", flash.BACKWARD_HEAD_DIMS)
@pytest.mark.parametrize("mask", FLASH_MASKS, ids=str)
def test_flash(gen, dtype, head_dim, mask):
    heads = [(8, 8), (8, 2), (8, 1), (6, 3)][hash(str(mask)) % 4]
    check_grads(gen, dtype, "cuda", "flash", heads=heads, head_dim=head_dim, batch=7, longest=300,
                with_lse=hash(str(mask)) % 2 == 0, **mask)


# Every mask with one of the head layouts (GQA 1, 4, 8 and 2, MQA), and causal with all of them.
HOPPER_HEADS = [(8, 8), (8, 2), (8, 1), (6, 3)]
HOPPER_CASES = ([(mask, HOPPER_HEADS[i % 4]) for i, mask in enumerate(FLASH_MASKS)]
                + [(FLASH_MASKS[1], heads) for heads in HOPPER_HEADS[1:]])


@pytest.mark.gpu
@pytest.mark.parametrize("head_dim", flash.HOPPER_BACKWARD_HEAD_DIMS)
@pytest.mark.parametrize("mask, heads", HOPPER_CASES, ids=str)
def test_flash_hopper_backward(gen, monkeypatch, head_dim, mask, heads):
    """On Hopper, kernels_cu/flash_bwd_hopper.cu itself (not the mma.sync
    backward it falls back on) at each of its head dims: drawn lengths (0, 1,
    Lq != Lk, several query tiles of 64 or 128 rows), then lengths around the
    tile edges, Lk 0 against Lq > 0 among them."""
    chosen = hopper_backward_calls(monkeypatch)
    case = HOPPER_CASES.index((mask, heads))
    dtype = (torch.bfloat16, torch.float16)[case % 2]
    check_grads(gen, dtype, "cuda", "flash", heads=heads, head_dim=head_dim, batch=7, longest=300,
                with_lse=case % 3 != 0, **mask)
    check_grads(gen, dtype, "cuda", "flash", heads=heads, head_dim=head_dim, with_lse=case % 3 == 0,
                lengths=([1, 0, 64, 65, 127, 128, 129, 300], [1, 5, 64, 200, 0, 128, 127, 3]), **mask)
    assert len(chosen) == 2 and ran_hopper(chosen, deterministic=False)


def hopper_backward_calls(monkeypatch) -> list:
    """The flash backward's choice of main kernel at every call from now on (skips off sm_90a)."""
    from varattn.cuda import loader
    if loader.arch_of(torch.device("cuda")) != "sm_90a":
        pytest.skip("the Hopper backward runs on sm_90a")
    chosen, choose = [], flash._backward_kernel
    monkeypatch.setattr(flash, "_backward_kernel", lambda *args: chosen.append(choose(*args)) or chosen[-1])
    return chosen


def ran_hopper(chosen, deterministic: bool) -> bool:
    return bool(chosen) and all(kernel.family == "flash_bwd_hopper"
                                and kernel.name.endswith(f", {str(deterministic).lower()}>") for kernel in chosen)


# The deterministic Hopper backward orders a query tile's dQ additions last key
# tile first where the mask bounds keys from the right, else first key tile
# first: every mask, and a left window alone (the second order with a window).
HOPPER_DETERMINISTIC_MASKS = FLASH_MASKS + [dict(window=(37, -1)),
                                            dict(window=(150, -1), causal_align="lower_right")]


@pytest.mark.gpu
@pytest.mark.parametrize("head_dim", flash.HOPPER_BACKWARD_HEAD_DIMS)
@pytest.mark.parametrize("mask", HOPPER_DETERMINISTIC_MASKS, ids=str)
def test_flash_hopper_deterministic(gen, monkeypatch, head_dim, mask):
    """flash_bwd_hopper.cu's deterministic instance at each head dim: three
    runs, the same bits, against the float64 reference; drawn lengths (0, 1,
    Lq != Lk, several query tiles), then lengths around the tile edges (Lk 0
    against Lq > 0 among them); GQA, MQA and one head per key/value head."""
    chosen = hopper_backward_calls(monkeypatch)
    case = HOPPER_DETERMINISTIC_MASKS.index(mask)
    heads, dtype = HOPPER_HEADS[case % 4], (torch.bfloat16, torch.float16)[case % 2]
    check_grads(gen, dtype, "cuda", "flash", heads=heads, head_dim=head_dim, batch=7, longest=300,
                with_lse=case % 3 != 0, deterministic=True, repeats=3, **mask)
    check_grads(gen, dtype, "cuda", "flash", heads=heads, head_dim=head_dim, with_lse=case % 3 == 0,
                lengths=([1, 0, 64, 65, 127, 128, 129, 300], [1, 5, 64, 200, 0, 128, 127, 3]),
                deterministic=True, repeats=3, **mask)
    assert len(chosen) == 6 and ran_hopper(chosen, deterministic=True)


@pytest.mark.gpu
@pytest.mark.parametrize("head_dim", [64, 128])
@pytest.mark.parametrize("mask", [dict(), dict(causal=True), dict(window=(700, -1)), dict(window=(500, 0)),
                                  dict(causal=True, causal_align="lower_right")], ids=str)
def test_flash_hopper_deterministic_many_key_tiles(gen, monkeypatch, head_dim, mask):
    """Far more CTAs than SMs, waiting on one another's turns (a key tile
    waits only for key tiles the grid launched before it): the runs end, give
    the same bits, and agree with the default mode (too long for the float64
    reference on the CPU)."""
    chosen = hopper_backward_calls(monkeypatch)
    lengths_q, lengths_k = [6000, 1, 2500, 0, 333], [5800, 7, 2600, 64, 333]
    q, k, v, cu_q, cu_k = reference.packed_inputs(gen, lengths_q, lengths_k, 16, 8, head_dim, dtype=torch.bfloat16,
                                                  device="cuda")
    grad_out = reference.randn(gen, *q.shape, dtype=torch.bfloat16, device="cuda")
    runs = []
    for deterministic in (False, True, True, True):
        leaves = [x.detach().requires_grad_() for x in (q, k, v)]
        with varattn.use_backends("flash"):
            out = varattn.varlen_attention(*leaves, cu_q, cu_k, max(lengths_q), max(lengths_k),
                                           deterministic=deterministic, **mask)
        out.backward(grad_out)
        runs.append([x.grad for x in leaves])
    assert ran_hopper(chosen[:1], deterministic=False) and ran_hopper(chosen[1:], deterministic=True)
    default, first, *others = runs
    for other in others:
        assert all(torch.equal(a, b) for a, b in zip(first, other))
    for name, got, want in zip(("dq", "dk", "dv"), first, default):
        assert reference.relative_error(got.double(), want.double()) <= 1e-2, name


@pytest.mark.gpu
@pytest.mark.parametrize("head_dim", [64, 128])
def test_flash_seqused_and_long_sequences(gen, head_dim):
    check_grads(gen, torch.bfloat16, "cuda", "flash", heads=(8, 2), head_dim=head_dim, batch=4, longest=1500,
                seqused=True, causal=True)


@pytest.mark.gpu
@pytest.mark.parametrize("head_dim", flash.BACKWARD_HEAD_DIMS)
@pytest.mark.parametrize("deterministic", [False, True], ids=["default", "deterministic"])
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_flash_rows_past_seqused_are_never_read(gen, head_dim, deterministic, causal):
    check_grads(gen, torch.bfloat16, "cuda", "flash", heads=(4, 2), head_dim=head_dim, batch=5, longest=200,
                seqused=True, poison=True, causal=causal, deterministic=deterministic)


@pytest.mark.gpu
@pytest.mark.parametrize("head_dim", flash.BACKWARD_HEAD_DIMS)
@pytest.mark.parametrize("mask", FLASH_MASKS[:3], ids=str)
def test_flash_deterministic_matches_reference(gen, head_dim, mask):
    check_grads(gen, torch.float16, "cuda", "flash", heads=(6, 2), head_dim=head_dim, batch=6, longest=200,
                deterministic=True, **mask)


# ---------------------------------------------------------------------------
# gradcheck: finite differences in float64 on the math backend.

@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("options", [dict(), dict(causal=True), dict(causal=True, causal_align="lower_right"),
                                     dict(window=(1, 1))], ids=str)
def test_gradcheck_math(gen, device, options):
    q, k, v, cu_q, cu_k = reference.packed_inputs(gen, [0, 1, 3, 4], [2, 0, 3, 5], 4, 2, 6, dtype=torch.float64,
                                                  device=device)
    bias = reference.randn(gen, 4, 1, 4, 5, dtype=torch.float64, device=device)

    def attention(q, k, v, bias):
        with varattn.use_backends("math"):
            out, lse = varattn.varlen_attention(q, k, v, cu_q, cu_k, 4, 5, attn_bias=bias, return_lse=True, **options)
        return out, finite(lse)
    inputs = [x.requires_grad_() for x in (q, k, v, bias)]
    assert torch.autograd.gradcheck(attention, inputs)


# ---------------------------------------------------------------------------
# Deterministic backward: the same bits on every run.

def backward_twice(gen, device, dtype, **options):
    q, k, v, cu_q, cu_k = reference.packed_inputs(gen, [300, 0, 1, 257], [280, 5, 1, 300], 8, 2, 64, dtype=dtype,
                                                  device=device)
    grad_out = reference.randn(gen, *q.shape, dtype=dtype, device=device)
    runs = []
    for _ in range(2):
        leaves = [x.detach().requires_grad_() for x in (q, k, v)]
        out = varattn.varlen_attention(*leaves, cu_q, cu_k, 300, 300, causal=True, **options)
        out.backward(grad_out)
        runs.append([x.grad for x in leaves])
    return runs


@pytest.mark.parametrize("device", DEVICES)
def test_deterministic_argument(gen, device):
    dtype = torch.float32 if device == "cpu" else torch.bfloat16
    first, second = backward_twice(gen, device, dtype, deterministic=True)
    for a, b in zip(first, second):
        assert torch.equal(a, b)


@pytest.mark.parametrize("device", DEVICES)
def test_deterministic_algorithms_are_honoured(gen, device):
    dtype = torch.float32 if device == "cpu" else torch.bfloat16
    was = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        q, k, v, cu_q, cu_k = reference.packed_inputs(gen, [5], [5], 2, 2, 64, dtype=dtype, device=device)
        q.requires_grad_()
        assert varattn.explain(q, k, v, cu_q, cu_k, 5, 5).chosen is not None
        first, second = backward_twice(gen, device, dtype)
    finally:
        torch.use_deterministic_algorithms(was)
    for a, b in zip(first, second):
        assert torch.equal(a, b)


def test_explain_says_why_flash_cannot_train(gen):
    q, k, v, cu_q, cu_k = reference.packed_inputs(gen, [5], [5], 2, 2, 256, dtype=torch.bfloat16)
    q.requires_grad_()
    reasons = varattn.explain(q, k, v, cu_q, cu_k, 5, 5).reasons[varattn.Backend.FLASH]
    assert any("backward" in r and "256" in r for r in reasons)
    with torch.no_grad():
        reasons = varattn.explain(q, k, v, cu_q, cu_k, 5, 5).reasons[varattn.Backend.FLASH]
    assert not any("backward" in r for r in reasons)


def test_no_grad_calls_bypass_autograd(gen, monkeypatch):
    q, k, v, cu_q, cu_k = reference.packed_inputs(gen, [5, 3], [4, 6], 2, 2, 8, dtype=torch.float64)
    monkeypatch.setattr(run._Attention, "apply", None)  # calling it would raise
    out = varattn.varlen_attention(q, k, v, cu_q, cu_k, 5, 6)
    assert out.grad_fn is None
    with pytest.raises(TypeError):
        varattn.varlen_attention(q.requires_grad_(), k, v, cu_q, cu_k, 5, 6)


# ---------------------------------------------------------------------------
# The front ends: gradients reach NestedTensors, padded batches (zero at the
# padding), the SDPA drop-in's inputs and mask, and nn.SelfAttention's weights.

def front_end_dtype(device):
    return torch.float64 if device == "cpu" else torch.bfloat16


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("layout", [torch.jagged, torch.strided], ids=["jagged", "strided"])
def test_nested_grads(gen, device, layout):
    dtype, heads, head_dim = front_end_dtype(device), 4, 64
    lengths = reference.lengths(gen, 5, 40)
    if layout == torch.strided:  # torch's backward of view() on a strided NestedTensor fails when it starts empty
        lengths.sort(reverse=True)
    parts = [[reference.randn(gen, n, heads * head_dim, dtype=dtype, device=device) for n in lengths]
             for _ in range(3)]
    leaves = [torch.nested.nested_tensor(p, layout=layout, requires_grad=True) for p in parts]
    q, k, v = (x.view(len(lengths), -1, heads, head_dim).transpose(1, 2) for x in leaves)
    if layout == torch.jagged:  # key and value share their ragged structure
        v = torch.nested.nested_tensor_from_jagged(v.transpose(1, 2).values(), k.offsets(),
                                                   max_seqlen=max(lengths)).transpose(1, 2)
    grad_out = [reference.randn(gen, heads, n, head_dim, dtype=dtype, device=device) for n in lengths]
    varattn.attention(q, k, v, causal=True)  # a call without grad first: its cached packed form must not cut the graph
    out = varattn.attention(q, k, v, causal=True)
    packed_grad = torch.cat([g.transpose(0, 1) for g in grad_out])
    if layout == torch.jagged:  # the output's own ragged structure
        out.backward(torch.nested.nested_tensor_from_jagged(packed_grad, out.offsets()).transpose(1, 2))
    else:
        out.backward(torch.nested.nested_tensor(grad_out, layout=layout))

    flat = [torch.cat(p).view(-1, heads, head_dim).cpu().double().requires_grad_() for p in parts]
    cu = reference.cu_seqlens(lengths)
    expected, _ = reference.attention(*flat, cu, cu, causal=True)
    expected.backward(packed_grad.cpu().double())
    grads = [leaves[0].grad, leaves[1].grad] + ([leaves[2].grad] if layout == torch.strided else [])
    for got, want in zip(grads, flat):
        assert reference.relative_error(torch.cat(got.unbind()), want.grad.view(want.shape[0], -1)) <= \
            GRAD_TOLERANCE[dtype]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("layout", ["bhld", "blhd"])
@pytest.mark.parametrize("lengths_as", ["list", "mask"])
def test_padded_grads(gen, device, layout, lengths_as):
    dtype, batch, length, heads, head_dim = front_end_dtype(device), 4, 23, 4, 64
    lengths = [23, 0, 1, 11]
    shape = (batch, heads, length, head_dim) if layout == "bhld" else (batch, length, heads, head_dim)
    q, k, v = (reference.randn(gen, *shape, dtype=dtype, device=device).requires_grad_() for _ in range(3))
    given = dict(lengths=lengths) if lengths_as == "list" else dict(
        key_padding_mask=torch.arange(length, device=device)[None] >= torch.tensor(lengths, device=device)[:, None])
    out = varattn.attention(q, k, v, layout=layout, causal=True, **given)
    grad_out = reference.randn(gen, *shape, dtype=dtype, device=device)
    out.backward(grad_out)

    def rows(x):  # (B, L, H, D) valid rows, packed
        x = x if layout == "blhd" else x.transpose(1, 2)
        return torch.cat([x[b, :n] for b, n in enumerate(lengths)])
    flat = [rows(x).detach().cpu().double().requires_grad_() for x in (q, k, v)]
    cu = reference.cu_seqlens(lengths)
    expected, _ = reference.attention(*flat, cu, cu, causal=True)
    expected.backward(rows(grad_out).cpu().double())
    for x, want in zip((q, k, v), flat):
        assert reference.relative_error(rows(x.grad), want.grad) <= GRAD_TOLERANCE[dtype]
        grad = x.grad if layout == "blhd" else x.grad.transpose(1, 2)
        for b, n in enumerate(lengths):
            assert torch.equal(grad[b, n:], torch.zeros_like(grad[b, n:]))  # padding: exactly zero


@pytest.mark.parametrize("device", DEVICES)
def test_sdpa_grads_match_torch(gen, device):
    """Dense SDPA with a broadcast additive mask: gradients of q, k, v and the mask as torch's."""
    dtype = torch.float64 if device == "cpu" else torch.float32
    q, k, v = (reference.randn(gen, 2, 4, n, 32, dtype=dtype, device=device) for n in (9, 11, 11))
    mask = reference.randn(gen, 1, 1, 9, 11, dtype=dtype, device=device)
    grad_out = reference.randn(gen, 2, 4, 9, 32, dtype=dtype, device=device)
    grads = []
    for sdpa in (varattn.scaled_dot_product_attention, torch.nn.functional.scaled_dot_product_attention):
        leaves = [x.detach().requires_grad_() for x in (q, k, v, mask)]
        sdpa(*leaves[:3], attn_mask=leaves[3]).backward(grad_out)
        grads.append([x.grad for x in leaves])
    for got, want in zip(*grads):
        assert got.shape == want.shape and reference.relative_error(got, want) <= 1e-5


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("layout", [torch.jagged, torch.strided], ids=["jagged", "strided"])
def test_self_attention_grads(gen, device, layout):
    """nn.SelfAttention on a NestedTensor: input and weight gradients as torch SDPA run per sequence."""
    dtype, embed, heads = front_end_dtype(device), 128, 2
    block = varattn.nn.SelfAttention(heads, embed, bias=True, is_causal=True).to(device, dtype)
    parts = [reference.randn(gen, n, embed, dtype=dtype, device=device) for n in (7, 1, 12, 3)]
    x = torch.nested.nested_tensor(parts, layout=layout, requires_grad=True)
    y = block(x)
    grad_out = [reference.randn(gen, *p.shape, dtype=dtype, device=device) for p in parts]
    if layout == torch.jagged:
        y.backward(torch.nested.nested_tensor_from_jagged(torch.cat(grad_out), y.offsets()))
    else:
        y.backward(torch.nested.nested_tensor(grad_out, layout=layout))
    weights = [block.c_attn.weight, block.c_attn.bias, block.c_proj.weight]
    got = [torch.cat(x.grad.unbind())] + [w.grad for w in weights]

    # float64 on the CPU with torch's SDPA, one sequence at a time
    w_attn, b_attn, w_proj = (w.detach().cpu().double().requires_grad_() for w in weights)
    flat = [p.detach().cpu().double().requires_grad_() for p in parts]
    for p, g in zip(flat, grad_out):
        q, k, v = (p @ w_attn.T + b_attn).view(p.shape[0], 3, heads, -1).unbind(1)
        attended = torch.nn.functional.scaled_dot_product_attention(
            q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1), is_causal=True)
        (attended.transpose(0, 1).reshape(p.shape[0], embed) @ w_proj.T).backward(g.cpu().double())
    want = [torch.cat([p.grad for p in flat]), w_attn.grad, b_attn.grad, w_proj.grad]
    for g, w in zip(got, want):
        assert reference.relative_error(g, w) <= GRAD_TOLERANCE[dtype]
