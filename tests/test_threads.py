"""First use from many threads at once: each kernel is compiled once, every
thread gets its kernel, and on CUDA every result is right."""
from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch

from varattn.cuda import loader

THREADS = 8


def test_loader_compiles_each_kernel_once(monkeypatch):
    """Eight threads ask for two kernels at once (four each): two compiles,
    the second while the first is under way; all get the one compiled."""
    compiled = []

    def slow_compile(family, name, device, shared_mem):
        compiled.append(name)
        time.sleep(0.2)
        return loader.Kernel(name, len(compiled), 0)
    monkeypatch.setattr(loader, "_compile", slow_compile)
    monkeypatch.setattr(loader, "_kernels", {})
    start, got = threading.Barrier(THREADS), [None] * THREADS

    def ask(i):
        start.wait()
        got[i] = loader.kernel("math", f"k<{i % 2}>", torch.device("cuda", 0))
    threads = [threading.Thread(target=ask, args=(i,)) for i in range(THREADS)]
    began = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(compiled) == ["k<0>", "k<1>"]
    assert time.perf_counter() - began < 0.39  # the two compiled side by side
    for i, kernel in enumerate(got):
        assert kernel is got[i % 2] and kernel.name == f"k<{i % 2}>"


# A fresh process: eight threads call varattn at once on configurations that
# share kernels (the first four) or not; each checks its result against the
# float64 reference; compiles are counted from the loader's log.
_SCRIPT = r"""
import json, logging, sys, threading
sys.path[:0] = [sys.argv[1], sys.argv[2]]
import torch, reference, varattn
records = []
class Count(logging.Handler):
    def emit(self, record):
        if "ready for" in record.msg:  # args: the instance, its family
            records.append(f"{record.args[1]}: {record.args[0]}")
logger = logging.getLogger("varattn")
logger.setLevel(logging.INFO)
logger.addHandler(Count())
CONFIGS = [dict(dtype=torch.float16, head_dim=64, causal=True)] * 4 + [
    dict(dtype=torch.bfloat16, head_dim=128, causal=False), dict(dtype=torch.float16, head_dim=96, causal=True),
    dict(dtype=torch.float32, head_dim=64, causal=False), dict(dtype=torch.bfloat16, head_dim=32, causal=True)]
TOLERANCE = {torch.float16: 2e-3, torch.bfloat16: 1e-2, torch.float32: 1e-5}
start, errors = threading.Barrier(len(CONFIGS)), [None] * len(CONFIGS)
def run(i):
    config = CONFIGS[i]
    gen = torch.Generator().manual_seed(i)
    lengths = reference.lengths(gen, 6, 300)
    q, k, v, cu_q, cu_k = reference.packed_inputs(gen, lengths, lengths, 4, 2, config["head_dim"],
                                                  dtype=config["dtype"], device="cuda")
    start.wait()
    out = varattn.varlen_attention(q, k, v, cu_q, cu_k, max(lengths), max(lengths), causal=config["causal"])
    torch.cuda.synchronize()
    expected, _ = reference.attention(q, k, v, cu_q, cu_k, causal=config["causal"])
    errors[i] = reference.relative_error(out, expected) / TOLERANCE[config["dtype"]]
threads = [threading.Thread(target=run, args=(i,)) for i in range(len(CONFIGS))]
for t in threads: t.start()
for t in threads: t.join()
counts = {}
for name in records:
    counts[name] = counts.get(name, 0) + 1
print(json.dumps({"errors": errors, "compiles": counts}))
"""


@pytest.mark.gpu
def test_first_use_from_eight_threads_on_cuda():
    tests, root = Path(__file__).parent, Path(__file__).parent.parent
    result = subprocess.run([sys.executable, "-c", _SCRIPT, str(tests), str(root)], capture_output=True, text=True,
                            timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert all(e is not None and e <= 1.0 for e in report["errors"]), report["errors"]
    assert report["compiles"] and all(n == 1 for n in report["compiles"].values()), report["compiles"]
