"""`varattn.explain`: which backend would run a call, and why the others would not."""
from __future__ import annotations

from .. import dispatch
from ..params import build_params
from . import batched


def explain(query, key, value, *args, **kwargs) -> dispatch.Explanation:
    """The dispatch decision for a call, without running it.

    Takes the arguments of `varlen_attention` when cu_seqlens are given
    (positionally or as cu_seqlens_q=...), else those of `attention`.
    `print()` the result for a readable report.
    """
    if args or "cu_seqlens_q" in kwargs:
        params = build_params(query, key, value, *args, **kwargs)
    else:
        params, _, _ = batched.call(query, key, value, **kwargs)
    return dispatch.explain_params(params)
