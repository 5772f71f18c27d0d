"""Bad input gets a clear error: the right class, naming the argument."""
from __future__ import annotations

import decimal
import fractions
import re

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch.nn.attention.bias import causal_lower_right

import reference
import varattn


@pytest.fixture
def packed(gen):
    return reference.packed_inputs(gen, [3, 4], [3, 4], 4, 2, 8)


def call(packed, **changes):
    q, k, v, cu_q, cu_k = packed
    arguments = dict(q=q, k=k, v=v, cu_seqlens_q=cu_q, cu_seqlens_k=cu_k, max_seqlen_q=4, max_seqlen_k=4)
    arguments.update(changes)
    return varattn.varlen_attention(**arguments)


@pytest.mark.parametrize("change, error, words", [
    (lambda q, k, v, cu: dict(q=q[:, :3]), ValueError, "multiple of the key/value heads"),
    (lambda q, k, v, cu: dict(k=k[..., :4], v=v[..., :4]), ValueError, "same head_dim"),
    (lambda q, k, v, cu: dict(v=v[:, :1]), ValueError, "k and v"),
    (lambda q, k, v, cu: dict(cu_seqlens_q=cu.long()), TypeError, "cu_seqlens_q"),
    (lambda q, k, v, cu: dict(cu_seqlens_k=cu[:2]), ValueError, "same number of sequences"),
    (lambda q, k, v, cu: dict(cu_seqlens_q=torch.tensor([0, 3, 6], dtype=torch.int32)), ValueError, "cu_seqlens_q"),
    (lambda q, k, v, cu: dict(cu_seqlens_q=torch.tensor([0, 5, 3], dtype=torch.int32)), ValueError, "non-decreasing"),
    (lambda q, k, v, cu: dict(max_seqlen_q=3), ValueError, "max_seqlen_q"),
    (lambda q, k, v, cu: dict(max_seqlen_k=-1), ValueError, "max_seqlen_k"),
    (lambda q, k, v, cu: dict(q=q.int()), TypeError, "dtype"),
    (lambda q, k, v, cu: dict(k=k.double(), v=v.double()), TypeError, "one dtype"),
    (lambda q, k, v, cu: dict(q=q.transpose(1, 2).contiguous().transpose(1, 2)), ValueError, "unit stride"),
    (lambda q, k, v, cu: dict(q=q[0]), ValueError, "packed as"),
    (lambda q, k, v, cu: dict(q=q.numpy()), TypeError, "torch.Tensor"),
    (lambda q, k, v, cu: dict(causal_align="diagonal"), ValueError, "causal_align"),
    (lambda q, k, v, cu: dict(window=(-2, 0)), ValueError, "window"),
    (lambda q, k, v, cu: dict(window=3), ValueError, "window"),
    (lambda q, k, v, cu: dict(scale=float("nan")), ValueError, "scale"),
    (lambda q, k, v, cu: dict(causal=1), TypeError, "causal"),
    (lambda q, k, v, cu: dict(dropout_p=1.5), ValueError, "dropout_p"),
    (lambda q, k, v, cu: dict(attn_bias=torch.ones(2, 4, 4)), ValueError, "attn_bias"),
    (lambda q, k, v, cu: dict(attn_bias=torch.ones(2, 3, 4, 4)), ValueError, "attn_bias"),
    (lambda q, k, v, cu: dict(attn_bias=torch.ones(2, 1, 2, 4)), ValueError, "attn_bias"),
    (lambda q, k, v, cu: dict(attn_bias=torch.ones(2, 1, 4, 4, dtype=torch.int64)), TypeError, "attn_bias"),
    (lambda q, k, v, cu: dict(seqused_q=torch.tensor([5, 1], dtype=torch.int32)), ValueError, "seqused_q"),
])
def test_packed_errors(packed, change, error, words):
    q, k, v, cu_q, _ = packed
    with pytest.raises(error, match=words):
        call(packed, **change(q, k, v, cu_q))


def test_nested_and_dense_mixed(gen):
    nt = torch.nested.nested_tensor([torch.randn(3, 2, 8)], layout=torch.jagged).transpose(1, 2)
    dense = torch.randn(1, 2, 3, 8)
    with pytest.raises(TypeError, match="all NestedTensors or all dense"):
        varattn.attention(nt, dense, dense)


