"""W11: W10 with four queries per sequence (speculative decoding; every query
sees the whole cache), against the same comparators, contiguous and paged."""
from harness import suite

test_w11 = suite("W11", paged=True)
