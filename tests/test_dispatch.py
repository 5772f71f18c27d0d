"""Dispatch: which backend runs, restricting the set, and the reasons when none can."""
from __future__ import annotations

import dataclasses
import struct

import pytest
import torch

import reference
import varattn
from conftest import allow_tf32
from varattn import Backend, dispatch
from varattn.cuda import loader
from varattn.backends import REGISTRY, efficient, flash
from varattn.params import AttentionParams, Checked, build_params


def small(gen, dtype=torch.float32):
    return reference.packed_inputs(gen, [3, 5], [4, 5], 4, 2, 16, dtype=dtype)


def test_explain_cpu(gen):
    explanation = varattn.explain(*small(gen))
    assert explanation.chosen == Backend.MATH
    for backend in (Backend.DECODE, Backend.FLASH, Backend.EFFICIENT):
        assert any("cuda" in reason for reason in explanation.reasons[backend])
        assert f"  {backend.value}: runs on cuda" in str(explanation)
    assert "backend: math" in str(explanation)


def test_explain_front_end_arguments(gen):
    q = reference.randn(gen, 2, 4, 6, 16)
    assert varattn.explain(q, q, q, lengths=[6, 2], causal=True).chosen == Backend.MATH


def test_use_backends_restricts_and_restores(gen):
    inputs = small(gen)
    with varattn.use_backends("flash", Backend.EFFICIENT):
        with pytest.raises(varattn.NoBackendError) as raised:
            varattn.varlen_attention(*inputs)
        message = str(raised.value)
        for backend in Backend:
            assert backend.value in message
        assert "not allowed by use_backends()" in message
        assert isinstance(raised.value, NotImplementedError)
    assert varattn.explain(*inputs).chosen == Backend.MATH
    with pytest.raises(RuntimeError):
        with varattn.use_backends("math"):
            raise RuntimeError("inside")
    assert varattn.explain(*inputs).chosen == Backend.MATH


def test_use_backends_bad_name():
    with pytest.raises(ValueError, match="use_backends"):
        with varattn.use_backends("fastest"):
            pass


def test_dropout_goes_to_math_on_the_cpu_with_reasons(gen):
    explanation = varattn.explain(*small(gen), dropout_p=0.2)
    assert explanation.chosen == Backend.MATH
    assert any("dropout_p" in why for why in explanation.reasons[Backend.FLASH])


def test_device_checks_toggle():
    varattn.set_device_checks(True)
    assert varattn.checks.device_checks_enabled()
    varattn.set_device_checks(False)
    assert not varattn.checks.device_checks_enabled()


def test_priority_order():
    assert list(REGISTRY) == [Backend.DECODE, Backend.FLASH, Backend.EFFICIENT, Backend.MATH]


# ---------------------------------------------------------------------------
# Decisions on CUDA without a GPU: the params of a CPU call, seen as on a CUDA
# device whose properties the test chooses.

class OnCuda:
    """`params` as reasons() see them were its tensors on CUDA device 0."""
    device = torch.device("cuda", 0)

    def __init__(self, params):
        self._params = params

    def __getattr__(self, name):
        return getattr(self._params, name)


@pytest.fixture
def fake_device(monkeypatch):
    """A CUDA device that says `capability` and `shared_kb` of shared memory a
    block (an H100: sm_90, 227 KB, until set again), with CuPy present."""
    def describe(capability=(9, 0), shared_kb=227):
        monkeypatch.setattr(loader, "compute_capability", lambda index: capability)
        monkeypatch.setattr(loader, "shared_memory_per_block", lambda index: shared_kb * 1024)
        monkeypatch.setattr(loader, "cupy_missing_reason", lambda: None)
    describe()
    return describe


def on_cuda(gen, dtype=torch.float16, head_dim=64, *, grad=False, bias=None, queries=20, **options):
    """The explanation of a call with these inputs made on the fake device;
    `queries`: the longest query sequence (at most 16: a decode call)."""
    q, k, v, cu_q, cu_k = reference.packed_inputs(gen, [3, queries], [4, 25], 4, 2, head_dim, dtype=dtype)
    attn_bias = {None: None, "bool": torch.ones(1, 1, queries, 25, dtype=torch.bool),
                 "additive": torch.zeros(2, 4, queries, 25, dtype=dtype, requires_grad=grad)}[bias]
    params = build_params(q.requires_grad_(grad), k, v, cu_q, cu_k, queries, 25, attn_bias=attn_bias, **options)
    return dispatch.explain_params(OnCuda(params))


