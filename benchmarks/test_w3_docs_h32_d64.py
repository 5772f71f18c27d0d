"""W3 of DESIGN.md: varattn's backends against torch's varlen_attn,
torch SDPA (NestedTensor, padded + mask) and FlexAttention."""
from harness import suite

test_w3 = suite("W3")
