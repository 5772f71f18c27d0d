"""A paged KV cache (block_table) through varlen_attention and varlen_attn on
the math backend, and append_paged_kv, against the float64 reference over
the same keys laid out contiguously. Unused pages and rows past seqused_k
hold NaN: none may reach an output. CPU always; the gpu-marked variants run
the math backend on CUDA."""
from __future__ import annotations

import math

import pytest
import torch

import reference
import varattn
from conftest import LSE_TOLERANCE, TOLERANCE

DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)]
PAGE_SIZES = [16, 32, 64, 128, 256]


def paged_cache(gen, lengths_k, heads_kv, head_dim, page_size, dtype=torch.float64, device="cpu", spare_pages=3,
                spare_columns=1, head_dim_v=None):
    """(k_cache, v_cache, block_table, seqused_k, k, v, cu_seqlens_k): each
    sequence's keys in shuffled pages of NaN-filled pools, spare pages and
    columns of the table pointing at NaN pages, and the same keys packed."""
    head_dim_v = head_dim if head_dim_v is None else head_dim_v
    needed = [math.ceil(n / page_size) for n in lengths_k]
    max_pages = max(needed, default=0) + spare_columns
    num_pages = sum(needed) + spare_pages
    k_cache = torch.full((num_pages, page_size, heads_kv, head_dim), math.nan, dtype=dtype)
    v_cache = torch.full((num_pages, page_size, heads_kv, head_dim_v), math.nan, dtype=dtype)
    order = torch.randperm(num_pages, generator=gen)
    table = torch.empty(len(lengths_k), max_pages, dtype=torch.int32)
    k = reference.randn(gen, sum(lengths_k), heads_kv, head_dim, dtype=dtype)
    v = reference.randn(gen, sum(lengths_k), heads_kv, head_dim_v, dtype=dtype)
    taken, start = 0, 0
    for b, n in enumerate(lengths_k):
        pages = order[taken:taken + needed[b]]
        taken += needed[b]
        # unused columns: spare pages, which hold NaN only
        spare = order[sum(needed):][torch.randint(0, spare_pages, (max_pages - needed[b],), generator=gen)]
        table[b] = torch.cat([pages, spare]).int()
        for j in range(n):
            k_cache[pages[j // page_size], j % page_size] = k[start + j]
            v_cache[pages[j // page_size], j % page_size] = v[start + j]
        start += n
    move = dict(device=device)
    return (k_cache.to(**move), v_cache.to(**move), table.to(**move),
            torch.tensor(lengths_k, dtype=torch.int32, device=device), k, v, reference.cu_seqlens(lengths_k))


def check(out, lse, expected, expected_lse, dtype):
    assert reference.relative_error(out, expected) <= TOLERANCE[dtype]
    assert reference.lse_error(lse, expected_lse) <= LSE_TOLERANCE[dtype]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("page_size", PAGE_SIZES)
@pytest.mark.parametrize("group", [1, 2, 4, 8])
@pytest.mark.parametrize("queries", [1, 4], ids=["decode", "speculative"])
def test_decode_and_speculative_shapes(gen, device, page_size, group, queries):
    heads_kv, head_dim = 2, 16
    lengths_k = [0, 1, page_size, page_size + 3, 2 * page_size + 5]
    lengths_q = [min(queries, n) if n else queries for n in lengths_k]  # a query with no keys: zeros, lse -inf
    k_cache, v_cache, table, used, k, v, cu_k = paged_cache(gen, lengths_k, heads_kv, head_dim, page_size,
                                                            device=device)
    q = reference.randn(gen, sum(lengths_q), heads_kv * group, head_dim, dtype=torch.float64, device=device)
    cu_q = reference.cu_seqlens(lengths_q, device)
    out, lse = varattn.varlen_attention(q, k_cache, v_cache, cu_q, None, max(lengths_q), max(lengths_k), causal=True,
                                        causal_align="lower_right", seqused_k=used, block_table=table,
                                        return_lse=True)
    expected, expected_lse = reference.attention(q, k, v, cu_q.cpu(), cu_k, causal=True, causal_align="lower_right")
    check(out, lse, expected, expected_lse, torch.float64)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_paged_equals_contiguous(gen, device, dtype):
    lengths_q, lengths_k = [1, 4, 3, 0], [40, 70, 3, 17]
    k_cache, v_cache, table, used, k, v, cu_k = paged_cache(gen, lengths_k, 2, 32, 32, dtype=dtype, device=device)
    q = reference.randn(gen, sum(lengths_q), 4, 32, dtype=dtype, device=device)
    cu_q = reference.cu_seqlens(lengths_q, device)
    options = dict(causal=True, causal_align="lower_right", window=(20, -1), return_lse=True)
    paged = varattn.varlen_attention(q, k_cache, v_cache, cu_q, None, 4, 70, seqused_k=used, block_table=table,
                                     **options)
    contiguous = varattn.varlen_attention(q, k.to(device), v.to(device), cu_q, cu_k.to(device), 4, 70, **options)
    if device == "cpu":  # the same torch ops on the same keys (on CUDA, kernels may sum in another order)
        assert torch.equal(paged[0], contiguous[0]) and torch.equal(paged[1], contiguous[1])
    check(*paged, *contiguous, dtype)
    expected, expected_lse = reference.attention(q, k, v, cu_q.cpu(), cu_k, causal=True, causal_align="lower_right",
                                                 window=(20, -1))
    check(*paged, expected, expected_lse, dtype)


@pytest.mark.parametrize("device", DEVICES)
def test_seqused_k_shorter_than_the_pages_hold(gen, device):
    # the pages hold 50 keys each sequence; only the first seqused_k take part (the rest are NaN in the pool)
    k_cache, v_cache, table, _, k, v, _ = paged_cache(gen, [50, 50, 50], 2, 16, 16, device=device)
    used = [0, 1, 33]
    q = reference.randn(gen, 3, 2, 16, dtype=torch.float64, device=device)
    cu_q = reference.cu_seqlens([1, 1, 1], device)
    seqused_k = torch.tensor(used, dtype=torch.int32, device=device)
    k_cache[table[1, 0], 5:] = math.nan  # (row 5 on of sequence 1's first page: past its seqused_k)
    out = varattn.varlen_attention(q, k_cache, v_cache, cu_q, None, 1, None, seqused_k=seqused_k, block_table=table)
    keep = torch.cat([torch.arange(50 * b, 50 * b + n) for b, n in enumerate(used)])
    expected, _ = reference.attention(q, k[keep], v[keep], cu_q.cpu(), reference.cu_seqlens(used))
    assert reference.relative_error(out, expected) <= TOLERANCE[torch.float64]


@pytest.mark.parametrize("device", DEVICES)
def test_out_of_range_pages_are_skipped(gen, device):
    """Entries outside [0, num_pages): past a sequence's used pages they do
    not matter; within them that page's keys take no part (still counted in
    seqused_k for the causal diagonal); nothing outside the pools is read."""
    page_size = 16
    k_cache, v_cache, table, used, k, v, cu_k = paged_cache(gen, [40, 20, 5], 1, 16, page_size, device=device)
    q = reference.randn(gen, 3 * 2, 2, 16, dtype=torch.float64, device=device)
    cu_q = reference.cu_seqlens([2, 2, 2], device)
    options = dict(causal=True, causal_align="lower_right", seqused_k=used, return_lse=True)
    baseline = varattn.varlen_attention(q, k_cache, v_cache, cu_q, None, 2, 40, block_table=table, **options)
    num_pages = k_cache.shape[0]
    garbage = table.clone()
    garbage[1, 2:] = torch.tensor([num_pages, -7], dtype=torch.int32)  # past sequence 1's two used pages
    garbage[2, 1:] = 2**31 - 1
    past = varattn.varlen_attention(q, k_cache, v_cache, cu_q, None, 2, 40, block_table=garbage, **options)
    assert torch.equal(past[0], baseline[0]) and torch.equal(past[1], baseline[1])
    garbage[0, 1] = -1            # sequence 0's keys 16..31 are skipped
    garbage[2, 0] = num_pages + 5  # sequence 2 has no readable page: zeros, lse -inf
    out, lse = varattn.varlen_attention(q, k_cache, v_cache, cu_q, None, 2, 40, block_table=garbage, **options)
    visible = torch.ones(65, dtype=torch.bool)
    visible[16:32] = False
    visible[60:] = False
    bias = torch.zeros(3, 1, 1, 40, dtype=torch.bool)
    for b, (start, n) in enumerate(zip(cu_k[:-1].tolist(), [40, 20, 5])):
        bias[b, 0, 0, :n] = visible[start:start + n]
    expected, expected_lse = reference.attention(q, k, v, cu_q.cpu(), cu_k, causal=True, causal_align="lower_right",
                                                 attn_bias=bias)
    check(out, lse, expected, expected_lse, torch.float64)
    assert torch.equal(out[4:].cpu(), torch.zeros(2, 2, 16, dtype=torch.float64))
    assert (lse[:, 4:] == -math.inf).all()


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("packed", [True, False], ids=["packed", "batched"])
def test_append_then_attention_equals_the_concatenated_cache(gen, device, packed):
    page_size, heads_kv, head_dim = 16, 2, 8
    lengths_k = [0, 15, 16, 33]
    new = [3, 1, 2, 0] if packed else [2, 2, 2, 2]
    total = [n + m for n, m in zip(lengths_k, new)]
    # room for the new tokens: the pools are made for the total lengths, holding the old ones only
    k_cache, v_cache, table, _, k_all, v_all, cu_all = paged_cache(gen, total, heads_kv, head_dim, page_size,
                                                                   device=device)
    used = torch.tensor(lengths_k, dtype=torch.int32, device=device)
    old = torch.cat([torch.arange(s, s + n) for s, n in zip(cu_all[:-1].tolist(), lengths_k)])
    added = torch.cat([torch.arange(s + n, s + n + m) for s, n, m in zip(cu_all[:-1].tolist(), lengths_k, new)])
    for b, (n, m) in enumerate(zip(lengths_k, new)):  # forget the new tokens in the pools
        for j in range(n, n + m):
            k_cache[table[b, j // page_size], j % page_size] = math.nan
            v_cache[table[b, j // page_size], j % page_size] = math.nan
    k_new, v_new = k_all[added].to(device), v_all[added].to(device)
    if packed:
        lengths = varattn.append_paged_kv(k_new, v_new, k_cache, v_cache, table, used,
                                          reference.cu_seqlens(new, device))
    else:
        lengths = varattn.append_paged_kv(k_new.view(4, 2, heads_kv, head_dim), v_new.view(4, 2, heads_kv, head_dim),
                                          k_cache, v_cache, table, used)
    assert lengths.dtype == torch.int32 and lengths.tolist() == total
    assert used.tolist() == lengths_k  # not advanced in place
    assert old.numel() + added.numel() == k_all.shape[0]
    q = reference.randn(gen, 8, 4, head_dim, dtype=torch.float64, device=device)
    cu_q = reference.cu_seqlens([2] * 4, device)
    out, lse = varattn.varlen_attention(q, k_cache, v_cache, cu_q, None, 2, None, causal=True,
                                        causal_align="lower_right", seqused_k=lengths, block_table=table,
                                        return_lse=True)
    expected, expected_lse = reference.attention(q, k_all, v_all, cu_q.cpu(), cu_all, causal=True,
                                                 causal_align="lower_right")
    check(out, lse, expected, expected_lse, torch.float64)


@pytest.mark.parametrize("device", DEVICES)
def test_append_skips_rows_with_nowhere_to_go(gen, device):
    page_size = 16
    k_cache = torch.zeros(3, page_size, 1, 4, device=device)
    v_cache = torch.zeros(3, page_size, 1, 4, device=device)
    # sequence 0: its second page is out of range; sequence 1: its table is full after 16 + 16 keys
    table = torch.tensor([[0, 7], [1, 2]], dtype=torch.int32, device=device)
    used = torch.tensor([14, 31], dtype=torch.int32, device=device)
    k_new = torch.arange(1, 7, dtype=torch.float32, device=device)[:, None, None].expand(6, 1, 4).contiguous()
    lengths = varattn.append_paged_kv(k_new, -k_new, k_cache, v_cache, table, used,
                                      torch.tensor([0, 4, 6], dtype=torch.int32, device=device))
    assert lengths.tolist() == [18, 33]
    expected = torch.zeros(3, page_size, device=device)
    expected[0, 14:16] = torch.tensor([1.0, 2.0])
    expected[2, 15] = 5.0
    assert torch.equal(k_cache[..., 0, 0], expected) and torch.equal(v_cache[..., 0, 0], -expected)
    # nothing to write anywhere: the pools keep their contents
    before = k_cache.clone()
    varattn.append_paged_kv(k_new[:2], k_new[:2], k_cache, v_cache, table, torch.tensor([32, 32], dtype=torch.int32,
                            device=device), torch.tensor([0, 1, 2], dtype=torch.int32, device=device))
    assert torch.equal(k_cache, before)


@pytest.mark.gpu
@pytest.mark.parametrize("packed", [True, False], ids=["packed", "batched"])
def test_append_kernel_equals_the_torch_ops(gen, monkeypatch, packed):
    """The one-kernel append on CUDA writes what the torch-op path writes, garbage table entries included."""
    from varattn.frontends import paged_kv
    pages, page_size, heads_kv, head_dim, batch = 64, 16, 4, 128, 6
    table = torch.randperm(pages, generator=gen)[:batch * 8].view(batch, 8).int()  # no page named twice
    table[0, 0], table[3, 6], table[5, 7] = -3, pages, pages + 9                    # ones outside the pool
    table = table.cuda()
    used = torch.tensor([0, 5, 16, 100, 127, 130], dtype=torch.int32, device="cuda")
    new = [3, 0, 17, 2, 1, 4] if packed else [3] * batch
    rows = sum(new)
    k_new = reference.randn(gen, rows, heads_kv, head_dim, dtype=torch.bfloat16, device="cuda")
    v_new = reference.randn(gen, rows, heads_kv, head_dim, dtype=torch.bfloat16, device="cuda")
    if not packed:
        k_new, v_new = k_new.view(batch, 3, heads_kv, head_dim), v_new.view(batch, 3, heads_kv, head_dim)
    cu_new = reference.cu_seqlens(new, "cuda") if packed else None
    caches = []
    for fused in (True, False):
        if not fused:
            monkeypatch.setattr(paged_kv, "_append_kernel", lambda *args: None)
        k_cache = torch.zeros(pages, page_size, heads_kv, head_dim, dtype=torch.bfloat16, device="cuda")
        v_cache = torch.zeros_like(k_cache)
        lengths = varattn.append_paged_kv(k_new, v_new, k_cache, v_cache, table, used, cu_new)
        caches.append((k_cache, v_cache, lengths))
    for a, b in zip(*caches):
        assert torch.equal(a, b)


def test_varlen_attn_takes_torch_paged_arguments(gen):
    k_cache, v_cache, table, used, k, v, cu_k = paged_cache(gen, [30, 1, 0], 2, 16, 16)
    q = reference.randn(gen, 3, 4, 16, dtype=torch.float64)
    cu_q = reference.cu_seqlens([1, 1, 1])
    from torch.nn.attention.varlen import AuxRequest
    out, lse = varattn.varlen_attn(q, k_cache, v_cache, cu_q, cu_k, 1, 30, enable_gqa=True, seqused_k=used,
                                   block_table=table, return_aux=AuxRequest(lse=True), window_size=(-1, 0))
    expected, expected_lse = reference.attention(q, k, v, cu_q, cu_k, causal=True, causal_align="lower_right")
    check(out, lse, expected, expected_lse, torch.float64)
    with pytest.raises(ValueError, match=r"unless enable_gqa=True"):
        varattn.varlen_attn(q, k_cache, v_cache, cu_q, cu_k, 1, 30, seqused_k=used, block_table=table)


def test_explain_says_which_backends_take_paged_calls(gen):
    k_cache, v_cache, table, used, *_ = paged_cache(gen, [20, 3], 2, 64, 16, dtype=torch.float16)
    q = reference.randn(gen, 2, 2, 64, dtype=torch.float16)
    explanation = varattn.explain(q, k_cache, v_cache, reference.cu_seqlens([1, 1]), None, 1, None, seqused_k=used,
                                  block_table=table)
    assert explanation.chosen == (varattn.Backend.DECODE if q.is_cuda else varattn.Backend.MATH)
    for backend in (varattn.Backend.FLASH, varattn.Backend.EFFICIENT):
        assert "paged KV cache: not yet in this backend" in explanation.reasons[backend]
    with varattn.use_backends("flash", "efficient"), pytest.raises(varattn.NoBackendError,
                                                                   match="paged KV cache: not yet in this backend"):
        varattn.varlen_attention(q, k_cache, v_cache, reference.cu_seqlens([1, 1]), None, seqused_k=used,
                                 block_table=table)


def test_gradients_raise_not_implemented(gen):
    k_cache, v_cache, table, used, *_ = paged_cache(gen, [20, 3], 2, 16, 16)
    q = reference.randn(gen, 2, 2, 16, dtype=torch.float64)
    cu_q = reference.cu_seqlens([1, 1])
    for needs in (q, k_cache):
        needs.requires_grad_(True)
        with pytest.raises(NotImplementedError, match=r"gradients through a paged KV cache \(block_table\) are not "
                                                      r"implemented yet; run the call under torch.no_grad\(\)"):
            varattn.varlen_attention(q, k_cache, v_cache, cu_q, None, seqused_k=used, block_table=table)
        with torch.no_grad():  # fine without a gradient
            varattn.varlen_attention(q, k_cache, v_cache, cu_q, None, seqused_k=used, block_table=table)
        needs.requires_grad_(False)
    k_cache.requires_grad_(True)
    with pytest.raises(NotImplementedError, match="append_paged_kv: gradients through a paged KV cache"):
        varattn.append_paged_kv(k_cache[0, :1].detach(), v_cache[0, :1], k_cache, v_cache, table, used,
                                reference.cu_seqlens([1, 0]))


def test_attn_bias_with_pages_raises_not_implemented(gen):
    k_cache, v_cache, table, used, *_ = paged_cache(gen, [20, 3], 2, 16, 16)
    q = reference.randn(gen, 2, 2, 16, dtype=torch.float64)
    with pytest.raises(NotImplementedError, match=r"attn_bias with a paged KV cache \(block_table\) is not supported"):
        varattn.varlen_attention(q, k_cache, v_cache, reference.cu_seqlens([1, 1]), None, seqused_k=used,
                                 block_table=table, attn_bias=torch.zeros(2, 2, 1, 32, dtype=torch.float64))


def _call(**changes):
    gen = torch.Generator().manual_seed(0)
    k_cache, v_cache, table, used, *_ = paged_cache(gen, [20, 3], 2, 16, 16)
    arguments = dict(q=reference.randn(gen, 2, 2, 16, dtype=torch.float64), k=k_cache, v=v_cache,
                     cu_seqlens_q=reference.cu_seqlens([1, 1]), cu_seqlens_k=None, seqused_k=used, block_table=table)
    arguments.update(changes)
    return varattn.varlen_attention(**arguments)


@pytest.mark.parametrize("changes, error, message", [
    (dict(block_table=torch.zeros(2, 2, dtype=torch.int64)), TypeError,
     r"block_table must have dtype torch.int32, got torch.int64"),
    (dict(block_table=torch.zeros(4, dtype=torch.int32)), ValueError,
     r"block_table must be 2-D \(batch_size, max_pages\), got shape \(4,\)"),
    (dict(block_table=torch.zeros(3, 2, dtype=torch.int32)), ValueError,
     r"block_table must have one row per sequence \(2\), got shape \(3, 2\)"),
    (dict(block_table=[[0, 1], [2, 3]]), TypeError, r"block_table must be a torch.Tensor, got list"),
    (dict(seqused_k=None), ValueError, r"seqused_k is required with block_table \(a paged KV cache\)"),
    (dict(seqused_k=torch.tensor([20, 49], dtype=torch.int32)), ValueError,
     r"seqused_k must lie in \[0, 48\] \(block_table's max_pages \* page_size\) for each sequence, got \[20, 49\]"),
    (dict(seqused_k=torch.tensor([-1, 3], dtype=torch.int32)), ValueError, r"seqused_k must lie in \[0, 48\]"),
    (dict(max_seqlen_k=10), ValueError, r"max_seqlen_k is 10 but a k sequence has 20 rows"),
    (dict(k=torch.zeros(8, 12, 2, 16, dtype=torch.float64), v=torch.zeros(8, 12, 2, 16, dtype=torch.float64)),
     ValueError, r"k has page_size 12 \(dimension 1 of the page pool\); expected a power of two from 16 to 256"),
    (dict(k=torch.zeros(8, 512, 2, 16, dtype=torch.float64), v=torch.zeros(8, 512, 2, 16, dtype=torch.float64)),
     ValueError, r"k has page_size 512"),
    (dict(k=torch.zeros(8, 16, 2, 16, dtype=torch.float64), v=torch.zeros(8, 32, 2, 16, dtype=torch.float64)),
     ValueError, r"k and v must have the same \(num_pages, page_size, heads_kv\), got \(8, 16, 2\) and \(8, 32, 2\)"),
    (dict(k=torch.zeros(128, 2, 16, dtype=torch.float64)), ValueError,
     r"k must be a page pool \(num_pages, page_size, heads_kv, head_dim\) with block_table, got shape \(128, 2, 16\)"),
    (dict(cu_seqlens_k=torch.tensor([0, 1], dtype=torch.int32)), ValueError,
     r"cu_seqlens_q and cu_seqlens_k must describe the same number of sequences: got 2 and 1"),
])
def test_bad_arguments_say_what_was_expected(changes, error, message):
    with pytest.raises(error, match=message):
        _call(**changes)


def test_cu_seqlens_k_given_is_unused():
    a = _call()
    b = _call(cu_seqlens_k=torch.tensor([0, 5, 7], dtype=torch.int32))
    assert torch.equal(a, b)


def test_append_bad_arguments_say_what_was_expected(gen):
    k_cache, v_cache, table, used, *_ = paged_cache(gen, [20, 3], 2, 16, 16)
    cu = reference.cu_seqlens([1, 1])
    k_new = torch.zeros(2, 2, 16, dtype=torch.float64)
    with pytest.raises(ValueError, match=r"k_new must be \(batch, new tokens, heads_kv, head_dim\) without "
                                         r"cu_seqlens_new, got shape \(2, 2, 16\)"):
        varattn.append_paged_kv(k_new, k_new, k_cache, v_cache, table, used)
    with pytest.raises(TypeError, match=r"k_new must have the cache's dtype torch.float64, got torch.float32"):
        varattn.append_paged_kv(k_new.float(), k_new, k_cache, v_cache, table, used, cu)
    with pytest.raises(ValueError, match=r"v_new must have the cache's \(heads_kv, head_dim\) \(2, 16\), got shape "
                                         r"\(2, 2, 8\)"):
        varattn.append_paged_kv(k_new, k_new[..., :8], k_cache, v_cache, table, used, cu)
    with pytest.raises(ValueError, match=r"cu_seqlens_new must have 3 entries \(block_table's rows \+ 1\), got 2"):
        varattn.append_paged_kv(k_new, k_new, k_cache, v_cache, table, used, cu[:2])
    with pytest.raises(ValueError, match=r"seqused_k must have 2 entries, got 1"):
        varattn.append_paged_kv(k_new, k_new, k_cache, v_cache, table, used[:1], cu)
    with pytest.raises(ValueError, match=r"k_cache has page_size 8"):
        varattn.append_paged_kv(k_new, k_new, k_cache[:, :8], v_cache[:, :8], table, used, cu)
    with pytest.raises(ValueError, match=r"k_new has 3 sequences \(dim 0\) but block_table has 2 rows"):
        varattn.append_paged_kv(k_new[None].expand(3, 2, 2, 16), k_new[None].expand(3, 2, 2, 16), k_cache, v_cache,
                                table, used)


def test_compiled_paged_call_equals_eager(gen):
    k_cache, v_cache, table, used, *_ = paged_cache(gen, [20, 3, 0], 2, 16, 16)
    q = reference.randn(gen, 3, 4, 16, dtype=torch.float64)
    cu_q = reference.cu_seqlens([1, 1, 1])

    def call(q, k_cache, v_cache, table, used):
        return varattn.varlen_attention(q, k_cache, v_cache, cu_q, None, 1, 32, causal=True,
                                        causal_align="lower_right", seqused_k=used, block_table=table)
    eager = call(q, k_cache, v_cache, table, used)
    compiled = torch.compile(call, backend="aot_eager", fullgraph=True)(q, k_cache, v_cache, table, used)
    assert torch.equal(eager, compiled)
