"""torch's flash attention hook on varattn: `register()` adds the implementation
"varattn" to torch's registry (torch.nn.attention.register_flash_attention_impl),
so that

    import varattn.integrations.torch
    varattn.integrations.torch.register()
    torch.nn.attention.activate_flash_attention_impl("varattn")

runs torch's flash attention ops on varattn until
`torch.nn.attention.restore_flash_attention_impl()`. Registering activates
nothing (torch asks providers to leave that to the user), and importing this
module registers nothing.

The contract (torch 2.13's nn/attention/_registry.py, _fa4.py and the aten
schemas): activating calls the registered function, which replaces the
kernels of the aten flash ops through torch.library and returns a handle
whose remove() undoes it; torch keeps the handle until restore. The ops,
replaced here for CUDA and for the CPU (where torch has no kernel for them):

- _flash_attention_forward / _flash_attention_backward: varlen (T, H, D)
  with cum_seq_q/k, or dense (B, L, H, D); lse (H, T_q) or (B, H, L_q)
  float32; what torch's varlen_attn and its jagged NestedTensor SDPA call;
- _scaled_dot_product_flash_attention and its backward: (B, H, L, D), the
  SDPA flash path of dense tensors;
- _flash_attention_forward_no_dropout_inplace (torch 2.13; varlen_attn_out).

They keep FlashAttention-2's semantics (varattn/frontends/varlen_attn.py):
is_causal and windows aligned lower-right, the window rules of its
flash_api.cpp, the outputs' shapes and strides as torch's meta functions
give them (compiled graphs check them). A row that sees no key has lse
-inf (FlashAttention-2 writes +inf). The forward's rng_state output carries
varattn's dropout stream to the backward; return_debug_mask, alibi_slopes,
block_table, num_splits and seqused_k on dense inputs raise
NotImplementedError.

Autograd stays torch's: its formulas for these ops call the backward op.
The forward cannot tell whether torch's varlen_attn will differentiate it
(torch runs it without grad mode), so dispatch may choose the forward's
backend without regard for the backward, which then picks its own; both
compute the same lse.
"""
from __future__ import annotations

import dataclasses

import torch

from .. import run
from ..frontends.ragged import slots
from ..frontends.varlen_attn import fa2_mask, refuse
from ..params import build_params

NAME = "varattn"
KEYS = ("CUDA", "CPU")


def register() -> None:
    """Add "varattn" to torch's flash attention implementations (not activated).

    Raises RuntimeError where torch has no such registry
    (torch.nn.attention.register_flash_attention_impl; torch 2.13 has it)."""
    register_impl = getattr(torch.nn.attention, "register_flash_attention_impl", None)
    if register_impl is None:
        raise RuntimeError(f"torch {torch.__version__} has no torch.nn.attention.register_flash_attention_impl")
    register_impl(NAME, register_fn=activate)


@dataclasses.dataclass
class Handle:
    """What torch's registry keeps while varattn is active: dropping the
    library unregisters its kernels (torch.library's finalizer)."""
    library: torch.library.Library | None

    def remove(self) -> None:
        self.library = None


def activate() -> Handle:
    """Replace the aten flash ops' CUDA and CPU kernels with varattn's (what
    torch's activate_flash_attention_impl("varattn") calls)."""
    library = torch.library.Library("aten", "IMPL")
    for name, kernel in _KERNELS.items():
        if hasattr(torch.ops.aten, name):  # an older torch may lack some
            for key in KEYS:
                library.impl(name, kernel, key)
    return Handle(library)


# ---------------------------------------------------------------------------
# The kernels. Keyword arguments beyond those named are other releases' (the
# schemas change from release to release): honoured when left unset.

def flash_forward(query, key, value, cum_seq_q, cum_seq_k, max_q, max_k, dropout_p, is_causal, return_debug_mask, *,
                  scale=None, window_size_left=None, window_size_right=None, seqused_k=None, alibi_slopes=None,
                  block_table=None, num_splits=None, **newer):
    """aten::_flash_attention_forward -> (output, logsumexp, rng_state, unused, debug_attn_mask)."""
    refuse("aten::_flash_attention_forward", return_debug_mask=return_debug_mask, alibi_slopes=alibi_slopes,
           block_table=block_table, num_splits=num_splits, **newer)
    _check_cum_seq(cum_seq_q, cum_seq_k)
    if cum_seq_q is None:
        out, lse, state = _dense_forward(query, key, value, dropout_p, is_causal, scale, window_size_left,
                                         window_size_right, seqused_k)
    else:
        params = _params(query, key, value, cum_seq_q, cum_seq_k, max_q, max_k, dropout_p, is_causal, scale,
                         window_size_left, window_size_right, seqused_k)
        out, lse, state = torch.ops.varattn.attention(*run.call_args(params))
    return _strided_like(out, query), lse, state, _unused(), query.new_empty(0)


