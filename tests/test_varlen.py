"""varlen_attention against the float64 reference, on the CPU (math backend) and, marked gpu, on CUDA."""
from __future__ import annotations

import pytest
import torch

import reference
import varattn
from conftest import LSE_TOLERANCE, TOLERANCE
from varattn.backends import fused_cpu

MASKS = [
    dict(),
    dict(causal=True),
    dict(causal=True, causal_align="lower_right"),
    dict(window=(3, 0)),
    dict(window=(2, 5), causal_align="lower_right"),
    dict(causal=True, window=(4, -1)),
    dict(window=(-1, 2)),
]
HEADS = [(4, 4), (4, 2), (6, 1)]


def check(gen, dtype, device, *, heads=(4, 2), head_dim=16, head_dim_v=None, batch=6, longest=19, same_lengths=False,
          bias=None, seqused=False, backend=None, lengths=None, **options):
    """lengths: (lengths_q, lengths_k), default drawn (0, 1 and `longest` among them)."""
    heads_q, heads_kv = heads
    if lengths is not None:
        (lengths_q, lengths_k), batch = lengths, len(lengths[0])
    else:
        lengths_q = reference.lengths(gen, batch, longest)
        lengths_k = lengths_q if same_lengths else reference.lengths(gen, batch, longest + 5)
    q, k, v, cu_q, cu_k = reference.packed_inputs(gen, lengths_q, lengths_k, heads_q, heads_kv, head_dim, head_dim_v,
                                                  dtype, device)
    used_q = used_k = None
    if seqused:  # slots larger than their sequences: only the first rows of each are used
        used_q = torch.tensor([n // 2 for n in lengths_q], dtype=torch.int32, device=device)
        used_k = torch.tensor([(n + 1) // 2 for n in lengths_k], dtype=torch.int32, device=device)
    attn_bias = None
    if bias is not None:
        shape = {"bool": (batch, 1, max(lengths_q), max(lengths_k)), "additive": (1, heads_q, max(lengths_q) + 3, max(lengths_k)),
                 "keys": (batch, 1, 1, max(lengths_k))}[bias]
        attn_bias = (torch.rand(shape, generator=gen) > 0.3 if bias in ("bool", "keys")
                     else reference.randn(gen, *shape, dtype=dtype)).to(device)
    expected, expected_lse = reference.attention(q, k, v, cu_q, cu_k, seqused_q=used_q, seqused_k=used_k,
                                                 attn_bias=attn_bias, **options)
    with (varattn.use_backends(backend) if backend else varattn.use_backends(*varattn.Backend)):
        out, lse = varattn.varlen_attention(q, k, v, cu_q, cu_k, max(lengths_q), max(lengths_k), attn_bias=attn_bias,
                                            seqused_q=used_q, seqused_k=used_k, return_lse=True, **options)
    assert out.dtype == dtype and out.shape == (q.shape[0], heads_q, head_dim_v or head_dim)
    assert reference.relative_error(out, expected) <= TOLERANCE[dtype]
    assert reference.lse_error(lse, expected_lse) <= LSE_TOLERANCE[dtype]


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("mask", MASKS, ids=str)
def test_masks_cpu(gen, dtype, mask):
    check(gen, dtype, "cpu", **mask)


@pytest.mark.parametrize("heads", HEADS, ids=str)
@pytest.mark.parametrize("head_dim", [8, 24, 64])
def test_heads_and_head_dims_cpu(gen, heads, head_dim):
    check(gen, torch.float64, "cpu", heads=heads, head_dim=head_dim, causal=True)


@pytest.mark.parametrize("bias", ["bool", "additive", "keys"])
@pytest.mark.parametrize("mask", [dict(), dict(causal=True, causal_align="lower_right")], ids=str)
def test_bias_cpu(gen, bias, mask):
    check(gen, torch.float64, "cpu", bias=bias, **mask)


def test_seqused_scale_and_head_dim_v_cpu(gen):
    check(gen, torch.float64, "cpu", seqused=True, scale=0.3, head_dim_v=40, causal=True)


def test_lq_longer_than_lk_lower_right_rows_see_nothing(gen):
    q, k, v, cu_q, cu_k = reference.packed_inputs(gen, [6], [2], 2, 2, 8, dtype=torch.float64)
    out, lse = varattn.varlen_attention(q, k, v, cu_q, cu_k, 6, 2, causal=True, causal_align="lower_right",
                                        return_lse=True)
    assert torch.equal(out[:4], torch.zeros_like(out[:4])) and torch.isinf(lse[:, :4]).all()
    assert not torch.isnan(out).any()


def test_fully_masked_rows_give_zeros_not_nan(gen):
    q, k, v, cu_q, cu_k = reference.packed_inputs(gen, [3], [4], 2, 2, 8, dtype=torch.float64)
    mask = torch.ones(1, 1, 3, 4, dtype=torch.bool)
    mask[0, 0, 1] = False
    out, lse = varattn.varlen_attention(q, k, v, cu_q, cu_k, 3, 4, attn_bias=mask, return_lse=True)
    assert torch.equal(out[1], torch.zeros_like(out[1])) and torch.isinf(lse[:, 1]).all()


def test_max_seqlen_computed_when_left_out(gen):
    q, k, v, cu_q, cu_k = reference.packed_inputs(gen, [5, 0, 9], [3, 2, 7], 2, 1, 8, dtype=torch.float64)
    expected, _ = reference.attention(q, k, v, cu_q, cu_k)
    assert reference.relative_error(varattn.varlen_attention(q, k, v, cu_q, cu_k), expected) <= 1e-10


def test_math_workspace_chunks_cpu(gen, monkeypatch):
    monkeypatch.setattr(varattn.backends.math, "WORKSPACE_BYTES", 4 * 1024)
    check(gen, torch.float64, "cpu", causal=True, longest=40)


# ---------------------------------------------------------------------------
# The math backend's two CPU routes: torch's fused kernel for what
# varattn/backends/fused_cpu.py says it can express, math_cpu's own loop for
# the rest (forced here by making fused_cpu decline every call).

ROUTES = ["fused", "math"]
ROUTE_MASKS = [dict(), dict(causal=True), dict(causal=True, causal_align="lower_right")]


@pytest.fixture
def kernel_calls(monkeypatch):
    """How many times torch's fused forward and backward kernels ran."""
    calls = {"forward": 0, "backward": 0}

    def counted(name, op):
        def run(*args, **kwargs):
            calls[name] += 1
            return op(*args, **kwargs)
        return run
    monkeypatch.setattr(fused_cpu, "FORWARD", counted("forward", fused_cpu.FORWARD))
    monkeypatch.setattr(fused_cpu, "BACKWARD", counted("backward", fused_cpu.BACKWARD))
    return calls


def force_route(monkeypatch, route: str) -> None:
    if route == "math":
        monkeypatch.setattr(fused_cpu, "declined", lambda params, bias_grad=False: "forced: math_cpu's own path")


@pytest.mark.parametrize("route", ROUTES)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("mask", ROUTE_MASKS, ids=str)
def test_cpu_routes(gen, kernel_calls, monkeypatch, route, dtype, mask):
    """Lengths 0, 1 and Lq != Lk in one call: lower-right rows that see no key
    (Lk < Lq), lower-right Lq < Lk sequences left to math_cpu, GQA and MQA."""
    force_route(monkeypatch, route)
    heads = HEADS[hash(str(mask)) % 3]
    check(gen, dtype, "cpu", heads=heads, batch=8, head_dim=32, longest=40, **mask)
    assert (kernel_calls["forward"] > 0) == (route == "fused")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("lengths", [(33, 33), (40, 17), (17, 40), (1, 9)], ids=str)
@pytest.mark.parametrize("mask", ROUTE_MASKS, ids=str)
@pytest.mark.parametrize("batch", [1, 3])
def test_cpu_fused_dense_batch(gen, kernel_calls, dtype, lengths, mask, batch):
    """Every sequence of one length (a dense batch): one kernel call on views
    (lower-right causal with 1 < Lq < Lk through an additive mask)."""
    len_q, len_k = lengths
    check(gen, dtype, "cpu", heads=(4, 2), head_dim=32, lengths=([len_q] * batch, [len_k] * batch), **mask)
    assert kernel_calls["forward"] == 1


@pytest.mark.parametrize("gather_below", [0, 1000], ids=["one-by-one", "gathered"])
@pytest.mark.parametrize("mask", ROUTE_MASKS[:2], ids=str)
@pytest.mark.parametrize("bias", [None, "bool", "additive", "keys"])
def test_cpu_fused_unevenly_spaced_sequences(gen, kernel_calls, monkeypatch, gather_below, mask, bias):
    """Sequences of one length that do not lie evenly spaced: gathered into
    one call, or called one by one on views (fused_cpu.GATHER_BELOW); their
    bias rows (per sequence or broadcast) with them."""
    monkeypatch.setattr(fused_cpu, "GATHER_BELOW", gather_below)
    lengths = [3, 70, 3, 0, 70, 3, 1, 65, 3, 70]
    check(gen, torch.float32, "cpu", heads=(4, 1), head_dim=32, lengths=(lengths, lengths), bias=bias, **mask)
    shapes = len(set(n for n in lengths if n))  # 3, 70, 1, 65
    assert kernel_calls["forward"] == (shapes if gather_below else sum(1 for n in lengths if n))


@pytest.mark.parametrize("seqused", [False, True])
def test_cpu_fused_seqused_and_scale(gen, kernel_calls, seqused):
    check(gen, torch.float32, "cpu", seqused=seqused, scale=0.3, causal=True, batch=7, longest=30)
    assert kernel_calls["forward"] > 0


@pytest.mark.parametrize("layout", ["bhld", "blhd"])
@pytest.mark.parametrize("causal", [False, True])
def test_cpu_fused_padded_front_end(gen, kernel_calls, layout, causal):
    """varattn.attention on a dense (B, H, L, D) batch: one kernel call, as torch SDPA."""
    q, k, v = (reference.randn(gen, 3, 21, 4, 16) for _ in range(3))
    if layout == "bhld":  # transposed views of (B, L, H, D), as attention layers make them
        q, k, v = (x.transpose(1, 2) for x in (q, k, v))
    out = varattn.attention(q, k, v, layout=layout, causal=causal)
    bhld = (lambda x: x) if layout == "bhld" else (lambda x: x.transpose(1, 2))
    expected = torch.nn.functional.scaled_dot_product_attention(*(bhld(x).double() for x in (q, k, v)),
                                                                is_causal=causal)
    assert reference.relative_error(bhld(out), expected) <= TOLERANCE[torch.float32]
    assert kernel_calls["forward"] == 1


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
@pytest.mark.parametrize("bias", ["bool", "additive", "keys"])
@pytest.mark.parametrize("mask", ROUTE_MASKS, ids=str)
def test_cpu_fused_bias(gen, kernel_calls, dtype, bias, mask):
    """Masks and biases through the kernel's additive mask, rows they hide
    entirely (lse -inf, not the kernel's 0) among them; lower-right 1 < Lq < Lk
    sequences with a bias stay on math_cpu."""
    check(gen, dtype, "cpu", bias=bias, batch=8, longest=30, **mask)
    assert kernel_calls["forward"] > 0


def test_cpu_fused_bias_dense_and_fully_masked_rows(gen, kernel_calls):
    q, k, v, cu_q, cu_k = reference.packed_inputs(gen, [6, 6], [9, 9], 4, 2, 16)
    mask = torch.rand(2, 1, 6, 9, generator=gen) > 0.5
    mask[0, 0, 2] = False  # sees no key
    mask[1, 0, 4] = False
    mask[1, 0, 4, 7] = True  # sees one key, which causal hides
    for causal in (False, True):
        expected, expected_lse = reference.attention(q, k, v, cu_q, cu_k, attn_bias=mask, causal=causal)
        out, lse = varattn.varlen_attention(q, k, v, cu_q, cu_k, 6, 9, attn_bias=mask, causal=causal,
                                            return_lse=True)
        assert reference.relative_error(out, expected) <= TOLERANCE[torch.float32]
        assert reference.lse_error(lse, expected_lse) <= LSE_TOLERANCE[torch.float32]
        assert torch.isinf(lse[:, 2]).all() and (torch.isinf(lse[:, 6 + 4]).all() == causal)
    assert kernel_calls["forward"] == 2


def test_cpu_fused_bool_mask_within_the_workspace(gen, kernel_calls, monkeypatch):
    """A bool mask becomes an additive one per call: past the math backend's
    workspace, one call per sequence."""
    monkeypatch.setattr(varattn.backends.math, "WORKSPACE_BYTES", 4 * 20 * 20 * 4)  # 4 masks of 20 x 20 fp32
    lengths = ([20] * 5, [20] * 5)
    check(gen, torch.float32, "cpu", bias="bool", lengths=lengths, causal=True)
    assert kernel_calls["forward"] == 5


@pytest.mark.parametrize("option", [dict(window=(3, 0)), dict(head_dim_v=24)], ids=str)
def test_cpu_fused_declines(gen, kernel_calls, option):
    """What torch's kernel cannot express keeps math_cpu's path, with the reason fused_cpu.declined gives."""
    check(gen, torch.float32, "cpu", causal=True, **option)
    assert kernel_calls["forward"] == 0


def test_cpu_fused_declines_dropout(gen, kernel_calls):
    q, k, v, cu_q, cu_k = reference.packed_inputs(gen, [5, 7], [5, 7], 2, 2, 16)
    varattn.varlen_attention(q, k, v, cu_q, cu_k, 7, 7, dropout_p=0.3)
    assert kernel_calls["forward"] == 0


# ---------------------------------------------------------------------------
# CUDA: the math kernels for every dtype, the flash kernels for fp16/bf16.

@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("head_dim", [32, 40, 64, 128, 256, 512])
@pytest.mark.parametrize("mask", MASKS[:4], ids=str)
def test_math_kernels(gen, dtype, head_dim, mask):
    check(gen, dtype, "cuda", backend="math", head_dim=head_dim, heads=(4, 2), longest=70, **mask)


@pytest.mark.gpu
@pytest.mark.parametrize("bias", ["bool", "additive", "keys"])
def test_math_kernels_bias_seqused(gen, bias):
    check(gen, torch.float32, "cuda", backend="math", bias=bias, seqused=True, causal=True)


@pytest.mark.gpu
def test_math_kernels_workspace_chunks(gen, monkeypatch):
    monkeypatch.setattr(varattn.backends.math, "WORKSPACE_BYTES", 64 * 1024)
    check(gen, torch.float32, "cuda", backend="math", longest=300, batch=9, causal=True)


FLASH_MASKS = MASKS + [dict(window=(37, 5)), dict(causal=True, causal_align="lower_right", window=(100, -1))]


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("head_dim", [32, 64, 96, 128, 192, 256])
@pytest.mark.parametrize("mask", FLASH_MASKS, ids=str)
def test_flash(gen, dtype, head_dim, mask):
    heads = [(8, 8), (8, 2), (8, 1), (16, 2)][hash(str(mask)) % 4]  # GQA 1, 4, 8 and MQA across the matrix
    check(gen, dtype, "cuda", backend="flash", head_dim=head_dim, heads=heads, batch=7, longest=700, **mask)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("mask", FLASH_MASKS, ids=str)
def test_flash_head_dim_v_differs_on_hopper(gen, dtype, mask):
    from varattn.cuda import loader
    if loader.arch_of(torch.device("cuda")) != "sm_90a":
        pytest.skip("head_dim_v != head_dim runs on Hopper only")
    heads = [(8, 8), (8, 2), (16, 1)][hash(str(mask)) % 3]
    check(gen, dtype, "cuda", backend="flash", head_dim=192, head_dim_v=128, heads=heads, batch=7, longest=700, **mask)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("mask", FLASH_MASKS, ids=str)
@pytest.mark.parametrize("one_sm", [False, True], ids=["grid", "one-sm"])
def test_flash_short_queries(gen, monkeypatch, dtype, mask, one_sm):
    """Query sequences of at most SHORT_QUERIES rows (decode, speculative
    decoding, many short sequences) against longer keys: the short-query
    tiles on Hopper, also with one SM's CTAs looping over every tile."""
    from varattn.backends import flash
    if one_sm:
        monkeypatch.setattr(flash.loader, "multiprocessors", lambda index: 1)
    heads = [(8, 8), (8, 2), (16, 1)][hash(str(mask)) % 3]
    lengths_q = reference.lengths(gen, 9, flash.SHORT_QUERIES)
    lengths_k = reference.lengths(gen, 9, 700)
    check(gen, dtype, "cuda", backend="flash", head_dim=128, heads=heads, lengths=(lengths_q, lengths_k), **mask)


@pytest.mark.gpu
@pytest.mark.parametrize("head_dim", [32, 64, 96, 128, 192, 256])
@pytest.mark.parametrize("mask", FLASH_MASKS, ids=str)
@pytest.mark.parametrize("packed", [True, False], ids=["packed", "per-head"])
def test_flash_packed_gqa(gen, monkeypatch, request, head_dim, mask, packed):
    """Packed GQA on Hopper (a tile's rows span the query heads of one
    key/value head) and one head per tile, at group sizes that divide the
    tile (2, 4, 8, 16 = MQA) and one that does not (3: never packed); long
    and short query sequences, Lq != Lk, lengths 0 and 1; one SM's CTAs
    looping over every tile."""
    from varattn.backends import flash
    if not packed:
        monkeypatch.setattr(flash, "packs_gqa", lambda kernel, group: False)
    monkeypatch.setattr(flash.loader, "multiprocessors", lambda index: 1)
    flash._forward_kernels.cache_clear()
    request.addfinalizer(flash._forward_kernels.cache_clear)  # also when a check fails
    heads = [(8, 4), (8, 2), (16, 2), (16, 1), (6, 2)][FLASH_MASKS.index(mask) % 5]
    check(gen, torch.bfloat16, "cuda", backend="flash", head_dim=head_dim, heads=heads, batch=7, longest=300, **mask)
    lengths_q = reference.lengths(gen, 9, 40)
    check(gen, torch.float16, "cuda", backend="flash", head_dim=head_dim, heads=heads,
          lengths=(lengths_q, reference.lengths(gen, 9, 500)), **mask)


def hopper_or_skip():
    from varattn.cuda import loader
    if loader.arch_of(torch.device("cuda")) != "sm_90a":
        pytest.skip("the staged output is the Hopper forward's")


def recorded_out_maps(monkeypatch):
    """[(kernel, whether it got an output map)] of each Hopper forward call from here on."""
    from varattn.backends import flash
    calls, made = [], flash.out_map

    def recording(kernel, out, group):
        found = made(kernel, out, group)
        calls.append((kernel, found is not None))
        return found
    monkeypatch.setattr(flash, "out_map", recording)
    return calls


# Around multiples of 64 (a consumer warpgroup's rows), 0 and 1; keys otherwise.
STAGED_LENGTHS_Q = [0, 1, 63, 64, 65, 127, 128, 129, 191, 300]
STAGED_LENGTHS_K = [7, 0, 64, 130, 1, 127, 260, 64, 191, 300]


@pytest.mark.gpu
@pytest.mark.parametrize("head_dim, head_dim_v", [(32, 32), (64, 64), (96, 96), (128, 128), (192, 192), (192, 128),
                                                  (256, 256)])
@pytest.mark.parametrize("mask", FLASH_MASKS, ids=str)
@pytest.mark.parametrize("packed", [True, False], ids=["packed", "per-head"])
def test_flash_staged_output(gen, monkeypatch, request, head_dim, head_dim_v, mask, packed):
    """The Hopper forward's output through a staging tile and the copy engine
    (a consumer warpgroup whose 64 rows all belong to the sequence) beside
    the rows written from registers (a warpgroup that crosses the sequence's
    end), every instance with staging (256 has none and must say so), packed
    GQA and one head per tile, lengths around multiples of 64 with 0 and 1,
    Lq != Lk, one SM's CTAs looping over every tile so that a staging tile is
    reused. NaN-poisoned outputs catch a row left unwritten; with seqused the
    rows past each sequence's used rows must stay zero, which a whole box
    stored past a sequence's end would break."""
    from varattn.backends import flash
    hopper_or_skip()
    if not packed:
        monkeypatch.setattr(flash, "packs_gqa", lambda kernel, group: False)
    monkeypatch.setattr(flash.loader, "multiprocessors", lambda index: 1)
    flash._forward_kernels.cache_clear()
    request.addfinalizer(flash._forward_kernels.cache_clear)
    calls = recorded_out_maps(monkeypatch)
    heads = [(8, 2), (16, 1), (8, 8), (16, 4), (6, 2)][FLASH_MASKS.index(mask) % 5]
    lengths = (STAGED_LENGTHS_Q, STAGED_LENGTHS_K)
    check(gen, torch.bfloat16, "cuda", backend="flash", head_dim=head_dim, head_dim_v=head_dim_v, heads=heads,
          lengths=lengths, **mask)
    check(gen, torch.float16, "cuda", backend="flash", head_dim=head_dim, head_dim_v=head_dim_v, heads=heads,
          lengths=lengths, seqused=True, **mask)
    assert calls and all(stored == kernel.staged_out for kernel, stored in calls)
    assert all(kernel.staged_out == (head_dim != 256) for kernel, _ in calls)
    if packed and heads[0] // heads[1] in (2, 4, 8, 16):
        assert all(kernel.packed for kernel, _ in calls)


@pytest.mark.gpu
@pytest.mark.parametrize("aligned", [True, False], ids=["aligned", "4-bytes-off"])
@pytest.mark.parametrize("mask", [dict(), dict(causal=True, causal_align="lower_right")], ids=str)
def test_flash_staged_output_into_the_callers_buffer(gen, monkeypatch, aligned, mask):
    """A caller-provided `out` (NaN-poisoned): 16-byte aligned, stored through
    the copy engine; 4 bytes past that, which no tensor map can describe
    (cuTensorMapEncodeTiled wants 16), written from registers instead."""
    from varattn.backends import flash
    from varattn.params import build_params
    hopper_or_skip()
    calls = recorded_out_maps(monkeypatch)
    heads, head_dim = (8, 2), 128
    q, k, v, cu_q, cu_k = reference.packed_inputs(gen, STAGED_LENGTHS_Q, STAGED_LENGTHS_K, *heads, head_dim,
                                                  dtype=torch.bfloat16, device="cuda")
    size = q.shape[0] * heads[0] * head_dim
    offset = 0 if aligned else 2  # elements
    buffer = torch.empty(size + 8, dtype=q.dtype, device="cuda")
    out = buffer[offset:offset + size].view(q.shape[0], heads[0], head_dim)
    assert (out.data_ptr() % 16 == 0) == aligned
    params = build_params(q, k, v, cu_q, cu_k, max(STAGED_LENGTHS_Q), max(STAGED_LENGTHS_K), return_lse=True, out=out,
                          **mask)
    got, lse = flash.forward(params)
    assert got.data_ptr() == out.data_ptr()
    assert [stored for _, stored in calls] == [aligned]
    expected, expected_lse = reference.attention(q, k, v, cu_q, cu_k, **mask)
    assert reference.relative_error(out, expected) <= TOLERANCE[torch.bfloat16]
    assert reference.lse_error(lse, expected_lse) <= LSE_TOLERANCE[torch.bfloat16]


@pytest.mark.gpu
@pytest.mark.parametrize("head_dim", [64, 128])
def test_flash_seqused_and_long_sequences(gen, head_dim):
    check(gen, torch.bfloat16, "cuda", backend="flash", head_dim=head_dim, seqused=True, batch=4, longest=2100,
          causal=True)


@pytest.mark.gpu
@pytest.mark.parametrize("head_dim", [32, 64, 96, 128, 192, 256])
@pytest.mark.parametrize("mask", [dict(), dict(causal=True, causal_align="lower_right"), dict(window=(37, 5))], ids=str)
def test_flash_persistent_grid_on_one_sm(gen, monkeypatch, head_dim, mask):
    """The Hopper forward's CTAs loop over the tiles (elsewhere, a CTA per
    tile): on one SM a CTA goes through tens of tiles of every kind, empty
    sequences' (no key tiles) among them, its buffers' phases carried over."""
    from varattn.backends import flash
    monkeypatch.setattr(flash.loader, "multiprocessors", lambda index: 1)
    check(gen, torch.bfloat16, "cuda", backend="flash", head_dim=head_dim, heads=(4, 2), batch=9, longest=300, **mask)
