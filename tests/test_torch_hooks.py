"""torch's own hooks: varattn.varlen_attn against torch.nn.attention.varlen.varlen_attn's
contract (FlashAttention-2's semantics, through the float64 reference), and varattn
as torch's flash attention implementation "varattn" (varattn/integrations/torch.py).

On the CPU, where torch has no kernels for its flash ops, activation gives
them varattn's, so torch's varlen_attn and the aten ops run end to end here;
marked gpu: against torch's own FlashAttention-2 and through torch's SDPA.
"""
from __future__ import annotations

import inspect
from collections import namedtuple

import pytest
import torch

import reference
import varattn
import varattn.integrations.torch as hooks
from conftest import LSE_TOLERANCE, TOLERANCE

try:
    from torch.nn.attention import varlen as torch_varlen
except ImportError:  # torch before varlen_attn
    torch_varlen = None

# Anything with an `lse` field requests it, as in torch; torch's own AuxRequest where it has one.
AuxRequest = getattr(torch_varlen, "AuxRequest", None) or namedtuple("AuxRequest", "lse", defaults=(False,))

needs_registry = pytest.mark.skipif(not hasattr(torch.nn.attention, "register_flash_attention_impl"),
                                    reason=f"torch {torch.__version__} has no register_flash_attention_impl")


def fa2_reference(q, k, v, cu_q, cu_k, max_k, window_size=(-1, -1), is_causal=False, seqused_k=None, scale=None):
    """The float64 reference under FlashAttention-2's reading of its mask
    arguments, transcribed from its flash_api.cpp: is_causal sets right to 0,
    a side of max_k or more becomes -1 (mha_varlen_fwd), then
    set_params_fprop replaces one unbounded side by max_k when the other is
    bounded; the window is measured from the lower-right diagonal."""
    left, right = window_size
    if is_causal:
        right = 0
    left, right = (-1 if side >= max_k else side for side in (left, right))
    if left < 0 <= right:
        left = max_k
    if right < 0 <= left:
        right = max_k
    window = tuple(-1 if side < 0 else side for side in (left, right))
    return reference.attention(q, k, v, cu_q, cu_k, seqused_k=seqused_k, causal_align="lower_right", window=window,
                               scale=scale)


def packed(gen, heads=(4, 2), head_dim=16, dtype=torch.float64, device="cpu", batch=6, longest=13, longest_k=17,
           requires_grad=False):
    """q, k, v, cu_q, cu_k, max_q, max_k, with lengths 0, 1 and the longest among each side's."""
    lengths_q, lengths_k = reference.lengths(gen, batch, longest), reference.lengths(gen, batch, longest_k)
    q, k, v, cu_q, cu_k = reference.packed_inputs(gen, lengths_q, lengths_k, *heads, head_dim, dtype=dtype,
                                                  device=device)
    for x in (q, k, v):
        x.requires_grad_(requires_grad)
    return q, k, v, cu_q, cu_k, max(lengths_q), max(lengths_k)


WINDOWS = [(-1, -1), (-1, 0), (3, 0), (2, 5), (-1, 2), (4, -1), (100, 100), (-3, 0)]


# ---------------------------------------------------------------------------
# varattn.varlen_attn: the signature, the semantics, the errors.

# torch 2.13's varlen_attn: names, kinds and defaults (annotations aside: torch's are live objects).
TORCH_2_13_SIGNATURE = [
    ("query", "POSITIONAL_OR_KEYWORD", inspect.Parameter.empty),
    ("key", "POSITIONAL_OR_KEYWORD", inspect.Parameter.empty),
    ("value", "POSITIONAL_OR_KEYWORD", inspect.Parameter.empty),
    ("cu_seq_q", "POSITIONAL_OR_KEYWORD", inspect.Parameter.empty),
    ("cu_seq_k", "POSITIONAL_OR_KEYWORD", inspect.Parameter.empty),
    ("max_q", "POSITIONAL_OR_KEYWORD", inspect.Parameter.empty),
    ("max_k", "POSITIONAL_OR_KEYWORD", inspect.Parameter.empty),
    ("return_aux", "KEYWORD_ONLY", None),
    ("scale", "KEYWORD_ONLY", None),
    ("window_size", "KEYWORD_ONLY", (-1, -1)),
    ("enable_gqa", "KEYWORD_ONLY", False),
    ("seqused_k", "KEYWORD_ONLY", None),
    ("block_table", "KEYWORD_ONLY", None),
    ("num_splits", "KEYWORD_ONLY", None),
]


