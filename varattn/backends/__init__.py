"""The backends, in the order dispatch tries them.

A backend is a module with one protocol:
- `CAPABILITIES`, what it supports, and `reasons(params) -> list[str]`, why
  it cannot run a call (empty when it can); dispatch reads only these;
- `forward(params) -> (out, lse)`: out is `params.new_out()` (the caller's
  buffer when params.out is set), lse is (H, total_q) or None when neither
  the caller nor a backward needs it; params carry the call's dropout
  stream when dropout_p > 0 (run.py draws it, once per call);
- `backward(params, out, lse, grad_out, grad_lse, bias_grad) -> (dq, dk, dv,
  dbias or None)`, when CAPABILITIES say `backward`.
"""
from __future__ import annotations

import enum

from . import decode, efficient, flash, math


class Backend(str, enum.Enum):
    """The backends' names, in the order dispatch tries them.

    Members are strings (Backend.MATH == "math"), so either form names a
    backend: in `varattn.use_backends(...)`, which restricts dispatch to the
    backends given, and in `varattn.explain(...).chosen` and `.reasons`,
    which say which backend a call would run on and why each of the others
    would not.

    DECODE: CUDA sm80+, fp16 and bf16, at most 16 queries per sequence
        (decode, speculative decoding) at head dims 64 to 256, the keys split
        over the GPU, contiguous or paged; no mask, bias or dropout.
    FLASH: CUDA sm80+, fp16 and bf16 at head dims 32, 64, 96, 128, 192 and
        256, without a mask, bias or dropout; the fast path.
    EFFICIENT: CUDA sm80+, what flash leaves out: bool masks, additive
        biases, dropout, fp32, any head dim that is a multiple of 8 up to 256.
    MATH: the reference, on the CPU and CUDA: every dtype including fp64,
        head dims up to 512 and every feature (dropout on the CPU only); the
        only backend on the CPU.
    """

    DECODE = "decode"
    FLASH = "flash"
    EFFICIENT = "efficient"
    MATH = "math"


# Priority order: the specialist first, the fallback last: decode for short
# queries, flash when it can run the call, efficient for what flash leaves
# out, math for the rest.
REGISTRY = {
    Backend.DECODE: decode,
    Backend.FLASH: flash,
    Backend.EFFICIENT: efficient,
    Backend.MATH: math,
}
