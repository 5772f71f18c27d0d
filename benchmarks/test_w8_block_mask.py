"""W8: W1's batch with a random boolean mask of 64 x 64 blocks (half hidden) through
varattn.varlen_attention, against torch SDPA's efficient backend on the padded batch;
forward and forward + backward."""
from harness import suite

test_w8 = suite("W8")
test_w8_training = suite("W8", training=True)