def parameters(function):
    return [(p.name, p.kind.name, p.default) for p in inspect.signature(function).parameters.values()]


def test_signature_is_torch_2_13s():
    assert parameters(varattn.varlen_attn) == TORCH_2_13_SIGNATURE
    if torch_varlen is not None and torch.__version__ >= "2.13":
        assert parameters(torch_varlen.varlen_attn) == TORCH_2_13_SIGNATURE


@pytest.mark.parametrize("dtype", [torch.float64, torch.float16])
@pytest.mark.parametrize("window_size", WINDOWS, ids=str)
def test_windows_against_reference(gen, dtype, window_size):
    q, k, v, cu_q, cu_k, max_q, max_k = packed(gen, dtype=dtype)
    expected, expected_lse = fa2_reference(q, k, v, cu_q, cu_k, max_k, window_size)
    out, lse = varattn.varlen_attn(q, k, v, cu_q, cu_k, max_q, max_k, window_size=window_size, enable_gqa=True,
                                   return_aux=AuxRequest(lse=True))
    assert out.dtype == dtype and out.shape == q.shape
    assert lse.dtype == (torch.float64 if dtype == torch.float64 else torch.float32) and lse.shape == q.shape[1::-1]
    assert reference.relative_error(out, expected) <= TOLERANCE[dtype]
    assert reference.lse_error(lse, expected_lse) <= LSE_TOLERANCE[dtype]


def test_a_left_window_bounds_the_right_side_by_max_k(gen):
    """FlashAttention-2's rule that makes (W, -1) differ from 'unbounded right':
    queries more than max_k rows before the lower-right diagonal see no key."""
    q, k, v, cu_q, cu_k = reference.packed_inputs(gen, [12, 3], [2, 3], 2, 2, 8, dtype=torch.float64)
    out, lse = varattn.varlen_attn(q, k, v, cu_q, cu_k, 12, 3, window_size=(1, -1), return_aux=AuxRequest(lse=True))
    expected, expected_lse = fa2_reference(q, k, v, cu_q, cu_k, 3, (1, -1))
    assert torch.isinf(lse[:, :7]).all() and torch.isfinite(lse[:, 7:]).all()
    assert reference.relative_error(out, expected) <= 1e-10 and reference.lse_error(lse, expected_lse) <= 1e-10


@pytest.mark.parametrize("heads", [(4, 4), (4, 2), (6, 1)], ids=str)
def test_gqa(gen, heads):
    q, k, v, cu_q, cu_k, max_q, max_k = packed(gen, heads=heads)
    out = varattn.varlen_attn(q, k, v, cu_q, cu_k, max_q, max_k, window_size=(-1, 0), enable_gqa=heads[0] != heads[1])
    assert reference.relative_error(out, fa2_reference(q, k, v, cu_q, cu_k, max_k, (-1, 0))[0]) <= 1e-10


@pytest.mark.parametrize("return_aux", [None, AuxRequest(), AuxRequest(lse=False)], ids=str)
def test_out_alone_unless_lse_is_asked_for(gen, return_aux):
    q, k, v, cu_q, cu_k, max_q, max_k = packed(gen, heads=(2, 2))
    out = varattn.varlen_attn(q, k, v, cu_q, cu_k, max_q, max_k, return_aux=return_aux)
    assert isinstance(out, torch.Tensor) and out.shape == q.shape


def test_seqused_k_and_scale(gen):
    q, k, v, cu_q, cu_k, max_q, max_k = packed(gen)
    used = (cu_k.diff() + 1) // 2
    expected, _ = fa2_reference(q, k, v, cu_q, cu_k, max_k, (-1, 0), seqused_k=used, scale=0.3)
    out = varattn.varlen_attn(q, k, v, cu_q, cu_k, max_q, max_k, window_size=(-1, 0), enable_gqa=True, seqused_k=used,
                              scale=0.3)
    assert reference.relative_error(out, expected) <= 1e-10


