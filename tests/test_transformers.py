"""attn_implementation="varattn" in Hugging Face transformers: small models
from a config with random weights (Llama; Qwen2 with a full and a sliding
window layer; Mistral with a sliding window; 2 layers, GQA) against
attn_implementation="sdpa" on the same weights: padded batches (left and
right padding, eval and train), packed batches against padded ones, and
greedy generate() with the KV cache. CPU runs the math backend; the gpu
variants run on CUDA."""
from __future__ import annotations

import subprocess
import sys

import pytest
import torch

transformers = pytest.importorskip("transformers", minversion="4.53")  # the first with masking_utils

import reference  # noqa: E402
import varattn.integrations.transformers as hf  # noqa: E402
from transformers import masking_utils  # noqa: E402

DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)]
# bfloat16 takes the flash backend on CUDA, float32 the efficient one.
PRECISIONS = [("cpu", torch.float32), pytest.param("cuda", torch.float32, marks=pytest.mark.gpu),
              pytest.param("cuda", torch.bfloat16, marks=pytest.mark.gpu)]
MODELS = ("llama", "qwen2", "mistral")
WINDOW = 4  # shorter than the sequences, so that the window masks keys
LENGTHS = (10, 6, 3)


@pytest.fixture(scope="module", autouse=True)
def registered():
    hf.register()


def config(name: str, device: str):
    head_dim = 16 if device == "cpu" else 64  # one flash has kernels for
    common = dict(vocab_size=101, hidden_size=4 * head_dim, intermediate_size=96, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                  initializer_range=0.2)  # peakier attention than the default 0.02, so that masking shows
    if name == "llama":
        return transformers.LlamaConfig(**common)
    if name == "qwen2":  # layer 0 full attention, layer 1 a sliding window: two masks a forward
        return transformers.Qwen2Config(**common, use_sliding_window=True, sliding_window=WINDOW, max_window_layers=1)
    return transformers.MistralConfig(**common, sliding_window=WINDOW)


def model(name: str, implementation: str, device: str, dtype=torch.float32):
    """The model with the weights of seed 0 (each its own config: from_config keeps the implementation there)."""
    torch.manual_seed(0)
    made = transformers.AutoModelForCausalLM.from_config(config(name, device), attn_implementation=implementation)
    return made.to(device=device, dtype=dtype).eval()


def padded_batch(padding: str, device: str):
    """(input_ids, attention_mask) of LENGTHS padded on the left or the right."""
    length = max(LENGTHS)
    ids = torch.randint(0, 101, (len(LENGTHS), length), generator=torch.Generator().manual_seed(1))
    columns = torch.arange(length)
    mask = torch.stack([columns >= length - n if padding == "left" else columns < n for n in LENGTHS])
    return ids.to(device), mask.long().to(device)


def logits_and_grads(made, tokens, **inputs):
    """Logits where `tokens` (B, L) is True, and in train mode each parameter's gradient of a cross-entropy there."""
    logits = made(**inputs).logits
    labels = torch.randint(0, 101, (int(tokens.sum()),), generator=torch.Generator().manual_seed(2))
    if made.training:
        made.zero_grad()
        torch.nn.functional.cross_entropy(logits[tokens].float(), labels.to(logits.device)).backward()
    grads = {n: p.grad.clone() for n, p in made.named_parameters() if p.grad is not None}
    return logits[tokens].detach(), grads


def assert_like_sdpa(run, dtype):
    """run(implementation, dtype) -> (logits, gradients). In float32 varattn's
    are within 1e-4 of sdpa's (relative error); in lower precision their
    error against sdpa in float32 is at most twice sdpa's own, plus 1e-3."""
    (got, got_grads), (want, want_grads) = run("varattn", dtype), run("sdpa", torch.float32)
    assert got_grads.keys() == want_grads.keys()
    low, low_grads = run("sdpa", dtype) if dtype != torch.float32 else (None, {})
    triples = [(got, want, low), *((got_grads[n], want_grads[n], low_grads.get(n)) for n in want_grads)]
    for actual, expected, sdpa in triples:
        bound = 1e-4 if sdpa is None else 2 * reference.relative_error(sdpa, expected) + 1e-3
        assert reference.relative_error(actual, expected) <= bound


@pytest.mark.parametrize("device, dtype", PRECISIONS)
@pytest.mark.parametrize("mode", ["eval", "train"])
@pytest.mark.parametrize("padding", ["left", "right"])
@pytest.mark.parametrize("name", MODELS)
def test_padded_matches_sdpa(name, padding, mode, device, dtype):
    ids, mask = padded_batch(padding, device)

    def run(implementation, dtype):
        made = model(name, implementation, device, dtype).train(mode == "train")
        return logits_and_grads(made, mask.bool(), input_ids=ids, attention_mask=mask)
    assert bool(run("varattn", dtype)[1]) == (mode == "train")
    assert_like_sdpa(run, dtype)