@pytest.mark.parametrize("dtype, head_dim, call, chosen", [
    (torch.float16, 64, dict(), Backend.FLASH),
    (torch.bfloat16, 128, dict(grad=True, deterministic=True), Backend.FLASH),
    (torch.float16, 64, dict(bias="bool"), Backend.EFFICIENT),
    (torch.bfloat16, 64, dict(bias="additive", grad=True), Backend.EFFICIENT),
    (torch.float16, 64, dict(dropout_p=0.1), Backend.EFFICIENT),
    (torch.float32, 64, dict(causal=True), Backend.EFFICIENT),
    (torch.float32, 64, dict(deterministic=True), Backend.EFFICIENT),  # the forward has no atomics
    (torch.float16, 40, dict(), Backend.EFFICIENT),
    (torch.float16, 64, dict(scale=-0.5), Backend.EFFICIENT),  # flash folds the scale into its max, efficient not
    (torch.float16, 8, dict(window=(4, 0)), Backend.EFFICIENT),
    (torch.bfloat16, 256, dict(grad=True), Backend.EFFICIENT),
    (torch.float64, 64, dict(), Backend.MATH),
    (torch.float16, 12, dict(), Backend.MATH),
    (torch.float16, 264, dict(), Backend.MATH),
    (torch.float32, 64, dict(grad=True, deterministic=True), Backend.MATH),
    (torch.bfloat16, 256, dict(grad=True, deterministic=True), Backend.MATH),
], ids=str)
def test_decisions_on_cuda(gen, fake_device, dtype, head_dim, call, chosen):
    assert on_cuda(gen, dtype, head_dim, **call).chosen == chosen


@pytest.mark.parametrize("dtype, head_dim, call, chosen", [
    (torch.float16, 64, dict(), Backend.DECODE),
    (torch.bfloat16, 128, dict(grad=True, causal=True, causal_align="lower_right"), Backend.DECODE),
    (torch.bfloat16, 256, dict(), Backend.DECODE),
    (torch.bfloat16, 256, dict(grad=True), Backend.EFFICIENT),  # no flash backward at 256
    (torch.float16, 32, dict(), Backend.FLASH),
    (torch.float16, 64, dict(bias="bool"), Backend.EFFICIENT),
    (torch.float32, 64, dict(), Backend.EFFICIENT),
], ids=str)
def test_decisions_on_cuda_for_short_queries(gen, fake_device, dtype, head_dim, call, chosen):
    assert on_cuda(gen, dtype, head_dim, queries=4, **call).chosen == chosen


@pytest.mark.parametrize("capability, head_dims, grad, chosen, flash_says", [
    ((9, 0), (192, 128), False, Backend.FLASH, None),
    ((9, 0), (192, 128), True, Backend.MATH, "the backward needs head_dim_v == head_dim"),
    ((8, 0), (192, 128), False, Backend.MATH, "head_dim_v != head_dim runs on Hopper (sm_90a) only"),
    ((9, 0), (128, 64), False, Backend.MATH, "(head_dim, head_dim_v) (128, 64) differ: the forward takes (192, 128) only"),
], ids=str)
def test_head_dim_v_differs_on_cuda(gen, fake_device, capability, head_dims, grad, chosen, flash_says):
    """flash's forward takes D_v != D on Hopper at the pairs it has kernels for; elsewhere, and with a
    backward, the call goes to math (efficient takes one head dim) and flash says why."""
    fake_device(capability=capability)
    q, k, v, cu_q, cu_k = reference.packed_inputs(gen, [3, 5], [4, 5], 4, 2, *head_dims, dtype=torch.bfloat16)
    explanation = dispatch.explain_params(OnCuda(build_params(q.requires_grad_(grad), k, v, cu_q, cu_k, 5, 5)))
    assert explanation.chosen == chosen
    if flash_says:
        assert any(flash_says in why for why in explanation.reasons[Backend.FLASH])


