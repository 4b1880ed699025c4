"""Continuous batching (llama/continuous.py) writes, for every request, generation.generate's
caption of that request alone: greedy and sampled, slots refilled many times, in any arrival
order, with prompts of several lengths, in fp32 on the CPU; torch.compile too. Bad settings and
requests are one-line ValueErrors."""

import random

import pytest
import torch

from llama_caption.llama.continuous import ContinuousDecoder, Request
from llama_caption.llama.generation import generate
from llama_caption.llama.model import ModelArgs
from llama_caption.tools.testing import random_model

EOS = 2


@pytest.fixture(scope="module")
def model(process_group):
    args = ModelArgs(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=96, max_seq_len=40, rope_theta=500000.0,
                     use_scaled_rope=True)
    return random_model(args, torch.device("cpu"), torch.float32, std=0.3)


def requests(n, seed=0, prompts=([1],), prefix_len=3, sample=False):
    """`n` requests with 3-embedding prefixes (as a captioner's, all as long; every fifth has its
    prompt alone, as `complete` sends) and max_gen_len drawn in 1..20, cycling through `prompts`.
    Captions end at different steps two ways: the drawn max_gen_len, and EOS (token 2), which
    this random model writes after a number of tokens that depends on the request
    (`ends_both_ways` checks that both happen)."""
    g = torch.Generator().manual_seed(seed)
    rng = random.Random(seed)
    out = []
    for i in range(n):
        prompt = list(prompts[i % len(prompts)])
        prefix = torch.randn(prefix_len, 64, generator=g) * 0.5
        if i % 5 == 4:
            prefix = None
        out.append(Request(prefix, prompt, max_gen_len=rng.randint(1, 20), tag=i,
                           temperature=1.0 if sample else 0.0, top_p=0.9,
                           generator=torch.Generator().manual_seed(100 + i) if sample else None))
    return out


def alone(model, r: Request, eos_id=EOS):
    """The reference: generation.generate on this request alone (a batch of one), its generator
    seeded as the request's was."""
    gen = None if r.generator is None else torch.Generator().manual_seed(r.generator.initial_seed())
    prefix = None if r.prefix is None else r.prefix[None]
    return generate(model, [r.prompt], eos_id=eos_id, max_gen_len=r.max_gen_len, prefix=prefix,
                    temperature=r.temperature, top_p=r.top_p, generator=gen)[0]


def fresh(reqs):
    """The same requests with generators in their initial state (a run draws from them)."""
    return [Request(r.prefix, r.prompt, r.max_gen_len, r.temperature, r.top_p,
                    None if r.generator is None else torch.Generator().manual_seed(r.generator.initial_seed()), r.tag)
            for r in reqs]


def ends_both_ways(reqs, want):
    ended_by_eos = [r.tag for r in reqs if len(want[r.tag]) < r.max_gen_len]
    ended_by_length = [r.tag for r in reqs if len(want[r.tag]) == r.max_gen_len]
    assert len(ended_by_eos) >= 3 and len(ended_by_length) >= 3, (ended_by_eos, ended_by_length)
    assert len({len(c) for c in want.values()}) >= 6  # captions of many lengths


def test_greedy_captions_are_each_request_alone_in_any_order(model):
    reqs = requests(30, prompts=([1], [1, 7, 3], [1, 5]))
    want = {r.tag: alone(model, r) for r in reqs}
    ends_both_ways(reqs, want)
    decoder = ContinuousDecoder(model, 4, eos_id=EOS)
    for order in (reqs, reqs[::-1], random.Random(1).sample(reqs, len(reqs))):
        got = list(decoder.run(order))
        assert dict(got) == want and len(got) == len(reqs)
        assert [t for t, _ in got] != [r.tag for r in order]  # yielded as they end, not as given
    # Other slot counts, and admitted prompts padded to 1, 2 or 4 (the compiled and CUDA-graph
    # modes' shapes; the padding prompts write into the spare cache row).
    for slots, sizes in ((1, None), (3, (1, 2, 4)), (8, (2, 8))):
        assert dict(ContinuousDecoder(model, slots, eos_id=EOS, prefill_sizes=sizes).run(reqs)) == want
    # Several end tokens, as Llama 3's stop ids.
    want2 = {r.tag: alone(model, r, eos_id=(EOS, 5)) for r in reqs}
    assert want2 != want
    assert dict(ContinuousDecoder(model, 5, eos_id=(EOS, 5)).run(reqs)) == want2


def test_sampled_captions_are_each_request_alone_with_its_seed(model):
    reqs = requests(16, seed=1, sample=True)
    want = {r.tag: alone(model, r) for r in reqs}
    assert len({tuple(c) for c in want.values()}) == len(reqs)
    for slots, order in ((3, list(range(16))), (5, list(range(16))[::-1])):
        assert dict(ContinuousDecoder(model, slots, eos_id=EOS).run(fresh([reqs[i] for i in order]))) == want
    # Sampled and greedy requests sharing the slots.
    greedy = requests(8, seed=2)
    for r in greedy:
        r.tag += 100
    want.update({r.tag: alone(model, r) for r in greedy})
    mixed = [r for pair in zip(fresh(reqs[:8]), greedy) for r in pair] + fresh(reqs[8:])
    assert dict(ContinuousDecoder(model, 4, eos_id=EOS).run(mixed)) == want


