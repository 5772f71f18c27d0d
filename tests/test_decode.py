"""The decode backend against the float64 reference: decode and speculative
shapes (1 to 16 queries), every head dim and GQA ratio it takes, masks in
both alignments, key lengths from 0 to 64k (split over the GPU), packed and
paged keys (NaN in unused pages and rows past seqused_k, garbage table
entries), gradients through the flash backward; and what explain() says
where it declines (CPU)."""
from __future__ import annotations

import math

import pytest
import torch

import reference
import varattn
from conftest import LSE_TOLERANCE, TOLERANCE
from test_grad import check_grads
from test_paged import paged_cache
from test_varlen import check
from varattn.backends import decode

gpu = pytest.mark.gpu
HALF = [torch.bfloat16, torch.float16]
MASKS = [
    dict(),
    dict(causal=True, causal_align="lower_right"),
    dict(causal=True),
    dict(window=(70, 0), causal_align="lower_right"),
]
# keys 0, 1, a tile and one past it, several splits; queries 0 and 1 among them
LENGTHS_K = [0, 1, 63, 64, 65, 300, 2000, 5000]


def lengths(queries):
    return [queries, 1, queries, queries, 0, queries, queries, queries], LENGTHS_K


@gpu
@pytest.mark.parametrize("dtype", HALF)
@pytest.mark.parametrize("head_dim", decode.HEAD_DIMS)
def test_head_dims(gen, dtype, head_dim):
    check(gen, dtype, "cuda", heads=(8, 2), head_dim=head_dim, lengths=lengths(4), backend="decode",
          causal=True, causal_align="lower_right")


@gpu
@pytest.mark.parametrize("queries", [1, 2, 4, 16])
@pytest.mark.parametrize("heads", [(4, 4), (8, 2), (32, 8), (8, 1), (16, 2)], ids=str)
def test_queries_and_gqa(gen, queries, heads):
    rows = queries * heads[0] // heads[1]
    if rows > decode.MAX_ROWS[128]:
        pytest.skip(f"{rows} rows: more than one CTA holds at head_dim 128")
    check(gen, torch.bfloat16, "cuda", heads=heads, head_dim=128, lengths=lengths(queries), backend="decode")


@gpu
@pytest.mark.parametrize("mask", MASKS, ids=str)
@pytest.mark.parametrize("head_dim", [64, 256])
def test_masks(gen, mask, head_dim):
    check(gen, torch.float16, "cuda", heads=(8, 2), head_dim=head_dim, lengths=lengths(16 if head_dim == 64 else 8),
          backend="decode", **mask)


@gpu
def test_seqused_and_rows_past_them(gen):
    check(gen, torch.bfloat16, "cuda", heads=(8, 2), head_dim=128, lengths=([4, 3, 1, 4], [400, 70, 1, 9]),
          seqused=True, backend="decode", causal=True, causal_align="lower_right")


@gpu
def test_long_keys_split_across_the_gpu(gen):
    check(gen, torch.bfloat16, "cuda", heads=(32, 8), head_dim=128, lengths=([1, 4, 1], [65536, 40000, 1]),
          backend="decode", causal=True, causal_align="lower_right")


@gpu
@pytest.mark.parametrize("page_size", [16, 32, 64, 128, 256])
@pytest.mark.parametrize("queries", [1, 4])
def test_paged(gen, page_size, queries):
    lengths_k = [0, 1, page_size, page_size + 3, 3 * page_size + 5, 1000]
    lengths_q = [queries] * len(lengths_k)
    k_cache, v_cache, table, used, k, v, cu_k = paged_cache(gen, lengths_k, 2, 128, page_size, dtype=torch.bfloat16,
                                                            device="cuda")
    q = reference.randn(gen, sum(lengths_q), 8, 128, dtype=torch.bfloat16, device="cuda")
    cu_q = reference.cu_seqlens(lengths_q, "cuda")
    with varattn.use_backends("decode"):
        out, lse = varattn.varlen_attention(q, k_cache, v_cache, cu_q, None, queries, max(lengths_k), causal=True,
                                            causal_align="lower_right", seqused_k=used, block_table=table,
                                            return_lse=True)
    expected, expected_lse = reference.attention(q, k, v, cu_q.cpu(), cu_k, causal=True, causal_align="lower_right")
    assert reference.relative_error(out, expected) <= TOLERANCE[torch.bfloat16]
    assert reference.lse_error(lse, expected_lse) <= LSE_TOLERANCE[torch.bfloat16]


