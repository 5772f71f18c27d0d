"""Host time per call of varattn's front ends on W5's batch, the way a model
calls: new views for every call (made ahead, one triple per call), on CUDA.

    python benchmarks/host_time.py [package_dir]

package_dir: where `varattn` is imported from (another checkout, to compare).
Host time: time.perf_counter around the call with no synchronisation (the
GPU runs behind it), median of the calls after the first five. Prints one
line per call form and writes host_time.json under $OUT (or /tmp).
"""
import json
import os
import statistics
import sys
import time

if len(sys.argv) > 1:
    sys.path.insert(0, sys.argv[1])

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

import varattn  # noqa: E402
from workloads import WORKLOADS  # noqa: E402

W5 = WORKLOADS["W5"]
DEVICE = torch.device("cuda")
B, H, D, LENGTHS = len(W5.lengths_q), W5.heads, W5.head_dim, list(W5.lengths_q)
CALLS = 200


def projection(layout, grad=False):
    """A (B, j, 3 H D) NestedTensor, as the tutorial's qkv projection gives."""
    x = torch.nested.nested_tensor([torch.randn(n, 3 * H * D, device=DEVICE, dtype=W5.dtype) for n in LENGTHS],
                                   layout=layout)
    return x.detach().requires_grad_() if grad else x


def views(x):
    """q, k, v of projection x, the tutorial's way (unflatten for jagged, view for strided)."""
    if x.layout == torch.jagged:
        return [t.unflatten(-1, [H, D]).transpose(1, 2) for t in x.chunk(3, -1)]
    return [t.view(B, -1, H, D).transpose(1, 2) for t in x.chunk(3, -1)]


def host_us(fn, argsets):
    for args in argsets[:5]:
        fn(*args)
    torch.cuda.synchronize()
    times = []
    for args in argsets[5:]:
        started = time.perf_counter()
        fn(*args)
        times.append(time.perf_counter() - started)
    torch.cuda.synchronize()
    return statistics.median(times) * 1e6


def main():
    print("varattn from", varattn.__file__, "torch", torch.__version__)
    rows = []

    def record(name, us):
        rows.append((name, us))
        print(f"{name:60s} {us:9.1f} us", flush=True)

    for layout, name in ((torch.jagged, "jagged"), (torch.strided, "strided")):
        x = projection(layout)
        with torch.no_grad():
            record(f"{name}: varattn.attention, fresh views", host_us(varattn.attention, [views(x) for _ in range(CALLS)]))
            record(f"{name}: torch SDPA, fresh views",
                   host_us(F.scaled_dot_product_attention, [views(x) for _ in range(CALLS)]))
        # (the forward only: torch has no backward for chunk on strided NestedTensors)
        grad_x = projection(layout, grad=True)
        record(f"{name}: varattn.attention with grad, forward",
               host_us(varattn.attention, [views(grad_x) for _ in range(CALLS)]))

    length = max(LENGTHS)
    q, k, v = (torch.randn(B, length, H, D, device=DEVICE, dtype=W5.dtype).transpose(1, 2) for _ in range(3))
    cu = torch.arange(B + 1, dtype=torch.int32, device=DEVICE) * length
    used = torch.tensor(LENGTHS, dtype=torch.int32, device=DEVICE)
    rows_q, rows_k, rows_v = (x.transpose(1, 2).reshape(B * length, H, D) for x in (q, k, v))
    mask = torch.arange(length, device=DEVICE)[None] >= used[:, None]
    with torch.no_grad():
        record("padded: varlen_attention on the same data (seqused)", host_us(
            lambda: varattn.varlen_attention(rows_q, rows_k, rows_v, cu, cu, length, length, seqused_q=used,
                                             seqused_k=used), [()] * CALLS))
        for name, lengths in (("list", LENGTHS), ("CPU tensor", torch.tensor(LENGTHS)), ("CUDA tensor", used)):
            record(f"padded: attention(lengths=<{name}>)",
                   host_us(lambda: varattn.attention(q, k, v, lengths=lengths), [()] * CALLS))
        record("padded: attention(key_padding_mask=<CUDA>)",
               host_us(lambda: varattn.attention(q, k, v, key_padding_mask=mask), [()] * CALLS))
    with open(os.path.join(os.environ.get("OUT", "/tmp"), "host_time.json"), "w") as handle:
        json.dump(rows, handle)


if __name__ == "__main__":
    main()
