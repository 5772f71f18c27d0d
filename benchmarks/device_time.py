"""Device time of the flash backend against torch's varlen_attn, packed calls,
for comparing kernels (another checkout's, say) in one sitting.

    python benchmarks/device_time.py [package_dir] [--dims] [--train] [--label NAME]

package_dir: where `varattn` is imported from (default: this checkout).
Times the suites' own `varattn-flash` and `torch-varlen` calls (harness.py)
on the same packed rows of W1-W4 and W9 (--dims: also the head-dim
workloads, bf16 and fp16 D96), the forward or (--train) a training step,
forward + backward to a random output gradient. CUDA events around eight
calls back to back (so the host's time per call hides behind the GPU's),
median of 15;
prints a line per workload and writes device_time_<label>.json under $OUT
(or /tmp). Alternate the package dirs over several runs: the same kernels
vary by a few percent from run to run.
"""
import argparse
import json
import os
import statistics
import sys

parser = argparse.ArgumentParser()
parser.add_argument("package_dir", nargs="?")
parser.add_argument("--dims", action="store_true", help="also the head-dim workloads")
parser.add_argument("--train", action="store_true", help="forward + backward")
parser.add_argument("--label", default="this")
args = parser.parse_args()
if args.package_dir:
    sys.path.insert(0, args.package_dir)

import torch  # noqa: E402

from harness import comparator, training_comparator  # noqa: E402  (the suites' own calls)
from workloads import HEAD_DIM_WORKLOADS, WORKLOADS, Inputs  # noqa: E402

DEVICE = torch.device("cuda")
REPS, INNER = 15, 8


def median_ms(fn):
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(REPS):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(INNER):
            fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) / INNER)
    return statistics.median(times)


def main():
    cases = [(name, WORKLOADS[name]) for name in ("W1", "W2", "W3", "W4", "W9")]
    if args.dims:
        cases += [(name, w) for name, w in HEAD_DIM_WORKLOADS.items() if "bfloat16" in name or "D96" in name]
    make = training_comparator if args.train else comparator
    rows = []
    for name, workload in cases:
        inputs = Inputs(workload, DEVICE)
        mine_ms, theirs_ms = median_ms(make(inputs, "varattn-flash")), median_ms(make(inputs, "torch-varlen"))
        rows.append(dict(workload=name, varattn_ms=mine_ms, torch_varlen_ms=theirs_ms, ratio=mine_ms / theirs_ms))
        print(f"{args.label:8s} {name:22s} varattn {mine_ms:7.3f} ms  torch varlen_attn {theirs_ms:7.3f} ms  "
              f"ratio {mine_ms / theirs_ms:.3f}", flush=True)
    kind = "train" if args.train else "forward"
    with open(os.path.join(os.environ.get("OUT", "/tmp"), f"device_time_{args.label}_{kind}.json"), "w") as handle:
        json.dump(rows, handle, indent=1)


if __name__ == "__main__":
    main()
