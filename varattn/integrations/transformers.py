"""Hugging Face transformers on varattn: `register()` adds the attention
implementation "varattn", so that

    import varattn.integrations.transformers
    varattn.integrations.transformers.register()
    model = AutoModelForCausalLM.from_config(config, attn_implementation="varattn")

runs every attention layer of the model through varattn.

Supported: transformers 4.53 (the first with `masking_utils` and its
AttentionMaskInterface) to 5.x; tested with 4.53.0, 4.57.1, 5.0.0 and
5.24.0 (CPU).

The contract (transformers' own source: modeling_utils.AttentionInterface,
masking_utils, integrations/sdpa_attention.py and flash_attention.py). A
model makes each forward's masks once, through the mask function registered
for its implementation (`make_mask` here), and hands one to every layer;
the layer calls the attention function (`attention_forward` here) with
query (B, H, Lq, D), key and value (B, H_kv, Lk, D) as its cache returns
them, that mask and its own arguments, and takes (B, Lq, H, D) back. What
varattn makes of them:

- A causal mask over a 2-D padding mask (True at tokens; left, right or
  both-sided padding), with the sliding window of the layer kind if it has
  one, stays that 2-D mask, cut to the layer's keys; the attention function
  turns it, on the device, into where each sequence starts in its row and
  how long it is (`cu_seqlens`, `seqused`) and calls
  `varlen_attention` on the rows as they are. The queries are the mask's
  last Lq columns (as for flash_attention_2); keys past the mask's columns
  (a StaticCache's unfilled slots) take no part. Without a padding mask
  it is None, and the batch runs as it is, unless it is packed:
- Packed batches, with no mask: `cu_seq_lens_q/k` and `max_length_q/k`
  (DataCollatorWithFlattening(return_flash_attn_kwargs=True)) go to
  `varlen_attention` as given; else `position_ids` that restart (a
  sequence starts wherever a position is not the one before plus 1,
  transformers' rule) give the sequences. No padding is made.
- Every other mask (`or_mask_function` / `and_mask_function` overlays,
  chunked or bidirectional attention, block sequence ids, a padding mask
  whose tokens are not contiguous in a row) is transformers' SDPA mask, a
  (B, 1, Lq, Lk) bool tensor, and a 4-D mask the caller hands the model
  goes through as it is: both run through varattn's `attn_mask` path, which
  then carries the causal and window masking, as in SDPA.
- causal: the layer's `is_causal` argument, else `module.is_causal`,
  aligned lower-right (bottom-right): a query shorter than the keys (a
  decode step, chunked prefill) sees the keys up to its own position.
  `sliding_window=w`, which the layers of windowed models (Mistral, Qwen2,
  Qwen3, ...) pass as they do for flash_attention_2, becomes
  window=(w - 1, w - 1): a query sees itself and the w - 1 keys before it
  (transformers' `kv_idx > q_idx - w`). `scaling` is the scale, `dropout`
  the dropout_p (the layers pass 0 in eval mode), and key/value heads fewer
  than the query heads are GQA.
- `softcap`, `s_aux` (attention sinks) and `position_bias` raise
  ValueError; the attention weights are never returned (None).

Host syncs: one per forward and mask kind with a padding mask, when the
mask function reads whether each row's tokens are contiguous (transformers'
SDPA mask reads its mask once a forward too); one per forward with no mask,
more than one query and `position_ids`, when the restarts are read (a
forward's layers share them; flash_attention_2 reads them in every layer);
and `max_length_q/k` given as tensors, or left out, are read. Lengths from
a padding mask stay on the device, and the padded lengths bound
`max_seqlen`. A StaticCache needs the attention mask passed (generate
passes it) to keep its unfilled slots out.
"""
from __future__ import annotations

import torch
import transformers
from torch.utils.weak import WeakIdKeyDictionary

from ..frontends.batched import attention
from ..frontends.packed import varlen_attention

try:
    from transformers import masking_utils
except ImportError as error:
    raise ImportError(f"varattn.integrations.transformers needs transformers>=4.53 (masking_utils), "
                      f"found {transformers.__version__}") from error

NAME = "varattn"
UNSUPPORTED = ("softcap", "s_aux", "position_bias")


