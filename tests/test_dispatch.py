"""Dispatch: which backend runs, restricting the set, and the reasons when none can."""
from __future__ import annotations

import pytest
import torch

import reference
import varattn
from varattn import Backend


def small(gen, dtype=torch.float32):
    return reference.packed_inputs(gen, [3, 5], [4, 5], 4, 2, 16, dtype=dtype)


def test_explain_cpu(gen):
    explanation = varattn.explain(*small(gen))
    assert explanation.chosen == Backend.MATH
    assert explanation.reasons[Backend.DECODE] == ["not built yet in this version"]
    assert explanation.reasons[Backend.EFFICIENT] == ["not built yet in this version"]
    assert any("cuda" in reason for reason in explanation.reasons[Backend.FLASH])
    assert "backend: math" in str(explanation)


def test_explain_front_end_arguments(gen):
    q = reference.randn(gen, 2, 4, 6, 16)
    assert varattn.explain(q, q, q, lengths=[6, 2], causal=True).chosen == Backend.MATH


def test_use_backends_restricts_and_restores(gen):
    inputs = small(gen)
    with varattn.use_backends("flash", Backend.EFFICIENT):
        with pytest.raises(varattn.NoBackendError) as raised:
            varattn.varlen_attention(*inputs)
        message = str(raised.value)
        for backend in Backend:
            assert backend.value in message
        assert "not allowed by use_backends()" in message
        assert isinstance(raised.value, NotImplementedError)
    assert varattn.explain(*inputs).chosen == Backend.MATH
    with pytest.raises(RuntimeError):
        with varattn.use_backends("math"):
            raise RuntimeError("inside")
    assert varattn.explain(*inputs).chosen == Backend.MATH


def test_use_backends_bad_name():
    with pytest.raises(ValueError, match="use_backends"):
        with varattn.use_backends("fastest"):
            pass


def test_dropout_goes_to_math_on_the_cpu_with_reasons(gen):
    explanation = varattn.explain(*small(gen), dropout_p=0.2)
    assert explanation.chosen == Backend.MATH
    assert any("dropout_p" in why for why in explanation.reasons[Backend.FLASH])


def test_device_checks_toggle():
    varattn.set_device_checks(True)
    assert varattn.checks.device_checks_enabled()
    varattn.set_device_checks(False)
    assert not varattn.checks.device_checks_enabled()


@pytest.mark.gpu
def test_flash_chosen_for_half_precision_on_cuda(gen):
    inputs = reference.packed_inputs(gen, [3, 5], [4, 5], 4, 2, 64, dtype=torch.bfloat16, device="cuda")
    assert varattn.explain(*inputs).chosen == Backend.FLASH
    assert varattn.explain(*inputs, attn_bias=torch.ones(1, 1, 5, 5, dtype=torch.bool, device="cuda")).chosen == Backend.MATH
    fp32 = reference.packed_inputs(gen, [3], [3], 2, 2, 64, device="cuda")
    assert any("dtype" in r for r in varattn.explain(*fp32).reasons[Backend.FLASH])
