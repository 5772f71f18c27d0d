"""W6 of DESIGN.md: varattn's backends against torch's varlen_attn,
torch SDPA (NestedTensor, padded + mask) and FlexAttention."""
from harness import suite

test_w6 = suite("W6")
