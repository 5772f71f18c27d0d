"""A randomized differential test. Each draw is a call configuration: front
end, layout, dtype, head dim, lengths with 0 and 1 among them, Lq != Lk, the
GQA ratio, causal alignment, window, mask or bias, dropout, return_lse and
gradients. Every backend that accepts the call runs it and is checked
against the float64 reference per sequence, values and gradients.

CPU: DRAWS["cpu"] draws (the math backend; in CI). GPU: DRAWS["cuda"] draws
over every backend. Draw i of seed s is the same configuration and data on
every run: a failure prints it, and
`VARATTN_RANDOM_SEED=s python -m pytest tests/test_random.py -k "cpu-i]"`
runs it again (the seed defaults to RANDOM_SEED).
"""
from __future__ import annotations

import os
import random
from dataclasses import dataclass

import pytest
import torch
from torch.nn.attention.bias import causal_lower_right

import reference
import varattn
from conftest import LSE_TOLERANCE, TOLERANCE
from test_grad import GRAD_TOLERANCE, finite
from varattn import dropout
from varattn.frontends import batched
from varattn.params import build_params

RANDOM_SEED = int(os.environ.get("VARATTN_RANDOM_SEED", "2026"))
DRAWS = {"cpu": 300, "cuda": 200}
# Draws include sequences of one or two keys, where dS = P (dP - delta)
# cancels almost completely (P near 1): their gradients are rounding noise of
# dP's size, which the float64 reference has not. The efficient backend's
# fp32 and fp16 gradients of such draws reached 1.8x / 1.3x test_grad's
# bounds (H200, 2026-12-02; 6 of 200 GPU draws), which hold on its longer
# sequences; here they get 2.5x.
GRAD_SLACK = 2.5
BACKENDS = [varattn.Backend.FLASH, varattn.Backend.EFFICIENT, varattn.Backend.MATH]


@dataclass(frozen=True)
class Draw:
    front_end: str          # packed, jagged, strided, padded, sdpa
    layout: str             # bhld or blhd (nested, padded)
    dtype: torch.dtype
    heads: int
    heads_kv: int
    head_dim: int
    lengths_q: tuple[int, ...]
    lengths_k: tuple[int, ...]
    causal: str             # "", "upper_left", "lower_right"
    window: tuple[int, int]
    mask: str               # "", "bool", "additive"
    mask_batch: int         # 1 (broadcast) or B
    mask_heads: int         # 1 (broadcast) or H
    dropout_p: float
    return_lse: bool
    grad: bool
    seed: int               # of the data


def draw(rng: random.Random, device: str) -> Draw:
    front_end = rng.choice(["packed", "jagged", "strided", "padded", "sdpa"])
    batch = rng.randint(1, 4)
    longest = rng.choice([1, 5, 12]) if device == "cpu" else rng.choice([1, 17, 64, 130])
    if front_end == "sdpa":  # a dense batch: one length for all
        lengths_q = (rng.randint(1, longest),) * batch
        lengths_k = (rng.randint(1, longest),) * batch
    else:
        specials = [0, 1, longest]
        lengths_q = tuple(rng.choice(specials) if rng.random() < 0.4 else rng.randint(0, longest) for _ in range(batch))
        lengths_k = lengths_q if rng.random() < 0.4 else tuple(
            rng.choice(specials) if rng.random() < 0.4 else rng.randint(0, longest + 3) for _ in range(batch))
    heads_kv = rng.choice([1, 2])
    heads = heads_kv * rng.choice([1, 2, 3])
    if device == "cpu":
        dtype = rng.choice([torch.float64, torch.float64, torch.float32, torch.bfloat16])
        head_dim = rng.choice([8, 16, 24, 40])
    else:
        dtype = rng.choice([torch.float16, torch.bfloat16, torch.float32])
        head_dim = rng.choice([32, 40, 64, 96, 128, 192, 256])
    mask = rng.choice(["", "", "bool", "additive"])
    causal = rng.choice(["", "", "upper_left", "lower_right"]) if not (front_end == "sdpa" and mask) else ""
    window = (-1, -1)
    if front_end != "sdpa" and rng.random() < 0.25:
        window = (rng.choice([-1, 0, 3]), rng.choice([-1, 0, 4]))
    dropout_p = rng.choice([0.0, 0.0, 0.0, 0.3]) if front_end != "sdpa" else 0.0
    return Draw(front_end=front_end, layout=rng.choice(["bhld", "blhd"]), dtype=dtype, heads=heads,
                heads_kv=heads_kv, head_dim=head_dim, lengths_q=lengths_q, lengths_k=lengths_k, causal=causal,
                window=window, mask=mask, mask_batch=rng.choice([1, batch]), mask_heads=rng.choice([1, heads]),
                dropout_p=dropout_p, return_lse=rng.random() < 0.5, grad=rng.random() < 0.5,
                seed=rng.randrange(2**31))


