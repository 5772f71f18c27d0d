"""How every suite times its comparators: the device synchronised inside the
timed call, warm-up outside it (compiles, then a quarter of the budget so that
clocks settle), rounds sized to a time budget, and
TFLOP/s (TB/s for decode) and, on CUDA, the peak memory of one call recorded
in extra_info.

Training suites time forward + backward (autograd from q, k, v to a random
output gradient, the leaves' gradients cleared before each step as an
optimizer's zero_grad does) and count the backward as 2.5x the forward's FLOPs."""
from __future__ import annotations

import inspect
import time

import pytest
import torch
import torch.nn.functional as F

import varattn
from workloads import SMOKE, WORKLOADS, Inputs

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
COMPARATORS = [f"varattn-{b.value}" for b in varattn.Backend] + ["torch-varlen", "torch-nested", "torch-padded", "flex"]
# Forward + backward: the math backend and padded torch SDPA would take seconds per call there.
TRAINING_COMPARATORS = ["varattn-flash", "torch-varlen", "torch-nested", "flex"]
# Masked workloads (Workload.mask), forward and forward + backward: varattn as dispatch
# chooses, against torch SDPA on the padded batch with the same mask (and, for W8's
# blocks, compiled FlexAttention with a block mask of the same blocks).
MASKED_COMPARATORS = {"key_padding": ["varattn", "torch-padded"], "blocks": ["varattn", "torch-efficient", "flex"]}
# Decode workloads with a paged cache beside the contiguous one: varattn and
# torch's varlen_attn reading the same keys from pages of 16 and 128 rows.
PAGED_COMPARATORS = [f"{impl}-paged-{size}" for impl in ("varattn", "torch-varlen") for size in (16, 128)]
BACKWARD_FLOPS = 2.5  # times the forward's


def inputs_for(name: str) -> Inputs:
    if DEVICE.type != "cuda" and not SMOKE:
        pytest.skip("benchmarks need CUDA (VARATTN_BENCH_SMOKE=1 runs them small on the CPU)")
    return Inputs(WORKLOADS[name], DEVICE)


def _synchronised(fn):
    def run():
        fn()
        if DEVICE.type == "cuda":
            torch.cuda.synchronize()
    return run


def _varattn(inputs, backend):
    w = inputs.workload
    explanation = None
    with varattn.use_backends(backend):
        if w.name == "W5":  # the whole NestedTensor call, front end included
            q, k, v = inputs.nested(torch.strided)
            explanation = varattn.explain(q, k, v, causal=w.causal)
            if explanation.chosen is None:
                pytest.skip(f"{backend.value}: {'; '.join(explanation.reasons[backend])}")
            call = lambda: varattn.attention(q, k, v, causal=w.causal)
        else:
            args = (inputs.q, inputs.k, inputs.v, inputs.cu_q, inputs.cu_k, inputs.max_q, inputs.max_k)
            explanation = varattn.explain(*args, causal=w.causal)
            if explanation.chosen is None:
                pytest.skip(f"{backend.value}: {'; '.join(explanation.reasons[backend])}")
            call = lambda: varattn.varlen_attention(*args, causal=w.causal)

    def run():
        with varattn.use_backends(backend):
            call()
    return run


def _masked_varattn(inputs, leaves=None):
    """varattn on a masked workload, as a user holding that batch calls it:
    the padded batch and its key_padding_mask, or the packed batch and the
    block mask in padded form. `leaves`: the tensors to call it on (padded or
    packed as the workload needs), default the inputs'."""
    w = inputs.workload
    if w.mask == "key_padding":
        q, k, v = leaves or inputs.padded()[:3]
        key_padding_mask = inputs.key_padding_mask()
        return lambda: varattn.attention(q, k, v, key_padding_mask=key_padding_mask)
    q, k, v = leaves or (inputs.q, inputs.k, inputs.v)
    mask = inputs.block_mask()
    args = (q, k, v, inputs.cu_q, inputs.cu_k, inputs.max_q, inputs.max_k)
    return lambda: varattn.varlen_attention(*args, attn_bias=mask)


def _gqa(q, k) -> dict:
    """torch SDPA's and FlexAttention's keyword for fewer key/value heads than query heads, where there are."""
    return dict(enable_gqa=True) if q.shape[-3] != k.shape[-3] else {}


def _torch_padded(q, k, v, mask, backend=None):
    """torch SDPA on a padded batch and its mask (one SDPA backend, or torch's choice)."""
    gqa = _gqa(q, k)
    if backend is None:
        return lambda: F.scaled_dot_product_attention(q, k, v, attn_mask=mask, **gqa)
    from torch.nn.attention import sdpa_kernel

    def run():
        with sdpa_kernel(backend):
            return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, **gqa)
    return run


