"""The one description of an attention call, built once by a front end.

Every front end turns its inputs into the packed form (DESIGN.md) and builds an
`AttentionParams`; dispatch, the backends and `explain()` read only this.
Building it validates the inputs on the host: it never reads device memory
unless the caller left `max_seqlen_*` out or turned device checks on
(`varattn.set_device_checks`). It is built once per call and treated as
immutable: changed copies are made with `dataclasses.replace`.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from . import checks
from .recent import Recent

CAUSAL_ALIGNS = ("upper_left", "lower_right")


class Checked:
    """A call structure that build_params has checked (see build_params):
    the options it stands for, checked, and `derived`, where dispatch and the
    backends keep what they derive from the structure alone (small values,
    never tensors), so that calls of one structure reuse it without building
    and hashing a key of their own. Compared and hashed by identity."""

    __slots__ = ("options", "derived")

    def __init__(self, options: tuple):
        self.options, self.derived = options, {}


def needs_grad(*tensors) -> bool:
    """Whether a backward will follow: grad mode is on and one of `tensors` (None
    allowed) requires grad. The one rule every front end and build_params use;
    NestedTensors' torch-function layer is bypassed, as reading a property
    through it costs microseconds."""
    if not torch.is_grad_enabled():
        return False
    if torch.compiler.is_compiling():
        return any(t is not None and t.requires_grad for t in tensors)
    with torch._C.DisableTorchFunctionSubclass():
        return any(t is not None and t.requires_grad for t in tensors)


@dataclass(slots=True)
class AttentionParams:
    q: torch.Tensor                        # (total_q, H, D)
    k: torch.Tensor                        # (total_k, H_kv, D); paged: the page pool (num_pages, page_size, H_kv, D)
    v: torch.Tensor                        # (total_k, H_kv, D_v); paged: (num_pages, page_size, H_kv, D_v)
    cu_seqlens_q: torch.Tensor             # (B + 1,) int32: where each sequence starts
    cu_seqlens_k: torch.Tensor | None      # None only in a paged call (seqused_k gives the key lengths)
    seqused_q: torch.Tensor | None         # (B,) int32: rows used from each start, or None
    seqused_k: torch.Tensor | None
    max_seqlen_q: int
    max_seqlen_k: int
    causal: bool
    causal_align: str                      # "upper_left" | "lower_right"
    window: tuple[int, int]                # (left, right), -1 = unbounded
    scale: float
    attn_bias: torch.Tensor | None         # (B, H, >=max_seqlen_q, >=max_seqlen_k), broadcast by strides
    dropout_p: float
    return_lse: bool
    out: torch.Tensor | None = None        # (total_q, H, D_v) for the forward to write into, or None: its own
    requires_grad: bool = False            # grad mode on and an input requires grad: a backward will follow
    deterministic: bool = False            # the backward must give the same bits on every run
    dropout_state: tuple[int, int] | None = None  # (seed, offset) of the call's dropout stream (varattn/dropout.py)
    memo: dict | None = None               # kept with the four length tensors when their contents never change
                                           # (frontends/ragged.py): where backends keep what they derive (tile plans)
    structure: Checked | None = None       # see build_params: the same for calls that pass the same checks and
                                           # dispatch alike, given their tensors' addresses
    block_table: torch.Tensor | None = None  # (B, max_pages) int32: sequence b's key j is row j % page_size of
                                           # page block_table[b, j // page_size] of k and v (varattn/paged.py)

    @property
    def batch_size(self) -> int:
        return self.cu_seqlens_q.shape[0] - 1

    @property
    def num_heads(self) -> int:
        return self.q.shape[1]

    @property
    def num_heads_kv(self) -> int:
        return self.k.shape[-2]

    @property
    def head_dim(self) -> int:
        return self.q.shape[2]

    @property
    def head_dim_v(self) -> int:
        return self.v.shape[-1]

    @property
    def total_q(self) -> int:
        return self.q.shape[0]

    @property
    def total_k(self) -> int:
        """Rows of k: the pool's num_pages * page_size in a paged call."""
        return self.k.shape[0] * self.k.shape[1] if self.block_table is not None else self.k.shape[0]

    @property
    def paged(self) -> bool:
        """k and v are page pools read through block_table (a paged KV cache)."""
        return self.block_table is not None

    @property
    def page_size(self) -> int | None:
        return self.k.shape[1] if self.block_table is not None else None

    @property
    def dtype(self) -> torch.dtype:
        return self.q.dtype

    @property
    def device(self) -> torch.device:
        return self.q.device

    @property
    def lse_dtype(self) -> torch.dtype:
        return torch.float64 if self.dtype == torch.float64 else torch.float32

    @property
    def has_window(self) -> bool:
        return self.window != (-1, -1)

    @property
    def bias_kind(self) -> str:
        """"none", "bool" (True = take part, as in torch SDPA) or "additive"."""
        if self.attn_bias is None:
            return "none"
        return "bool" if self.attn_bias.dtype == torch.bool else "additive"

    def with_tensors(self, q, k, v, attn_bias, out=None) -> AttentionParams:
        """These params with other tensors (None: none kept, as an autograd
        context keeps them beside its saved tensors): dataclasses.replace
        without its generic field walk, which costs microseconds a call."""
        return AttentionParams(
            q, k, v, self.cu_seqlens_q, self.cu_seqlens_k, self.seqused_q, self.seqused_k, self.max_seqlen_q,
            self.max_seqlen_k, self.causal, self.causal_align, self.window, self.scale, attn_bias, self.dropout_p,
            self.return_lse, out, self.requires_grad, self.deterministic, self.dropout_state, self.memo, self.structure,
            self.block_table)

    def new_out(self) -> torch.Tensor:
        """Output buffer (`out` when given); zeroed where some rows (padding, holes) belong to no sequence."""
        q = self.q
        shape = (q.shape[0], q.shape[1], self.v.shape[-1])
        if self.out is not None:
            return self.out.zero_() if self.seqused_q is not None else self.out
        return q.new_zeros(shape) if self.seqused_q is not None else q.new_empty(shape)

    def new_lse(self) -> torch.Tensor:
        q = self.q
        shape, dtype = (q.shape[1], q.shape[0]), self.lse_dtype
        if self.seqused_q is not None:
            return q.new_full(shape, -math.inf, dtype=dtype)
        return q.new_empty(shape, dtype=dtype)