@pytest.mark.parametrize("dtype, head_dim, call, expected", [
    (torch.float64, 64, dict(), "dtype torch.float64 not in torch.float16, torch.bfloat16, torch.float32"),
    (torch.float16, 12, dict(), "head_dim 12 is not a multiple of 8"),
    (torch.float16, 264, dict(), "head_dim 264 > 256"),
    (torch.float32, 64, dict(grad=True, deterministic=True), "deterministic=True"),
], ids=str)
def test_efficient_reasons(gen, fake_device, dtype, head_dim, call, expected):
    explanation = on_cuda(gen, dtype, head_dim, **call)
    assert explanation.chosen == Backend.MATH
    assert any(expected in why for why in explanation.reasons[Backend.EFFICIENT])
    assert "  efficient: " in str(explanation)


def test_efficient_reasons_on_the_cpu_too(gen):
    """What depends on the call only, not on the device, is said for CPU inputs as well."""
    q, k, v, cu_q, cu_k = reference.packed_inputs(gen, [3, 5], [4, 5], 4, 2, 12, dtype=torch.float64)
    why = varattn.explain(q.requires_grad_(), k, v, cu_q, cu_k, deterministic=True).reasons[Backend.EFFICIENT]
    assert any("runs on cuda" in r for r in why)
    for expected in ("dtype torch.float64", "head_dim 12 is not a multiple of 8", "deterministic=True"):
        assert any(expected in r for r in why), expected


def test_older_devices_and_missing_cupy(gen, fake_device, monkeypatch):
    fake_device(capability=(7, 5))
    assert any("needs sm_80 or newer, device is sm_75" in r for r in on_cuda(gen, bias="bool").reasons[Backend.EFFICIENT])
    fake_device()
    monkeypatch.setattr(loader, "cupy_missing_reason", lambda: "CuPy with NVRTC is needed")
    assert "CuPy with NVRTC is needed" in on_cuda(gen, bias="bool").reasons[Backend.EFFICIENT]


def test_shared_memory_on_a_smaller_device(gen, fake_device):
    """sm_86 offers 99 KB a block: fp16 at head_dim 256 fits the forward
    exactly, not with a bias tile nor the backward; fp32 at 256 neither."""
    fake_device(capability=(8, 6), shared_kb=99)
    assert on_cuda(gen, torch.float16, 256, dropout_p=0.1).chosen == Backend.EFFICIENT
    biased = on_cuda(gen, torch.float16, 256, bias="bool")
    assert any("the forward at head_dim 256" in r for r in biased.reasons[Backend.EFFICIENT])
    explanation = on_cuda(gen, torch.float16, 256, bias="bool", grad=True)
    assert explanation.chosen == Backend.MATH
    assert any("the backward at head_dim 256" in r and "shared memory" in r and "99 KB" in r
               for r in explanation.reasons[Backend.EFFICIENT])
    explanation = on_cuda(gen, torch.float32, 256)
    assert any("the forward at head_dim 256" in r for r in explanation.reasons[Backend.EFFICIENT])
    assert on_cuda(gen, torch.float32, 128, grad=True).chosen == Backend.MATH  # 150 KB backward
    fake_device(capability=(9, 0), shared_kb=227)
    assert on_cuda(gen, torch.float32, 256, grad=True).chosen == Backend.EFFICIENT


def test_misaligned_rows(gen, fake_device):
    q, k, v, cu_q, cu_k = reference.packed_inputs(gen, [3, 5], [4, 5], 4, 2, 64, dtype=torch.float32)
    shifted = torch.empty(q.numel() + 1)[1:].view(q.shape).copy_(q)  # data 4 bytes past a 16-byte boundary
    explanation = dispatch.explain_params(OnCuda(build_params(shifted, k, v, cu_q, cu_k, 5, 5)))
    assert explanation.chosen == Backend.MATH
    assert any("q rows are not 16-byte aligned" in r and "multiples of 4 elements" in r
               for r in explanation.reasons[Backend.EFFICIENT])


def test_choice_per_structure_follows_alignment(gen, fake_device):
    """A choice kept for a call's structure serves only calls whose tensors
    sit as aligned: a shifted q of the same structure is asked again."""
    q, k, v, cu_q, cu_k = reference.packed_inputs(gen, [3, 5], [4, 5], 4, 2, 64, dtype=torch.float32)
    shifted = torch.empty(q.numel() + 1)[1:].view(q.shape).copy_(q)
    structure, checked = ("test_choice_per_structure_follows_alignment", object()), set()
    for x, chosen in ((q, efficient), (shifted, REGISTRY[Backend.MATH]), (q, efficient)):
        params = build_params(x, k, v, cu_q, cu_k, 5, 5, structure=structure)
        checked.add(params.structure)
        assert dispatch.select(OnCuda(params)) is chosen
    assert len(checked) == 1 and isinstance(checked.pop(), Checked)  # one Checked serves the structure


