"""Shared fixtures: one tolerance table, NaN-poisoned outputs, fresh generators, the gpu marker."""
from __future__ import annotations

import contextlib
import math

import pytest
import torch

import varattn
from varattn.frontends.nested import StridedSide
from varattn.params import AttentionParams

# Relative error ||out - ref|| / ||ref|| allowed per dtype; lse absolute.
TOLERANCE = {torch.float64: 1e-10, torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1e-2}
LSE_TOLERANCE = {torch.float64: 1e-10, torch.float32: 1e-5, torch.float16: 1e-3, torch.bfloat16: 1e-3}

has_cuda = torch.cuda.is_available()


@contextlib.contextmanager
def allow_tf32(allowed: bool):
    """torch.backends.cuda.matmul.allow_tf32 = allowed inside the block, restored after."""
    from varattn.backends import efficient
    was = efficient.tf32_allowed()  # reading allow_tf32 itself raises once torch's newer setting was used
    torch.backends.cuda.matmul.allow_tf32 = allowed
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32 = was


def pytest_collection_modifyitems(items):
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords and not has_cuda:
            item.add_marker(skip)


@pytest.fixture
def gen(request):
    """A generator seeded from the test's id: fresh inputs per test, reproducible per run."""
    return torch.Generator().manual_seed(hash(request.node.nodeid) % 2**31)


@pytest.fixture(autouse=True)
def poisoned_outputs(monkeypatch):
    """Every output buffer a kernel must fill completely starts as NaN, so an
    element it leaves unwritten fails the comparison. (With seqused the zeros
    and -inf of the rows outside every sequence are intended.)"""
    new_out, new_lse = AttentionParams.new_out, AttentionParams.new_lse

    def poisoned(make):
        def wrapper(self):
            buffer = make(self)
            if self.seqused_q is None:
                buffer.fill_(math.nan)
            return buffer
        return wrapper
    monkeypatch.setattr(AttentionParams, "new_out", poisoned(new_out))
    monkeypatch.setattr(AttentionParams, "new_lse", poisoned(new_lse))
    new_nested = StridedSide.new_nested

    def poisoned_nested(self, *args):
        made = new_nested(self, *args)
        if made is not None:
            made[0].fill_(math.nan)
        return made
    monkeypatch.setattr(StridedSide, "new_nested", poisoned_nested)


@pytest.fixture(autouse=True)
def no_device_checks():
    varattn.set_device_checks(False)
    yield
    varattn.set_device_checks(False)
