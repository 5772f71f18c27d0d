"""varattn on the CPU against torch SDPA on the same data (issue 16), with
or without a GPU on the machine: everything here runs on the CPU.

- "CPU dense": a dense (B, H, L, D) batch, transposed views of (B, L, H, D)
  as attention layers make them: varattn.attention against
  F.scaled_dot_product_attention on the same tensors ("torch-padded": the
  padded form, here with nothing padded, so no mask).
- "CPU nested": the SDPA tutorial's NestedTensor batch at half its lengths
  (32 sequences of about 128 rows, one of 256, 8 heads x 64), jagged
  NestedTensors (B, H, j, D): varattn.attention against torch SDPA on the
  same NestedTensors ("torch-nested"), and torch SDPA called once per
  sequence on views of the same rows ("torch-loop", what a torch user can
  write without NestedTensors; not an anchor of report.py's ratio).

Each group forward alone and forward + backward ("fwd+bwd": autograd from
q, k, v to a fixed output gradient, rather than the leaves' gradients
cleared: the inputs are new every round). Every round gets fresh inputs,
made before its timer starts, as a user's next batch. Every side runs with
torch.set_num_threads(THREADS): VARATTN_BENCH_THREADS, default torch's own
count. VARATTN_BENCH_SMOKE=1 shrinks the workloads (lengths / 4, 4 heads).

    python -m pytest benchmarks/test_cpu.py -q --benchmark-json=cpu.json
    python benchmarks/report.py cpu.json

extra_info: workload, impl, device, threads and gflops (real work only, the
backward counted as 2.5x the forward).
"""
from __future__ import annotations

import itertools
import os
import time
from dataclasses import dataclass

import pytest
import torch
import torch.nn.functional as F

import varattn
from harness import BACKWARD_FLOPS
from workloads import SMOKE, _tutorial

CPU = torch.device("cpu")
THREADS = int(os.environ.get("VARATTN_BENCH_THREADS", "0")) or torch.get_num_threads()


