"""W10: GQA decode (32 query heads over 8 key/value heads, 32 sequences of one
query against 1k to 32k keys), varattn's backends against torch's varlen_attn,
torch SDPA (NestedTensor, padded + mask) and FlexAttention, and both reading
the keys from a paged cache (pages of 16 and 128 rows, shuffled)."""
from harness import suite

test_w10 = suite("W10", paged=True)