def test_choice_per_structure_follows_torch_deterministic_setting(gen, fake_device):
    """torch.use_deterministic_algorithms, which no structure covers, turns
    a kept choice for a call with gradients from efficient to math."""
    q, k, v, cu_q, cu_k = reference.packed_inputs(gen, [3, 5], [4, 5], 4, 2, 64, dtype=torch.float32)
    structure = ("test_choice_per_structure_follows_torch_deterministic_setting", object())
    was = torch.are_deterministic_algorithms_enabled()
    try:
        for deterministic, chosen in ((False, efficient), (True, REGISTRY[Backend.MATH]), (False, efficient)):
            torch.use_deterministic_algorithms(deterministic)
            params = build_params(q.requires_grad_(), k, v, cu_q, cu_k, 5, 5, structure=structure)
            assert dispatch.select(OnCuda(params)) is chosen
    finally:
        torch.use_deterministic_algorithms(was)


def test_checked_structure_still_checks_what_it_does_not_cover(gen):
    """A structure checked once skips the checks it covers, not those of the
    values it leaves out: max_seqlen, and lengths' contents on the CPU."""
    q, k, v, cu_q, cu_k = reference.packed_inputs(gen, [3, 5], [4, 5], 4, 2, 16)
    tensors = object()

    def call(max_q=5, max_k=5, **options):
        options = dict(dict(causal=True, window=(2, 0)), **options)
        structure = ("test_checked_structure", tensors, *options.values())  # as the front ends key calls
        return build_params(q, k, v, cu_q, cu_k, max_q, max_k, structure=structure, **options)

    params, again = call(), call()
    assert again.structure == params.structure is not None
    for field in dataclasses.fields(params):
        mine, theirs = getattr(again, field.name), getattr(params, field.name)
        assert mine is theirs if isinstance(mine, torch.Tensor) else mine == theirs, field.name
    with pytest.raises(ValueError, match="max_seqlen_q must be a non-negative int"):
        call(max_q=-1)
    with pytest.raises(ValueError, match="max_seqlen_k is 3 but a k sequence has 5 rows"):
        call(max_k=3)
    with pytest.raises(ValueError, match="window must be a pair"):  # an unhashable option: checked in full
        call(window=[2])


def test_fp32_follows_torch_tf32_setting():
    with allow_tf32(False):
        assert efficient.passes(torch.float32) == 3
        assert efficient.passes(torch.bfloat16) == 1
    with allow_tf32(True):
        assert efficient.passes(torch.float32) == 1
    matmul = torch.backends.cuda.matmul
    if getattr(matmul, "fp32_precision", None) is not None:  # torch's newer setting
        was = matmul.fp32_precision
        try:
            matmul.fp32_precision = "tf32"
            assert efficient.passes(torch.float32) == 1
            matmul.fp32_precision = "ieee"
            assert efficient.passes(torch.float32) == 3
        finally:
            matmul.fp32_precision = was