@pytest.mark.parametrize("arguments, error, words", [
    (dict(lengths=[3, 9]), ValueError, "lengths"),
    (dict(lengths=[3]), ValueError, "lengths"),
    (dict(lengths=torch.tensor([1.0, 2.0])), TypeError, "lengths"),
    (dict(kv_lengths=[1, 2], key_padding_mask=torch.zeros(2, 5, dtype=torch.bool)), ValueError, "not both"),
    (dict(key_padding_mask=torch.tensor([[False, True, False, False, False]] * 2)), ValueError, "pad at the end"),
    (dict(key_padding_mask=torch.zeros(2, 4, dtype=torch.bool)), ValueError, "key_padding_mask"),
    (dict(layout="hbld"), ValueError, "layout"),
])
def test_padded_errors(gen, arguments, error, words):
    q = reference.randn(gen, 2, 4, 5, 8)
    with pytest.raises(error, match=words):
        varattn.attention(q, q, q, **arguments)


def test_lengths_for_queries_with_other_key_length(gen):
    q = reference.randn(gen, 2, 4, 5, 8)
    k = reference.randn(gen, 2, 4, 7, 8)
    with pytest.raises(ValueError, match="kv_lengths"):
        varattn.attention(q, k, k, lengths=[5, 3])


def test_nested_takes_no_lengths(gen):
    nt = torch.nested.nested_tensor([torch.randn(3, 2, 8)], layout=torch.jagged).transpose(1, 2)
    with pytest.raises(ValueError, match="lengths"):
        varattn.attention(nt, nt, nt, lengths=[3])


def test_nested_key_value_must_match(gen):
    k = torch.nested.nested_tensor([torch.randn(3, 2, 8), torch.randn(2, 2, 8)], layout=torch.jagged).transpose(1, 2)
    v = torch.nested.nested_tensor([torch.randn(2, 2, 8), torch.randn(3, 2, 8)], layout=torch.jagged).transpose(1, 2)
    with pytest.raises(ValueError, match="same sequence lengths"):
        varattn.attention(k, k, v)


def test_sdpa_heads_without_enable_gqa(gen):
    q = reference.randn(gen, 1, 4, 3, 8)
    k = reference.randn(gen, 1, 2, 3, 8)
    with pytest.raises(ValueError, match="enable_gqa"):
        varattn.scaled_dot_product_attention(q, k, k)


# ---------------------------------------------------------------------------
# torch's behaviour at the edges (issue 16): the SDPA drop-in raises what
# torch.nn.functional.scaled_dot_product_attention raises, naming the argument.

def _raised(call):
    try:
        call()
    except Exception as error:  # noqa: BLE001 - the type is what is compared
        return error
    return None


def _qualified(x) -> str:
    kind = type(x)
    return kind.__qualname__ if kind.__module__ == "builtins" else f"{kind.__module__}.{kind.__qualname__}"


FLAG_REJECTED = [1, 0, 1.0, 0.5, np.bool_(True), np.bool_(False), np.int64(1), np.float32(0.0), torch.tensor(True),
                 torch.tensor(1), "False", "", None]
NUMBER_REJECTED = ["0.5", "", fractions.Fraction(1, 2), decimal.Decimal("0.5"), 0.5j, torch.tensor([0.5]),
                   torch.tensor(0.5, requires_grad=True), np.array([0.5])]


@pytest.mark.parametrize("argument, value", [("is_causal", x) for x in FLAG_REJECTED]
                         + [("enable_gqa", x) for x in FLAG_REJECTED]
                         + [("dropout_p", x) for x in NUMBER_REJECTED + [None]]
                         + [("scale", x) for x in NUMBER_REJECTED], ids=repr)
def test_sdpa_argument_types_as_torch(gen, argument, value):
    q = reference.randn(gen, 2, 4, 5, 8)
    theirs = _raised(lambda: F.scaled_dot_product_attention(q, q, q, **{argument: value}))
    assert isinstance(theirs, TypeError)
    for call in (lambda: varattn.scaled_dot_product_attention(q, q, q, **{argument: value}),
                 lambda: varattn.explain(q, q, q, **{argument: value})):
        with pytest.raises(TypeError, match=argument) as raised:
            call()
        if not isinstance(value, torch.Tensor):
            assert _qualified(value) in str(raised.value)  # numpy.bool, not bool


