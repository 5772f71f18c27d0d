"""`varattn.explain`: which backend would run a call, and why the others would not."""
from __future__ import annotations

import inspect

import torch

from .. import dispatch
from ..backends import Backend
from ..params import build_params
from . import batched, sdpa
from .packed import varlen_attention

# Keywords only one of the calls takes (attention's own are told apart by elimination).
_VARLEN_ONLY = frozenset(("q", "k", "v", "cu_seqlens_q", "cu_seqlens_k", "max_seqlen_q", "max_seqlen_k", "attn_bias",
                          "seqused_q", "seqused_k", "block_table"))
_SDPA_ONLY = frozenset(("is_causal", "enable_gqa"))
_ATTENTION_ONLY = frozenset(("layout", "lengths", "kv_lengths", "key_padding_mask", "causal", "causal_align", "window",
                             "return_lse", "deterministic"))
_SIGNATURES = {}


def explain(*args, **kwargs) -> dispatch.Explanation:
    """The dispatch decision for a call, without running it.

    Takes the arguments of one of the three calls, as that call takes them
    (positionally or by name; an argument the call does not take is a
    TypeError) and with its checks (bad input raises what the call raises):

    - `varlen_attention`'s when cu_seqlens are given (an integer tensor as
      the fourth positional argument) or one of its own keywords (q, k, v,
      cu_seqlens_q/k, max_seqlen_q/k, attn_bias, seqused_q/k, block_table);
    - `scaled_dot_product_attention`'s when given is_causal or enable_gqa,
      a CausalBias attn_mask, an attn_mask (or None) as the fourth
      positional argument, or, with none of attention's own keywords,
      dense inputs or a dense attn_mask that are not 4-D (which attention
      does not take);
    - else `attention`'s.

    `print()` the result for a readable report. A scaled_dot_product_attention
    call whose output has no elements runs no backend, and says so.
    """
    kind = _kind(args, kwargs)
    arguments = _signature(kind).bind(*args, **kwargs).arguments
    if kind == "varlen":
        params = build_params(**arguments)
    elif kind == "sdpa":
        params, _, _, shape = sdpa.call(**arguments)
        if params is None:
            return _NoBackendNeeded(shape)
    else:
        params, _, _ = batched.call(**arguments)
    return dispatch.explain_params(params)


def _kind(args, kwargs) -> str:
    """"varlen", "sdpa" or "attention": which call's arguments these are."""
    given = kwargs.keys()
    if not _VARLEN_ONLY.isdisjoint(given):
        return "varlen"
    if len(args) > 3:
        fourth = args[3]
        integers = (isinstance(fourth, torch.Tensor) and not fourth.is_floating_point() and not fourth.is_complex()
                    and fourth.dtype != torch.bool)
        return "varlen" if integers else "sdpa"
    if not _SDPA_ONLY.isdisjoint(given) or sdpa._causal_bias(kwargs.get("attn_mask")) is not None:
        return "sdpa"
    if _ATTENTION_ONLY.isdisjoint(given):
        inputs = [*args, *(kwargs.get(name) for name in ("query", "key", "value"))]
        tensors = [x for x in (*inputs, kwargs.get("attn_mask")) if isinstance(x, torch.Tensor) and not x.is_nested]
        if any(x.dim() != 4 for x in tensors):
            return "sdpa"
    return "attention"


def _signature(kind: str) -> inspect.Signature:
    found = _SIGNATURES.get(kind)
    if found is None:
        function = {"varlen": varlen_attention, "sdpa": sdpa.scaled_dot_product_attention,
                    "attention": batched.attention}[kind]
        found = _SIGNATURES[kind] = inspect.signature(function)
    return found


class _NoBackendNeeded(dispatch.Explanation):
    """A call whose output has no elements: it is made without a backend."""

    def __init__(self, shape):
        why = f"not needed: the output, of shape {tuple(shape)}, has no elements and is made without a backend"
        super().__init__(chosen=None, reasons={backend: [why] for backend in Backend})
        self.shape = tuple(shape)

    def __str__(self) -> str:
        return f"backend: none needed (the output, of shape {self.shape}, has no elements)"
