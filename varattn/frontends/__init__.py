"""The front ends: the caller's form (packed tensors, NestedTensors, padded
batches, torch's SDPA signature, the tutorial's block) to one AttentionParams
and back (packed.py, nested.py, padded.py, batched.py, sdpa.py, nn.py), and
`explain()` of a call without running it (explain.py)."""