def build_params(
    q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q=None, max_seqlen_k=None, *,
    causal=False, causal_align="upper_left", window=(-1, -1), scale=None,
    attn_bias=None, dropout_p=0.0, seqused_q=None, seqused_k=None, return_lse=False, deterministic=False,
    requires_grad=None, out=None, memo=None, structure=None, bias_name="attn_bias", block_table=None,
) -> AttentionParams:
    """Validate packed inputs (host-side) and describe the call.

    requires_grad: whether a backward will follow; None: `needs_grad` of q, k,
    v and attn_bias. A front end that packs tensors of its own (NestedTensors'
    rows, read without autograd) passes `needs_grad` of the caller's.
    out: a (total_q, H, D_v) buffer of q's dtype and device for the forward to
    write into (a front end's output made ahead), or None. memo: see
    AttentionParams.memo. bias_name: the caller's name for attn_bias, in errors.

    structure: a key, made by the front end, of everything about the call
    but its tensors' addresses, row counts (k's and v's are compared) and
    lengths' contents: the
    tensors' types, dtypes, devices, other sizes and strides, the lengths
    tensors' shapes, requires_grad and every option. A call with the key of
    one already checked skips the checks that depend on nothing else, and
    its params carry that key's `Checked` (where dispatch and the backends
    keep their choices, varattn/dispatch.py); None: checked in full.

    block_table: (B, max_pages) int32 on q's device for a paged KV cache: k
    and v are then page pools (num_pages, page_size, H_kv, D or D_v), page_size
    a power of two from 16 to 256, seqused_k (B,) is required and gives the key
    lengths, cu_seqlens_k may be None (else it is checked as a (B + 1,) int32
    tensor and unused), max_seqlen_k left out is max_pages * page_size (no
    sync). Paged calls take no structure key, no attn_bias and no gradient
    yet. The table's contents are never read here (varattn/paged.py says what
    an entry outside the pool does).
    """
    options = (causal, causal_align, window, scale, dropout_p, return_lse, deterministic)
    paged = block_table is not None
    if structure is not None and attn_bias is None and not paged:
        params = checked_params(structure, q, k, v, cu_seqlens_q, cu_seqlens_k, seqused_q, seqused_k, max_seqlen_q,
                                max_seqlen_k, options, requires_grad, memo, out)
        if params is not None:
            return params
        if not _keyable(max_seqlen_q, max_seqlen_k, options):
            structure = None
    else:
        structure = None
    checks.packed_qkv(q, k, v, paged)
    batch = checks.cu_seqlens(cu_seqlens_q, "cu_seqlens_q", q.device)
    if paged:
        checks.block_table(block_table, batch, q.device)
        if seqused_k is None:
            raise ValueError("seqused_k is required with block_table (a paged KV cache): (B,) int32, the number of "
                             "keys each sequence holds in its pages; got None")
    if cu_seqlens_k is not None or not paged:
        batch_k = checks.cu_seqlens(cu_seqlens_k, "cu_seqlens_k", q.device)
        if batch != batch_k:
            raise ValueError(
                f"cu_seqlens_q and cu_seqlens_k must describe the same number of sequences: "
                f"got {batch} and {batch_k}")
    checks.seqused(seqused_q, "seqused_q", batch, q.device)
    checks.seqused(seqused_k, "seqused_k", batch, q.device)
    if max_seqlen_q is None:
        max_seqlen_q = checks.longest(cu_seqlens_q, seqused_q)
    if max_seqlen_k is None:
        max_seqlen_k = block_table.shape[1] * k.shape[1] if paged else checks.longest(cu_seqlens_k, seqused_k)
    checks.non_negative_int(max_seqlen_q, "max_seqlen_q")
    checks.non_negative_int(max_seqlen_k, "max_seqlen_k")
    checks.flag(causal, "causal")
    checks.flag(return_lse, "return_lse")
    if causal_align not in CAUSAL_ALIGNS:
        raise ValueError(f"causal_align must be one of {CAUSAL_ALIGNS}, got {causal_align!r}")
    window = checks.window(window)
    scale = checks.scale(scale, q.shape[-1])
    dropout_p = checks.dropout(dropout_p)
    checks.flag(deterministic, "deterministic")
    if attn_bias is not None:
        if paged:
            raise NotImplementedError(f"varattn: {bias_name} with a paged KV cache (block_table) is not supported "
                                      f"yet; pass contiguous k and v with cu_seqlens_k for a biased call")
        attn_bias = checks.attn_bias(attn_bias, q, batch, max_seqlen_q, max_seqlen_k, bias_name)
    if requires_grad is None:
        requires_grad = needs_grad(q, k, v, attn_bias)
    if paged and requires_grad:
        raise NotImplementedError(
            "varattn: gradients through a paged KV cache (block_table) are not implemented yet; run the call under "
            "torch.no_grad() (or with inputs that do not require grad), or pass contiguous k and v with "
            "cu_seqlens_k for a differentiable call")
    checked = None if structure is None else Checked((causal, causal_align, window, scale, None, dropout_p, return_lse))
    params = AttentionParams(
        q=q, k=k, v=v, cu_seqlens_q=cu_seqlens_q, cu_seqlens_k=cu_seqlens_k,
        seqused_q=seqused_q, seqused_k=seqused_k,
        max_seqlen_q=max_seqlen_q, max_seqlen_k=max_seqlen_k,
        causal=causal, causal_align=causal_align, window=window, scale=scale,
        attn_bias=attn_bias, dropout_p=dropout_p, return_lse=return_lse,
        requires_grad=requires_grad,
        deterministic=deterministic or torch.are_deterministic_algorithms_enabled(), out=out, memo=memo,
        structure=checked, block_table=block_table,
    )
    # Under torch.compile the tensors are traced, not read: their contents are checked when the op runs eagerly.
    if (q.device.type == "cpu" or checks.device_checks_enabled()) and not torch.compiler.is_compiling():
        _check_lengths(params)
    if structure is not None:
        _checked.put(structure, checked)
    return params