@gpu
def test_paged_garbage_entries_are_skipped(gen):
    """Pages outside the pool take no part and are never read; seqused_k
    shorter than the pages hold; NaN everywhere else in the pools."""
    page_size, lengths_k = 16, [100, 40, 5]
    k_cache, v_cache, table, _, k, v, cu_k = paged_cache(gen, lengths_k, 1, 64, page_size, dtype=torch.float16,
                                                         device="cuda")
    used = torch.tensor([90, 40, 5], dtype=torch.int32, device="cuda")
    q = reference.randn(gen, 3 * 2, 4, 64, dtype=torch.float16, device="cuda")
    cu_q = reference.cu_seqlens([2, 2, 2], "cuda")
    garbage = table.clone()
    num_pages = k_cache.shape[0]
    garbage[0, 1] = -1                 # sequence 0's keys 16..31 skipped
    garbage[1, 3:] = 2**31 - 1         # past sequence 1's used pages: never looked at
    garbage[2, 0] = num_pages + 5      # sequence 2 has no readable page: zeros, lse -inf
    with varattn.use_backends("decode"):
        out, lse = varattn.varlen_attention(q, k_cache, v_cache, cu_q, None, 2, 100, causal=True,
                                            causal_align="lower_right", seqused_k=used, block_table=garbage,
                                            return_lse=True)
    bias = torch.zeros(3, 1, 1, 100, dtype=torch.bool)
    bias[0, 0, 0, :90] = True
    bias[0, 0, 0, 16:32] = False
    bias[1, 0, 0, :40] = True
    expected, expected_lse = reference.attention(q, k, v, cu_q.cpu(), cu_k, causal=True, causal_align="lower_right",
                                                 attn_bias=bias, seqused_k=torch.tensor([90, 40, 0]))
    assert reference.relative_error(out, expected) <= TOLERANCE[torch.float16]
    assert reference.lse_error(lse, expected_lse) <= LSE_TOLERANCE[torch.float16]
    assert (out[4:] == 0).all() and (lse[:, 4:] == -math.inf).all()


@gpu
@pytest.mark.parametrize("head_dim", [64, 128])
def test_gradients_through_the_flash_backward(gen, head_dim):
    check_grads(gen, torch.bfloat16, "cuda", "decode", heads=(8, 2), head_dim=head_dim,
                lengths=([4, 1, 0, 4], [300, 1, 5, 70]), causal=True, causal_align="lower_right")


@gpu
def test_dispatch_picks_decode_for_short_queries(gen):
    q, k, v, cu_q, cu_k = reference.packed_inputs(gen, [1, 1], [500, 20], 8, 2, 128, dtype=torch.bfloat16,
                                                  device="cuda")
    assert varattn.explain(q, k, v, cu_q, cu_k, 1, 500).chosen == varattn.Backend.DECODE
    q, _, _, cu_q, _ = reference.packed_inputs(gen, [17, 1], [500, 20], 8, 2, 128, dtype=torch.bfloat16,
                                               device="cuda")
    explanation = varattn.explain(q, k, v, cu_q, cu_k, 17, 500)
    assert explanation.chosen == varattn.Backend.FLASH
    assert any("at most 16 queries" in why for why in explanation.reasons[varattn.Backend.DECODE])