@pytest.mark.parametrize("device, dtype", PRECISIONS)
@pytest.mark.parametrize("form", ["position_ids", "cu_seq_lens"])
@pytest.mark.parametrize("name", MODELS)
def test_packed_matches_padded(name, form, device, dtype, monkeypatch):
    """One row of LENGTHS back to back, as DataCollatorWithFlattening makes it,
    in train mode with its default cache (so transformers' mask sees no
    packing: varattn finds it), against sdpa on the right-padded batch."""
    ids, mask = padded_batch("right", device)
    packed = dict(input_ids=ids[mask.bool()][None], position_ids=torch.cat([torch.arange(n) for n in LENGTHS])[None])
    if form == "cu_seq_lens":
        cu = reference.cu_seqlens(LENGTHS)
        packed.update(cu_seq_lens_q=cu, cu_seq_lens_k=cu, max_length_q=max(LENGTHS), max_length_k=max(LENGTHS))
    packed = {key: value.to(device) if torch.is_tensor(value) else value for key, value in packed.items()}
    calls = []
    varlen_attention = hf.varlen_attention
    monkeypatch.setattr(hf, "varlen_attention", lambda q, k, v, cu_q, *args, **options: calls.append(
        (q.shape[0], cu_q.tolist())) or varlen_attention(q, k, v, cu_q, *args, **options))

    def run(implementation, dtype):
        made = model(name, implementation, device, dtype).train()
        if implementation == "sdpa":
            return logits_and_grads(made, mask.bool(), input_ids=ids, attention_mask=mask)
        return logits_and_grads(made, torch.ones(1, sum(LENGTHS), dtype=torch.bool, device=device), **packed)
    assert_like_sdpa(run, dtype)
    assert calls == [(sum(LENGTHS), reference.cu_seqlens(LENGTHS).tolist())] * 2  # in each layer, no padding


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("name, cache", [*((name, "dynamic") for name in MODELS), ("llama", "static")])
def test_generate_matches_sdpa(name, cache, device):
    """Greedy tokens of left-padded prompts: prefill, then decode steps of one
    query against the growing cache (past the sliding window); eager, as
    generate would compile a static cache's steps on CUDA."""
    ids, mask = padded_batch("left", device)
    tokens = []
    for implementation in ("sdpa", "varattn"):
        made = model(name, implementation, device)
        tokens.append(made.generate(ids, attention_mask=mask, max_new_tokens=6, do_sample=False,
                                    cache_implementation=cache, pad_token_id=0, disable_compile=True))
    assert tokens[0].shape == (len(LENGTHS), max(LENGTHS) + 6)
    assert torch.equal(tokens[1], tokens[0])


@pytest.mark.parametrize("form", ["holes", "4-D"])
def test_other_masks_take_the_attn_mask_path(form, monkeypatch):
    """A padding mask with holes in a row, and a 4-D additive mask the caller
    makes, run as varattn's attn_mask (transformers' SDPA mask for the former)."""
    ids, mask = padded_batch("right", "cpu")
    mask[0, 2:4] = 0
    tokens = mask.bool()
    if form == "4-D":
        allowed = torch.ones(10, 10, dtype=torch.bool).tril() & tokens[:, None, None, :]
        mask = torch.zeros(allowed.shape).masked_fill(~allowed, torch.finfo(torch.float32).min)
    masks = []
    attention = hf.attention
    monkeypatch.setattr(hf, "attention", lambda *args, **options: masks.append(options["attn_mask"])
                        or attention(*args, **options))
    want, _ = logits_and_grads(model("llama", "sdpa", "cpu"), tokens, input_ids=ids, attention_mask=mask)
    got, _ = logits_and_grads(model("llama", "varattn", "cpu"), tokens, input_ids=ids, attention_mask=mask)
    assert len(masks) == 2 and all(m.shape == (3, 1, 10, 10) for m in masks)
    assert reference.relative_error(got, want) <= 1e-4


def test_mask_structures():
    """Causal masks with a sliding window or packed sequences are told apart
    from every other pattern, in the closures of the installed transformers."""
    causal = masking_utils.causal_mask_function
    positions = torch.zeros(1, 4, dtype=torch.long)
    plain = [causal, masking_utils.sliding_window_causal_mask_function(3)]
    if hasattr(masking_utils, "packed_sequence_mask_function"):
        plain.append(masking_utils.and_masks(causal, masking_utils.packed_sequence_mask_function(positions)))
    other = [masking_utils.or_masks(causal, lambda b, h, q, kv: kv == 0),
             masking_utils.and_masks(causal, masking_utils.padding_mask_function(positions.bool())),
             masking_utils.sliding_window_overlay(3), lambda b, h, q, kv: kv <= q]
    assert [hf._is_causal_window_or_packed(f) for f in plain] == [True] * len(plain)
    assert [hf._is_causal_window_or_packed(f) for f in other] == [False] * len(other)


def test_layer_arguments_reach_varattn(monkeypatch):
    """scaling and dropout as the layer passes them (dropout only in train mode);
    what varattn cannot do is refused by name."""
    seen = []
    varlen_attention = hf.varlen_attention
    monkeypatch.setattr(hf, "varlen_attention", lambda *args, **options: seen.append(options)
                        or varlen_attention(*args, **options))
    made = model("llama", "varattn", "cpu")
    for layer in made.model.layers:
        layer.self_attn.attention_dropout = 0.5
    ids, mask = padded_batch("left", "cpu")
    made(input_ids=ids, attention_mask=mask)
    made.train()(input_ids=ids, attention_mask=mask)
    assert [o["dropout_p"] for o in seen] == [0.0, 0.0, 0.5, 0.5] and {o["scale"] for o in seen} == {16 ** -0.5}
    query = torch.zeros(1, 4, 3, 16)
    with pytest.raises(ValueError, match="softcap"):
        hf.attention_forward(made.model.layers[0].self_attn, query, query, query, None, softcap=30.0)


def test_import_varattn_leaves_transformers_out():
    probe = "import sys, varattn, varattn.integrations; print('transformers' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True,
                          check=True).stdout.strip() == "False"
