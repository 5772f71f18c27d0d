"""`python -m varattn`: the PyTorch SDPA tutorial's NestedTensor batch through varattn and torch.

Builds a batch of 32 sequences of about 256 tokens (one of 512), 8 heads of
64, as the tutorial does; runs it through `varattn.attention` and through
`torch.nn.functional.scaled_dot_product_attention`; prints the backend
varattn chose, the largest difference between the two, and the time of each.
Runs on the GPU when there is one (fp16), else on the CPU (fp32).
"""
from __future__ import annotations

import random
import statistics
import time

import torch
import torch.nn.functional as F

import varattn


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
    repeats = 20 if device.type == "cuda" else 3
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


def main():
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.float16 if device.type == "cuda" else torch.float32
    q, k, v = tutorial_batch(32, 512, 8, 64, dtype, device)

    torch_inputs = (q, k, v)
    try:
        F.scaled_dot_product_attention(*torch_inputs)
    except RuntimeError:  # torch on the CPU takes only contiguous (jagged) NestedTensors
        torch_inputs = [torch.nested.as_nested_tensor(list(x.transpose(1, 2).unbind()), layout=torch.jagged)
                        .transpose(1, 2) for x in (q, k, v)]

    def torch_sdpa():
        return F.scaled_dot_product_attention(*torch_inputs)

    def flat(nt):
        return torch.cat([part.reshape(-1) for part in nt.unbind()]).float()

    print(f"varattn {varattn.__version__} on {torch.cuda.get_device_name(device) if device.type == 'cuda' else 'CPU'}, "
          f"{dtype}, 32 sequences of ~256 tokens (max 512), 8 heads x 64")
    print(varattn.explain(q, k, v))
    ours, theirs = varattn.attention(q, k, v), torch_sdpa()
    print(f"max |varattn - torch| = {(flat(ours) - flat(theirs)).abs().max().item():.3e}")
    print(f"varattn.attention:                  {median_ms(lambda: varattn.attention(q, k, v), device):8.3f} ms")
    print(f"torch scaled_dot_product_attention: {median_ms(torch_sdpa, device):8.3f} ms")


if __name__ == "__main__":
    main()
