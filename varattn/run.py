"""How a call runs, once a front end has described it: the one place that
draws dropout, picks the backend through dispatch and runs it.

Three ways, by what the call needs:
- no gradient: the chosen backend's forward, directly;
- a gradient, eagerly: `_Attention`, an autograd.Function whose inputs are
  the caller's own tensors (packed, padded or NestedTensors) and whose
  backward runs the forward's backend;
- traced by torch.compile: the custom ops `varattn::attention` and
  `varattn::attention_backward` on the packed tensors, with fake (shape
  only) implementations so that a model compiles without graph breaks. The
  front end's conversions to and from the packed form are traced torch ops.

A front end hands over the call's AttentionParams and a `Form`, which turns
the packed results into the caller's form and, for the backward, gradients
back (`PACKED` when the caller holds the packed form). The forward keeps
only q, k, v, out, lse, the lengths, the bias and the dropout stream: memory
O(total tokens), no scores or masks.
"""
from __future__ import annotations

import dataclasses
from typing import Protocol

import torch

from . import dispatch, dropout
from .backends import Backend
from .params import AttentionParams


class Form(Protocol):
    """How the packed form maps to the caller's (frontends/ has one per kind of input)."""

    def outputs(self, out: torch.Tensor, lse: torch.Tensor | None):
        """(out, lse) in the caller's form from the packed (total_q, H, Dv) and (H, total_q) or None."""

    def grad_outputs(self, grad_out, grad_lse):
        """The gradients reaching the caller's out and lse (either may be None), packed."""

    def input_grads(self, dq: torch.Tensor, dk: torch.Tensor, dv: torch.Tensor):
        """Packed gradients of q, k and v in the form of the caller's q, k and v."""


class _Packed:
    """The caller holds the packed form: nothing to convert."""

    def outputs(self, out, lse):
        return out, lse

    def grad_outputs(self, grad_out, grad_lse):
        return grad_out, grad_lse

    def input_grads(self, dq, dk, dv):
        return dq, dk, dv


PACKED = _Packed()


def attention(params: AttentionParams, form: Form = PACKED, inputs: tuple | None = None):
    """(out, lse) of the call in the caller's form; lse None unless params.return_lse.

    inputs: the caller's (q, k, v) that gradients flow to when they are not
    params' own: the front end packed them without autograd, and the form's
    conversions run inside the autograd Function, both ways. None: params'
    tensors carry the gradients (packed by differentiable torch ops, if at
    all), and the form's outputs() must be differentiable too.
    """
    if torch.compiler.is_compiling():
        out, lse, _ = torch.ops.varattn.attention(*call_args(params))
        return form.outputs(out, lse if params.return_lse else None)
    if params.requires_grad:
        if inputs is None:
            made = _Attention.apply(params, PACKED, dispatch.allowed(), params.q, params.k, params.v, params.attn_bias)
            return form.outputs(*made) if params.return_lse else form.outputs(made, None)
        made = _Attention.apply(params, form, dispatch.allowed(), *inputs, params.attn_bias)
        return made if params.return_lse else (made, None)
    _, params, out, lse = _forward(params)
    return form.outputs(out, lse if params.return_lse else None)


def _forward(params, allowed=None):
    """(the backend dispatch picks among `allowed`, params with the call's
    dropout stream, out, lse) of the backend's forward."""
    backend = dispatch.select(params, allowed)
    params = dropout.drawn(params)  # only once a backend takes the call: a refused call leaves torch's generator alone
    out, lse = backend.forward(params)
    return backend, params, out, lse


def _bias_grad(bias) -> bool:
    return bias is not None and bias.requires_grad and bias.dtype != torch.bool


def _own(x):
    """A dense output made as a view inside the Function would forbid in-place
    ops on it (autograd's rule for views created in custom Functions)."""
    return x.detach() if type(x) is torch.Tensor and x._base is not None else x


class _Attention(torch.autograd.Function):
    """A call with a gradient, eagerly: the params' tensors (possibly the
    caller's own) go through save_for_backward, the rest of the params and
    the backend that ran the forward beside them. It returns the result
    alone unless lse was asked for: a None beside a NestedTensor output
    makes autograd detach it, which builds another NestedTensor."""

    @staticmethod
    def forward(ctx, params, form, allowed, q, k, v, attn_bias):
        backend, params, out, lse = _forward(params, allowed)
        ctx.save_for_backward(params.q, params.k, params.v, params.attn_bias, out, lse)
        ctx.params = params.with_tensors(None, None, None, None)
        ctx.backend, ctx.form, ctx.bias_grad = backend, form, _bias_grad(attn_bias)
        ctx.set_materialize_grads(False)  # grad_lse stays None unless lse is used
        if not params.return_lse:
            return _own(form.outputs(out, None)[0])
        result, result_lse = form.outputs(out, lse)
        return _own(result), _own(result_lse)

    @staticmethod
    def backward(ctx, grad_result, grad_result_lse=None):
        q, k, v, attn_bias, out, lse = ctx.saved_tensors
        params = ctx.params.with_tensors(q, k, v, attn_bias)
        grad_out, grad_lse = ctx.form.grad_outputs(grad_result, grad_result_lse)
        if grad_out is None:  # only lse reached the loss
            grad_out = torch.zeros_like(out)
        dq, dk, dv, dbias = ctx.backend.backward(params, out, lse, grad_out, grad_lse, ctx.bias_grad)
        return (None, None, None, *ctx.form.input_grads(dq, dk, dv), dbias if ctx.bias_grad else None)


# ---------------------------------------------------------------------------
# The custom ops, for torch.compile.