def register() -> None:
    """Register "varattn" with transformers' AttentionInterface and its mask
    function with AttentionMaskInterface, for every model made after it
    (`from_pretrained` / `from_config(..., attn_implementation="varattn")`,
    or, from 4.56, `model.set_attn_implementation("varattn")`). Calling it again is harmless."""
    transformers.AttentionInterface.register(NAME, attention_forward)
    masking_utils.AttentionMaskInterface.register(NAME, make_mask)


def make_mask(*, mask_function, attention_mask=None, kv_length, kv_offset=0, **kwargs):
    """transformers' mask function for "varattn": None, a 2-D padding mask
    (B, columns <= kv_length), True at tokens, or a 4-D SDPA mask (see the
    module's docstring). transformers calls it once per forward and mask
    kind with keywords only; the ones not named here go on to its SDPA mask."""
    if _is_causal_window_or_packed(mask_function):
        if attention_mask is None:
            return None
        padding = attention_mask[:, kv_offset:kv_offset + kv_length]
        if torch.compiler.is_compiling() or _contiguous(padding):
            return padding
    sdpa_mask = masking_utils.ALL_MASK_ATTENTION_FUNCTIONS["sdpa"]
    return sdpa_mask(mask_function=mask_function, attention_mask=attention_mask, kv_length=kv_length,
                     kv_offset=kv_offset, **{**kwargs, "allow_is_causal_skip": False})


def attention_forward(module, query, key, value, attention_mask, dropout=0.0, scaling=None, sliding_window=None,
                      is_causal=None, **kwargs):
    """transformers' attention function for "varattn": query (B, H, Lq, D),
    key and value (B, H_kv, Lk, D) -> ((B, Lq, H, D_v), None)."""
    for name in UNSUPPORTED:
        if kwargs.get(name) is not None:
            raise ValueError(f"attn_implementation='varattn' does not support {name}, which "
                             f"{type(module).__name__} passes; use 'eager' for this model")
    if attention_mask is not None and attention_mask.dim() == 4:
        if attention_mask.is_floating_point():
            attention_mask = attention_mask.to(query.dtype)
        out = attention(query, key, value, layout="bhld", attn_mask=attention_mask, scale=scaling, dropout_p=dropout)
        return out.transpose(1, 2), None
    causal = getattr(module, "is_causal", True) if is_causal is None else is_causal
    window = (-1, -1) if sliding_window is None else (sliding_window - 1, sliding_window - 1)
    options = dict(causal=bool(causal), causal_align="lower_right", window=window, scale=scaling, dropout_p=dropout)
    batch, len_q, len_k = query.shape[0], query.shape[2], key.shape[2]
    if attention_mask is not None:
        lengths = _kept(attention_mask, (len_q, len_k), lambda: _padding_lengths(attention_mask, len_q, len_k))
    else:
        lengths = _packed_lengths(kwargs, batch, len_q, len_k)
    if lengths is None:
        return attention(query, key, value, layout="bhld", **options).transpose(1, 2), None
    cu_q, cu_k, max_q, max_k, used_q, used_k = lengths
    out = varlen_attention(_rows(query), _rows(key), _rows(value), cu_q, cu_k, max_q, max_k, seqused_q=used_q,
                           seqused_k=used_k, **options)
    return out.view(batch, len_q, *out.shape[1:]), None


def _rows(x):
    """(B, H, L, D) -> (B * L, H, D): a view when x is a transposed (B, L, H, D), as the layers make queries."""
    return x.transpose(1, 2).reshape(-1, x.shape[1], x.shape[3])


def _padding_lengths(mask, len_q: int, len_k: int):
    """varlen lengths of rows in slots of Lq queries and Lk keys, from a 2-D
    mask (B, M), True at each row's contiguous tokens, Lq <= M <= Lk; on the device."""
    if mask.dim() != 2 or not len_q <= mask.shape[1] <= len_k:
        raise ValueError(f"attention_mask must be 4-D or 2-D with {len_q} (the queries) to {len_k} (the keys) "
                         f"columns, got shape {tuple(mask.shape)}")
    columns = mask.shape[1]
    mask = mask.bool()
    cu_k, used_k = _starts(mask, len_k)
    cu_q, used_q = (cu_k, used_k) if len_q == columns == len_k else _starts(mask[:, columns - len_q:], len_q)
    return cu_q, cu_k, len_q, len_k, used_q, used_k


