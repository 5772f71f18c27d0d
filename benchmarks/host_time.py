"""Host time per call of varattn's front ends on W5's batch, the way a model
calls: new views for every call (made ahead, one triple per call), on CUDA.

    python benchmarks/host_time.py [package_dir]

package_dir: where `varattn` is imported from (another checkout, to compare).
Host time: time.perf_counter around the call with no synchronisation (the
GPU runs behind it), median of the calls after the first five. The forms
are timed in turn, ROUNDS times over, since a shared machine's speed drifts
within a run: each line gives the median and the least of the rounds'
medians, and the median of each round's ratio to its anchor (torch SDPA on
the same views, or varlen_attention on the same padded data). Writes
host_time.json under $OUT (or /tmp).
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
ROUNDS = 5


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


def cases():
    """(name, function, argument sets' maker, anchor's name or None) of every call form timed."""
    found = []
    for layout, name in ((torch.jagged, "jagged"), (torch.strided, "strided")):
        x, grad_x = projection(layout), projection(layout, grad=True)
        sdpa = f"{name}: torch SDPA, fresh views"
        found.append((sdpa, F.scaled_dot_product_attention, lambda x=x: views(x), None))
        found.append((f"{name}: varattn.attention, fresh views", varattn.attention, lambda x=x: views(x), sdpa))
        # (the forward only: torch has no backward for chunk on strided NestedTensors)
        found.append((f"{name}: varattn.attention with grad, forward", varattn.attention,
                      lambda x=grad_x: views(x), None))
    length = max(LENGTHS)
    q, k, v = (torch.randn(B, length, H, D, device=DEVICE, dtype=W5.dtype).transpose(1, 2) for _ in range(3))
    cu = torch.arange(B + 1, dtype=torch.int32, device=DEVICE) * length
    used = torch.tensor(LENGTHS, dtype=torch.int32, device=DEVICE)
    rows_q, rows_k, rows_v = (x.transpose(1, 2).reshape(B * length, H, D) for x in (q, k, v))
    mask = torch.arange(length, device=DEVICE)[None] >= used[:, None]
    varlen = "padded: varlen_attention on the same data (seqused)"
    found.append((varlen, lambda: varattn.varlen_attention(rows_q, rows_k, rows_v, cu, cu, length, length,
                                                           seqused_q=used, seqused_k=used), tuple, None))
    for name, lengths in (("list", LENGTHS), ("CPU tensor", torch.tensor(LENGTHS)), ("CUDA tensor", used)):
        found.append((f"padded: attention(lengths=<{name}>)",
                      lambda lengths=lengths: varattn.attention(q, k, v, lengths=lengths), tuple, varlen))
    found.append(("padded: attention(key_padding_mask=<CUDA>)",
                  lambda: varattn.attention(q, k, v, key_padding_mask=mask), tuple, varlen))
    return found


def main():
    print("varattn from", varattn.__file__, "torch", torch.__version__)
    forms = cases()
    rounds = {name: [] for name, *_ in forms}
    for _ in range(ROUNDS):
        for name, fn, make, _ in forms:
            with torch.no_grad() if "grad" not in name else torch.enable_grad():
                rounds[name].append(host_us(fn, [make() for _ in range(CALLS)]))
    rows = []
    print(f"{'call':58s} {'median':>8s} {'least':>8s}  ratio to anchor (median of rounds)")
    for name, _, _, anchor in forms:
        times = rounds[name]
        ratio = statistics.median(t / a for t, a in zip(times, rounds[anchor])) if anchor else None
        rows.append({"call": name, "median_us": statistics.median(times), "least_us": min(times),
                     "anchor": anchor, "ratio": ratio})
        print(f"{name:58s} {statistics.median(times):8.1f} {min(times):8.1f}  "
              + (f"{ratio:.2f} x {anchor.split(': ', 1)[1]}" if anchor else ""), flush=True)
    with open(os.path.join(os.environ.get("OUT", "/tmp"), "host_time.json"), "w") as handle:
        json.dump(rows, handle, indent=1)


if __name__ == "__main__":
    main()
