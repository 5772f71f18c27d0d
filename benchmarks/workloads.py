"""The workloads (W1-W9), defined once for every suite.

Lengths are drawn with fixed seeds; data is random normal, never zeros.
VARATTN_BENCH_SMOKE=1 shrinks every workload (lengths / 16, at most 4
sequences, 2 heads) so the suites can be exercised on a CPU.
"""
from __future__ import annotations

import itertools
import os
import random
from dataclasses import dataclass

import torch

SMOKE = os.environ.get("VARATTN_BENCH_SMOKE", "0") not in ("", "0")


@dataclass(frozen=True)
class Workload:
    name: str
    title: str
    lengths_q: tuple[int, ...]
    lengths_k: tuple[int, ...]
    heads: int
    head_dim: int
    dtype: torch.dtype
    causal: bool
    decode: bool = False       # report TB/s rather than TFLOP/s
    mask: str = "document"     # "document": lengths only; "key_padding": a padded batch and its
                               # key_padding_mask; "blocks": a random boolean mask of 64 x 64 blocks
    heads_kv: int = 0          # key/value heads (GQA); 0: as many as the queries'

    @property
    def kv_heads(self) -> int:
        return self.heads_kv or self.heads

    @property
    def group(self) -> str:
        return f"{self.name} {self.title}"

    @property
    def flops(self) -> int:
        """Real work only: 4 H D sum(pairs), pairs L(L+1)/2 under a causal mask,
        the visible pairs under a block mask."""
        if self.mask == "blocks":
            pairs = int(sum(visible.sum() for visible in block_masks(self)))
        else:
            pairs = sum(lq * (lq + 1) // 2 if self.causal and lq == lk else lq * lk
                        for lq, lk in zip(self.lengths_q, self.lengths_k))
        return 4 * self.heads * self.head_dim * pairs

    @property
    def bytes_moved(self) -> int:
        """q, k and v read once, out written once."""
        element = torch.finfo(self.dtype).bits // 8
        return element * self.head_dim * (2 * self.heads * sum(self.lengths_q) + 2 * self.kv_heads * sum(self.lengths_k))


def _docs(seed, count=32):
    rng = random.Random(seed)
    return [rng.randint(128, 2048) for _ in range(count)]


def _tutorial(seed):
    """The PyTorch SDPA tutorial's generate_rand_batch(32, 512, pad_percentage=0.5)."""
    rng = random.Random(seed)
    lengths = [int(512 * (1 - rng.gauss(0.5, 0.01))) for _ in range(32)]
    lengths[rng.randrange(32)] = 512
    return lengths


def _long_tail(seed):
    rng = random.Random(seed)
    return [rng.randint(16, 256) for _ in range(60)] + [8192, 4096, 4096, 2048]


BLOCK = 64