def _starts(mask, slot: int):
    """cu_seqlens (B + 1,) and seqused (B,) of each row's tokens, the row a slot of `slot` rows."""
    used = mask.sum(1, dtype=torch.int32)
    cu = torch.arange(0, (mask.shape[0] + 1) * slot, slot, dtype=torch.int32, device=mask.device)
    cu[:-1] += mask.to(torch.uint8).argmax(1).to(torch.int32)  # the first token; 0 in an empty row
    return cu, used


def _contiguous(mask) -> bool:
    """Whether each row's True entries are contiguous (a host read)."""
    starts = mask[:, 1:] & ~mask[:, :-1]
    return bool((starts.sum(1) + mask[:, 0] <= 1).all())


def _packed_lengths(kwargs, batch: int, len_q: int, len_k: int):
    """varlen lengths of a batch without a mask, when it is packed; else None."""
    cu_q, cu_k = kwargs.get("cu_seq_lens_q"), kwargs.get("cu_seq_lens_k")
    if cu_q is not None and cu_k is not None:
        max_q, max_k = (None if m is None else int(m) for m in (kwargs.get("max_length_q"), kwargs.get("max_length_k")))
        return cu_q.to(torch.int32), cu_k.to(torch.int32), max_q, max_k, None, None
    positions = kwargs.get("position_ids")
    if positions is None or positions.dim() != 2 or len_q != len_k or len_q < 2 or positions.shape[1] != len_q:
        return None
    return _kept(positions, (batch, len_q), lambda: _restarts(positions.expand(batch, -1)))


def _restarts(positions):
    """varlen lengths of the sequences in rows of positions (B, L), each
    starting where a position is not the one before plus 1, or None when
    each row is one sequence (a host read)."""
    starts = torch.ones(positions.shape, dtype=torch.bool, device=positions.device)
    starts[:, 1:] = positions.diff(dim=1) != 1
    first = starts.flatten().cpu().nonzero().flatten()
    if len(first) == positions.shape[0]:
        return None
    cu = torch.cat([first, first.new_tensor([positions.numel()])])
    longest = int(cu.diff().max())
    cu = cu.to(device=positions.device, dtype=torch.int32)
    return cu, cu, longest, longest, None, None


_lengths = WeakIdKeyDictionary()  # a mask or position_ids -> (version, sizes, lengths): a forward's layers share them


def _kept(x, sizes, make):
    """make(), kept for as long as x lives unchanged, for calls of the same sizes."""
    if torch.compiler.is_compiling():
        return make()
    found = _lengths.get(x)
    if found is not None and found[0] == x._version and found[1] == sizes:
        return found[2]
    made = make()
    _lengths[x] = (x._version, sizes, made)
    return made


def _terms(mask_function):
    """The masks that mask_function ANDs, as masking_utils composes them:
    "causal", "window", "packed", "remapped" (positions read through
    position_ids) or "other"."""
    if mask_function is masking_utils.causal_mask_function:
        yield "causal"
        return
    kind = _KINDS.get(getattr(mask_function, "__code__", None), "other")
    if kind == "and":
        for inner in _cell(mask_function, "mask_functions"):
            yield from _terms(inner)
    elif kind == "remapped":
        yield kind
        yield from _terms(_cell(mask_function, "mask_function"))
    else:
        yield kind


def _cell(function, name: str):
    """What the closure `function` holds for its free variable `name`."""
    return function.__closure__[function.__code__.co_freevars.index(name)].cell_contents


def _is_causal_window_or_packed(mask_function) -> bool:
    """Whether mask_function is causal masking, with at most a sliding window and packed sequences (within
    which positions restart with the rows, so that a mask on positions is one on rows)."""
    terms = list(_terms(mask_function))
    return ("causal" in terms and "other" not in terms and terms.count("window") <= 1
            and ("remapped" not in terms or "packed" in terms))


def _closures():
    """The code of masking_utils' closures -> what they mask; built from the
    installed version's own factories, the newer ones where it has them."""
    some = torch.zeros(1, 1, dtype=torch.long)
    made = {masking_utils.and_masks(masking_utils.causal_mask_function): "and",
            masking_utils.sliding_window_overlay(1): "window"}
    if hasattr(masking_utils, "packed_sequence_mask_function"):  # 4.56
        made[masking_utils.packed_sequence_mask_function(some)] = "packed"
    if hasattr(masking_utils, "remap_positions_for_packed_sequence"):  # 5.x
        made[masking_utils.remap_positions_for_packed_sequence(masking_utils.causal_mask_function, some)] = "remapped"
    return {function.__code__: kind for function, kind in made.items()}


_KINDS = _closures()
