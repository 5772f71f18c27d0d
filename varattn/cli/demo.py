"""`python -m varattn` (or `python -m varattn demo`): the PyTorch SDPA tutorial's NestedTensor batch through varattn and through torch.

Builds a batch as the tutorial's generate_rand_batch(pad_percentage=0.5)
does, as strided NestedTensors (B, H, j, D) with 8 heads of 64: on the GPU
the tutorial's size, 32 sequences of about 256 tokens (one of 512) in fp16;
on the CPU, smaller so that a call takes milliseconds rather than seconds,
8 sequences of about 64 tokens (one of 128) in fp32. Runs it through
`varattn.attention` and through
`torch.nn.functional.scaled_dot_product_attention` and prints, for each call,
the backend varattn chose (`varattn.explain`), the largest absolute
difference from torch's result and the median time per call.
"""
from __future__ import annotations

import argparse
import random
import statistics
import time
import warnings

import torch
import torch.nn.functional as F

import varattn

HEADS, HEAD_DIM = 8, 64


def tutorial_batch(batch, max_len, heads, head_dim, dtype, device, seed=0):
    """The tutorial's generate_rand_batch(pad_percentage=0.5), as (B, H, j, D) NestedTensors."""
    rng = random.Random(seed)
    lengths = [int(max_len * (1 - rng.gauss(0.5, 0.01))) for _ in range(batch)]
    lengths[rng.randrange(batch)] = max_len
    generator = torch.Generator().manual_seed(seed)

    def nested():
        parts = [torch.randn(n, heads * head_dim, generator=generator).to(device, dtype) for n in lengths]
        return torch.nested.nested_tensor(parts).view(batch, -1, heads, head_dim).transpose(1, 2)
    return nested(), nested(), nested()


def median_ms(fn, device):
    fn()  # warm up: compiles kernels on first use
    repeats = 20 if device.type == "cuda" else 5
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def max_abs_difference(a, b):
    return max((x.float() - y.float()).abs().max().item() for x, y in zip(a.unbind(), b.unbind()))


def demo():
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type == "cuda":
        batch, max_len, dtype, where = 32, 512, torch.float16, torch.cuda.get_device_name(device)
    else:
        batch, max_len, dtype, where = 8, 128, torch.float32, "the CPU"
    q, k, v = tutorial_batch(batch, max_len, HEADS, HEAD_DIM, dtype, device)
    lengths = [part.shape[1] for part in q.unbind()]

    torch_inputs, torch_note = (q, k, v), ""
    try:
        F.scaled_dot_product_attention(q, k, v)
    except RuntimeError:  # torch's CPU NestedTensor attention takes only contiguous (jagged) ones
        torch_inputs = [torch.nested.as_nested_tensor(list(x.transpose(1, 2).unbind()), layout=torch.jagged)
                        .transpose(1, 2) for x in (q, k, v)]
        torch_note = "torch ran on jagged copies of q, k, v: its CPU attention takes no strided NestedTensors"

    def torch_sdpa():
        return F.scaled_dot_product_attention(*torch_inputs)

    def ours():
        return varattn.attention(q, k, v)

    explanation = varattn.explain(q, k, v)
    difference = max_abs_difference(ours(), torch_sdpa())
    print(f"varattn {varattn.__version__}, torch {torch.__version__}, on {where}")
    print(f"q, k, v: strided NestedTensors (B, H, j, D), {batch} sequences of {min(lengths)} to {max(lengths)} tokens, "
          f"{HEADS} heads of {HEAD_DIM}, {str(dtype).removeprefix('torch.')}")
    print()
    rows = [("call", "backend", "max |diff| to torch", "time per call"),
            ("varattn.attention(q, k, v)", explanation.chosen.value, f"{difference:.2e}",
             f"{median_ms(ours, device):.3f} ms"),
            ("torch.nn.functional.scaled_dot_product_attention(q, k, v)", "torch's own", "(the reference)",
             f"{median_ms(torch_sdpa, device):.3f} ms")]
    widths = [max(len(row[i]) for row in rows) for i in range(3)]
    for row in rows:
        print("  ".join(cell.ljust(width) for cell, width in zip(row, widths)) + "  " + row[3])
    if torch_note:
        print(torch_note)
    print()
    print("varattn.explain(q, k, v):")
    print(explanation)


def main(argv=None) -> int:
    argparse.ArgumentParser(prog="python -m varattn demo", description=__doc__.split("\n\n")[0]).parse_args(argv)
    with warnings.catch_warnings():
        # torch warns on every strided NestedTensor made, which the tutorial's batch is
        warnings.filterwarnings("ignore", message="The PyTorch API of nested tensors is in prototype stage",
                                category=UserWarning)
        demo()
    return 0