def flash_backward(grad_out, query, key, value, out, logsumexp, cum_seq_q, cum_seq_k, max_q, max_k, dropout_p,
                   is_causal, rng_state, unused, *, scale=None, window_size_left=None, window_size_right=None):
    """aten::_flash_attention_backward -> (grad_query, grad_key, grad_value)."""
    _check_cum_seq(cum_seq_q, cum_seq_k)
    if cum_seq_q is None:
        dq, dk, dv = _dense_backward(grad_out, query, key, value, out, logsumexp, dropout_p, is_causal, rng_state,
                                     scale, window_size_left, window_size_right)
    else:
        params = _params(query, key, value, cum_seq_q, cum_seq_k, max_q, max_k, dropout_p, is_causal, scale,
                         window_size_left, window_size_right, requires_grad=True)
        dq, dk, dv, _ = torch.ops.varattn.attention_backward(grad_out, None, out, logsumexp, rng_state, False,
                                                             *run.call_args(params))
    return _strided_like(dq, query), _strided_like(dk, key), _strided_like(dv, value)


def flash_forward_inplace(out, query, key, value, cum_seq_q, cum_seq_k, max_q, max_k, dropout_p, is_causal,
                          return_debug_mask, *, scale=None, window_size_left=None, window_size_right=None,
                          seqused_k=None, alibi_slopes=None, block_table=None, num_splits=None, **newer):
    """aten::_flash_attention_forward_no_dropout_inplace: the output written into `out`; -> logsumexp."""
    refuse("aten::_flash_attention_forward_no_dropout_inplace", return_debug_mask=return_debug_mask,
           alibi_slopes=alibi_slopes, block_table=block_table, num_splits=num_splits, **newer)
    if cum_seq_q is None:
        raise NotImplementedError("aten::_flash_attention_forward_no_dropout_inplace: dense (batch, length, heads, "
                                  "dim) inputs not supported by varattn yet; pass cum_seq_q and cum_seq_k")
    params = _params(query, key, value, cum_seq_q, cum_seq_k, max_q, max_k, dropout_p, is_causal, scale,
                     window_size_left, window_size_right, seqused_k, requires_grad=False, out=out)
    expected = (query.shape[0], query.shape[1], value.shape[2])
    if (out.shape, out.dtype, out.device) != (expected, query.dtype, query.device) or out.stride(2) != 1:
        raise ValueError(f"out must be a {expected} {query.dtype} tensor on {query.device} with unit stride on its "
                         f"last dim, got {tuple(out.shape)} {out.dtype} on {out.device}, strides {out.stride()}")
    return run.attention(params)[1]


def sdpa_forward(query, key, value, dropout_p=0.0, is_causal=False, return_debug_mask=False, *, scale=None):
    """aten::_scaled_dot_product_flash_attention on (B, H, L, D) -> (output, logsumexp, cum_seq_q,
    cum_seq_k, max_q, max_k, rng_state, unused, debug_attn_mask)."""
    refuse("aten::_scaled_dot_product_flash_attention", return_debug_mask=return_debug_mask)
    out, lse, state = _dense_forward(*_blhd(query, key, value), dropout_p, is_causal, scale)
    return (_strided_like(out.transpose(1, 2), query), lse, None, None, query.shape[2], key.shape[2], state, _unused(),
            query.new_empty(0))


def sdpa_backward(grad_out, query, key, value, out, logsumexp, cum_seq_q, cum_seq_k, max_q, max_k, dropout_p,
                  is_causal, philox_seed, philox_offset, *, scale=None):
    """aten::_scaled_dot_product_flash_attention_backward -> (grad_query, grad_key, grad_value)."""
    grads = _dense_backward(*_blhd(grad_out, query, key, value, out), logsumexp, dropout_p, is_causal, philox_seed,
                            scale)
    return tuple(_strided_like(g.transpose(1, 2), x) for g, x in zip(grads, (query, key, value)))


