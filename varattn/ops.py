"""The packed call with a gradient: torch.library custom ops for
torch.compile, and an autograd.Function for eager calls.

`varattn::attention` runs the forward of the backend that dispatch picks and
returns (out, lse, the dropout stream it drew); `varattn::attention_backward`
runs that backend's backward from the saved q, k, v, out, lse, lengths, bias
and dropout stream: memory O(total tokens), no scores or masks kept. Both
ops have fake implementations (shapes only), so torch.compile traces a model
through varattn without graph breaks, with the gradient formula registered
on the forward op. Eager calls take `_EagerAttention`, which runs the same
forward and backward (`_forward`, `_backward_of`) without the custom-op
machinery: torch's wrapper costs a few hundred microseconds of host time
per call, all of it before the forward's kernel is launched.

Only calls that need a gradient, or run under torch.compile, come here:
`dispatch.run` calls the backend directly otherwise, without the dispatcher.
The backends allowed by `use_backends` at the forward go with the call, so
the backward runs on the forward's backend wherever it is called.
"""

import dataclasses

import torch

from . import dispatch, dropout
from .backends import Backend
from .params import AttentionParams

# What describes a call besides the tensors the backward gets back as saved
# tensors. The scalars travel in two lists: torch's autograd wrapper walks the
# schema's arguments at every call in time quadratic in their number.
_CALL = ("Tensor q, Tensor k, Tensor v, Tensor cu_seqlens_q, Tensor cu_seqlens_k, Tensor? seqused_q, "
         "Tensor? seqused_k, Tensor? attn_bias, SymInt[] options, float[] scale_and_dropout, str[] backends")
_TENSORS = 8  # the leading Tensor arguments of _CALL
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
            params.seqused_k, params.attn_bias, options, [params.scale, params.dropout_p], dispatch.allowed_names())


def _params(q, k, v, cu_seqlens_q, cu_seqlens_k, seqused_q, seqused_k, attn_bias, options, scale_and_dropout, backends):
    """(AttentionParams, allowed backends) of _CALL arguments, checked when the front end built them."""
    max_seqlen_q, max_seqlen_k, causal, lower_right, window_left, window_right, needs_grad, deterministic = options
    scale, dropout_p = scale_and_dropout
    params = AttentionParams(
        q=q, k=k, v=v, cu_seqlens_q=cu_seqlens_q, cu_seqlens_k=cu_seqlens_k, seqused_q=seqused_q,
        seqused_k=seqused_k, max_seqlen_q=max_seqlen_q, max_seqlen_k=max_seqlen_k, causal=bool(causal),
        causal_align="lower_right" if lower_right else "upper_left", window=(window_left, window_right),
        scale=scale, attn_bias=attn_bias, dropout_p=dropout_p, return_lse=True, requires_grad=bool(needs_grad),
        deterministic=bool(deterministic))
    return params, frozenset(Backend(b) for b in backends)


def attention(params: AttentionParams):
    """(out, lse) of the call, differentiable (lse None unless params.return_lse)."""
    if torch.compiler.is_compiling():
        out, lse, _ = torch.ops.varattn.attention(*call_args(params))
    else:
        out, lse = _EagerAttention.apply(params.q, params.k, params.v, params.attn_bias, params, dispatch.allowed())
    return out, lse if params.return_lse else None


def _forward(params, allowed):
    """(params with its dropout stream, out, lse) from the backend dispatch picks."""
    backend = dispatch.select(params, allowed)
    params = dropout.drawn(params)  # only once a backend takes the call: a refused call leaves torch's generator alone
    out, lse = backend.forward(params)
    return params, out, lse


def _backward_of(params, allowed, out, lse, grad_out, grad_lse, bias_grad: bool):
    """(dq, dk, dv, dbias or None) of the call whose forward gave out and lse."""
    if grad_out is None:  # only lse reached the loss
        grad_out = torch.zeros_like(out)
    return dispatch.select(params, allowed).backward(params, out, lse, grad_out, grad_lse, bias_grad)


def _bias_grad(bias) -> bool:
    return bias is not None and bias.requires_grad and bias.dtype != torch.bool