def test_a_slot_is_refilled_at_once_and_requests_are_pulled_lazily(model):
    """One 20-token request beside twelve 2-token ones in 4 slots: the other 3 slots take the short
    ones two steps each while the long one runs, so everything is done in 20 steps (a batch
    decoder would run 3 batches, 20 + 2 + 2 steps)."""
    long = Request(torch.randn(3, 64) * 0.5, [1], 20, tag="long")
    short = [Request(torch.randn(3, 64) * 0.5, [1], 2, tag=i) for i in range(12)]
    decoder = ContinuousDecoder(model, 4, eos_id=-1)
    pulled = []

    def source():
        for r in [long] + short:
            pulled.append(r.tag)
            yield r
    it = decoder.run(source())
    first = next(it)
    assert first[0] == 0 and len(pulled) == 4  # nothing was taken before a slot was free for it
    got = dict([first, *it])
    assert got == {r.tag: alone(model, r, eos_id=-1) for r in [long] + short}
    steps = 0
    for r in [long] + short:
        decoder.submit(r)
    while decoder.in_flight:
        decoder.step()
        steps += 1
    assert steps == 20


def test_submit_and_step_between_steps(model):
    """A server's use: requests arrive between steps; one too long for the window is refused
    where it is submitted and the others decode as if it had never come."""
    reqs = requests(10, seed=3)
    want = {r.tag: alone(model, r) for r in reqs}
    decoder = ContinuousDecoder(model, 3, eos_id=EOS, window=26)
    got = {}
    for r in reqs[:4]:
        decoder.submit(r)
    for _ in range(3):
        got.update(decoder.step())
    too_long = Request(torch.randn(3, 64), [1], 23, tag="too long")
    with pytest.raises(ValueError, match=r"prompt \(4\) \+ max_gen_len \(23\) exceeds the decoder's window 26"):
        decoder.submit(too_long)
    for r in reqs[4:]:
        decoder.submit(r)
        got.update(decoder.step())
    while decoder.in_flight:
        got.update(decoder.step())
    assert got == want
    assert decoder.step() == []  # nothing left: no forward


@pytest.mark.slow
def test_compiled_step_gives_the_static_tokens(model):
    reqs = requests(5, seed=4)[:4]  # no prefix-less request: one prompt length, two step shapes
    want = {r.tag: alone(model, r) for r in reqs}
    decoder = ContinuousDecoder(model, 2, eos_id=EOS, mode="compile", prefill_sizes=(2,))
    assert dict(decoder.run(reqs)) == want


def test_bad_settings_and_requests_are_refused(model):
    for slots in (0, -1, 2.5, True):
        with pytest.raises(ValueError, match="slots must be a whole number of at least 1"):
            ContinuousDecoder(model, slots, eos_id=EOS)
    for window in (1, 41):
        with pytest.raises(ValueError, match="window must be a whole number between 2 and the model's max_seq_len 40"):
            ContinuousDecoder(model, 2, eos_id=EOS, window=window)
    with pytest.raises(ValueError, match="mode must be one of"):
        ContinuousDecoder(model, 2, eos_id=EOS, mode="eager")
    with pytest.raises(ValueError, match="needs the model on a CUDA device"):
        ContinuousDecoder(model, 2, eos_id=EOS, mode="cuda_graph")
    with pytest.raises(ValueError, match="prefill_sizes must hold a count between 1 and slots"):
        ContinuousDecoder(model, 2, eos_id=EOS, prefill_sizes=(0, 4))
    decoder = ContinuousDecoder(model, 2, eos_id=EOS)
    decoder.submit(Request(None, [1], 5))
    bad = [(Request(torch.zeros(3, 32), [1], 5), r"prefix must be \(P, 64\) embeddings, got shape \(3, 32\)"),
           (Request(None, [], 5), "needs a prefix or at least one prompt token"),
           (Request(None, [1], 0), "max_gen_len must be a whole number of at least 1, got 0"),
           (Request(torch.zeros(3, 64), [1], 37), r"prompt \(4\) \+ max_gen_len \(37\) exceeds the decoder's window 40")]
    for request, message in bad:
        with pytest.raises(ValueError, match=message):
            decoder.submit(request)
    assert decoder.in_flight == 1
    # From run: the request before it is decoded; the bad one stops the run where it is pulled.
    it = ContinuousDecoder(model, 1, eos_id=-1).run([Request(None, [1], 3, tag="ok"), bad[3][0]])
    assert next(it) == ("ok", alone(model, Request(None, [1], 3), eos_id=-1))
    with pytest.raises(ValueError, match="exceeds the decoder's window"):
        next(it)


def test_bench_compares_the_two_decoders_caption_for_caption(model):
    """`bench --continuous`'s comparison on the tiny shape's slot counts (the figures come from the bench)."""
    from llama_caption.tools.bench import CONFIGS, CONTINUOUS, caption_lengths, continuous_bench

    lengths = caption_lengths(1000)
    assert min(lengths) in (8, 9) and max(lengths) == 30 and 13.5 < sum(lengths) / 1000 < 14.5
    res = continuous_bench(model, CONFIGS["tiny"], CONTINUOUS["tiny"], torch.device("cpu"), ["static"], lambda m: None,
                           rounds=1)
    assert set(res["static"]) == {2, 4}
    assert all(r["identical"] == 12 and r["continuous_captions_s"] > 0 for r in res["static"].values())


def test_a_slot_count_whose_cache_does_not_fit_in_free_memory_is_one_line(model):
    from llama_caption.errors import UserError
    from llama_caption.opening import check_slots, free_memory

    check_slots(model, 8, "cpu")
    kv_width = model.args.kv_heads * model.args.head_dim  # grouped-query attention: 2 of the 4 heads
    too_many = free_memory("cpu") // (2 * model.args.n_layers * model.args.max_seq_len * kv_width * 4) + 1
    with pytest.raises(UserError, match=rf"--batch_size {too_many} slots need a .* GiB KV cache, more than the"):
        check_slots(model, too_many, "cpu")