@pytest.mark.parametrize("value", [np.bool_(True), np.bool_(False), 1, np.int64(1), torch.tensor(True), "False", None],
                         ids=repr)
def test_flags_are_bools_in_every_front_end(gen, value):
    q = reference.randn(gen, 2, 4, 5, 8)
    rows, cu = q.transpose(1, 2).reshape(10, 4, 8), torch.tensor([0, 5, 10], dtype=torch.int32)
    nt = torch.nested.nested_tensor([torch.randn(3, 4, 8), torch.randn(2, 4, 8)], layout=torch.jagged).transpose(1, 2)
    block = varattn.nn.SelfAttention(num_heads=2, embed_dimension=16, is_causal=value)
    calls = {
        "causal": [lambda: varattn.attention(q, q, q, causal=value),
                   lambda: varattn.attention(nt, nt, nt, causal=value),
                   lambda: varattn.varlen_attention(rows, rows, rows, cu, cu, 5, 5, causal=value),
                   lambda: varattn.explain(q, q, q, causal=value),
                   lambda: varattn.explain(rows, rows, rows, cu, cu, causal=value),
                   lambda: block(torch.randn(2, 3, 16))],
        "return_lse": [lambda: varattn.attention(q, q, q, return_lse=value)],
        "deterministic": [lambda: varattn.varlen_attention(rows, rows, rows, cu, cu, deterministic=value)],
        "is_causal": [lambda: varattn.scaled_dot_product_attention(nt, nt, nt, is_causal=value)],
    }
    for name, made in calls.items():
        for call in made:
            # once after a call with the same options' values as bools: a checked structure must not let it by
            call_ok = {"causal": lambda: varattn.attention(q, q, q, causal=bool(value)),
                       "return_lse": lambda: varattn.attention(q, q, q, return_lse=bool(value))}.get(name)
            for _ in range(2):
                with pytest.raises(TypeError, match=f"{name} must be a bool, got {_qualified(value)}"):
                    call()
                if call_ok is not None and not isinstance(value, str):
                    call_ok()


def test_checked_structure_does_not_pass_other_types(gen):
    """A call with causal=True makes its structure known; causal=1 or numpy.True_ compare equal to
    True but are still refused, and a 0-d tensor scale is not kept in the key."""
    q = reference.randn(gen, 2, 4, 5, 8)
    for _ in range(2):
        varattn.attention(q, q, q, causal=True, scale=0.5)
        for value in (1, np.True_, 1.0):
            with pytest.raises(TypeError, match="causal must be a bool"):
                varattn.attention(q, q, q, causal=value, scale=0.5)
        with pytest.raises(ValueError, match="window"):
            varattn.attention(q, q, q, causal=True, window=(True, 0))
    scale = torch.tensor(0.5)
    first = varattn.attention(q, q, q, scale=scale)
    scale.fill_(2.0)  # changed in place: the next call reads it again
    assert not torch.equal(first, varattn.attention(q, q, q, scale=scale))


@pytest.mark.parametrize("value, error", [(1.5, "dropout_p"), (-0.1, "dropout_p"), (float("nan"), "dropout_p")])
def test_dropout_out_of_range(gen, value, error):
    q = reference.randn(gen, 2, 4, 5, 8)
    with pytest.raises(ValueError, match=error):
        varattn.scaled_dot_product_attention(q, q, q, dropout_p=value)


@pytest.mark.parametrize("case", ["larger", "larger 4x4", "more dims", "other batch", "lower_right(3, 4)",
                                  "lower_right(5, 5)", "lower_right(5, 7)"])
