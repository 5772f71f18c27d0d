"""`import varattn` stays cheap: CuPy, torch._dynamo and the compile machinery
load on first use only, and the import adds little to `import torch`."""
import json
import subprocess
import sys

# Modules that take seconds to import and that an eager CPU or CUDA user need not pay for at import.
DEFERRED = ("cupy", "torch._dynamo", "torch._inductor", "sympy", "torch.nn.attention.bias")

_PROBE = f"""
import json, sys, time
started = time.perf_counter()
import torch
torch_s = time.perf_counter() - started
started = time.perf_counter()
import varattn
varattn_s = time.perf_counter() - started
print(json.dumps(dict(torch_s=torch_s, varattn_s=varattn_s, loaded=[m for m in {DEFERRED!r} if m in sys.modules])))
"""


def _import_times() -> dict:
    done = subprocess.run([sys.executable, "-c", _PROBE], capture_output=True, text=True, check=True)
    return json.loads(done.stdout.splitlines()[-1])


def test_import_defers_heavy_modules():
    assert _import_times()["loaded"] == []


def test_import_adds_little_to_import_torch():
    # The goal is at most 0.3 s over `import torch` (about 2-3 s);
    # measured as a ratio to torch's import in the same process, the least of
    # three runs, so a loaded machine slows both alike.
    ratio = min(t["varattn_s"] / t["torch_s"] for t in (_import_times() for _ in range(3)))
    assert ratio < 0.15, f"import varattn took {ratio:.2f}x import torch's time"
