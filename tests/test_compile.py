"""torch.compile(fullgraph=True) through varattn: the packed and padded front
ends and jagged NestedTensors trace to the varattn::attention op and its
backward without graph breaks; outputs and gradients equal eager ones. CPU
with aot_eager; inductor on CUDA."""
from __future__ import annotations

import pytest
import torch
from functorch.compile import make_boxed_func
from torch import nn
from torch._dynamo.backends.common import aot_autograd

import reference
import varattn

BACKENDS = [pytest.param("cpu", "aot_eager", id="cpu-aot_eager"),
            pytest.param("cuda", "inductor", id="cuda-inductor", marks=pytest.mark.gpu)]


class PackedBlock(nn.Module):
    """qkv projection, varlen_attention over packed rows (GQA: 4 query heads, 2 key/value heads), projection."""

    def __init__(self, embed=128, heads=4, heads_kv=2):
        super().__init__()
        self.heads, self.heads_kv, self.head_dim = heads, heads_kv, embed // heads
        self.qkv = nn.Linear(embed, (heads + 2 * heads_kv) * self.head_dim)
        self.proj = nn.Linear(embed, embed)

    def forward(self, x, cu_seqlens, max_seqlen: int):
        q, k, v = self.qkv(x).view(x.shape[0], -1, self.head_dim).split([self.heads, self.heads_kv, self.heads_kv], 1)
        y = varattn.varlen_attention(q, k, v, cu_seqlens, cu_seqlens, max_seqlen, max_seqlen, causal=True)
        return self.proj(y.reshape(x.shape[0], -1))


class PaddedBlock(nn.Module):
    """The SDPA tutorial's shape of block on a padded batch plus lengths, through varattn.attention."""

    def __init__(self, embed=128, heads=4):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(embed, 3 * embed)
        self.proj = nn.Linear(embed, embed)

    def forward(self, x, lengths):
        batch, length, embed = x.shape
        q, k, v = self.qkv(x).view(batch, length, 3, self.heads, -1).unbind(2)
        y = varattn.attention(q, k, v, layout="blhd", lengths=lengths, causal=True)
        return self.proj(y.reshape(batch, length, embed))


def eager_and_compiled(model, compiler, *inputs):
    """(output, gradients) of model eagerly and compiled with fullgraph=True."""
    results = []
    for run in (model, torch.compile(model, backend=compiler, fullgraph=True)):
        model.zero_grad()
        out = run(*inputs)
        out.float().square().sum().backward()
        results.append((out.detach(), [p.grad.clone() for p in model.parameters()]))
    return results


def dtype_on(device):
    return torch.float32 if device == "cpu" else torch.bfloat16


@pytest.mark.parametrize("device, compiler", BACKENDS)
def test_packed_block_compiles(gen, device, compiler):
    torch._dynamo.reset()
    dtype = dtype_on(device)
    model = PackedBlock().to(device, dtype)
    lengths = reference.lengths(gen, 5, 70)
    x = reference.randn(gen, sum(lengths), 128, dtype=dtype, device=device)
    (out, grads), (out_c, grads_c) = eager_and_compiled(model, compiler, x, reference.cu_seqlens(lengths, device),
                                                        max(lengths))
    assert torch.allclose(out, out_c, rtol=1e-2, atol=1e-2)
    for a, b in zip(grads, grads_c):
        assert reference.relative_error(b, a) <= 2e-2


@pytest.mark.parametrize("device, compiler", BACKENDS)
def test_padded_block_compiles(gen, device, compiler):
    torch._dynamo.reset()
    dtype = dtype_on(device)
    model = PaddedBlock().to(device, dtype)
    lengths = torch.tensor([33, 0, 1, 20], device=device)
    x = reference.randn(gen, 4, 33, 128, dtype=dtype, device=device)
    (out, grads), (out_c, grads_c) = eager_and_compiled(model, compiler, x, lengths)
    assert torch.allclose(out, out_c, rtol=1e-2, atol=1e-2)
    for a, b in zip(grads, grads_c):
        assert reference.relative_error(b, a) <= 2e-2


@pytest.mark.parametrize("device, compiler", BACKENDS)
def test_jagged_nested_self_attention_compiles(gen, device, compiler):
    """varattn.nn.SelfAttention on jagged NestedTensors: the traced max_seqlen
    stays symbolic, so a batch of other lengths runs through the same code."""
    torch._dynamo.reset()
    dtype = dtype_on(device)
    model = varattn.nn.SelfAttention(num_heads=4, embed_dimension=64, is_causal=True).to(device, dtype)
    compiled = torch.compile(model, backend=compiler, fullgraph=True)
    for lengths in ([3, 0, 17, 1], [9, 30]):
        x = torch.nested.nested_tensor([reference.randn(gen, n, 64, dtype=dtype) for n in lengths],
                                       layout=torch.jagged, device=device)
        results = []
        for run in (model, compiled):
            model.zero_grad()
            out = run(x)
            out.values().float().square().sum().backward()
            results.append((out.values().detach(), [p.grad.clone() for p in model.parameters()]))
        (out, grads), (out_c, grads_c) = results
        assert torch.allclose(out, out_c, rtol=1e-2, atol=1e-2)
        for a, b in zip(grads, grads_c):
            assert reference.relative_error(b, a) <= 2e-2


def test_compiled_graph_has_the_custom_ops(gen):
    """The traced forward holds varattn::attention and the backward varattn::attention_backward."""
    torch._dynamo.reset()
    graphs = []

    def record(graph_module, example_inputs):
        graphs.append(str(graph_module.graph))
        return make_boxed_func(graph_module.forward)
    model = PackedBlock()
    compiled = torch.compile(model, backend=aot_autograd(fw_compiler=record, bw_compiler=record), fullgraph=True)
    lengths = [5, 0, 9]
    compiled(reference.randn(gen, 14, 128), reference.cu_seqlens(lengths), 9).sum().backward()
    assert len(graphs) == 2
    assert "varattn.attention.default" in graphs[0] and "varattn.attention_backward.default" in graphs[1]