def test_sdpa_mask_shape_as_torch(gen, case):
    """A dense attn_mask that does not broadcast to (N, ..., H, L, S), and a causal_lower_right made for
    other lengths, raise torch's RuntimeError, naming attn_mask, what was expected and what came."""
    length_q, length_k = (5, 5) if case.startswith("larger") else (5, 6)
    q = reference.randn(gen, 2, 4, length_q, 8)
    k = reference.randn(gen, 2, 4, length_k, 8)
    masks = {"larger": torch.ones(2, 4, 9, 9, dtype=torch.bool), "larger 4x4": torch.zeros(4, 4, 9, 9),
             "more dims": torch.ones(1, 2, 4, 5, 6, dtype=torch.bool), "other batch": torch.zeros(3, 1, 5, 6),
             "lower_right(3, 4)": causal_lower_right(3, 4), "lower_right(5, 5)": causal_lower_right(5, 5),
             "lower_right(5, 7)": causal_lower_right(5, 7)}
    mask = masks[case]
    if case != "lower_right(5, 5)":  # torch runs that one as is_causal=True (upper-left): varattn refuses it
        assert isinstance(_raised(lambda: F.scaled_dot_product_attention(q, k, k, attn_mask=mask)), RuntimeError)
    for call in (lambda: varattn.scaled_dot_product_attention(q, k, k, attn_mask=mask),
                 lambda: varattn.explain(q, k, k, attn_mask=mask, is_causal=False)):
        with pytest.raises(RuntimeError, match="attn_mask") as raised:
            call()
        assert re.search("expected .*, got ", str(raised.value))


def test_sdpa_nested_mask_larger_than_the_longest(gen):
    nt = torch.nested.nested_tensor([torch.randn(n, 4, 8) for n in (3, 5)], layout=torch.jagged).transpose(1, 2)
    with pytest.raises(ValueError, match=r"attn_mask .*expected \(B or 1, H or 1, 5 or 1, 5 or 1\).*got shape"):
        varattn.scaled_dot_product_attention(nt, nt, nt, attn_mask=torch.ones(2, 4, 9, 9, dtype=torch.bool))
    varattn.scaled_dot_product_attention(nt, nt, nt, attn_mask=torch.ones(2, 4, 5, 5, dtype=torch.bool))


def test_attention_names_attn_mask(gen):
    """varattn.attention's mask errors name its attn_mask, not the packed checks' attn_bias."""
    q = reference.randn(gen, 2, 4, 5, 8)
    with pytest.raises(TypeError, match="^attn_mask must be bool"):
        varattn.attention(q, q, q, attn_mask=torch.ones(2, 4, 5, 5, dtype=torch.int64))
    with pytest.raises(ValueError, match="^attn_mask must be 4-D"):
        varattn.attention(q, q, q, attn_mask=torch.ones(5, 5, dtype=torch.bool))


@pytest.mark.parametrize("layout", [torch.jagged, torch.strided], ids=["jagged", "strided"])
def test_nested_head_dim_zero_is_a_clear_error(gen, layout):
    x = torch.nested.nested_tensor([torch.randn(n, 0) for n in (3, 2)], layout=layout).view(2, -1, 2, 0).transpose(1, 2)
    for call in (varattn.attention, varattn.scaled_dot_product_attention, varattn.explain):
        with pytest.raises(ValueError, match="head_dim must be positive"):
            call(x, x, x)


def test_empty_sdpa_still_checks(gen):
    q = reference.randn(gen, 2, 4, 0, 8)
    with pytest.raises(TypeError, match="one dtype"):
        varattn.scaled_dot_product_attention(q, q.double(), q.double())
    with pytest.raises(RuntimeError, match="attn_mask"):
        varattn.scaled_dot_product_attention(q, q, q, attn_mask=torch.ones(2, 4, 3, 5, dtype=torch.bool))
    with pytest.raises(TypeError, match="is_causal must be a bool, got numpy.bool"):
        varattn.scaled_dot_product_attention(q, q, q, is_causal=np.True_)
    with pytest.raises(ValueError, match="scale"):
        varattn.scaled_dot_product_attention(q, q, q, scale=float("inf"))


# ---------------------------------------------------------------------------
# explain() takes each call's arguments as the call takes them, and raises what it raises.