# build_params' options with their defaults, in the order that structure keys
# and checked_params take their values.
OPTIONS = (("causal", False), ("causal_align", "upper_left"), ("window", (-1, -1)), ("scale", None),
           ("dropout_p", 0.0), ("return_lse", False), ("deterministic", False))


def option_values(options: dict) -> tuple:
    """The values of build_params' options given as keywords in `options`, in OPTIONS' order, defaults filled in."""
    return tuple([options.get(name, default) for name, default in OPTIONS])


def checked_params(structure, q, k, v, cu_seqlens_q, cu_seqlens_k, seqused_q, seqused_k, max_seqlen_q, max_seqlen_k,
                   options: tuple, requires_grad, memo=None, out=None) -> AttentionParams | None:
    """build_params' params of a call without attn_bias whose `structure`
    passed its checks before (options: option_values'), or None when it
    did not (build_params then checks the call in full): what build_params
    does first, taking its arguments as they come, without keywords."""
    if structure is None or not _keyable(max_seqlen_q, max_seqlen_k, options) or k.shape[0] != v.shape[0]:
        return None
    try:
        known = _checked.get(structure)
    except TypeError:  # a key holding an unhashable value: checked in full
        return None
    if known is None:
        return None
    params = AttentionParams(
        q, k, v, cu_seqlens_q, cu_seqlens_k, seqused_q, seqused_k, max_seqlen_q, max_seqlen_k, *known.options, out,
        needs_grad(q, k, v) if requires_grad is None else requires_grad,
        options[6] or torch.are_deterministic_algorithms_enabled(), None, memo, known)
    if q.device.type == "cpu" or checks.device_checks_enabled():
        _check_lengths(params)
    return params


