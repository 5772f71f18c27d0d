"""The flash backward kernel (kernels_cu/flash_bwd.cu) against the float64 reference's autograd."""
from __future__ import annotations

import pytest
import torch

import reference
import varattn
from test_varlen import FLASH_MASKS
from varattn.backends import flash
from varattn.params import build_params

# Gradients accumulate over a whole sequence and pass through P and dS in
# 16 bits, so they get twice the forward's tolerance.
GRAD_TOLERANCE = {torch.float16: 4e-3, torch.bfloat16: 2e-2}


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("head_dim", flash.BACKWARD_HEAD_DIMS)
@pytest.mark.parametrize("mask", FLASH_MASKS, ids=str)
def test_flash_backward(gen, dtype, head_dim, mask):
    heads, heads_kv = [(8, 8), (8, 2), (8, 1), (6, 3)][hash(str(mask)) % 4]
    lengths_q = reference.lengths(gen, 7, 300)
    lengths_k = reference.lengths(gen, 7, 340)
    q, k, v, cu_q, cu_k = reference.packed_inputs(gen, lengths_q, lengths_k, heads, heads_kv, head_dim, dtype=dtype,
                                                  device="cuda")
    grad_out = reference.randn(gen, *q.shape, dtype=dtype, device="cuda")
    with varattn.use_backends("flash"):
        out, lse = varattn.varlen_attention(q, k, v, cu_q, cu_k, max(lengths_q), max(lengths_k), return_lse=True, **mask)
    params = build_params(q, k, v, cu_q, cu_k, max(lengths_q), max(lengths_k), **mask)
    dq, dk, dv = flash.backward(params, out, lse, grad_out)

    leaves = [x.detach().cpu().double().requires_grad_() for x in (q, k, v)]
    expected, _ = reference.attention(*leaves, cu_q, cu_k, **mask)
    expected.backward(grad_out.cpu().double())
    for name, got, leaf in zip(("dq", "dk", "dv"), (dq, dk, dv), leaves):
        assert got.dtype == dtype and got.shape == leaf.shape, name
        assert not got.isnan().any(), name
        assert reference.relative_error(got, leaf.grad) <= GRAD_TOLERANCE[dtype], name