class Data:
    """A draw's inputs per sequence, float64 on the CPU, never zeros; and the loss weights."""

    def __init__(self, d: Draw):
        gen = torch.Generator().manual_seed(d.seed)
        self.q = [torch.randn(n, d.heads, d.head_dim, generator=gen, dtype=torch.float64) for n in d.lengths_q]
        self.k = [torch.randn(n, d.heads_kv, d.head_dim, generator=gen, dtype=torch.float64) for n in d.lengths_k]
        self.v = [torch.randn(n, d.heads_kv, d.head_dim, generator=gen, dtype=torch.float64) for n in d.lengths_k]
        self.grad_out = [torch.randn(n, d.heads, d.head_dim, generator=gen, dtype=torch.float64) for n in d.lengths_q]
        self.grad_lse = [torch.randn(d.heads, n, generator=gen, dtype=torch.float64) for n in d.lengths_q]
        shape = (d.mask_batch, d.mask_heads, max(d.lengths_q, default=0), max(d.lengths_k, default=0))
        self.mask = None
        if d.mask == "bool":
            self.mask = torch.rand(shape, generator=gen) > 0.3
        elif d.mask == "additive":
            self.mask = torch.randn(shape, generator=gen, dtype=torch.float64)


def options_of(d: Draw) -> dict:
    return dict(causal=bool(d.causal), causal_align=d.causal or "upper_left", window=d.window, dropout_p=d.dropout_p,
                return_lse=d.return_lse)