@pytest.mark.parametrize("window_size", [(-1, -1), (-1, 0), (3, 1)], ids=str)
def test_gradients_against_reference(gen, window_size):
    q, k, v, cu_q, cu_k, max_q, max_k = packed(gen, requires_grad=True)
    out, lse = varattn.varlen_attn(q, k, v, cu_q, cu_k, max_q, max_k, window_size=window_size, enable_gqa=True,
                                   return_aux=AuxRequest(lse=True))
    expected, expected_lse = fa2_reference(q, k, v, cu_q, cu_k, max_k, window_size)
    grad_out = reference.randn(gen, *out.shape, dtype=out.dtype)
    # lse's gradient flows too (torch's varlen_attn drops it): weighted on the rows that see keys
    grad_lse = torch.where(torch.isfinite(expected_lse), reference.randn(gen, *lse.shape, dtype=lse.dtype), 0)
    grads = torch.autograd.grad((out, lse), (q, k, v), (grad_out, grad_lse))
    expected_grads = torch.autograd.grad((expected, expected_lse), (q, k, v), (grad_out, grad_lse))
    for grad, expected_grad in zip(grads, expected_grads):
        assert reference.relative_error(grad, expected_grad) <= 1e-10


def test_rows_that_see_no_key_give_zeros_and_lse_minus_inf(gen):
    # FlashAttention-2 writes lse +inf there; -inf is log(0), which merging partial attentions by lse needs
    q, k, v, cu_q, cu_k = reference.packed_inputs(gen, [3, 2], [0, 1], 2, 2, 8, dtype=torch.float64)
    out, lse = varattn.varlen_attn(q, k, v, cu_q, cu_k, 3, 1, window_size=(-1, 0), return_aux=AuxRequest(lse=True))
    assert torch.equal(out[:4], torch.zeros_like(out[:4])) and (lse[:, :4] == -torch.inf).all()
    assert torch.isfinite(lse[:, 4]).all()


@pytest.mark.parametrize("refused", [dict(num_splits=1),
                                     dict(block_table=torch.zeros(2, 1, dtype=torch.int32), num_splits=2)], ids=str)
def test_unsupported_arguments_raise_not_implemented_naming_them(gen, refused):
    # (block_table is taken: tests/test_paged.py)
    q, k, v, cu_q, cu_k, max_q, max_k = packed(gen)
    with pytest.raises(NotImplementedError, match=r"varattn\.varlen_attn: num_splits not supported"):
        varattn.varlen_attn(q, k, v, cu_q, cu_k, max_q, max_k, enable_gqa=True, **refused)


def test_errors(gen):
    q, k, v, cu_q, cu_k, max_q, max_k = packed(gen, heads=(4, 2))
    with pytest.raises(ValueError, match=r"same number of heads \(dim 1\) unless enable_gqa=True \(grouped-query "
                                         r"attention\), got shapes \(\d+, 4, 16\) and \(\d+, 2, 16\)"):
        varattn.varlen_attn(q, k, v, cu_q, cu_k, max_q, max_k)
    q3, k3, v3, cu_q3, cu_k3, _, _ = packed(gen, heads=(3, 2))
    with pytest.raises(ValueError, match="multiple of the key/value heads"):
        varattn.varlen_attn(q3, k3, v3, cu_q3, cu_k3, max_q, max_k, enable_gqa=True)
    with pytest.raises(ValueError, match=r"window_size must be a pair \(left, right\), got \(1, 2, 3\)"):
        varattn.varlen_attn(q, k, v, cu_q, cu_k, max_q, max_k, enable_gqa=True, window_size=(1, 2, 3))
    with pytest.raises(TypeError, match="window_size left must be an int, got 1.5"):
        varattn.varlen_attn(q, k, v, cu_q, cu_k, max_q, max_k, enable_gqa=True, window_size=(1.5, 0))
    with pytest.raises(ValueError, match="max_k must be a non-negative int, got None"):
        varattn.varlen_attn(q, k, v, cu_q, cu_k, max_q, None, enable_gqa=True)
    with pytest.raises(TypeError, match="cu_seqlens_q must have dtype torch.int32"):
        varattn.varlen_attn(q, k, v, cu_q.long(), cu_k, max_q, max_k, enable_gqa=True)