def _torch_varlen(inputs, leaves=None, paged=None):
    """torch's varlen_attn (FlashAttention-2 inside torch) on the packed rows, the
    anchor every torch user has. `leaves`: q, k, v to call it on, default the
    inputs'; `paged`: (block_table, seqused_k) of leaves' k and v as page pools."""
    try:
        from torch.nn.attention.varlen import varlen_attn
    except ImportError:
        pytest.skip(f"torch {torch.__version__} has no torch.nn.attention.varlen.varlen_attn")
    parameters = inspect.signature(varlen_attn).parameters
    if paged is not None and "block_table" not in parameters:
        pytest.skip(f"torch {torch.__version__}'s varlen_attn takes no block_table")
    w = inputs.workload
    if inputs.device.type != "cuda" or w.dtype not in (torch.float16, torch.bfloat16):
        pytest.skip("varlen_attn runs on CUDA in fp16 and bf16 only")
    causal = {}
    if w.causal:
        if w.lengths_q != w.lengths_k:
            pytest.skip("varlen_attn aligns its causal mask lower-right, varattn here upper-left: "
                        "they differ where Lq != Lk")
        # torch 2.10 takes is_causal; later versions a window, (-1, 0) meaning causal
        causal = (dict(window_size=(-1, 0)) if "window_size" in parameters else dict(is_causal=True))
    q, k, v = leaves or (inputs.q, inputs.k, inputs.v)
    if q.shape[1] != k.shape[-2]:
        causal["enable_gqa"] = True
    if paged is not None:
        table, used = paged
        args = (q, k, v, inputs.cu_q, None, inputs.max_q, inputs.max_k)
        return lambda: varlen_attn(*args, seqused_k=used, block_table=table, **causal)
    args = (q, k, v, inputs.cu_q, inputs.cu_k, inputs.max_q, inputs.max_k)
    return lambda: varlen_attn(*args, **causal)


def _paged(inputs, name):
    """Comparator `name` ("varattn-paged-<page size>" or "torch-varlen-paged-<page size>")
    on the inputs' keys and values in shuffled pages."""
    impl, size = name.rsplit("-paged-", 1)
    k_pool, v_pool, table, used = inputs.paged(int(size))
    if impl == "torch-varlen":
        return _torch_varlen(inputs, (inputs.q, k_pool, v_pool), paged=(table, used))
    args = (inputs.q, k_pool, v_pool, inputs.cu_q, None, inputs.max_q, inputs.max_k)
    return lambda: varattn.varlen_attention(*args, seqused_k=used, block_table=table)


def comparator(inputs, name):
    """The callable timed for comparator `name` on these inputs (or pytest.skip)."""
    w = inputs.workload
    if name == "varattn":
        return _masked_varattn(inputs)
    if "-paged-" in name:
        return _paged(inputs, name)
    if name == "torch-efficient":
        from torch.nn.attention import SDPBackend
        return _torch_padded(*inputs.padded(), SDPBackend.EFFICIENT_ATTENTION)
    if name.startswith("varattn-"):
        return _varattn(inputs, varattn.Backend(name[len("varattn-"):]))
    if name == "torch-varlen":
        return _torch_varlen(inputs)
    if name == "torch-nested":
        q, k, v = inputs.nested(torch.strided if w.name == "W5" else torch.jagged)
        gqa = _gqa(inputs.q.transpose(0, 1), inputs.k.transpose(0, 1))
        return lambda: F.scaled_dot_product_attention(q, k, v, is_causal=w.causal, **gqa)
    if name == "torch-padded":
        return _torch_padded(*inputs.padded())
    if name == "flex":
        from torch.nn.attention.flex_attention import flex_attention
        q, k, v, block_mask = inputs.flex()
        compiled = torch.compile(flex_attention) if DEVICE.type == "cuda" else flex_attention
        gqa = _gqa(q, k)
        return lambda: compiled(q, k, v, block_mask=block_mask, **gqa)
    raise ValueError(name)


def _with_grad(tensors):
    return [x.detach().clone().requires_grad_() for x in tensors]


def _step(leaves, forward, grad):
    """One training step's attention: gradients cleared (set to None, as
    optimizer.zero_grad() does), forward, backward."""
    def run():
        for x in leaves:
            x.grad = None
        forward().backward(grad)
    return run