class Call:
    """A draw's call through its front end on `device`: the leaves gradients
    reach, the call, and each sequence's output, lse and input gradients."""

    def __init__(self, d: Draw, data: Data, device: str):
        self.d, self.device = d, device
        cast = lambda x: x.to(device=device, dtype=d.dtype)  # noqa: E731
        self.mask = None if data.mask is None else data.mask.to(device=device, dtype=(
            torch.bool if d.mask == "bool" else d.dtype))
        if d.mask == "additive" and d.grad:
            self.mask.requires_grad_()
        if d.front_end in ("packed", "sdpa", "padded"):
            if d.front_end == "packed":
                self.leaves = [cast(torch.cat(parts)) for parts in (data.q, data.k, data.v)]
            else:
                self.leaves = [cast(self.pad(parts, lengths)) for parts, lengths in
                               ((data.q, d.lengths_q), (data.k, d.lengths_k), (data.v, d.lengths_k))]
            self.leaves = [x.requires_grad_(d.grad) for x in self.leaves]
        else:
            layout = torch.jagged if d.front_end == "jagged" else torch.strided
            self.leaves = [torch.nested.nested_tensor([cast(p) for p in parts], layout=layout, requires_grad=d.grad)
                           for parts in (data.q, data.k)]
            if layout == torch.jagged:  # value shares key's offsets
                self.leaves.append(cast(torch.cat(data.v)).requires_grad_(d.grad))
            else:
                self.leaves.append(torch.nested.nested_tensor([cast(p) for p in data.v], requires_grad=d.grad))

    @staticmethod
    def pad(parts, lengths):
        """(B, L, H, D) with zeros past each length."""
        longest = max(lengths, default=0)
        return torch.stack([torch.cat([p, p.new_zeros(longest - p.shape[0], *p.shape[1:])]) for p in parts])

    def inputs(self):
        """(q, k, v) as the front end takes them, from the leaves."""
        d, (q, k, v) = self.d, self.leaves
        if d.front_end in ("jagged", "strided"):
            if d.front_end == "jagged":
                v = torch.nested.nested_tensor_from_jagged(v, k.offsets(), max_seqlen=max(d.lengths_k, default=0))
            return tuple(x.transpose(1, 2) if d.layout == "bhld" else x for x in (q, k, v))
        if d.front_end == "padded" and d.layout == "bhld" or d.front_end == "sdpa":
            return q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
        return q, k, v

    def kwargs(self):
        d = self.d
        if d.front_end == "packed":
            return dict(attn_bias=self.mask, **options_of(d))
        if d.front_end == "padded":
            return dict(layout=d.layout, lengths=list(d.lengths_q), kv_lengths=list(d.lengths_k), attn_mask=self.mask,
                        **options_of(d))
        return dict(layout=d.layout, attn_mask=self.mask, **options_of(d))

    def run(self):
        """(out, lse or None) through the front end."""
        d, (q, k, v) = self.d, self.inputs()
        if d.front_end == "packed":
            cu_q, cu_k = reference.cu_seqlens(d.lengths_q, self.device), reference.cu_seqlens(d.lengths_k, self.device)
            result = varattn.varlen_attention(q, k, v, cu_q, cu_k, max(d.lengths_q, default=0),
                                              max(d.lengths_k, default=0), **self.kwargs())
        elif d.front_end == "sdpa":
            mask = self.mask
            if d.causal == "lower_right":
                mask = causal_lower_right(q.shape[-2], k.shape[-2])
            return varattn.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=d.causal == "upper_left",
                                                        enable_gqa=d.heads != d.heads_kv), None
        else:
            result = varattn.attention(q, k, v, **self.kwargs())
        return result if d.return_lse else (result, None)

    def params(self):
        """The packed call the front end makes (for its dropout mask)."""
        d, (q, k, v) = self.d, self.inputs()
        if d.front_end == "packed":
            cu_q, cu_k = reference.cu_seqlens(d.lengths_q, self.device), reference.cu_seqlens(d.lengths_k, self.device)
            return build_params(q, k, v, cu_q, cu_k, **self.kwargs())
        return batched.call(q, k, v, **self.kwargs())[0]

    def per_sequence(self, out, lse):
        """[(out (Lq, H, D), lse (H, Lq) or None)] of each sequence."""
        d, found = self.d, []
        starts = reference.cu_seqlens(d.lengths_q).tolist()
        for b, n in enumerate(d.lengths_q):
            if d.front_end == "packed":
                o, s = out[starts[b]:starts[b] + n], None if lse is None else lse[:, starts[b]:starts[b] + n]
            elif d.front_end in ("jagged", "strided"):
                o, s = out.unbind()[b], None if lse is None else lse.unbind()[b]
                if d.layout == "bhld":
                    o = o.transpose(0, 1)
                elif s is not None:
                    s = s.transpose(0, 1)
            elif d.front_end == "padded" and d.layout == "blhd":
                o, s = out[b, :n], None if lse is None else lse[b, :n].transpose(0, 1)
            else:
                o, s = out[b, :, :n].transpose(0, 1), None if lse is None else lse[b, :, :n]
            found.append((o, s))
        return found

    def grads(self):
        """The gradients reaching q, k, v per sequence, and the mask's."""
        d, found = self.d, []
        for leaf, lengths in zip(self.leaves, (d.lengths_q, d.lengths_k, d.lengths_k)):
            g = leaf.grad
            if d.front_end == "packed" or (d.front_end == "jagged" and not leaf.is_nested):
                found.append(g)
            elif leaf.is_nested:
                found.append(torch.cat([x.reshape(-1, *x.shape[-2:]) for x in g.unbind()]))
            else:
                found.append(torch.cat([g[b, :n] for b, n in enumerate(lengths)]))
        return found, None if self.mask is None or not self.mask.requires_grad else self.mask.grad