def test_compiles_without_graph_breaks(gen):
    q, k, v, cu_q, cu_k, max_q, max_k = packed(gen, dtype=torch.float32, requires_grad=True)

    def call(q, k, v):
        return varattn.varlen_attn(q, k, v, cu_q, cu_k, max_q, max_k, window_size=(2, 0), enable_gqa=True,
                                   return_aux=AuxRequest(lse=True))
    out, lse = torch.compile(call, backend="aot_eager", fullgraph=True)(q, k, v)
    expected, expected_lse = call(q, k, v)
    assert torch.equal(out, expected) and torch.equal(lse, expected_lse)
    out.sum().backward()
    assert all(x.grad is not None for x in (q, k, v))


def torch_varlen_attn(*args, **options):
    """torch's varlen_attn with the options the installed torch takes (GQA
    needs no enable_gqa where torch has no such check)."""
    accepted = inspect.signature(torch_varlen.varlen_attn).parameters
    if "enable_gqa" not in accepted:
        options.pop("enable_gqa", None)
    missing = [name for name in options if name not in accepted]
    if missing:
        pytest.skip(f"torch {torch.__version__}'s varlen_attn has no {missing}")
    return torch_varlen.varlen_attn(*args, **options)


# ---------------------------------------------------------------------------
# The registry: "varattn" among torch's flash attention implementations.

@pytest.fixture
def activated():
    hooks.register()
    torch.nn.attention.activate_flash_attention_impl("varattn")
    try:
        yield
    finally:
        torch.nn.attention.restore_flash_attention_impl()


def has_cpu_kernel(op: str) -> bool:
    return torch._C._dispatch_has_kernel_for_dispatch_key(f"aten::{op}", "CPU")


@needs_registry
def test_register_lists_without_activating_and_restore_removes_the_kernels():
    hooks.register()
    assert "varattn" in torch.nn.attention.list_flash_attention_impls()
    assert torch.nn.attention.current_flash_attention_impl() is None
    assert not has_cpu_kernel("_flash_attention_forward")
    torch.nn.attention.activate_flash_attention_impl("varattn")
    try:
        assert torch.nn.attention.current_flash_attention_impl() == "varattn"
        assert all(has_cpu_kernel(op) for op in ("_flash_attention_forward", "_flash_attention_backward",
                                                 "_scaled_dot_product_flash_attention",
                                                 "_scaled_dot_product_flash_attention_backward"))
    finally:
        torch.nn.attention.restore_flash_attention_impl()
    assert torch.nn.attention.current_flash_attention_impl() is None
    assert not has_cpu_kernel("_flash_attention_forward")


def test_register_without_a_registry_says_so(monkeypatch):
    monkeypatch.delattr(torch.nn.attention, "register_flash_attention_impl", raising=False)
    with pytest.raises(RuntimeError, match="no torch.nn.attention.register_flash_attention_impl"):
        hooks.register()


@pytest.fixture
def varattn_calls(monkeypatch):
    """How many calls varattn's dispatch chose a backend for."""
    calls = []
    select = varattn.dispatch.select
    monkeypatch.setattr(varattn.dispatch, "select", lambda *args: calls.append(1) or select(*args))
    return calls


@needs_registry
@pytest.mark.skipif(torch_varlen is None, reason="torch has no varlen_attn")
@pytest.mark.parametrize("window_size", [(-1, -1), (-1, 0), (3, 0)], ids=str)
def test_torch_varlen_attn_runs_on_varattn_cpu(gen, activated, varattn_calls, window_size):
    q, k, v, cu_q, cu_k, max_q, max_k = packed(gen, heads=(4, 4), requires_grad=True)
    out, lse = torch_varlen_attn(q, k, v, cu_q, cu_k, max_q, max_k, window_size=window_size,
                                 return_aux=AuxRequest(lse=True))
    assert len(varattn_calls) == 1
    expected, expected_lse = fa2_reference(q, k, v, cu_q, cu_k, max_k, window_size)
    mine, mine_lse = varattn.varlen_attn(q, k, v, cu_q, cu_k, max_q, max_k, window_size=window_size,
                                         return_aux=AuxRequest(lse=True))
    assert torch.equal(out, mine) and torch.equal(lse, mine_lse)
    assert reference.relative_error(out, expected) <= 1e-10 and reference.lse_error(lse, expected_lse) <= 1e-10
    grad_out = reference.randn(gen, *out.shape, dtype=out.dtype)
    for grad, expected_grad in zip(torch.autograd.grad(out, (q, k, v), grad_out),
                                   torch.autograd.grad(expected, (q, k, v), grad_out)):
        assert reference.relative_error(grad, expected_grad) <= 1e-10


