"""`varattn.nn.SelfAttention`: the SDPA tutorial's CausalSelfAttention block, on varattn."""
from __future__ import annotations

import torch
from torch import nn

from . import nested, padded
from .packed import varlen_attention


class SelfAttention(nn.Module):
    """Multi-head self-attention: qkv projection, attention, output projection, dropout.

    The SDPA tutorial's CausalSelfAttention, with the same arguments and
    submodules (`c_attn`, `c_proj`, `resid_dropout`), so that its state dict
    loads as it is. Attention runs on the packed rows directly: no padding, no
    copies of q/k/v.

    num_heads: heads; embed_dimension (E) must be a multiple of it. bias: the
    projections' bias. is_causal: each token sees itself and the tokens
    before it in its own sequence. dropout: the probability of dropping
    attention probabilities and the output, in training mode only.

    Unlike the tutorial's block, which turns causality off in eval(), this
    one is causal in eval() too when `is_causal` is set: a model evaluated or
    generating sees what it saw in training. Only dropout depends on the mode.
    """

    def __init__(self, num_heads: int, embed_dimension: int, bias: bool = False, is_causal: bool = False,
                 dropout: float = 0.0):
        super().__init__()
        if embed_dimension % num_heads:
            raise ValueError(f"embed_dimension {embed_dimension} is not a multiple of num_heads {num_heads}")
        self.c_attn = nn.Linear(embed_dimension, 3 * embed_dimension, bias=bias)
        self.c_proj = nn.Linear(embed_dimension, embed_dimension, bias=bias)
        self.dropout = dropout
        self.resid_dropout = nn.Dropout(dropout)
        self.num_heads = num_heads
        self.embed_dimension = embed_dimension
        self.is_causal = is_causal

    def forward(self, x: torch.Tensor, lengths=None) -> torch.Tensor:
        """Self-attention over each sequence of `x`.

        x: a NestedTensor (B, j, E), jagged or strided; or a padded batch, a
        tensor (B, L, E).
        lengths: for a padded batch only, each sequence's length: a list of B
        ints or an integer tensor (B,) on the host or on x's device, each in
        [0, L]; the tokens past a length are padding, neither attending nor
        attended to. None: every sequence has all L tokens.
        Returns a NestedTensor of x's layout, or (B, L, E) with zeros past
        each length.
        """
        if nested.is_nested(x):
            if lengths is not None:
                raise ValueError("lengths applies to padded inputs; a NestedTensor carries its own")
            rows, side = nested.rows(x, 1, "x")
            return nested.nested(self._attend(rows), side)
        if x.dim() != 3:
            raise ValueError(f"x must be a NestedTensor (B, j, E) or a padded (B, L, E) tensor, got shape {tuple(x.shape)}")
        batch, length = x.shape[:2]
        if lengths is not None:
            lengths = padded.lengths_arg(lengths, batch, length, x.device, "lengths")
        y = self._attend(padded.unpack(x, "blhd", lengths)).view(batch, length, -1)
        if lengths is not None:  # padding rows stay zero, not c_proj's bias
            y = y * (torch.arange(length, device=x.device) < lengths[0][:, None])[..., None]
        return y

    def _attend(self, rows) -> torch.Tensor:
        """Packed rows (total, E) (a Ragged) -> (total, E)."""
        total, heads, head_dim = rows.values.shape[0], self.num_heads, self.embed_dimension // self.num_heads
        q, k, v = self.c_attn(rows.values).view(total, 3, heads, head_dim).unbind(1)
        y = varlen_attention(q, k, v, rows.cu_seqlens, rows.cu_seqlens, rows.max_seqlen, rows.max_seqlen,
                             causal=self.is_causal, dropout_p=self.dropout if self.training else 0.0,
                             seqused_q=rows.seqused, seqused_k=rows.seqused)
        return self.resid_dropout(self.c_proj(y.reshape(total, self.embed_dimension)))