def loss_of(pairs, data: Data):
    """sum(out * w) (+ sum(lse * w') where the call returned lse) over the sequences, in float64 on the CPU."""
    loss = 0.0
    for (o, s), g, gl in zip(pairs, data.grad_out, data.grad_lse):
        loss = loss + (o.double().cpu() * g).sum()
        if s is not None:
            loss = loss + (finite(s).double().cpu() * gl).sum()
    return loss


def check(d: Draw, device: str):
    data = Data(d)
    keep = None
    if d.dropout_p > 0:  # the mask the call draws right after torch.manual_seed(d.seed)
        torch.manual_seed(d.seed)
        keep = dropout.keep_mask(dropout.drawn(Call(d, data, device).params()))
    # The reference sees the inputs as the call does: rounded to its dtype.
    leaves = [torch.cat(parts).to(d.dtype).double().requires_grad_(d.grad) for parts in (data.q, data.k, data.v)]
    mask = data.mask
    if d.mask == "additive":
        mask = mask.to(d.dtype).double().requires_grad_(d.grad)
    cu_q, cu_k = reference.cu_seqlens(d.lengths_q), reference.cu_seqlens(d.lengths_k)
    expected, expected_lse = reference.attention(*leaves, cu_q, cu_k, causal=bool(d.causal),
                                                 causal_align=d.causal or "upper_left", window=d.window, attn_bias=mask,
                                                 dropout_p=d.dropout_p, dropout_keep=keep)
    with_lse = d.return_lse and d.front_end != "sdpa"
    if d.grad:
        expected_loss = loss_of([(expected[s:s + n], expected_lse[:, s:s + n] if with_lse else None)
                                 for s, n in zip(cu_q.tolist(), d.lengths_q)], data)
        if expected_loss.requires_grad:
            expected_loss.backward()
        for x in leaves + ([mask] if d.mask == "additive" else []):  # no query rows: nothing reaches them
            x.grad = torch.zeros_like(x) if x.grad is None else x.grad
    ran = []
    for backend in BACKENDS:
        call = Call(d, data, device)
        with varattn.use_backends(backend):
            torch.manual_seed(d.seed)
            try:
                out, lse = call.run()
            except varattn.NoBackendError:
                continue
        ran.append(backend)
        pairs = call.per_sequence(out, lse)
        got = torch.cat([o.reshape(-1, d.heads, d.head_dim) for o, _ in pairs])
        assert reference.relative_error(got, expected) <= TOLERANCE[d.dtype], (backend.value, "out")
        if with_lse:
            got_lse = torch.cat([s for _, s in pairs], dim=1)
            assert reference.lse_error(got_lse, expected_lse) <= LSE_TOLERANCE[d.dtype], (backend.value, "lse")
        if d.grad:
            loss_of(pairs, data).backward()
            grads, mask_grad = call.grads()
            bound = GRAD_TOLERANCE[d.dtype] * GRAD_SLACK
            for name, grad, leaf in zip("qkv", grads, leaves):
                assert reference.relative_error(grad, leaf.grad) <= bound, (backend.value, "d" + name)
            if mask_grad is not None:
                assert reference.relative_error(mask_grad, mask.grad) <= bound, (backend.value, "dmask")
    assert ran, "no backend ran the call"


def draws(device):
    return [pytest.param(device, i, marks=[pytest.mark.gpu] if device == "cuda" else [], id=f"{device}-{i}")
            for i in range(DRAWS[device])]


@pytest.mark.parametrize("device, index", draws("cpu") + draws("cuda"))
def test_random_draw(device, index):
    d = draw(random.Random(RANDOM_SEED * 1_000_003 + index), device)
    try:
        check(d, device)
    except AssertionError as error:
        raise AssertionError(f"{error}\n  draw {index} of seed {RANDOM_SEED}: {d}\n  rerun: VARATTN_RANDOM_SEED="
                             f"{RANDOM_SEED} python -m pytest tests/test_random.py -k '{device}-{index}]'") from None