@needs_registry
@pytest.mark.skipif(not hasattr(torch_varlen, "varlen_attn_out"), reason="torch has no varlen_attn_out")
def test_torch_varlen_attn_out_writes_in_place_cpu(gen, activated):
    q, k, v, cu_q, cu_k, max_q, max_k = packed(gen, heads=(4, 4))
    out = torch.full_like(q, torch.nan)
    result, lse = torch_varlen.varlen_attn_out(out, q, k, v, cu_q, cu_k, max_q, max_k, window_size=(-1, 0),
                                               return_aux=AuxRequest(lse=True))
    expected, expected_lse = fa2_reference(q, k, v, cu_q, cu_k, max_k, (-1, 0))
    assert result is out and reference.relative_error(out, expected) <= 1e-10
    assert reference.lse_error(lse, expected_lse) <= 1e-10


def meta_results(op, *args, **kwargs):
    """What torch's meta function says `op` returns (shapes and strides)."""
    return op(*(x.to("meta") if isinstance(x, torch.Tensor) else x for x in args), **kwargs)


def assert_like_meta(results, meta):
    """Shapes and strides as torch's meta function gives them, for the tensors a compiled graph checks."""
    for got, expected in zip(results, meta):
        if isinstance(expected, torch.Tensor) and expected.numel() > 0:
            assert (got.shape, got.stride()) == (expected.shape, expected.stride())


def bhld(gen, batch, heads, length, head_dim, transposed, dtype=torch.float64):
    """(B, H, L, D), contiguous or as the transpose of a contiguous (B, L, H, D) (how attention layers make them)."""
    if transposed:
        return reference.randn(gen, batch, length, heads, head_dim, dtype=dtype).transpose(1, 2).requires_grad_()
    return reference.randn(gen, batch, heads, length, head_dim, dtype=dtype).requires_grad_()


def dense_reference(q, k, v, causal, scale=None):
    """(B, H, L, D) through the float64 reference, causal lower-right: (out (B, H, L_q, D), lse (B, H, L_q))."""
    batch, len_q, len_k = q.shape[0], q.shape[2], k.shape[2]
    rows = [x.transpose(1, 2).flatten(0, 1) for x in (q, k, v)]
    out, lse = reference.attention(*rows, reference.cu_seqlens([len_q] * batch), reference.cu_seqlens([len_k] * batch),
                                   causal=causal, causal_align="lower_right", scale=scale)
    return out.view(batch, len_q, *out.shape[1:]).transpose(1, 2), lse.view(-1, batch, len_q).transpose(0, 1)


@needs_registry
@pytest.mark.parametrize("transposed", [False, True], ids=["bhld", "blhd-transposed"])
@pytest.mark.parametrize("is_causal", [False, True])
def test_sdpa_flash_op_cpu(gen, activated, transposed, is_causal):
    q = bhld(gen, 2, 4, 6, 16, transposed)
    k, v = bhld(gen, 2, 2, 9, 16, transposed), bhld(gen, 2, 2, 9, 16, transposed)
    op = torch.ops.aten._scaled_dot_product_flash_attention
    results = op(q, k, v, 0.0, is_causal, scale=0.3)
    assert_like_meta(results, meta_results(op, q, k, v, 0.0, is_causal, scale=0.3))
    expected, expected_lse = dense_reference(q, k, v, is_causal, scale=0.3)
    assert reference.relative_error(results[0], expected) <= 1e-10
    assert reference.lse_error(results[1], expected_lse) <= 1e-10
    assert results[4:6] == (6, 9)
    grad_out = reference.randn(gen, *expected.shape, dtype=expected.dtype)
    grads = torch.autograd.grad(results[0], (q, k, v), grad_out)  # torch's formula calls the backward op
    for grad, expected_grad, x in zip(grads, torch.autograd.grad(expected, (q, k, v), grad_out), (q, k, v)):
        assert grad.stride() == torch.empty_like(x).stride()
        assert reference.relative_error(grad, expected_grad) <= 1e-10


