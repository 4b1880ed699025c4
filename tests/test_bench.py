"""The benchmark's three decoders agree, on a tiny random model (the figures come from the bench)."""

import pytest
import torch

from llama_caption.bench import CONFIGS, decode_bench, hf_model
from llama_caption.model import ModelArgs
from llama_caption.testing import random_model

transformers = pytest.importorskip("transformers", reason="the bench extra: pip install -e .[bench]")


@pytest.fixture(scope="module")
def tiny(process_group):
    c = CONFIGS["tiny"]
    args = ModelArgs(dim=c["dim"], n_layers=c["n_layers"], n_heads=c["n_heads"], n_kv_heads=2,
                     vocab_size=c["vocab"], max_seq_len=32)
    return random_model(args, torch.device("cpu"), torch.float32), c


def test_converted_weights_give_the_same_logits_in_transformers(tiny):
    model, _ = tiny
    hf = hf_model(model)
    tokens = torch.randint(0, 512, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(hf(tokens).logits.float(), model(tokens), rtol=1e-4, atol=1e-4)


def test_ours_seed_and_transformers_produce_the_same_captions(tiny):
    model, c = tiny
    res = decode_bench(model, c, torch.device("cpu"), lambda m: None)
    # Ours on packed and on plain weights, at batch 1 and 8; the no-cache baseline on both weights.
    assert res["captions_identical"] == {"batch8": True, "no_cache_packed": True, "ours_plain": True, "no_cache": True,
                                         "hf_batch8": True}
    assert set(res["ours"]) == {1, 8} and all(r["captions_s"] > 0 for r in res["ours"].values())
