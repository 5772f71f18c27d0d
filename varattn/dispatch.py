"""Choose a backend for a call, or say why none can run it.

Walks the backends in priority order and takes the first whose `reasons()`
is empty among those allowed by `use_backends`. `explain()` gives the same
report without running anything.
"""
from __future__ import annotations

import contextlib
import contextvars
from dataclasses import dataclass, field

import torch

from .backends import REGISTRY, Backend

_allowed: contextvars.ContextVar[frozenset] = contextvars.ContextVar(
    "varattn_allowed_backends", default=frozenset(Backend))


# A backend's reasons() read the call's structure (params.structure: what
# build_params says it covers), params.deterministic (which torch's global
# setting can turn on) and its tensors' addresses only to see that they are
# 16-byte aligned; so one choice serves every call of a structure with the
# same address residues, deterministic mode and allowed backends, and is
# kept in the structure's `derived`.


class NoBackendError(NotImplementedError):
    """No allowed backend can run the call; the message lists every backend's reasons."""


def allowed() -> frozenset:
    """The backends `use_backends` allows here."""
    return _allowed.get()


def allowed_names() -> list[str]:
    """The names of `allowed()`, sorted; torch.compile takes them as a constant of the traced call."""
    return sorted(b.value for b in _allowed.get())


# What torch.compiler.assume_constant_result sets, set directly: the decorator
# imports torch._dynamo, two seconds that an eager user would pay at import
# (tests/test_torch_private.py checks the attribute is still the one it sets).
allowed_names._dynamo_marked_constant = True


@contextlib.contextmanager
def use_backends(*backends):
    """Restrict dispatch to `backends` (Backend members or their names) inside the block.

    Like `torch.nn.attention.sdpa_kernel`: `with varattn.use_backends("math"): ...`
    """
    if len(backends) == 1 and isinstance(backends[0], (list, tuple, set, frozenset)):
        backends = tuple(backends[0])
    try:
        chosen = frozenset(Backend(b) for b in backends)
    except ValueError:
        names = ", ".join(b.value for b in Backend)
        raise ValueError(f"use_backends takes backends among {names}; got {backends!r}") from None
    token = _allowed.set(chosen)
    try:
        yield
    finally:
        _allowed.reset(token)


@dataclass
class Explanation:
    """Which backend would run the call, and why each of the others would not."""
    chosen: Backend | None
    reasons: dict = field(default_factory=dict)   # Backend -> list[str]

    def __str__(self) -> str:
        lines = [f"backend: {self.chosen.value if self.chosen else 'none can run this call'}"]
        for backend, why in self.reasons.items():
            if why:
                lines.append(f"  {backend.value}: " + "; ".join(why))
        return "\n".join(lines)


def explain_params(params) -> Explanation:
    allowed = _allowed.get()
    explanation = Explanation(chosen=None)
    for backend, module in REGISTRY.items():
        why = list(module.reasons(params))
        if backend not in allowed:
            why.insert(0, "not allowed by use_backends()")
        if not why and explanation.chosen is not None:
            why = [f"could run, but {explanation.chosen.value} comes first"]
        if not why:
            explanation.chosen = backend
        explanation.reasons[backend] = why
    return explanation


def select(params, allowed=None):
    """The module of the first backend in `allowed` (default: what
    use_backends allows) that can run the call (later ones are not asked);
    raises NoBackendError listing every backend's reasons."""
    allowed = _allowed.get() if allowed is None else allowed
    structure, key = params.structure, None
    if structure is not None:
        key = (allowed, params.deterministic, params.q.data_ptr() % 16, params.k.data_ptr() % 16,
               params.v.data_ptr() % 16)
        found = structure.derived.get(key)
        if found is not None:
            return found
    for backend, module in REGISTRY.items():
        if backend in allowed and not module.reasons(params):
            if key is not None:
                structure.derived[key] = module
            return module
    token = _allowed.set(allowed)
    try:
        why = str(explain_params(params))
    finally:
        _allowed.reset(token)
    raise NoBackendError("varattn: no backend can run this call.\n" + why)