@needs_registry
def test_dense_and_varlen_flash_forward_like_meta_cpu(gen, activated):
    op = torch.ops.aten._flash_attention_forward
    q = bhld(gen, 2, 4, 6, 16, True).transpose(1, 2).detach()  # (B, L, H, D)
    results = op(q, q, q, None, None, 6, 6, 0.0, True, False)
    assert_like_meta(results, meta_results(op, q, q, q, None, None, 6, 6, 0.0, True, False))
    rows = reference.randn(gen, 4, 11, 16, dtype=torch.float64).transpose(0, 1)  # (T, H, D), permuted strides
    cu = reference.cu_seqlens([5, 0, 6])
    results = op(rows, rows, rows, cu, cu, 6, 6, 0.0, False, False, window_size_left=2, window_size_right=1)
    assert_like_meta(results, meta_results(op, rows, rows, rows, cu, cu, 6, 6, 0.0, False, False,
                                           window_size_left=2, window_size_right=1))
    expected, expected_lse = fa2_reference(rows, rows, rows, cu, cu, 6, (2, 1))
    assert reference.relative_error(results[0], expected) <= 1e-10
    assert reference.lse_error(results[1], expected_lse) <= 1e-10


@needs_registry
def test_dropout_stream_reaches_the_backward_cpu(gen, activated):
    """The forward's rng_state carries varattn's dropout stream: the op's
    result and gradients are varattn.attention's under the same seed."""
    q, k, v = (bhld(gen, 2, 2, 7, 8, True) for _ in range(3))
    grad_out = reference.randn(gen, 2, 2, 7, 8, dtype=torch.float64)
    torch.manual_seed(5)
    out = torch.ops.aten._scaled_dot_product_flash_attention(q, k, v, 0.4, True)[0]
    grads = torch.autograd.grad(out, (q, k, v), grad_out)
    torch.manual_seed(5)
    expected = varattn.attention(q, k, v, causal=True, causal_align="lower_right", dropout_p=0.4)
    expected_grads = torch.autograd.grad(expected, (q, k, v), grad_out)
    assert torch.equal(out, expected) and all(map(torch.equal, grads, expected_grads))


@needs_registry
def test_aten_ops_refuse_what_varattn_lacks_cpu(gen, activated):
    q = reference.randn(gen, 2, 6, 4, 16, dtype=torch.float64)
    forward = torch.ops.aten._flash_attention_forward
    with pytest.raises(NotImplementedError, match="return_debug_mask"):
        torch.ops.aten._scaled_dot_product_flash_attention(q, q, q, 0.0, False, True)
    with pytest.raises(NotImplementedError, match="alibi_slopes"):
        forward(q, q, q, None, None, 6, 6, 0.0, False, False, alibi_slopes=torch.zeros(4))
    with pytest.raises(NotImplementedError, match="seqused_k"):
        forward(q, q, q, None, None, 6, 6, 0.0, False, False, seqused_k=torch.zeros(2, dtype=torch.int32))
    with pytest.raises(ValueError, match="cum_seq_q and cum_seq_k must both be tensors"):
        forward(q, q, q, None, reference.cu_seqlens([6, 6]), 6, 6, 0.0, False, False)
    with pytest.raises(ValueError, match=r"dense query, key and value must be 4-D with one batch size, got shapes "
                                         r"\(2, 6, 4, 16\), \(1, 6, 4, 16\)"):
        forward(q, q[:1], q[:1], None, None, 6, 6, 0.0, False, False)


@needs_registry
@pytest.mark.skipif(not hasattr(torch.ops.aten, "_flash_attention_forward_no_dropout_inplace"),
                    reason="torch has no _flash_attention_forward_no_dropout_inplace")
def test_inplace_forward_checks_out_cpu(gen, activated):
    q = reference.randn(gen, 2, 6, 4, 16, dtype=torch.float64)
    rows, cu = q.flatten(0, 1), reference.cu_seqlens([6, 6])
    inplace = torch.ops.aten._flash_attention_forward_no_dropout_inplace
    with pytest.raises(ValueError, match=r"out must be a \(12, 4, 16\) torch.float64 tensor"):
        inplace(torch.empty(12, 4, 8, dtype=torch.float64), rows, rows, rows, cu, cu, 6, 6, 0.0, False, False)
    with pytest.raises(NotImplementedError, match="dense"):
        inplace(torch.empty_like(q), q, q, q, None, None, 6, 6, 0.0, False, False)