_KERNELS = {
    "_flash_attention_forward": flash_forward,
    "_flash_attention_backward": flash_backward,
    "_flash_attention_forward_no_dropout_inplace": flash_forward_inplace,
    "_scaled_dot_product_flash_attention": sdpa_forward,
    "_scaled_dot_product_flash_attention_backward": sdpa_backward,
}


def _params(query, key, value, cu_q, cu_k, max_q, max_k, dropout_p, is_causal, scale, left, right, seqused_k=None,
            requires_grad=None, out=None):
    """The packed call of an aten flash op's arguments. requires_grad None:
    whether autograd is recording (needs_grad), for dispatch to choose a
    backend whose backward can follow."""
    causal, window = fa2_mask(-1 if left is None else left, -1 if right is None else right, is_causal, max_k)
    return build_params(query, key, value, cu_q, cu_k, max_q, max_k, causal=causal, causal_align="lower_right",
                        window=window, scale=scale, dropout_p=dropout_p, seqused_k=seqused_k, return_lse=True,
                        requires_grad=requires_grad, out=out)


def _dense_params(query, key, value, dropout_p, is_causal, scale, left, right, requires_grad=None):
    """A dense (B, L, H, D) call as a packed one: each batch element a slot of L rows."""
    if not query.dim() == key.dim() == value.dim() == 4 or not query.shape[0] == key.shape[0] == value.shape[0]:
        raise ValueError(f"dense query, key and value must be 4-D with one batch size, got shapes "
                         f"{tuple(query.shape)}, {tuple(key.shape)}, {tuple(value.shape)}")
    batch, len_q, len_k = query.shape[0], query.shape[1], key.shape[1]
    cu_q = slots(batch, len_q, query.device)
    cu_k = cu_q if len_k == len_q else slots(batch, len_k, query.device)
    return _params(*(x.flatten(0, 1) for x in (query, key, value)), cu_q, cu_k, len_q, len_k, dropout_p, is_causal,
                   scale, left, right, requires_grad=requires_grad)


def _dense_forward(query, key, value, dropout_p, is_causal, scale, left=None, right=None, seqused_k=None):
    """(out (B, L_q, H, D_v), lse (B, H, L_q) contiguous, dropout state) of dense (B, L, H, D) inputs."""
    refuse("aten flash attention on dense (batch, length, heads, dim) inputs", seqused_k=seqused_k)
    out, lse, state = torch.ops.varattn.attention(*run.call_args(
        _dense_params(query, key, value, dropout_p, is_causal, scale, left, right)))
    batch, len_q = query.shape[:2]
    return (out.view(batch, len_q, *out.shape[1:]), lse.view(lse.shape[0], batch, len_q).transpose(0, 1).contiguous(),
            state)


def _dense_backward(grad_out, query, key, value, out, lse, dropout_p, is_causal, rng_state, scale, left=None,
                    right=None):
    """(dq, dk, dv) (B, L, H, D) of dense inputs, lse (B, H, L_q) as _dense_forward made it."""
    params = _dense_params(query, key, value, dropout_p, is_causal, scale, left, right, requires_grad=True)
    grads = torch.ops.varattn.attention_backward(grad_out.flatten(0, 1), None, out.flatten(0, 1),
                                                 lse.transpose(0, 1).flatten(1), rng_state, False,
                                                 *run.call_args(params))
    return tuple(g.view(x.shape[0], x.shape[1], *g.shape[1:]) for g, x in zip(grads[:3], (query, key, value)))


def _check_cum_seq(cum_seq_q, cum_seq_k) -> None:
    if (cum_seq_q is None) != (cum_seq_k is None):
        raise ValueError(f"cum_seq_q and cum_seq_k must both be tensors (varlen inputs) or both None (dense), got "
                         f"{type(cum_seq_q).__name__} and {type(cum_seq_k).__name__}")


def _blhd(*tensors):
    return tuple(x.transpose(1, 2) for x in tensors)


def _strided_like(x, like):
    """x with the strides of torch.empty_like(like), which torch's meta
    functions give these results and compiled graphs assert; copied only
    when they differ."""
    if x.shape != like.shape or x.stride() == like.stride():
        return x
    wanted = torch.empty_like(like)
    return x if wanted.stride() == x.stride() else wanted.copy_(x)


def _unused():
    """The 'unused' output (torch's philox offset): a 0-dim uint64, as its meta function makes it."""
    return torch.empty((), dtype=torch.uint64)
