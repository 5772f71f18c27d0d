"""W5 the way a model calls: new NestedTensors every call (W5 itself repeats
one call on the same objects).

- "W5 fresh views": the attention call alone on views made for it, before
  the timer starts, as the tutorial's block makes them (chunk the
  projection, split the heads, transpose): one view triple per round. The
  views of one projection share its offsets, as a model's layers share a
  step's; "-new-batch" makes a new projection (new offsets) every round,
  as a step's first layer sees. "-grad": the projection requires grad.
- "W5 fresh batch, block": the tutorial's CausalSelfAttention (eval mode,
  no grad) on a new NestedTensor every round: torch SDPA, varattn's SDPA
  swapped in, and varattn.nn.SelfAttention.
- "W5 padded": varattn.attention on the padded batch with its lengths in
  each form a user holds them, against varlen_attention on the same data.

Each time is a whole synchronised call; extra_info["host_us"] is the median
host time of a call measured apart, time.perf_counter around the call with
no synchronisation (the GPU runs on behind it), which is what a model's
Python thread pays.
"""
from __future__ import annotations

import statistics
import time

import pytest
import torch
import torch.nn.functional as F

import varattn
from harness import DEVICE, inputs_for
from workloads import WORKLOADS

W5 = WORKLOADS["W5"]
HOST_ROUNDS = 200


def _sync():
    if DEVICE.type == "cuda":
        torch.cuda.synchronize()


def measure_fresh(benchmark, make, call, impl, group_flops=None):
    """Time call(*make()) with new arguments each round (made untimed), and its host time apart."""
    for _ in range(3):  # kernel compiles, warm-up
        call(*make())
    _sync()
    host = []
    for _ in range(HOST_ROUNDS):
        args = make()
        _sync()
        started = time.perf_counter()
        call(*args)
        host.append(time.perf_counter() - started)
        _sync()

    def timed(*args):
        call(*args)
        _sync()
    benchmark.pedantic(timed, setup=lambda: (make(), {}), rounds=100, warmup_rounds=2)
    benchmark.extra_info.update(workload=W5.name, impl=impl, host_us=statistics.median(host) * 1e6,
                                device=torch.cuda.get_device_name() if DEVICE.type == "cuda" else "cpu")
    if group_flops:
        benchmark.extra_info["tflops"] = group_flops / benchmark.stats.stats.median / 1e12


def _projection(inputs, layout, grad=False):
    """The W5 batch as a (B, j, 3 * H * D) NestedTensor, as a qkv projection gives it."""
    h, d = W5.heads, W5.head_dim
    rows = torch.cat([inputs.q, inputs.k, inputs.v], dim=-1).reshape(inputs.q.shape[0], 3 * h * d)
    if layout == torch.jagged:
        x = torch.nested.nested_tensor_from_jagged(rows, inputs.cu_q.long().clone(), max_seqlen=inputs.max_q)
    else:
        x = torch.nested.nested_tensor(list(rows.split(list(W5.lengths_q))))
    return x.detach().requires_grad_() if grad else x


def _views(x):
    """q, k, v (B, H, j, D) of projection x, the tutorial's way (unflatten on jagged, view on strided)."""
    batch, h, d = len(W5.lengths_q), W5.heads, W5.head_dim
    if x.layout == torch.jagged:
        return [t.unflatten(-1, [h, d]).transpose(1, 2) for t in x.chunk(3, -1)]
    return [t.view(batch, -1, h, d).transpose(1, 2) for t in x.chunk(3, -1)]


VIEWS = ["varattn-jagged", "varattn-jagged-new-batch", "varattn-jagged-grad", "varattn-strided",
         "torch-jagged", "torch-strided"]


@pytest.mark.benchmark(group="W5 fresh views, attention call")
@pytest.mark.parametrize("impl", VIEWS)
def test_fresh_views(benchmark, impl):
    inputs = inputs_for("W5")
    layout = torch.strided if "strided" in impl else torch.jagged
    grad = impl.endswith("-grad")
    projection = _projection(inputs, layout, grad)
    if impl.endswith("-new-batch"):
        make = lambda: _views(_projection(inputs, layout))  # noqa: E731
    else:
        make = lambda: _views(projection)  # noqa: E731
    if impl.startswith("varattn"):
        call = varattn.attention
    else:
        call = F.scaled_dot_product_attention
        try:
            call(*make())
        except RuntimeError as error:  # torch's NestedTensor SDPA has no CPU kernel for every layout
            pytest.skip(f"torch SDPA cannot run these views: {str(error).splitlines()[0][:120]}")
    with torch.set_grad_enabled(grad):
        measure_fresh(benchmark, make, call, impl, W5.flops)