# ---------------------------------------------------------------------------
# CUDA: against torch's own FlashAttention-2, and torch's SDPA after activation.

@pytest.mark.gpu
@pytest.mark.skipif(torch_varlen is None, reason="torch has no varlen_attn")
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("window_size", WINDOWS, ids=str)
@pytest.mark.parametrize("heads", [(8, 8), (8, 2)], ids=str)
def test_against_torch_flash_attention_2(gen, dtype, window_size, heads):
    q, k, v, cu_q, cu_k, max_q, max_k = packed(gen, heads=heads, head_dim=64, dtype=dtype, device="cuda", batch=7,
                                               longest=300, longest_k=400, requires_grad=True)
    options = dict(window_size=window_size, enable_gqa=heads[0] != heads[1], return_aux=AuxRequest(lse=True))
    theirs, their_lse = torch_varlen_attn(q, k, v, cu_q, cu_k, max_q, max_k, **options)
    out, lse = varattn.varlen_attn(q, k, v, cu_q, cu_k, max_q, max_k, **options)
    expected, expected_lse = fa2_reference(q, k, v, cu_q, cu_k, max_k, window_size)
    assert reference.relative_error(out, expected) <= TOLERANCE[dtype]
    assert reference.relative_error(theirs, expected) <= TOLERANCE[dtype]  # the reference reads FA2's rules right
    seen = torch.isfinite(expected_lse).cuda()
    assert reference.lse_error(lse, expected_lse) <= LSE_TOLERANCE[dtype]
    assert torch.allclose(lse[seen], their_lse[seen], atol=LSE_TOLERANCE[dtype])
    assert (their_lse[~seen] == torch.inf).all() and (lse[~seen] == -torch.inf).all()  # FA2 writes +inf there
    grad_out = torch.randn_like(out)
    for grad, their_grad in zip(torch.autograd.grad(out, (q, k, v), grad_out),
                                torch.autograd.grad(theirs, (q, k, v), grad_out)):
        assert reference.relative_error(grad, their_grad) <= 5 * TOLERANCE[dtype]


@pytest.mark.gpu
@pytest.mark.skipif(torch_varlen is None, reason="torch has no varlen_attn")
@pytest.mark.parametrize("lengths_q, lengths_k, window_size", [
    ([40, 3], [2, 3], (1, -1)),     # a bounded left: the right side becomes max_k, early rows see nothing
    ([40, 3], [2, 3], (-1, 5)),     # a bounded right: the left side becomes max_k (no effect)
    ([9, 30], [20, 4], (2, 100)),   # a side of max_k or more is unbounded
    ([9, 0, 30], [20, 4, 0], (-1, 0)),
], ids=str)
def test_fa2_window_rules_against_torch(gen, lengths_q, lengths_k, window_size):
    q, k, v, cu_q, cu_k = reference.packed_inputs(gen, lengths_q, lengths_k, 4, 4, 64, dtype=torch.float16,
                                                  device="cuda")
    options = dict(window_size=window_size, return_aux=AuxRequest(lse=True))
    theirs, their_lse = torch_varlen_attn(q, k, v, cu_q, cu_k, max(lengths_q), max(lengths_k), **options)
    out, lse = varattn.varlen_attn(q, k, v, cu_q, cu_k, max(lengths_q), max(lengths_k), **options)
    assert reference.relative_error(out, theirs) <= TOLERANCE[torch.float16]
    assert torch.equal(torch.isfinite(lse), torch.isfinite(their_lse))
    seen = torch.isfinite(lse)
    assert torch.allclose(lse[seen], their_lse[seen], atol=LSE_TOLERANCE[torch.float16])