@dataclass(frozen=True)
class CpuWorkload:
    name: str
    lengths: tuple[int, ...]
    heads: int
    head_dim: int
    dtype: torch.dtype
    causal: bool
    nested: bool  # a jagged NestedTensor batch, else a dense one (every length equal)

    @property
    def group(self) -> str:
        shape = (f"{len(self.lengths)} of ~{sorted(self.lengths)[len(self.lengths) // 2]}" if self.nested
                 else f"({len(self.lengths)}, {self.heads}, {self.lengths[0]}, {self.head_dim})")
        return f"CPU {self.name} {shape}{', causal' if self.causal else ''}, {str(self.dtype)[6:]}"

    @property
    def flops(self) -> int:
        pairs = sum(n * (n + 1) // 2 if self.causal else n * n for n in self.lengths)
        return 4 * self.heads * self.head_dim * pairs


def _make(name, lengths, heads, head_dim, dtype, causal, nested):
    if SMOKE:
        lengths, heads = [max(1, n // 4) for n in lengths], min(heads, 4)
    return CpuWorkload(name, tuple(lengths), heads, head_dim, dtype, causal, nested)


WORKLOADS = [
    _make("dense", [1024] * 4, 32, 32, torch.float32, False, False),
    _make("nested", [n // 2 for n in _tutorial(5)], 8, 64, torch.float32, False, True),
]


class Batch:
    """One round's fresh inputs for `impl` on workload `w`: the leaves (which
    require grad when training), the call's q, k, v in its form, and the
    gradient reaching the output."""

    def __init__(self, w: CpuWorkload, impl: str, training: bool, generator, offsets):
        total, h, d = sum(w.lengths), w.heads, w.head_dim

        def randn(*shape):
            return torch.randn(*shape, generator=generator).to(w.dtype)
        self.w, self.impl, self.offsets = w, impl, offsets
        rows = [randn(total, h, d) for _ in range(4)]  # q, k, v, grad_out as packed rows (total, H, D)
        self.leaves = [x.requires_grad_(training) for x in rows[:3]]
        self.grad_rows = rows[3]
        if not w.nested:  # (B, H, L, D) views of (B, L, H, D)
            batch, length = len(w.lengths), w.lengths[0]
            self.qkv = [x.view(batch, length, h, d).transpose(1, 2) for x in self.leaves]
        elif impl == "torch-loop":  # per sequence (H, n, D) views of the rows
            self.qkv = [[x[s:e].transpose(0, 1) for s, e in itertools.pairwise(offsets.tolist())]
                        for x in self.leaves]
        else:
            self.qkv = [torch.nested.nested_tensor_from_jagged(x, offsets, max_seqlen=max(w.lengths)).transpose(1, 2)
                        for x in self.leaves]

    def grad(self, out):
        """The gradient of `out` (the call's result) from grad_rows, in out's form."""
        w = self.w
        if not w.nested:
            return self.grad_rows.view(len(w.lengths), w.lengths[0], w.heads, w.head_dim).transpose(1, 2)
        if self.impl == "torch-loop":
            return [self.grad_rows[s:e].transpose(0, 1) for s, e in itertools.pairwise(self.offsets.tolist())]
        return torch.nested.nested_tensor_from_jagged(self.grad_rows, out.offsets(),
                                                      max_seqlen=max(w.lengths)).transpose(1, 2)


def _call(w: CpuWorkload, impl: str):
    """The attention call of `impl` on a Batch's q, k, v."""
    if impl == "varattn":
        return lambda q, k, v: varattn.attention(q, k, v, causal=w.causal)
    if impl == "torch-loop":
        return lambda q, k, v: [F.scaled_dot_product_attention(*parts, is_causal=w.causal) for parts in zip(q, k, v)]
    return lambda q, k, v: F.scaled_dot_product_attention(q, k, v, is_causal=w.causal)


@pytest.fixture(autouse=True)
def threads():
    was = torch.get_num_threads()
    torch.set_num_threads(THREADS)
    yield
    torch.set_num_threads(was)


def measure_cpu(benchmark, w: CpuWorkload, impl: str, training: bool, budget_s: float = 4.0):
    """Time `impl` on fresh batches of `w` with pytest-benchmark (rounds sized to
    the budget, as harness.measure does) and record its rate."""
    generator = torch.Generator().manual_seed(0)
    offsets = torch.tensor([0, *itertools.accumulate(w.lengths)])
    call = _call(w, impl)

    def make():  # a new batch: new rows and, for NestedTensors, new offsets
        return (Batch(w, impl, training, generator, offsets.clone()),), {}

    def run(batch):
        with torch.set_grad_enabled(training):
            out = call(*batch.qkv)
            if training:
                torch.autograd.backward(out, batch.grad(out))

    try:
        run(make()[0][0])
    except RuntimeError as error:  # an anchor that cannot run this form
        pytest.skip(f"{impl} cannot run {w.group}: {str(error).splitlines()[0][:200]}")
    # Warm-up (a quarter of the budget), which also tells how long one call takes.
    spent, calls = 0.0, 0
    while spent < budget_s / 4 or calls < 2:
        batch = make()[0][0]
        began = time.perf_counter()
        run(batch)
        spent += time.perf_counter() - began
        calls += 1
    once = spent / calls
    rounds = max(10, min(200, int(budget_s / once)))
    benchmark.pedantic(run, setup=make, rounds=rounds, iterations=1, warmup_rounds=1)
    # GFLOP/s rather than the GPU suites' TFLOP/s, which report.py prints to no decimal places
    benchmark.extra_info.update(workload=w.name, impl=impl, device="cpu", threads=THREADS,
                                gflops=w.flops * ((1 + BACKWARD_FLOPS) if training else 1)
                                / benchmark.stats.stats.median / 1e9)


def _suite(w: CpuWorkload, training: bool):
    impls = ["varattn", "torch-nested", "torch-loop"] if w.nested else ["varattn", "torch-padded"]

    @pytest.mark.benchmark(group=w.group + (", fwd+bwd" if training else ""))
    @pytest.mark.parametrize("impl", impls)
    def test(benchmark, impl):
        measure_cpu(benchmark, w, impl, training)
    return test


test_cpu_dense = _suite(WORKLOADS[0], training=False)
test_cpu_dense_training = _suite(WORKLOADS[0], training=True)
test_cpu_nested = _suite(WORKLOADS[1], training=False)
test_cpu_nested_training = _suite(WORKLOADS[1], training=True)
