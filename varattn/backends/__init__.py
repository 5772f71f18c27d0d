"""The backends, in the order dispatch tries them.

A backend is a module with `CAPABILITIES`, `reasons(params) -> list[str]`
(empty when it can run the call), `forward(params) -> (out, lse)` and
`prepare(params)`, a callable that runs the call into a given output buffer
(`out -> (out, lse)`), for front ends that repeat a call, and
`backward(params, out, lse, grad_out, grad_lse, bias_grad) -> (dq, dk, dv,
dbias or None)` when its CAPABILITIES say `backward`. The ones
not built yet are listed with `None` so that `explain()` can say so.
"""
from __future__ import annotations

import enum

from . import efficient, flash, math


class Backend(str, enum.Enum):
    DECODE = "decode"
    FLASH = "flash"
    EFFICIENT = "efficient"
    MATH = "math"


# Priority order: the specialist first, the fallback last: flash when it can
# run the call, efficient for what flash leaves out, math for the rest.
REGISTRY = {
    Backend.DECODE: None,
    Backend.FLASH: flash,
    Backend.EFFICIENT: efficient,
    Backend.MATH: math,
}
