"""Every head dim the flash backend takes (32 to 256), fp16 and bf16, full and
causal, on W1's sequences with H = 2048 / D: varattn's flash backend against
torch's varlen_attn, forward, a group per head dim, dtype and mask."""
import pytest

from harness import DEVICE, measure
from workloads import HEAD_DIM_WORKLOADS, SMOKE, Inputs

_inputs = {}  # the last workload's inputs: one batch on the device at a time


@pytest.mark.parametrize("impl", ["varattn-flash", "torch-varlen"])
@pytest.mark.parametrize("name", list(HEAD_DIM_WORKLOADS))
def test_head_dim(benchmark, name, impl):
    if DEVICE.type != "cuda" and not SMOKE:
        pytest.skip("benchmarks need CUDA (VARATTN_BENCH_SMOKE=1 runs them small on the CPU)")
    workload = HEAD_DIM_WORKLOADS[name]
    benchmark.group = workload.group
    if name not in _inputs:
        _inputs.clear()
        _inputs[name] = Inputs(workload, DEVICE)
    measure(benchmark, _inputs[name], impl)
