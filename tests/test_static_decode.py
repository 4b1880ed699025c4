"""Fixed-shape decoding (static KV cache, one graph-ready step) gives generation.generate's tokens
in fp32 on the CPU: greedy and sampled, with prompts of different lengths, an image prefix and
a batch padded to a captured size; compiled with torch.compile too. (CUDA graphs need a GPU.)"""

import pytest
import torch

from llama_caption.llama.generation import generate
from llama_caption.llama.model import ModelArgs
from llama_caption.llama.static_decode import StaticDecoder
from llama_caption.tools.testing import random_model


@pytest.fixture(scope="module")
def model(process_group):
    args = ModelArgs(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=96, max_seq_len=40, rope_theta=500000.0,
                     use_scaled_rope=True)
    return random_model(args, torch.device("cpu"), torch.float32, std=0.3)


PROMPTS = [[1, 5, 9, 4], [1, 7], [1, 3, 3, 8, 2, 6, 11]]


def prefix_for(model, n, seed=0):
    return torch.randn(n, 3, model.args.dim, generator=torch.Generator().manual_seed(seed)) * 0.5


def test_static_greedy_equals_generate(model):
    prefix = prefix_for(model, 3)
    want = generate(model, PROMPTS, eos_id=2, max_gen_len=16, prefix=prefix)
    decoder = StaticDecoder(model, "static", sizes=(1, 4))
    assert decoder.generate(PROMPTS, eos_id=2, max_gen_len=16, prefix=prefix) == want
    assert list(decoder.steps) == [4]  # three prompts ran as a padded batch of four
    # The cache is reused: a second, different batch through the same buffers.
    want1 = generate(model, PROMPTS[1:2], eos_id=2, max_gen_len=16)
    assert decoder.generate(PROMPTS[1:2], eos_id=2, max_gen_len=16) == want1
    assert decoder.generate(PROMPTS[:2], eos_id=(2, 5), max_gen_len=16) == generate(model, PROMPTS[:2], eos_id=(2, 5), max_gen_len=16)
    assert any(len(x) > 3 for x in want)  # not all ending at once: the steps were exercised


def test_static_sampling_equals_generate(model):
    prefix = prefix_for(model, 3, seed=1)
    a = generate(model, PROMPTS, eos_id=2, max_gen_len=12, prefix=prefix, temperature=1.0, top_p=0.9,
                 generator=torch.Generator().manual_seed(3))
    b = StaticDecoder(model, "static", sizes=(8,)).generate(PROMPTS, eos_id=2, max_gen_len=12, prefix=prefix,
                                                             temperature=1.0, top_p=0.9,
                                                             generator=torch.Generator().manual_seed(3))
    assert a == b


@pytest.mark.slow
def test_compiled_step_equals_generate(model):
    prefix = prefix_for(model, 3, seed=2)
    want = generate(model, PROMPTS, eos_id=2, max_gen_len=10, prefix=prefix)
    assert StaticDecoder(model, "compile", sizes=(4,)).generate(PROMPTS, eos_id=2, max_gen_len=10, prefix=prefix) == want


def test_cuda_graph_mode_refuses_a_cpu_model(model):
    with pytest.raises(ValueError, match="needs the model on a CUDA device"):
        StaticDecoder(model, "cuda_graph")