# What describes a call besides the tensors the backward gets back as saved
# tensors. The scalars travel in two lists: torch's autograd wrapper walks the
# schema's arguments at every call in time quadratic in their number.
_CALL = ("Tensor q, Tensor k, Tensor v, Tensor cu_seqlens_q, Tensor? cu_seqlens_k, Tensor? seqused_q, "
         "Tensor? seqused_k, Tensor? attn_bias, Tensor? block_table, SymInt[] options, float[] scale_and_dropout, "
         "str[] backends")
_TENSORS = 9  # the leading Tensor arguments of _CALL
_BIAS = 7     # where attn_bias is among them
# options: max_seqlen_q, max_seqlen_k, causal, lower_right, window_left, window_right, needs_grad, deterministic

_library = torch.library.Library("varattn", "DEF")
# Outputs: out, lse and the dropout stream (varattn/dropout.py) as an int64
# CPU tensor [seed, offset], which the backward gets back.
_library.define(f"attention({_CALL}) -> (Tensor, Tensor, Tensor)")
_library.define(f"attention_backward(Tensor grad_out, Tensor? grad_lse, Tensor out, Tensor lse, "
                f"Tensor dropout_state, bool bias_grad, {_CALL}) -> (Tensor, Tensor, Tensor, Tensor)")


def call_args(params: AttentionParams) -> tuple:
    """The _CALL arguments of `params`, with the backends use_backends allows now."""
    options = [params.max_seqlen_q, params.max_seqlen_k, int(params.causal), int(params.causal_align == "lower_right"),
               *params.window, int(params.requires_grad), int(params.deterministic)]
    return (params.q, params.k, params.v, params.cu_seqlens_q, params.cu_seqlens_k, params.seqused_q,
            params.seqused_k, params.attn_bias, params.block_table, options, [params.scale, params.dropout_p],
            dispatch.allowed_names())


def _params(q, k, v, cu_seqlens_q, cu_seqlens_k, seqused_q, seqused_k, attn_bias, block_table, options,
            scale_and_dropout, backends):
    """(AttentionParams, allowed backends) of _CALL arguments, checked when the front end built them."""
    max_seqlen_q, max_seqlen_k, causal, lower_right, window_left, window_right, needs_grad, deterministic = options
    scale, dropout_p = scale_and_dropout
    params = AttentionParams(
        q=q, k=k, v=v, cu_seqlens_q=cu_seqlens_q, cu_seqlens_k=cu_seqlens_k, seqused_q=seqused_q,
        seqused_k=seqused_k, max_seqlen_q=max_seqlen_q, max_seqlen_k=max_seqlen_k, causal=bool(causal),
        causal_align="lower_right" if lower_right else "upper_left", window=(window_left, window_right),
        scale=scale, attn_bias=attn_bias, dropout_p=dropout_p, return_lse=True, requires_grad=bool(needs_grad),
        deterministic=bool(deterministic), block_table=block_table)
    return params, frozenset(Backend(b) for b in backends)


def _state_tensor(params) -> torch.Tensor:
    if params.dropout_state is None:
        return torch.zeros(2, dtype=torch.int64)
    seed, offset = params.dropout_state
    return torch.tensor([seed - 2**64 if seed >= 2**63 else seed, offset], dtype=torch.int64)  # seed as uint64 bits


@torch.library.impl(_library, "attention", "CompositeExplicitAutograd")
def _attention(*call):
    _, params, out, lse = _forward(*_params(*call))
    return out, lse, _state_tensor(params)


@torch.library.register_fake("varattn::attention")
def _attention_fake(q, k, v, *rest):
    lse_dtype = torch.float64 if q.dtype == torch.float64 else torch.float32
    return (q.new_empty(q.shape[0], q.shape[1], v.shape[-1]), q.new_empty(q.shape[1], q.shape[0], dtype=lse_dtype),
            torch.empty(2, dtype=torch.int64))


@torch.library.impl(_library, "attention_backward", "CompositeExplicitAutograd")
def _attention_backward(grad_out, grad_lse, out, lse, dropout_state, bias_grad, *call):
    params, allowed = _params(*call)
    if params.dropout_p > 0:
        seed, offset = dropout_state.tolist()
        params = dataclasses.replace(params, dropout_state=(seed & (2**64 - 1), offset))
    backend = dispatch.select(params, allowed)  # the forward's: same call, same allowed backends
    dq, dk, dv, dbias = backend.backward(params, out, lse, grad_out, grad_lse, bias_grad)
    return dq, dk, dv, params.q.new_empty(0) if dbias is None else dbias


@torch.library.register_fake("varattn::attention_backward")
def _attention_backward_fake(grad_out, grad_lse, out, lse, dropout_state, bias_grad, q, k, v, cu_q, cu_k, used_q, used_k,
                             bias, block_table, *rest):
    dbias = bias.new_empty(bias.shape) if bias_grad else q.new_empty(0)
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape), dbias


def _setup_context(ctx, inputs, output):
    ctx.save_for_backward(*inputs[:_TENSORS], *output)
    ctx.options = inputs[_TENSORS:]
    ctx.bias_grad = _bias_grad(inputs[_BIAS])
    ctx.set_materialize_grads(False)  # grad_lse stays None unless lse is used


def _backward(ctx, grad_out, grad_lse, grad_state):
    *tensors, out, lse, dropout_state = ctx.saved_tensors
    if grad_out is None:  # the op's schema takes a tensor
        grad_out = torch.zeros_like(out)
    dq, dk, dv, dbias = torch.ops.varattn.attention_backward(grad_out, grad_lse, out, lse, dropout_state, ctx.bias_grad,
                                                              *tensors, *ctx.options)
    return (dq, dk, dv, None, None, None, None, dbias if ctx.bias_grad else None, None) + (None,) * len(ctx.options)


torch.library.register_autograd("varattn::attention", _backward, setup_context=_setup_context)