@pytest.mark.gpu
@needs_registry
@pytest.mark.skipif(torch_varlen is None, reason="torch has no varlen_attn")
@pytest.mark.parametrize("head_dim", [128, 256])
def test_torch_varlen_attn_after_activation_is_varattns(gen, activated, varattn_calls, head_dim):
    """At head_dim 256 the forward runs on flash (torch runs it without grad
    mode, so dispatch does not know a backward follows) and the backward,
    which flash has not at 256, on efficient, from flash's out and lse."""
    q, k, v, cu_q, cu_k, max_q, max_k = packed(gen, heads=(8, 8), head_dim=head_dim, dtype=torch.bfloat16,
                                               device="cuda", longest=500, longest_k=500, requires_grad=True)
    out, lse = torch_varlen_attn(q, k, v, cu_q, cu_k, max_q, max_k, window_size=(-1, 0),
                                 return_aux=AuxRequest(lse=True))
    assert len(varattn_calls) == 1
    mine, mine_lse = varattn.varlen_attn(q, k, v, cu_q, cu_k, max_q, max_k, window_size=(-1, 0),
                                         return_aux=AuxRequest(lse=True))
    # torch calls varattn without grad mode, which may pick another tile plan than
    # varattn.varlen_attn with gradients: a few outputs round to a neighbouring bf16
    assert reference.relative_error(out, mine) <= 1e-4
    assert reference.lse_error(lse, mine_lse.detach().cpu().double()) <= 1e-5
    grad_out = torch.randn_like(out)
    for grad, mine_grad in zip(torch.autograd.grad(out, (q, k, v), grad_out),
                               torch.autograd.grad(mine, (q, k, v), grad_out)):
        assert reference.relative_error(grad, mine_grad) <= 1e-3  # dQ's atomics add in any order


def sdpa_flash(q, k, v, **options):
    with torch.nn.attention.sdpa_kernel(torch.nn.attention.SDPBackend.FLASH_ATTENTION):
        return torch.nn.functional.scaled_dot_product_attention(q, k, v, **options)


@pytest.mark.gpu
@needs_registry
@pytest.mark.parametrize("is_causal", [False, True])
@pytest.mark.parametrize("head_dim", [64, 80, 128])
def test_torch_sdpa_flash_after_activation_is_varattns(gen, activated, varattn_calls, is_causal, head_dim):
    q, k, v = (bhld(gen, 3, 8, 333, head_dim, True, torch.float16).cuda().detach().requires_grad_() for _ in range(3))
    out = sdpa_flash(q, k, v, is_causal=is_causal)
    assert len(varattn_calls) == 1
    mine = varattn.scaled_dot_product_attention(q, k, v, is_causal=is_causal)
    assert reference.relative_error(out, mine) <= TOLERANCE[torch.float16]
    grad_out = torch.randn_like(out)
    for grad, mine_grad in zip(torch.autograd.grad(out, (q, k, v), grad_out),
                               torch.autograd.grad(mine, (q, k, v), grad_out)):
        assert reference.relative_error(grad, mine_grad) <= 5 * TOLERANCE[torch.float16]


@pytest.mark.gpu
@needs_registry
def test_torch_nested_sdpa_after_activation_is_varattns(gen, activated, varattn_calls):
    x = torch.nested.nested_tensor([reference.randn(gen, n, 512, dtype=torch.bfloat16) for n in (30, 200, 7)],
                                   layout=torch.jagged, device="cuda")
    q = k = v = x.view(3, -1, 8, 64).transpose(1, 2)
    out = sdpa_flash(q, k, v, is_causal=True)
    assert varattn_calls
    mine = varattn.attention(q, k, v, causal=True)
    assert reference.relative_error(out.values(), mine.values()) <= TOLERANCE[torch.bfloat16]


@pytest.mark.gpu
@needs_registry
def test_compiled_sdpa_after_activation(gen, activated):
    """Inductor checks the strides of the op's outputs against torch's meta function's."""
    q, k, v = (bhld(gen, 2, 8, 256, 64, transposed, torch.bfloat16).cuda().detach().requires_grad_()
               for transposed in (True, False, True))
    compiled = torch.compile(lambda q, k, v: torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True),
                             fullgraph=True)
    with torch.nn.attention.sdpa_kernel(torch.nn.attention.SDPBackend.FLASH_ATTENTION):
        out = compiled(q, k, v)
        out.sum().backward()
    mine = varattn.scaled_dot_product_attention(q, k, v, is_causal=True)
    assert reference.relative_error(out, mine) <= TOLERANCE[torch.bfloat16]
    assert all(x.grad is not None for x in (q, k, v))