def _explain_forms(gen):
    q = reference.randn(gen, 2, 4, 5, 8)
    rows, cu = q.transpose(1, 2).reshape(10, 4, 8), torch.tensor([0, 5, 10], dtype=torch.int32)
    mask = torch.ones(5, 5, dtype=torch.bool)
    return {
        "varlen positional": ((rows, rows, rows, cu, cu, 5, 5), dict(causal=True)),
        "varlen by name": ((), dict(q=rows, k=rows, v=rows, cu_seqlens_q=cu, cu_seqlens_k=cu, dropout_p=0.1)),
        "varlen mixed": ((rows, rows, rows), dict(cu_seqlens_q=cu, cu_seqlens_k=cu, attn_bias=mask[None, None])),
        "attention": ((q, q, q), dict(lengths=[5, 2], causal=True)),
        "attention by name": ((), dict(query=q, key=q, value=q, causal=True, scale=np.float32(0.3))),
        "sdpa positional": ((q, q, q, mask, 0.0, False, 0.3, False), {}),
        "sdpa by name": ((), dict(query=q, key=q, value=q, is_causal=True, enable_gqa=False)),
        "sdpa 2-D mask": ((q, q, q), dict(attn_mask=mask)),
        "sdpa 3-D inputs": ((q[0], q[0], q[0]), dict(dropout_p=torch.tensor(0.0))),
        "sdpa CausalBias": ((q, q, q), dict(attn_mask=causal_lower_right(5, 5))),
    }


@pytest.mark.parametrize("form", ["varlen positional", "varlen by name", "varlen mixed", "attention",
                                  "attention by name", "sdpa positional", "sdpa by name", "sdpa 2-D mask",
                                  "sdpa 3-D inputs", "sdpa CausalBias"])
def test_explain_takes_each_call_arguments(gen, form):
    args, kwargs = _explain_forms(gen)[form]
    call = {"varlen": varattn.varlen_attention, "attention": varattn.attention,
            "sdpa": varattn.scaled_dot_product_attention}[form.split()[0]]
    call(*args, **kwargs)
    assert varattn.explain(*args, **kwargs).chosen == varattn.Backend.MATH


def test_explain_of_an_empty_output(gen):
    q = reference.randn(gen, 2, 4, 0, 8)
    explanation = varattn.explain(q, q, q, is_causal=True)
    assert explanation.chosen is None and "no elements" in str(explanation)


@pytest.mark.parametrize("case", ["unknown keyword", "packed-only keyword", "wrong cu dtype", "missing cu_seqlens_k",
                                  "mask with is_causal", "gqa without enable_gqa", "bad layout", "bad window",
                                  "attn_mask dtype", "scale string", "too many positional"])
def test_explain_raises_what_the_call_raises(gen, case):
    q = reference.randn(gen, 2, 4, 5, 8)
    rows, cu = q.transpose(1, 2).reshape(10, 4, 8), torch.tensor([0, 5, 10], dtype=torch.int32)
    kv = reference.randn(gen, 2, 2, 5, 8)
    sdpa, attention, varlen = varattn.scaled_dot_product_attention, varattn.attention, varattn.varlen_attention
    call, args, kwargs = {
        "unknown keyword": (attention, (q, q, q), dict(casual=True)),
        "packed-only keyword": (attention, (q, q, q), dict(requires_grad=True)),
        "wrong cu dtype": (varlen, (rows, rows, rows, cu.long(), cu), {}),
        "missing cu_seqlens_k": (varlen, (rows, rows, rows), dict(cu_seqlens_q=cu)),
        "mask with is_causal": (sdpa, (q, q, q), dict(attn_mask=torch.ones(5, 5, dtype=torch.bool), is_causal=True)),
        "gqa without enable_gqa": (sdpa, (q, kv, kv), dict(is_causal=True)),
        "bad layout": (attention, (q, q, q), dict(layout="hbld")),
        "bad window": (attention, (q, q, q), dict(window=(-2, 0))),
        "attn_mask dtype": (attention, (q, q, q), dict(attn_mask=torch.ones(2, 4, 5, 5, dtype=torch.int64))),
        "scale string": (sdpa, (q, q, q), dict(scale="0.5")),
        "too many positional": (sdpa, (q, q, q, None, 0.0, False, None, False, "extra"), {}),
    }[case]
    theirs = _raised(lambda: call(*args, **kwargs))
    ours = _raised(lambda: varattn.explain(*args, **kwargs))
    assert theirs is not None and type(ours) is type(theirs)
    if not isinstance(theirs, TypeError) or "argument" not in str(theirs):  # Python's own binding messages differ
        assert str(ours) == str(theirs)
