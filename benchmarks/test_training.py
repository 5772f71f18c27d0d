"""W1-W4 forward + backward: varattn's flash backend against torch's varlen_attn,
torch SDPA on NestedTensors and FlexAttention."""
from harness import suite

test_w1_training = suite("W1", training=True)
test_w2_training = suite("W2", training=True)
test_w3_training = suite("W3", training=True)
test_w4_training = suite("W4", training=True)
