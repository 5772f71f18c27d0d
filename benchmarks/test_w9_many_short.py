"""W9: 4000 sequences of 1 to 64 tokens, varattn's backends against torch's
varlen_attn, torch SDPA (NestedTensor, padded + mask) and FlexAttention."""
from harness import suite

test_w9 = suite("W9")