def test_explain_says_why_decode_declines_cpu(gen):
    q, k, v, cu_q, cu_k = reference.packed_inputs(gen, [1, 1], [5, 2], 8, 2, 32)
    why = varattn.explain(q, k, v, cu_q, cu_k, 1, 5).reasons[varattn.Backend.DECODE]
    assert any("runs on cuda" in reason for reason in why)
    assert any("head_dim 32 not in" in reason for reason in why)


def test_row_shapes_cover_every_call_decode_takes():
    for head_dim in decode.HEAD_DIMS:
        for rows in range(1, decode.MAX_ROWS[head_dim] + 1):
            warps, slices = decode.row_shape(head_dim, rows)
            assert decode.instance(torch.bfloat16, head_dim, (warps, slices)) in decode.INSTANCES
            assert decode.shared_mem(head_dim, (warps, slices)) <= 227 * 1024


@gpu
@pytest.mark.parametrize("backend, queries, paged", [("decode", 1, False), ("decode", 4, True), ("flash", 40, False)],
                         ids=["decode", "decode-paged", "flash"])
def test_cuda_graph_replays_with_new_lengths(gen, backend, queries, paged):
    """One step captured with torch.cuda.graph, max_seqlen_* as upper
    bounds, replayed with new key lengths and new queries in the same
    buffers: each replay equals the eager call on the same data."""
    heads, heads_kv, head_dim, batch, capacity, page_size = 8, 2, 128, 4, 2048, 64
    q = reference.randn(gen, batch * queries, heads, head_dim, dtype=torch.bfloat16, device="cuda")
    cu_q = reference.cu_seqlens([queries] * batch, "cuda")
    used = torch.zeros(batch, dtype=torch.int32, device="cuda")
    if paged:
        pages = batch * capacity // page_size
        k = reference.randn(gen, pages, page_size, heads_kv, head_dim, dtype=torch.bfloat16, device="cuda")
        v = reference.randn(gen, pages, page_size, heads_kv, head_dim, dtype=torch.bfloat16, device="cuda")
        table = torch.randperm(pages, generator=gen).int().view(batch, -1).cuda()
        keys = dict(cu_seqlens_k=None, block_table=table)
    else:
        k = reference.randn(gen, batch * capacity, heads_kv, head_dim, dtype=torch.bfloat16, device="cuda")
        v = reference.randn(gen, batch * capacity, heads_kv, head_dim, dtype=torch.bfloat16, device="cuda")
        keys = dict(cu_seqlens_k=torch.arange(batch + 1, dtype=torch.int32, device="cuda") * capacity)

    def step():
        with varattn.use_backends(backend):
            return varattn.varlen_attention(q, k, v, cu_seqlens_q=cu_q, max_seqlen_q=queries, max_seqlen_k=capacity,
                                            causal=True, causal_align="lower_right", seqused_k=used, **keys)

    used.fill_(capacity)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # compiles and warms up outside the capture
        step()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = step()
    for lengths in ([1, 2047, 300, 0], [2048, 5, 1000, 64], [queries, 700, 2048, 129]):
        used.copy_(torch.tensor(lengths, dtype=torch.int32))
        q.copy_(reference.randn(gen, *q.shape, dtype=torch.bfloat16, device="cuda"))
        graph.replay()
        eager = step()
        torch.cuda.synchronize()
        assert torch.equal(captured, eager), lengths


@gpu
def test_dropout_is_refused_under_capture(gen):
    q, k, v, cu_q, cu_k = reference.packed_inputs(gen, [20, 30], [20, 30], 4, 4, 64, dtype=torch.float16,
                                                  device="cuda")
    varattn.varlen_attention(q, k, v, cu_q, cu_k, 30, 30, dropout_p=0.1)  # compiled outside the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with pytest.raises(RuntimeError, match="not supported under CUDA graph capture"):
        with torch.cuda.graph(graph):
            varattn.varlen_attention(q, k, v, cu_q, cu_k, 30, 30, dropout_p=0.1)