def _keyable(max_seqlen_q, max_seqlen_k, options: tuple) -> bool:
    """Whether a call with these longest lengths and options may stand for,
    or be stood for by, a checked structure: plain non-negative ints, and
    options as _plain says."""
    return (type(max_seqlen_q) is int and type(max_seqlen_k) is int and max_seqlen_q >= 0 and max_seqlen_k >= 0
            and _plain(*options))


def _plain(causal, causal_align, window, scale, dropout_p, return_lse, deterministic) -> bool:
    """Whether the options are of the plain types a checked structure may
    stand for. A structure key holds the options' values, and values of
    other types compare and hash equal to them (causal=1 or numpy.True_ to
    True, window=(True, 0) to (1, 0)) without passing the checks; a 0-d
    tensor scale would be kept in the key. Such calls are checked in full."""
    return (type(causal) is bool and type(return_lse) is bool and type(deterministic) is bool
            and type(causal_align) is str and type(window) is tuple and len(window) == 2
            and type(window[0]) is int and type(window[1]) is int
            and (scale is None or type(scale) in _NUMBERS) and type(dropout_p) in _NUMBERS)


_NUMBERS = (float, int)


def _check_lengths(p: AttentionParams) -> None:
    checks.lengths_content(p.cu_seqlens_q, p.seqused_q, p.q.shape[0], p.max_seqlen_q, "q")
    if p.block_table is not None:  # cu_seqlens_k, if given, is unused; the table's entries may be anything
        checks.paged_lengths_content(p.seqused_k, p.block_table.shape[1] * p.page_size, p.max_seqlen_k)
    else:
        checks.lengths_content(p.cu_seqlens_k, p.seqused_k, p.k.shape[0], p.max_seqlen_k, "k")


# structure -> its Checked, whose options are in AttentionParams' order from
# causal to return_lse (attn_bias None): bounded, and holding only small values.
_checked = Recent(1024)