class TutorialBlock(torch.nn.Module):
    """The PyTorch SDPA tutorial's CausalSelfAttention, with the SDPA function a parameter."""

    def __init__(self, sdpa, num_heads, embed_dimension):
        super().__init__()
        self.c_attn = torch.nn.Linear(embed_dimension, 3 * embed_dimension, bias=False)
        self.c_proj = torch.nn.Linear(embed_dimension, embed_dimension, bias=False)
        self.sdpa, self.num_heads = sdpa, num_heads

    def forward(self, x):
        query_projected = self.c_attn(x)
        batch_size, embed_dim = query_projected.size(0), query_projected.size(2)
        head_dim = embed_dim // (self.num_heads * 3)
        query, key, value = query_projected.chunk(3, -1)
        query = query.view(batch_size, -1, self.num_heads, head_dim).transpose(1, 2)
        key = key.view(batch_size, -1, self.num_heads, head_dim).transpose(1, 2)
        value = value.view(batch_size, -1, self.num_heads, head_dim).transpose(1, 2)
        y = self.sdpa(query, key, value)
        y = y.transpose(1, 2).view(batch_size, -1, self.num_heads * head_dim)
        return self.c_proj(y)


BLOCKS = [f"{block}-{layout}" for layout in ("jagged", "strided")
          for block in ("varattn-sdpa", "varattn-nn", "torch")]


@pytest.mark.benchmark(group="W5 fresh batch, tutorial block")
@pytest.mark.parametrize("impl", BLOCKS)
def test_fresh_block(benchmark, impl):
    inputs = inputs_for("W5")
    layout = torch.strided if impl.endswith("strided") else torch.jagged
    embed = W5.heads * W5.head_dim
    if impl.startswith("varattn-nn"):
        block = varattn.nn.SelfAttention(W5.heads, embed)
    else:
        block = TutorialBlock(varattn.scaled_dot_product_attention if impl.startswith("varattn")
                              else F.scaled_dot_product_attention, W5.heads, embed)
    block = block.to(DEVICE, W5.dtype).eval()
    rows = inputs.q.reshape(inputs.q.shape[0], embed)

    def make():
        if layout == torch.jagged:
            return (torch.nested.nested_tensor_from_jagged(rows, inputs.cu_q.long().clone(), max_seqlen=inputs.max_q),)
        return (torch.nested.nested_tensor(list(rows.split(list(W5.lengths_q)))),)
    try:
        with torch.no_grad():
            block(*make())
    except RuntimeError as error:
        pytest.skip(f"{impl} cannot run: {str(error).splitlines()[0][:120]}")
    with torch.no_grad():
        measure_fresh(benchmark, make, block, impl)


PADDED = ["varattn-lengths-list", "varattn-lengths-cpu", "varattn-lengths-cuda", "varattn-key-padding-mask",
          "varattn-varlen"]


@pytest.mark.benchmark(group="W5 padded, attention call")
@pytest.mark.parametrize("impl", PADDED)
def test_padded(benchmark, impl):
    inputs = inputs_for("W5")
    q, k, v, _ = inputs.padded()
    batch, length = q.shape[0], q.shape[2]
    lengths = list(W5.lengths_q)
    if impl == "varattn-varlen":  # the same data as packed rows in slots of the padded length
        cu = torch.arange(batch + 1, dtype=torch.int32, device=DEVICE) * length
        used = torch.tensor(lengths, dtype=torch.int32, device=DEVICE)
        rows = [x.transpose(1, 2).reshape(batch * length, *x.shape[1:2], x.shape[3]) for x in (q, k, v)]
        call = lambda: varattn.varlen_attention(*rows, cu, cu, length, length, seqused_q=used, seqused_k=used)  # noqa
    else:
        argument = {"varattn-lengths-list": dict(lengths=lengths),
                    "varattn-lengths-cpu": dict(lengths=torch.tensor(lengths)),
                    "varattn-lengths-cuda": dict(lengths=torch.tensor(lengths, device=DEVICE)),
                    "varattn-key-padding-mask": dict(key_padding_mask=torch.arange(length, device=DEVICE)[None]
                                                     >= torch.tensor(lengths, device=DEVICE)[:, None])}[impl]
        call = lambda: varattn.attention(q, k, v, **argument)  # noqa: E731
    with torch.no_grad():
        measure_fresh(benchmark, lambda: (), call, impl, W5.flops)
