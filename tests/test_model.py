import json
import math

import pytest
import torch

from llama_caption.llama.checkpoint import load_llama
from llama_caption.llama.meta import load_shard
from llama_caption.llama.generation import generate
from llama_caption.llama.model import ModelArgs
from llama_caption.tools.testing import greedy_no_cache


def test_hidden_size_rule_matches_released_llama_shapes():
    # FFN widths of Meta's released v1 models (from their checkpoint shapes).
    for dim, hidden in ((4096, 11008), (5120, 13824), (6656, 17920), (8192, 22016)):
        assert ModelArgs(dim=dim, multiple_of=256).hidden_dim == hidden
    # Llama 2 70B: ffn_dim_multiplier 1.3, multiple_of 4096.
    assert ModelArgs(dim=8192, multiple_of=4096, ffn_dim_multiplier=1.3).hidden_dim == 28672


def reference_logits(sd, params, tokens, theta=10000.0):
    """An independent LLaMA written straight from the paper's equations, with complex rotary
    embeddings, explicit softmax attention and key/value heads repeated for GQA."""
    dim, n_heads = params["dim"], params["n_heads"]
    kvh = params.get("n_kv_heads") or n_heads
    hd = dim // n_heads
    eps = params["norm_eps"]

    def rms(x, w):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * w

    T = tokens.shape[1]
    freqs = 1.0 / (theta ** (torch.arange(0, hd, 2)[: hd // 2].float() / hd))
    rot = torch.polar(torch.ones(T, hd // 2), torch.outer(torch.arange(T).float(), freqs))

    def rope(x):  # (B, T, H, hd)
        xc = torch.view_as_complex(x.reshape(*x.shape[:-1], -1, 2))
        return torch.view_as_real(xc * rot[None, :, None, :]).flatten(3)

    h = sd["tok_embeddings.weight"][tokens]
    B = tokens.shape[0]
    causal = torch.full((T, T), float("-inf")).triu(1)
    for i in range(params["n_layers"]):
        p = f"layers.{i}."
        x = rms(h, sd[p + "attention_norm.weight"])
        q = rope((x @ sd[p + "attention.wq.weight"].T).view(B, T, n_heads, hd))
        k = rope((x @ sd[p + "attention.wk.weight"].T).view(B, T, kvh, hd))
        v = (x @ sd[p + "attention.wv.weight"].T).view(B, T, kvh, hd)
        k = k.repeat_interleave(n_heads // kvh, dim=2)
        v = v.repeat_interleave(n_heads // kvh, dim=2)
        scores = torch.einsum("bthd,bshd->bhts", q, k) / math.sqrt(hd) + causal
        att = torch.einsum("bhts,bshd->bthd", scores.softmax(-1), v).reshape(B, T, dim)
        h = h + att @ sd[p + "attention.wo.weight"].T
        x = rms(h, sd[p + "ffn_norm.weight"])
        ff = torch.nn.functional.silu(x @ sd[p + "feed_forward.w1.weight"].T) * (x @ sd[p + "feed_forward.w3.weight"].T)
        h = h + ff @ sd[p + "feed_forward.w2.weight"].T
    return rms(h, sd["norm.weight"]) @ sd["output.weight"].T


@pytest.mark.parametrize("name", ["tiny", "tiny_gqa"])
def test_logits_match_independent_reference(assets, process_group, name):
    model, tok = load_llama(assets[name], assets["tokenizer"], max_seq_len=64)
    params = json.load(open(f"{assets[name]}/params.json"))
    sd = load_shard(f"{assets[name]}/consolidated.00.pth")
    tokens = torch.randint(0, tok.n_words, (2, 11), generator=torch.Generator().manual_seed(0))
    ref = reference_logits(sd, params, tokens, theta=params.get("rope_theta", 10000.0))
    torch.testing.assert_close(model(tokens), ref, rtol=1e-4, atol=1e-4)
    # Token ids and their embeddings are interchangeable inputs.
    torch.testing.assert_close(model(embeddings=model.embed(tokens)), ref, rtol=1e-4, atol=1e-4)


def test_cached_decoding_logits_equal_full_forward(assets, process_group):
    model, _ = load_llama(assets["tiny_gqa"], assets["tokenizer"], max_seq_len=64)
    tokens = torch.randint(3, 100, (3, 9), generator=torch.Generator().manual_seed(1))
    full = model(tokens)
    cache = model.new_cache(3, 16)
    assert cache[0].k.dtype == model.dtype and cache[0].k.device == model.device
    step = [model(tokens[:, :5], cache=cache)]
    for t in range(5, 9):
        step.append(model(tokens[:, t:t + 1], cache=cache, start_pos=t))
    torch.testing.assert_close(torch.cat(step, 1), full, rtol=1e-5, atol=1e-5)
    # A prompt filled into the cache in two chunks: the second (start_pos 4, 5 queries) needs the
    # explicit mask, the first takes SDPA's causal kernel.
    cache = model.new_cache(3, 16)
    chunks = [model(tokens[:, :4], cache=cache), model(tokens[:, 4:], cache=cache, start_pos=4)]
    torch.testing.assert_close(torch.cat(chunks, 1), full, rtol=1e-5, atol=1e-5)


def test_logits_at_returns_the_logits_of_the_chosen_positions(assets, process_group):
    model, _ = load_llama(assets["tiny"], assets["tokenizer"], max_seq_len=64)
    emb = torch.randn(3, 7, 64, generator=torch.Generator().manual_seed(3))
    keep = torch.rand(3, 7, generator=torch.Generator().manual_seed(4)) > 0.5
    kept = model(embeddings=emb, logits_at=keep)
    assert kept.shape == (int(keep.sum()), model.args.vocab_size)
    torch.testing.assert_close(kept, model(embeddings=emb)[keep], rtol=1e-5, atol=1e-5)


def test_packed_weights_decode_the_same_and_leave_training_on_the_plain_weights(assets, process_group):
    from llama_caption.llama.model import onednn_packing_available

    assert onednn_packing_available()  # the pinned torch has oneDNN on x86 CPUs
    model, tok = load_llama(assets["tiny_gqa"], assets["tokenizer"], max_seq_len=64)
    prompts = [tok.encode(s, bos=True, eos=False) for s in ("a red cat", "the", "a blue dog under the")]
    prefix = torch.randn(3, 3, 64, generator=torch.Generator().manual_seed(2))
    tokens = torch.randint(3, 100, (2, 9), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        plain = model(tokens)
    plain_gen = generate(model, prompts, eos_id=tok.eos_id, max_gen_len=10, prefix=prefix)
    assert model.pack_weights()
    with torch.no_grad():
        torch.testing.assert_close(model(tokens), plain, rtol=1e-5, atol=1e-5)
    assert generate(model, prompts, eos_id=tok.eos_id, max_gen_len=10, prefix=prefix) == plain_gen
    # Which copy is read: zero the plain output layer. Decoding (no gradient) still reads the
    # packed copy; a forward that needs input gradients reads the plain weights.
    model.output.weight.zero_()
    with torch.no_grad():
        torch.testing.assert_close(model(tokens), plain, rtol=1e-5, atol=1e-5)
    emb = model.embed(tokens).requires_grad_(True)
    assert model(embeddings=emb).abs().max() == 0
    model.unpack_weights()
    with torch.no_grad():
        assert model(tokens).abs().max() == 0


@pytest.mark.parametrize("name", ["tiny", "tiny_gqa"])
@pytest.mark.parametrize("with_prefix", [False, True])
def test_kv_cache_greedy_equals_no_cache_greedy(assets, process_group, name, with_prefix):
    model, tok = load_llama(assets[name], assets["tokenizer"], max_seq_len=64)
    prompts = [tok.encode(s, bos=True, eos=False) for s in
               ("a red cat", "the", "a blue dog under the white house near", "a green")]
    assert len({len(p) for p in prompts}) == 4  # all lengths differ: left padding is exercised
    prefix = torch.randn(4, 3, 64, generator=torch.Generator().manual_seed(2)) if with_prefix else None
    cached = generate(model, prompts, eos_id=tok.eos_id, max_gen_len=12, prefix=prefix)
    slow = greedy_no_cache(model, prompts, eos_id=tok.eos_id, max_gen_len=12, prefix=prefix)
    assert cached == slow
    assert sum(len(c) for c in cached) > 12  # something was generated
    # Batched equals one prompt at a time.
    alone = [generate(model, [p], eos_id=tok.eos_id, max_gen_len=12,
                      prefix=None if prefix is None else prefix[i:i + 1])[0] for i, p in enumerate(prompts)]
    assert cached == alone


def test_generation_stops_at_eos_and_max_len(assets, process_group):
    model, tok = load_llama(assets["tiny"], assets["tokenizer"], max_seq_len=64)
    prompts = [tok.encode("a red", True, False), tok.encode("the blue dog", True, False)]
    free = generate(model, prompts, eos_id=-1, max_gen_len=8)  # no id is -1: never stops early
    assert [len(x) for x in free] == [8, 8]
    # Call the token the first sequence generates at step 3 "EOS": it stops there; the other
    # sequence stops at that token's first appearance, or runs to max_gen_len.
    stop = next(t for i, t in enumerate(free[0]) if i >= 1 and t not in free[0][:i])
    cut = generate(model, prompts, eos_id=stop, max_gen_len=8)
    assert cut[0] == free[0][: free[0].index(stop)]
    assert cut[1] == (free[1][: free[1].index(stop)] if stop in free[1] else free[1])
    with pytest.raises(ValueError, match="max_seq_len"):
        generate(model, prompts[:1], eos_id=tok.eos_id, max_gen_len=64)


def test_sampling_is_seeded_and_uses_top_p(assets, process_group):
    model, tok = load_llama(assets["tiny"], assets["tokenizer"], max_seq_len=64)
    prompts = [tok.encode("a red", True, False)] * 3
    kw = dict(eos_id=tok.eos_id, max_gen_len=10, temperature=1.0, top_p=0.9)
    a = generate(model, prompts, generator=torch.Generator().manual_seed(5), **kw)
    b = generate(model, prompts, generator=torch.Generator().manual_seed(5), **kw)
    assert a == b
    # A tiny top_p keeps only the most likely token: sampling collapses to greedy.
    greedy = generate(model, prompts, eos_id=tok.eos_id, max_gen_len=10)
    tiny_p = generate(model, prompts, eos_id=tok.eos_id, max_gen_len=10, temperature=1.0, top_p=1e-6,
                      generator=torch.Generator().manual_seed(0))
    assert tiny_p == greedy


def test_gradients_reach_input_embeddings_with_frozen_weights(assets, process_group):
    model, _ = load_llama(assets["tiny"], assets["tokenizer"], max_seq_len=64)
    assert not any(p.requires_grad for p in model.parameters())
    emb = torch.randn(2, 6, 64, requires_grad=True)
    loss = model(embeddings=emb)[:, -1].logsumexp(-1).sum()
    loss.backward()
    assert emb.grad is not None and emb.grad.abs().sum() > 0
    # Every position before the last influences it through attention.
    assert (emb.grad[0].abs().sum(-1) > 0).all()
    assert all(p.grad is None for p in model.parameters())


def test_bf16_attention_on_the_cpu_runs_in_fp32_only_under_a_gradient(assets, process_group, monkeypatch):
    model, _ = load_llama(assets["tiny"], assets["tokenizer"], max_seq_len=64, dtype=torch.bfloat16)
    ref, _ = load_llama(assets["tiny"], assets["tokenizer"], max_seq_len=64)
    real = torch.nn.functional.scaled_dot_product_attention
    seen = []

    def spy(q, k, v, **kwargs):
        seen.append((q.dtype, k.dtype, v.dtype))
        return real(q, k, v, **kwargs)

    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", spy)
    x = torch.randn(2, 6, 64, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        decoded = model(embeddings=x.bfloat16())
    assert seen == [(torch.bfloat16,) * 3] * model.args.n_layers  # decoding stays in bf16
    seen.clear()
    emb = x.bfloat16().requires_grad_(True)
    trained = model(embeddings=emb)
    assert seen == [(torch.float32,) * 3] * model.args.n_layers
    torch.testing.assert_close(trained.detach(), decoded, rtol=0.05, atol=0.05)
    trained[:, -1].logsumexp(-1).sum().backward()
    # The bf16 gradient of the input embeddings points where the fp32 model's does.
    emb32 = x.clone().requires_grad_(True)
    ref(embeddings=emb32)[:, -1].logsumexp(-1).sum().backward()
    assert emb.grad.dtype == torch.bfloat16
    assert torch.nn.functional.cosine_similarity(emb.grad.float().flatten(), emb32.grad.flatten(), dim=0) > 0.99
