"""W7: W1's batch padded with a key_padding_mask through varattn.attention, against torch SDPA on
the padded batch with its mask; forward and forward + backward."""
from harness import suite

test_w7 = suite("W7")
test_w7_training = suite("W7", training=True)