def training_comparator(inputs, name):
    """The callable running forward + backward for comparator `name` (or pytest.skip)."""
    w = inputs.workload
    generator = torch.Generator().manual_seed(1)
    grad_out = torch.randn(inputs.q.shape, generator=generator).to(inputs.q.device, inputs.q.dtype)
    if w.mask != "document" and name != "flex":
        padded = name != "varattn" or w.mask == "key_padding"
        *tensors, mask = inputs.padded() if padded else (inputs.q, inputs.k, inputs.v, None)
        leaves = _with_grad(tensors)
        if padded:
            grad_out = torch.randn(leaves[0].shape, generator=generator).to(inputs.q.device, inputs.q.dtype)
        if name == "varattn":
            forward = _masked_varattn(inputs, leaves)
        else:
            from torch.nn.attention import SDPBackend
            forward = _torch_padded(*leaves, mask, SDPBackend.EFFICIENT_ATTENTION if name == "torch-efficient" else None)
        return _step(leaves, forward, grad_out)
    if name == "varattn-flash":
        q, k, v = _with_grad((inputs.q, inputs.k, inputs.v))
        args = (q, k, v, inputs.cu_q, inputs.cu_k, inputs.max_q, inputs.max_k)
        chosen = varattn.explain(*args, causal=w.causal).chosen
        if chosen != varattn.Backend.FLASH:
            pytest.skip(f"flash cannot train on {w.name}")
        return _step((q, k, v), lambda: varattn.varlen_attention(*args, causal=w.causal), grad_out)
    if name == "torch-varlen":
        leaves = _with_grad((inputs.q, inputs.k, inputs.v))
        return _step(leaves, _torch_varlen(inputs, leaves), grad_out)
    if name == "torch-nested":
        values = _with_grad((inputs.q, inputs.k, inputs.v))
        offsets = [inputs.cu_q.long(), inputs.cu_k.long(), inputs.cu_k.long()]
        longest = [inputs.max_q, inputs.max_k, inputs.max_k]
        q, k, v = (torch.nested.nested_tensor_from_jagged(x, o, max_seqlen=m).transpose(1, 2)
                   for x, o, m in zip(values, offsets, longest))
        grad = torch.nested.nested_tensor_from_jagged(grad_out, offsets[0], max_seqlen=inputs.max_q).transpose(1, 2)
        return _step(values, lambda: F.scaled_dot_product_attention(q, k, v, is_causal=w.causal), grad)
    if name == "flex":
        from torch.nn.attention.flex_attention import flex_attention
        *tensors, block_mask = inputs.flex()
        q, k, v = _with_grad(tensors)
        grad = grad_out.transpose(0, 1)[None]
        compiled = torch.compile(flex_attention) if DEVICE.type == "cuda" else flex_attention
        return _step((q, k, v), lambda: compiled(q, k, v, block_mask=block_mask), grad)
    raise ValueError(name)


def measure(benchmark, inputs, name, budget_s=1.0, training=False):
    """Time `name` on `inputs` with pytest-benchmark and record its rate."""
    w = inputs.workload
    try:
        fn = _synchronised((training_comparator if training else comparator)(inputs, name))
        fn()  # kernel compiles, torch.compile
    except pytest.skip.Exception:
        raise
    except Exception as error:  # an anchor that cannot run this workload
        pytest.skip(f"{name} cannot run {w.name}: {type(error).__name__}: {str(error).splitlines()[0][:200]}")
    # Warm-up until the GPU's clocks have settled (a quarter of the budget),
    # which also tells how long one call takes.
    started, calls = time.perf_counter(), 0
    while time.perf_counter() - started < budget_s / 4 or calls < 2:
        fn()
        calls += 1
    once = (time.perf_counter() - started) / calls
    rounds = max(10, min(200, int(budget_s / once)))
    benchmark.pedantic(fn, rounds=rounds, iterations=1, warmup_rounds=1)
    median = benchmark.stats.stats.median
    benchmark.extra_info.update(workload=w.name, impl=name, mask=w.mask,
                                device=torch.cuda.get_device_name() if DEVICE.type == "cuda" else "cpu")
    if w.decode:
        benchmark.extra_info["tbps"] = w.bytes_moved / median / 1e12
    else:
        benchmark.extra_info["tflops"] = w.flops * ((1 + BACKWARD_FLOPS) if training else 1) / median / 1e12
    if DEVICE.type == "cuda":
        # Peak memory of one call beyond what was allocated before it (inputs, anchors' data).
        torch.cuda.synchronize()
        before = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        fn()
        benchmark.extra_info["peak_mib"] = (torch.cuda.max_memory_allocated() - before) / 2**20
        torch.cuda.empty_cache()


def suite(name, training=False, paged=False):
    """The parametrised benchmark of workload `name` over every comparator (forward, or
    forward + backward when `training`; `paged`: the paged-cache comparators too),
    for a test module."""
    inputs_cache = {}
    group = WORKLOADS[name].group + (", fwd+bwd" if training else "")

    masked = MASKED_COMPARATORS.get(WORKLOADS[name].mask)
    comparators = masked or (TRAINING_COMPARATORS if training else COMPARATORS + (PAGED_COMPARATORS if paged else []))

    @pytest.mark.benchmark(group=group)
    @pytest.mark.parametrize("impl", comparators)
    def test(benchmark, impl):
        if "inputs" not in inputs_cache:
            inputs_cache["inputs"] = inputs_for(name)
        measure(benchmark, inputs_cache["inputs"], impl, training=training)
    return test