def test_kernel_instances_and_their_launch():
    """The instances and shared memory kernels_cu/efficient_*.cu are written for."""
    fwd = efficient.forward_instance(torch.bfloat16, 72, 1)  # runs as head_dim 96
    bias_tile = lambda rows, row_bytes: rows * (row_bytes // 4 + 1) * 4 + rows * 4  # noqa: E731  BiasTile: words, offsets
    assert (fwd.name, fwd.shared_mem, fwd.bias_tile) == ("efficient_fwd<bf16_t, 96, 64, 64, 1>",
                                                         (64 + 128) * (96 + 8) * 2, bias_tile(64, 64 * 2))
    assert efficient.forward_instance(torch.float32, 8, 3).name == "efficient_fwd<float, 32, 64, 32, 3>"
    bwd = efficient.backward_instance(torch.float32, 256, 3)
    assert bwd.name == "efficient_bwd<float, 256, 64, 32, 3>" and bwd.column_splits == 4
    assert bwd.shared_mem == 2 * 64 * 260 * 4 + 2 * 32 * 260 * 4 + 64 * 36 * 4 + 2 * 32 * 4
    assert bwd.bias_tile == bias_tile(32, 64 * 4)
    for instance in (fwd, bwd):
        assert instance.name in loader.FAMILIES[instance.name.split("<")[0]]


@pytest.mark.parametrize("deterministic", [False, True], ids=["default", "deterministic"])
@pytest.mark.parametrize("head_dim, block_m", [(32, 128), (64, 128), (96, 64), (128, 64)])
def test_hopper_backward_instances(gen, fake_device, monkeypatch, head_dim, block_m, deterministic):
    """On Hopper every backward head dim runs kernels_cu/flash_bwd_hopper.cu,
    the deterministic mode too (its own instance): Q and dO copied in boxes of
    block_m rows (128 / swizzle atoms), K and V of 128, within the device's
    shared memory."""
    boxes = []
    monkeypatch.setattr(flash.tensor_map, "rows", lambda x, box_rows, box_heads=1: boxes.append(box_rows) or b"")
    q, k, v, _, _ = reference.packed_inputs(gen, [3, 5], [4, 5], 4, 2, head_dim, dtype=torch.bfloat16)
    params = dataclasses.make_dataclass("Params", ["dtype", "head_dim", "deterministic", "device", "q", "k", "v"])(
        torch.bfloat16, head_dim, deterministic, torch.device("cuda", 0), q, k, v)
    main = flash._backward_kernel(params, q)
    mode = str(deterministic).lower()
    assert (main.family, main.name, main.dq_name) == (
        "flash_bwd_hopper", f"flash_bwd_hopper<bf16_t, {head_dim}, {mode}>", f"flash_bwd_hopper_dq<bf16_t, {head_dim}>")
    assert boxes == [block_m, 128, 128, block_m] and flash.hopper_backward_block_m(head_dim) == block_m
    assert main.shared_mem <= 227 * 1024
    for name in (main.name, main.dq_name):
        assert name in loader.FAMILIES["flash_bwd_hopper"]


# Hopper forward instances by (head_dim, head_dim_v, consumer warpgroups): whether
# each consumer warpgroup has a 64-row output staging tile, and the dynamic
# shared memory (Q + 2 K + 3 V + staging + 1 KB to align, kernels_cu/flash_fwd_hopper.cu).
HOPPER_FORWARD_SHARED = {
    (32, 32, 1): (True, (64 + 2 * 128 + 3 * 128 + 64) * 128 + 1024),
    (64, 64, 1): (True, (64 + 2 * 128 + 3 * 128 + 64) * 128 + 1024),
    (96, 96, 2): (True, ((128 + 2 * 128 + 3 * 128) * 2 + 2 * 2 * 64) * 128 + 1024),
    (128, 128, 2): (True, ((128 + 2 * 128 + 3 * 128) * 2 + 2 * 2 * 64) * 128 + 1024),
    (192, 192, 2): (True, ((128 + 2 * 64 + 3 * 64) * 3 + 2 * 3 * 64) * 128 + 1024),
    (192, 128, 2): (True, ((128 + 2 * 64) * 3 + 3 * 64 * 2 + 2 * 2 * 64) * 128 + 1024),
    (256, 256, 2): (False, (128 + 2 * 64 + 3 * 64) * 4 * 128 + 1024),  # 64 KB of staging does not fit
    (128, 128, 1): (False, (64 + 2 * 64 + 3 * 64) * 2 * 128 + 1024),  # 16 KB more: not two CTAs per SM
}


def test_hopper_forward_staged_output():
    """The Hopper forward stages its output where the staging tiles still let
    2 / warpgroups CTAs share an SM (228 KB, 1 KB of it kept per CTA, 227 KB
    at most per CTA, 96 bytes of static barriers), and the instances say so."""
    kernels = [*flash.WGMMA.values(), *flash.WGMMA_SHORT.values()]
    assert len(kernels) == len(HOPPER_FORWARD_SHARED)
    for kernel in kernels:
        warpgroups = kernel.block_m // 64
        staged, shared = HOPPER_FORWARD_SHARED[kernel.head_dim, kernel.head_dim_v, warpgroups]
        assert (kernel.staged_out, kernel.shared_mem) == (staged, shared), kernel
        assert shared + 96 <= 227 * 1024 and kernel.ctas_per_sm * (shared + 96 + 1024) <= 228 * 1024
        for packed in (False, True):
            name = dataclasses.replace(kernel, packed=packed).instance(torch.bfloat16)
            assert name.endswith(f", {str(packed).lower()}, {str(staged).lower()}>")
            assert name in loader.FAMILIES["flash_fwd_hopper"]


def test_hopper_output_map(gen, monkeypatch):
    """The output's tensor map: boxes of a consumer warpgroup's 64 rows (packed:
    64 / G queries x G heads); none for an instance without staging, a group
    that does not divide 64, an `out` that is not packed rows, or one the
    copy engine cannot walk (each falls back on the kernel's writes from registers)."""
    boxes = []
    monkeypatch.setattr(flash.tensor_map, "rows", lambda x, box_rows, box_heads=1: boxes.append((box_rows, box_heads))
                        or b"map")
    kernel = flash.WGMMA[128, 128]
    out = torch.empty(10, 8, 128, dtype=torch.bfloat16)
    packed = dataclasses.replace(kernel, packed=True)
    assert [flash.out_map(kernel, out, 1), flash.out_map(packed, out, 4), flash.out_map(packed, out, 16)] == [b"map"] * 3
    assert boxes == [(64, 1), (16, 4), (4, 16)]
    assert flash.out_map(flash.WGMMA_SHORT[128, 128], out, 1) is None
    assert flash.out_map(flash.WGMMA[256, 256], torch.empty(10, 8, 256, dtype=torch.bfloat16), 1) is None
    assert flash.out_map(dataclasses.replace(packed, block_m=128), torch.empty(3, 128, 128), 128) is None
    assert flash.out_map(kernel, torch.empty(8, 10, 128, dtype=torch.bfloat16).transpose(0, 1), 1) is None
    assert len(boxes) == 3

    def refuse(x, box_rows, box_heads=1):
        raise flash.tensor_map.TensorMapError("strides")
    monkeypatch.setattr(flash.tensor_map, "rows", refuse)
    assert flash.out_map(kernel, out, 1) is None


def test_dropout_struct(gen):
    """kernels_cu/efficient_common.cuh's Dropout: seed, offset, threshold, 1 / (1 - p); threshold 0 without dropout."""
    inputs = reference.packed_inputs(gen, [3], [3], 2, 2, 8)
    params = dataclasses.replace(build_params(*inputs, dropout_p=0.25), dropout_state=(2**64 - 3, 12))
    *stream, scale = struct.unpack("<QQIf", efficient.dropout_args(params))
    assert stream == [2**64 - 3, 12, 2**30] and scale == pytest.approx(4 / 3)
    assert struct.unpack("<QQIf", efficient.dropout_args(build_params(*inputs))) == (0, 0, 0, 1.0)


# ---------------------------------------------------------------------------
# On a real GPU.

@pytest.mark.gpu
def test_choices_on_cuda(gen):
    short = reference.packed_inputs(gen, [3, 5], [4, 5], 4, 2, 64, dtype=torch.bfloat16, device="cuda")
    assert varattn.explain(*short).chosen == Backend.DECODE
    inputs = reference.packed_inputs(gen, [3, 20], [4, 20], 4, 2, 64, dtype=torch.bfloat16, device="cuda")
    assert varattn.explain(*inputs).chosen == Backend.FLASH
    mask = torch.ones(1, 1, 20, 20, dtype=torch.bool, device="cuda")
    assert varattn.explain(*inputs, attn_bias=mask).chosen == Backend.EFFICIENT
    assert varattn.explain(*inputs, dropout_p=0.1).chosen == Backend.EFFICIENT
    fp32 = reference.packed_inputs(gen, [3], [3], 2, 2, 64, device="cuda")
    explanation = varattn.explain(*fp32)
    assert explanation.chosen == Backend.EFFICIENT
    assert any("dtype" in r for r in explanation.reasons[Backend.FLASH])
    fp64 = reference.packed_inputs(gen, [3], [3], 2, 2, 64, dtype=torch.float64, device="cuda")
    assert varattn.explain(*fp64).chosen == Backend.MATH


def test_with_tensors_keeps_every_other_field():
    """AttentionParams.with_tensors is dataclasses.replace of the tensors: every other field carried over, in place."""
    names = [f.name for f in dataclasses.fields(AttentionParams)]
    params = AttentionParams(*(object() for _ in names))  # a distinct value in every field
    tensors = dict(q=object(), k=object(), v=object(), attn_bias=object(), out=object())
    made, expected = params.with_tensors(**tensors), dataclasses.replace(params, **tensors)
    assert [name for name in names if getattr(made, name) is not getattr(expected, name)] == []
