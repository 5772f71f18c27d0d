"""Training smoke test: a small transformer learns on variable-length token
batches through varattn (NestedTensors, no padding) with the same loss
curve as the same model through torch SDPA on padded inputs."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import varattn

VOCAB, EMBED, HEADS, LAYERS = 32, 128, 4, 2  # head_dim 32: the flash backend on a GPU


class Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.norm1, self.norm2 = nn.LayerNorm(EMBED), nn.LayerNorm(EMBED)
        self.attn = varattn.nn.SelfAttention(HEADS, EMBED, is_causal=True)
        self.mlp = nn.Sequential(nn.Linear(EMBED, 4 * EMBED), nn.GELU(), nn.Linear(4 * EMBED, EMBED))

    def forward(self, x, offsets, lengths, use_varattn: bool):
        """x: packed rows (total, EMBED) of sequences at `offsets`."""
        h = self.norm1(x)
        if use_varattn:
            attended = self.attn(torch.nested.nested_tensor_from_jagged(h, offsets)).values()
        else:
            attended = self.padded_torch_attention(h, offsets, lengths)
        x = x + attended
        return x + self.mlp(self.norm2(x))

    def padded_torch_attention(self, h, offsets, lengths):
        """The same weights through torch SDPA on a padded batch with a causal + key padding mask."""
        batch, longest = len(lengths), max(lengths)
        padded = h.new_zeros(batch, longest, EMBED)
        valid = torch.arange(longest, device=h.device)[None] < torch.tensor(lengths, device=h.device)[:, None]
        padded[valid] = h
        q, k, v = self.attn.c_attn(padded).view(batch, longest, 3, HEADS, -1).permute(2, 0, 3, 1, 4)
        causal = torch.ones(longest, longest, dtype=torch.bool, device=h.device).tril()
        mask = causal[None, None] & valid[:, None, None, :]
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask).transpose(1, 2).reshape(batch, longest, EMBED)
        return self.attn.c_proj(y)[valid]


class TinyLM(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(VOCAB, EMBED)
        self.blocks = nn.ModuleList(Block() for _ in range(LAYERS))
        self.head = nn.Linear(EMBED, VOCAB)

    def forward(self, tokens, offsets, lengths, use_varattn):
        x = self.embed(tokens)
        for block in self.blocks:
            x = block(x, offsets, lengths, use_varattn)
        return self.head(x)


def batch_of(gen, device, size=8):
    """Sequences t[i+1] = t[i] + step (mod VOCAB), each with its own start and step: learnable in context."""
    lengths = torch.randint(2, 25, (size,), generator=gen).tolist()
    tokens = [(torch.randint(VOCAB, (1,), generator=gen) + torch.randint(1, 4, (1,), generator=gen)
               * torch.arange(n)) % VOCAB for n in lengths]
    offsets = torch.tensor([0] + lengths).cumsum(0)
    return torch.cat(tokens).to(device), offsets.to(device), lengths


def next_token_loss(logits, tokens, offsets):
    last = torch.zeros(tokens.shape[0], dtype=torch.bool, device=tokens.device)
    last[offsets[1:] - 1] = True                      # a sequence's last token predicts nothing
    return F.cross_entropy(logits[:-1][~last[:-1]], tokens[1:][~last[:-1]])


def loss_curve(model, use_varattn, device, steps, seed):
    gen = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(steps):
        tokens, offsets, lengths = batch_of(gen, device)
        loss = next_token_loss(model(tokens, offsets, lengths, use_varattn), tokens, offsets)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    return torch.tensor(losses)


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
def test_loss_falls_like_torch_sdpa_on_padded_inputs(device):
    steps = 200
    dtype = torch.float32 if device == "cpu" else torch.bfloat16
    torch.manual_seed(0)
    model = TinyLM().to(device, dtype)
    twin = TinyLM().to(device, dtype)
    twin.load_state_dict(model.state_dict())
    ours = loss_curve(model, True, device, steps, seed=1)
    theirs = loss_curve(twin, False, device, steps, seed=1)
    smooth = lambda curve: curve.unfold(0, 20, 20).mean(1)  # noqa: E731  (means over 20 steps)
    assert smooth(ours)[-1] < 0.5 * smooth(ours)[0]
    tolerance = 1e-3 if dtype == torch.float32 else 5e-2
    assert ((smooth(ours) - smooth(theirs)).abs() / smooth(theirs)).max() <= tolerance