def block_masks(workload, seed=8):
    """Per sequence, (Lq, Lk) bool (True = take part): each 64 x 64 block kept
    or masked with probability 1/2, the diagonal blocks always kept so that
    every query row sees a key."""
    generator = torch.Generator().manual_seed(seed)
    masks = []
    for lq, lk in zip(workload.lengths_q, workload.lengths_k):
        blocks_q, blocks_k = -(-lq // BLOCK), -(-lk // BLOCK)
        kept = torch.rand(blocks_q, blocks_k, generator=generator) < 0.5
        kept |= torch.eye(blocks_q, blocks_k, dtype=torch.bool)
        masks.append(kept.repeat_interleave(BLOCK, 0).repeat_interleave(BLOCK, 1)[:lq, :lk])
    return masks


def _make(name, title, lengths_q, lengths_k, heads, head_dim, dtype, causal, decode=False, mask="document",
          heads_kv=0):
    if SMOKE:
        lengths_q = [max(1, n // 16) for n in lengths_q[:4]]
        lengths_k = [max(1, n // 16) for n in lengths_k[:4]]
        heads, heads_kv = min(heads, 2), (1 if heads_kv and heads_kv < heads else 0)
    return Workload(name, title, tuple(lengths_q), tuple(lengths_k), heads, head_dim, dtype, causal, decode, mask,
                    heads_kv)


def _many_short(seed, count=4000):
    rng = random.Random(seed)
    return [rng.randint(1, 64) for _ in range(count)]


def _decode_keys(seed, count=64, shortest=512, longest=8192):
    rng = random.Random(seed)
    return [rng.randint(shortest, longest) for _ in range(count)]


WORKLOADS = {
    "W1": _make("W1", "docs, full", _docs(1), _docs(1), 16, 128, torch.bfloat16, False),
    "W2": _make("W2", "docs, causal", _docs(1), _docs(1), 16, 128, torch.bfloat16, True),
    "W3": _make("W3", "docs H32 D64, causal", _docs(1), _docs(1), 32, 64, torch.bfloat16, True),
    "W4": _make("W4", "long tail, causal", _long_tail(4), _long_tail(4), 16, 128, torch.bfloat16, True),
    "W5": _make("W5", "tutorial NestedTensor, fp16", _tutorial(5), _tutorial(5), 8, 64, torch.float16, False),
    "W6": _make("W6", "decode", [1] * 64, _decode_keys(6), 32, 128, torch.bfloat16, False, decode=True),
    # W1's batch as users without varattn hold it: padded, with a key_padding_mask
    "W7": _make("W7", "docs padded + key_padding_mask", _docs(1), _docs(1), 16, 128, torch.bfloat16, False,
                mask="key_padding"),
    # W1's batch with an arbitrary mask: half of each sequence's 64 x 64 blocks hidden
    "W8": _make("W8", "docs, random 64-block mask", _docs(1), _docs(1), 16, 128, torch.bfloat16, False,
                mask="blocks"),
    # thousands of sequences shorter than one tile: what a fixed cost per tile costs
    "W9": _make("W9", "many short", _many_short(9), _many_short(9), 16, 128, torch.bfloat16, False),
    # serving: GQA decode against long caches, one query per sequence and four (speculative
    # decoding; every query sees the whole cache); the paged comparators read the same keys from pages
    "W10": _make("W10", "GQA decode 32/8", [1] * 32, _decode_keys(10, 32, 1024, 32768), 32, 128, torch.bfloat16,
                 False, decode=True, heads_kv=8),
    "W11": _make("W11", "GQA decode 32/8, 4 queries", [4] * 32, _decode_keys(10, 32, 1024, 32768), 32, 128,
                 torch.bfloat16, False, decode=True, heads_kv=8),
}


# Every head dim the flash backend takes, fp16 and bf16, full and causal, on
# W1's sequences with H = 2048 / D (the same work per token at every head dim).
HEAD_DIM_WORKLOADS = {
    f"D{d} {str(dtype)[6:]} {'causal' if causal else 'full'}":
        _make(f"D{d} {str(dtype)[6:]} {'causal' if causal else 'full'}", f"docs H{2048 // d}", _docs(1), _docs(1),
              2048 // d, d, dtype, causal)
    for d in (32, 64, 96, 128, 192, 256) for dtype in (torch.bfloat16, torch.float16) for causal in (False, True)
}


class Inputs:
    """One workload's data in every form a comparator needs, built on `device`."""

    def __init__(self, workload: Workload, device):
        self.workload, self.device = workload, device
        generator = torch.Generator().manual_seed(0)
        d, dtype = workload.head_dim, workload.dtype

        def randn(rows, heads):
            return torch.randn(rows, heads, d, generator=generator).to(device, dtype)
        rows_k = sum(workload.lengths_k)
        self.q = randn(sum(workload.lengths_q), workload.heads)
        self.k, self.v = randn(rows_k, workload.kv_heads), randn(rows_k, workload.kv_heads)
        self.cu_q = torch.tensor([0, *itertools.accumulate(workload.lengths_q)], dtype=torch.int32, device=device)
        self.cu_k = torch.tensor([0, *itertools.accumulate(workload.lengths_k)], dtype=torch.int32, device=device)
        self.max_q, self.max_k = max(workload.lengths_q), max(workload.lengths_k)

    def nested(self, layout=torch.jagged):
        """(B, H, j, D) NestedTensors over the same data."""
        if layout == torch.jagged:
            def make(values, cu, longest):
                return torch.nested.nested_tensor_from_jagged(values, cu.long(), max_seqlen=longest).transpose(1, 2)
            return (make(self.q, self.cu_q, self.max_q), make(self.k, self.cu_k, self.max_k),
                    make(self.v, self.cu_k, self.max_k))
        # the tutorial's way: a strided NestedTensor of (L, H * D) viewed as (B, H, j, D)
        batch, h, d = len(self.workload.lengths_q), self.workload.heads, self.workload.head_dim

        def make(values, lengths):
            parts = [part.reshape(part.shape[0], h * d) for part in values.split(list(lengths))]
            return torch.nested.nested_tensor(parts).view(batch, -1, h, d).transpose(1, 2)
        return make(self.q, self.workload.lengths_q), make(self.k, self.workload.lengths_k), make(self.v, self.workload.lengths_k)

    def paged(self, page_size: int, seed: int = 3):
        """(k pool, v pool, block_table, seqused_k): the keys and values in
        pages of `page_size` rows, (pages, page_size, H_kv, D), each
        sequence's pages at shuffled places in the pools."""
        lengths = torch.tensor(self.workload.lengths_k)
        pages_of = (lengths + page_size - 1) // page_size
        total = int(pages_of.sum())
        place = torch.randperm(total, generator=torch.Generator().manual_seed(seed))
        table = torch.zeros(len(lengths), int(pages_of.max()), dtype=torch.int32)
        first = torch.cumsum(pages_of, 0) - pages_of
        for b, count in enumerate(pages_of.tolist()):
            table[b, :count] = place[first[b]:first[b] + count].to(torch.int32)
        # key j of sequence b goes to row j % page_size of page table[b, j // page_size]
        b = torch.repeat_interleave(torch.arange(len(lengths)), lengths)
        j = torch.arange(int(lengths.sum())) - torch.repeat_interleave(torch.cumsum(lengths, 0) - lengths, lengths)
        rows = (table[b, j // page_size].long() * page_size + j % page_size).to(self.device)
        pools = []
        for x in (self.k, self.v):
            pool = x.new_zeros(total * page_size, *x.shape[1:])
            pool[rows] = x
            pools.append(pool.view(total, page_size, *x.shape[1:]))
        return (*pools, table.to(self.device), lengths.to(self.device, torch.int32))

    def key_padding_mask(self):
        """(B, Lk) bool, True at padding (nn.MultiheadAttention's convention)."""
        lengths_k = torch.tensor(self.workload.lengths_k, device=self.device)
        return torch.arange(self.max_k, device=self.device)[None, :] >= lengths_k[:, None]

    def block_mask(self):
        """W8's mask in padded form, (B, 1, max_q, max_k) bool, True = take part."""
        padded = torch.zeros(len(self.workload.lengths_q), 1, self.max_q, self.max_k, dtype=torch.bool)
        for b, visible in enumerate(block_masks(self.workload)):
            padded[b, 0, :visible.shape[0], :visible.shape[1]] = visible
        return padded.to(self.device)

    def padded(self):
        """(B, H, L, D) padded tensors and the bool mask (True = take part) for
        torch SDPA: the lengths (and causal) mask, or with a block mask that too."""
        lengths_q = torch.tensor(self.workload.lengths_q, device=self.device)
        lengths_k = torch.tensor(self.workload.lengths_k, device=self.device)

        def pad(values, lengths, longest):
            parts = values.split(lengths.tolist())
            return torch.nested.nested_tensor(list(parts)).to_padded_tensor(0.0, (len(parts), longest, *values.shape[1:])).transpose(1, 2)
        q, k, v = pad(self.q, lengths_q, self.max_q), pad(self.k, lengths_k, self.max_k), pad(self.v, lengths_k, self.max_k)
        i = torch.arange(self.max_q, device=self.device)[None, :, None]
        j = torch.arange(self.max_k, device=self.device)[None, None, :]
        mask = (j < lengths_k[:, None, None]) & (i < lengths_q[:, None, None])
        if self.workload.causal:
            mask = mask & (j <= i)
        if self.workload.mask == "blocks":
            mask = mask & self.block_mask()[:, 0]
        # a padded query row that sees nothing would give NaN in torch: let it see key 0
        mask = mask | ((j == 0) & ~mask.any(-1, keepdim=True))
        return q, k, v, mask[:, None]

    def flex(self):
        """(1, H, total, D) tensors and a block mask for FlexAttention: the
        documents, and under W8's mask ("blocks") its hidden 64 x 64 blocks too."""
        from torch.nn.attention.flex_attention import create_block_mask
        w = self.workload
        docs_q = torch.repeat_interleave(torch.arange(len(w.lengths_q), device=self.device),
                                         torch.tensor(w.lengths_q, device=self.device))
        docs_k = torch.repeat_interleave(torch.arange(len(w.lengths_k), device=self.device),
                                         torch.tensor(w.lengths_k, device=self.device))
        causal = w.causal
        if w.mask == "blocks":
            # per sequence, which 64 x 64 blocks take part (block_masks' own, padded to the longest)
            starts_q, starts_k = self.cu_q[:-1].long(), self.cu_k[:-1].long()
            blocks = torch.zeros(len(w.lengths_q), -(-self.max_q // BLOCK), -(-self.max_k // BLOCK), dtype=torch.bool)
            for b, visible in enumerate(block_masks(w)):
                kept = visible[::BLOCK, ::BLOCK]
                blocks[b, :kept.shape[0], :kept.shape[1]] = kept
            blocks = blocks.to(self.device)
            last_k = blocks.shape[2] - 1

            def document(b, h, q_index, kv_index):
                doc = docs_q[q_index]
                local_k = (kv_index - starts_k[doc]).clamp(0, last_k * BLOCK) // BLOCK
                return (doc == docs_k[kv_index]) & blocks[doc, (q_index - starts_q[doc]) // BLOCK, local_k]
        else:
            def document(b, h, q_index, kv_index):
                same = docs_q[q_index] == docs_k[kv_index]
                return same & (kv_index <= q_index) if causal else same
        block_mask = create_block_mask(document, None, None, self.q.shape[0], self.k.shape[0], device=self.device)
        as_flex = [x.transpose(0, 1)[None] for x in (self.q, self.k, self.v)]
        return (*as_flex, block_mask)