class _EagerAttention(torch.autograd.Function):
    """The call's autograd outside torch.compile; the tensors go through
    save_for_backward, the rest of the params beside them."""

    @staticmethod
    def forward(ctx, q, k, v, attn_bias, params, allowed):
        params, out, lse = _forward(params, allowed)
        ctx.save_for_backward(q, k, v, attn_bias, out, lse)
        ctx.params = dataclasses.replace(params, q=None, k=None, v=None, attn_bias=None, out=None)
        ctx.allowed, ctx.bias_grad = allowed, _bias_grad(attn_bias)
        ctx.set_materialize_grads(False)  # grad_lse stays None unless lse is used
        return out, lse

    @staticmethod
    def backward(ctx, grad_out, grad_lse):
        q, k, v, attn_bias, out, lse = ctx.saved_tensors
        params = dataclasses.replace(ctx.params, q=q, k=k, v=v, attn_bias=attn_bias)
        dq, dk, dv, dbias = _backward_of(params, ctx.allowed, out, lse, grad_out, grad_lse, ctx.bias_grad)
        return dq, dk, dv, dbias if ctx.bias_grad else None, None, None


def _state_tensor(params) -> torch.Tensor:
    if params.dropout_state is None:
        return torch.zeros(2, dtype=torch.int64)
    seed, offset = params.dropout_state
    return torch.tensor([seed - 2**64 if seed >= 2**63 else seed, offset], dtype=torch.int64)  # seed as uint64 bits


@torch.library.impl(_library, "attention", "CompositeExplicitAutograd")
def _attention(*call):
    params, out, lse = _forward(*_params(*call))
    return out, lse, _state_tensor(params)


@torch.library.register_fake("varattn::attention")
def _attention_fake(q, k, v, *rest):
    lse_dtype = torch.float64 if q.dtype == torch.float64 else torch.float32
    return (q.new_empty(q.shape[0], q.shape[1], v.shape[2]), q.new_empty(q.shape[1], q.shape[0], dtype=lse_dtype),
            torch.empty(2, dtype=torch.int64))


@torch.library.impl(_library, "attention_backward", "CompositeExplicitAutograd")
def _attention_backward(grad_out, grad_lse, out, lse, dropout_state, bias_grad, *call):
    params, allowed = _params(*call)
    if params.dropout_p > 0:
        seed, offset = dropout_state.tolist()
        params = dataclasses.replace(params, dropout_state=(seed & (2**64 - 1), offset))
    dq, dk, dv, dbias = _backward_of(params, allowed, out, lse, grad_out, grad_lse, bias_grad)
    return dq, dk, dv, params.q.new_empty(0) if dbias is None else dbias


@torch.library.register_fake("varattn::attention_backward")
def _attention_backward_fake(grad_out, grad_lse, out, lse, dropout_state, bias_grad, q, k, v, cu_q, cu_k, used_q, used_k,
                             bias, *rest):
    dbias = bias.new_empty(bias.shape) if bias_grad else q.new_empty(0)
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape), dbias


def _setup_context(ctx, inputs, output):
    ctx.save_for_backward(*inputs[:_TENSORS], *output)
    ctx.options = inputs[_TENSORS:]
    ctx.bias_grad = _bias_grad(inputs[_TENSORS - 1])
    ctx.set_materialize_grads(False)  # grad_lse stays None unless lse is used


def _backward(ctx, grad_out, grad_lse, grad_state):
    *tensors, out, lse, dropout_state = ctx.saved_tensors
    if grad_out is None:  # the op's schema takes a tensor
        grad_out = torch.zeros_like(out)
    dq, dk, dv, dbias = torch.ops.varattn.attention_backward(grad_out, grad_lse, out, lse, dropout_state, ctx.bias_grad,
                                                              *tensors, *ctx.options)
    return (dq, dk, dv, None, None, None, None, dbias if ctx.bias_grad else None) + (None,) * len(ctx.options)


torch.library.register_autograd("varattn::attention", _backward, setup_context=_setup_context)
