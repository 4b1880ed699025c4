import json
import os
import shutil

import pytest
import torch
from safetensors.torch import load_file

from conftest import run_python, torchrun
from llama_caption.llama.checkpoint import load_llama
from llama_caption.llama.meta import load_shard
from llama_caption.errors import UserError
from llama_caption.llama.convert import reshard
from llama_caption.tools.testing import train_tokenizer
from conftest import caption_lines


def copy_ckpt(src, dst):
    shutil.copytree(src, dst)
    return str(dst)


def test_rope_freqs_key_is_ignored(assets, process_group, tmp_path):
    d = copy_ckpt(assets["tiny"], tmp_path / "c")
    sd = load_shard(f"{d}/consolidated.00.pth")
    sd = {k: v.clone() for k, v in sd.items()}
    sd["rope.freqs"] = torch.zeros(8)
    torch.save(sd, f"{d}/consolidated.00.pth")
    model, _ = load_llama(d, assets["tokenizer"])
    assert model.output.weight.shape[0] == assets["vocab"]


def test_loading_casts_to_the_requested_dtype(assets, process_group):
    model, _ = load_llama(assets["tiny"], assets["tokenizer"], dtype=torch.bfloat16)
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    cache = model.new_cache(2, 8)
    assert cache[0].k.dtype == torch.bfloat16


def broken(tmp_path, assets, what):
    d = copy_ckpt(assets["tiny"], tmp_path / "c")
    tok = assets["tokenizer"]
    shard = f"{d}/consolidated.00.pth"
    if what == "no_dir":
        return str(tmp_path / "nope"), tok, "does not exist"
    if what == "no_params":
        os.remove(f"{d}/params.json")
        return d, tok, "params.json is missing"
    if what == "bad_params":
        open(f"{d}/params.json", "w").write("{not json")
        return d, tok, "not valid JSON"
    if what == "no_shards":
        os.remove(shard)
        return d, tok, "no consolidated.XX.pth"
    if what == "two_shards":
        # Two whole copies are not two shards of one model (any model-parallel size loads now).
        shutil.copy(shard, f"{d}/consolidated.01.pth")
        return d, tok, "params.json with model-parallel size 2 implies"
    if what == "tokenizer_vocab":
        other = train_tokenizer(caption_lines(seed=3), 90, str(tmp_path / "t90.model"))
        assert other.n_words != assets["vocab"]
        return d, other.path, "has 90 words but the checkpoint"
    params_edits = {
        "params_string": ({"dim": "64"}, "params.json: dim is '64': it should be a whole number of at least 1"),
        "params_zero_heads": ({"n_heads": 0}, "params.json: n_heads is 0: it should be a whole number of at least 1"),
        "params_zero_eps": ({"norm_eps": 0}, "params.json: norm_eps is 0: it should be a positive number"),
        "params_rope_scaling": ({"use_scaled_rope": True, "rope_scaling": {"factor": 8.0}},
                                "params.json: rope_scaling of type llama3 lacks low_freq_factor"),
        "params_kv_heads": ({"n_kv_heads": 3}, "the 4 heads are not a multiple of the 3 key/value heads"),
    }
    if what in params_edits:
        params = json.load(open(f"{d}/params.json"))
        params.update(params_edits[what][0])
        json.dump(params, open(f"{d}/params.json", "w"))
        return d, tok, params_edits[what][1]
    sd = {k: v.clone() for k, v in load_shard(shard).items()}
    if what == "int8":
        sd["layers.0.attention.wq.weight"] = sd["layers.0.attention.wq.weight"].to(torch.int8)
        msg = "layers.0.attention.wq.weight is int8: only fp32, fp16 and bf16 weights are read"
    elif what == "missing_key":
        del sd["layers.1.ffn_norm.weight"]
        msg = "missing keys ['layers.1.ffn_norm.weight']"
    elif what == "unexpected_key":
        sd["layers.2.attention.wq.weight"] = torch.zeros(1)
        msg = "unexpected keys ['layers.2.attention.wq.weight']"
    elif what == "wrong_shape":
        sd["layers.0.feed_forward.w2.weight"] = sd["layers.0.feed_forward.w2.weight"][:, :32].clone()
        msg = "layers.0.feed_forward.w2.weight has shape (64, 32)"
    elif what == "truncated":
        data = open(shard, "rb").read()
        open(shard, "wb").write(data[: len(data) // 2])
        return d, tok, "cannot read"
    torch.save(sd, shard)
    return d, tok, msg


CASES = ["no_dir", "no_params", "bad_params", "no_shards", "two_shards", "tokenizer_vocab",
         "missing_key", "unexpected_key", "wrong_shape", "truncated", "params_string", "params_zero_heads",
         "params_zero_eps", "params_rope_scaling", "params_kv_heads", "int8"]


@pytest.mark.parametrize("what", CASES)
def test_loading_errors_name_the_problem(assets, process_group, tmp_path, what):
    d, tok, msg = broken(tmp_path, assets, what)
    with pytest.raises(UserError) as e:
        load_llama(d, tok)
    assert msg in str(e.value)
    assert "\n" not in str(e.value)


@pytest.mark.slow
def test_loading_error_from_the_command_line_is_one_line(assets, tmp_path):
    d, tok, msg = broken(tmp_path, assets, "wrong_shape")
    proc = run_python("example.py", "--ckpt_dir", d, "--tokenizer_path", tok)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1].startswith("error: ") and msg in proc.stderr
    assert "Traceback" not in proc.stderr


def test_reshard_1_to_2_to_1_is_bit_exact(assets, tmp_path):
    src = assets["tiny_gqa"]
    reshard(src, 2, str(tmp_path / "mp2"), quiet=True)
    a = load_shard(f"{tmp_path}/mp2/consolidated.00.pth")
    b = load_shard(f"{tmp_path}/mp2/consolidated.01.pth")
    full = load_shard(f"{src}/consolidated.00.pth")
    # Column-parallel halves on dim 0, row-parallel and the embedding on dim 1, norms replicated.
    assert torch.equal(torch.cat([a["layers.0.attention.wk.weight"], b["layers.0.attention.wk.weight"]], 0),
                       full["layers.0.attention.wk.weight"])
    assert a["layers.0.attention.wo.weight"].shape == (64, 32)
    assert torch.equal(torch.cat([a["tok_embeddings.weight"], b["tok_embeddings.weight"]], 1), full["tok_embeddings.weight"])
    assert torch.equal(a["norm.weight"], b["norm.weight"])
    reshard(str(tmp_path / "mp2"), 1, str(tmp_path / "mp1"), quiet=True)
    back = load_shard(f"{tmp_path}/mp1/consolidated.00.pth")
    assert back.keys() == full.keys()
    for k in full:
        assert torch.equal(back[k], full[k]), k
    assert json.load(open(f"{tmp_path}/mp1/params.json")) == json.load(open(f"{src}/params.json"))
    # The shard file holds only its own half, not the storage of the whole tensor.
    assert os.path.getsize(f"{tmp_path}/mp2/consolidated.00.pth") < 0.6 * os.path.getsize(f"{src}/consolidated.00.pth")


@pytest.mark.slow
def test_reshard_refuses_a_size_that_does_not_divide_the_heads(assets, tmp_path):
    proc = run_python("-m", "llama_caption.reshard", "--ckpt_dir", assets["tiny"], "--mp", 3, "--out", tmp_path / "x")
    assert proc.returncode == 2 and "--mp 3 must divide n_heads 4" in proc.stderr
    assert not (tmp_path / "x").exists()


def test_reshard_refuses_shards_of_two_models_and_leaves_no_output(assets, tmp_path):
    reshard(assets["tiny_gqa"], 2, str(tmp_path / "gqa2"), quiet=True)
    mixed = copy_ckpt(assets["tiny"], tmp_path / "mixed")
    reshard(assets["tiny"], 2, str(tmp_path / "tiny2"), quiet=True)
    shutil.copy(tmp_path / "tiny2" / "consolidated.00.pth", f"{mixed}/consolidated.00.pth")
    shutil.copy(tmp_path / "gqa2" / "consolidated.01.pth", f"{mixed}/consolidated.01.pth")
    with pytest.raises(UserError, match="consolidated.01.pth: layers.0.attention.wk.weight has shape"):
        reshard(mixed, 1, str(tmp_path / "out"), quiet=True)
    assert not (tmp_path / "out").exists()


def test_reshard_of_tied_embeddings_writes_the_output_layer(assets, tmp_path, process_group):
    """A Meta checkpoint without output.weight (the embedding is the output layer), split on the
    width: resharded to 2 it gets output.weight, as Meta's code needs, and loads to the same logits."""
    tied = copy_ckpt(assets["tiny"], tmp_path / "tied")
    sd = {k: v.clone() for k, v in load_shard(f"{tied}/consolidated.00.pth").items() if k != "output.weight"}
    torch.save(sd, f"{tied}/consolidated.00.pth")
    reshard(tied, 2, str(tmp_path / "mp2"), quiet=True)
    halves = [load_shard(f"{tmp_path}/mp2/consolidated.0{r}.pth") for r in (0, 1)]
    assert torch.equal(torch.cat([h["output.weight"] for h in halves], 0), sd["tok_embeddings.weight"])
    a, tok = load_llama(tied, assets["tokenizer"])
    b, _ = load_llama(str(tmp_path / "mp2"), assets["tokenizer"])  # two shards merged by one rank
    tokens = torch.randint(3, tok.n_words, (2, 7), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(a(tokens), b(tokens))


@pytest.fixture(scope="module")
def mp2_assets(assets, tmp_path_factory):
    root = tmp_path_factory.mktemp("mp2")
    for name in ("tiny", "tiny_gqa"):
        reshard(assets[name], 2, str(root / name), quiet=True)
    return root


@pytest.fixture(scope="module")
def mp1_reference(assets, mp2_assets, process_group):
    """What tests/mp_worker.py computes at model-parallel size 1, in this process (one thread, as
    under torchrun): for each tiny checkpoint as written, and for its two resharded shards merged
    by one rank."""
    import mp_worker

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return {(which, name): mp_worker.run(str(root / name) if which == "merged" else assets[name], assets["tokenizer"])
                for which, root in (("mp1", None), ("merged", mp2_assets)) for name in ("tiny", "tiny_gqa")}
    finally:
        torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def mp2_runs(assets, mp2_assets, tmp_path_factory):
    """One two-rank launch of tests/mp_worker.py over four checkpoints: the resharded tiny and
    tiny_gqa (mp2/logits0-1), and the 1-shard originals, each rank cutting its half (2-3)."""
    out = tmp_path_factory.mktemp("mp2_runs")
    torchrun(2, "tests/mp_worker.py", out, assets["tokenizer"], mp2_assets / "tiny", mp2_assets / "tiny_gqa",
             assets["tiny"], assets["tiny_gqa"])
    return lambda i: (load_file(f"{out}/logits{i}.safetensors"), json.load(open(f"{out}/completions{i}.json")))


def plain(completions: dict) -> dict:
    """mp_worker's completions as its JSON file holds them (lists, not tuples)."""
    return json.loads(json.dumps(completions))


@pytest.mark.slow
def test_model_parallel_2_equals_1(mp1_reference, mp2_runs):
    """Two gloo ranks on the resharded checkpoint: the same logits and greedy completions, also
    through the packed weights (their own all-reduce and gather)."""
    for i, name in enumerate(("tiny", "tiny_gqa")):
        one, c1 = mp1_reference[("mp1", name)]
        two, c2 = mp2_runs(i)
        torch.testing.assert_close(two["logits"], one["logits"], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(two["packed_logits"], one["logits"], rtol=1e-5, atol=1e-5)
        c1 = plain(c1)
        assert c1 == c2
        assert c1["greedy_prefix_packed"] == c1["greedy_prefix"]
        assert all(len(x) > 0 for x in c1["greedy"])


@pytest.mark.slow
def test_meta_checkpoints_load_at_any_model_parallel_size(mp1_reference, mp2_runs):
    """Each rank cuts its slice from the stored shards: one shard loaded by two ranks, and two
    shards loaded by one, give the logits and completions of the checkpoint at its own size."""
    for i, name in enumerate(("tiny", "tiny_gqa")):
        one, c1 = mp1_reference[("mp1", name)]
        split, c_split = mp2_runs(2 + i)
        merged, c_merged = mp1_reference[("merged", name)]
        torch.testing.assert_close(split["logits"], one["logits"], rtol=1e-5, atol=1e-5)
        assert torch.equal(merged["logits"], one["logits"])  # the same weights, whole
        assert c_split == plain(c1)
        assert plain(c_merged) == plain(c1)


@pytest.mark.slow
def test_example_end_to_end_mp1_and_mp2(assets, mp2_assets):
    args = ["--tokenizer_path", assets["tokenizer"], "--temperature", 0, "--max_gen_len", 8, "--max_seq_len", 64,
            "--prompts", '["a red cat", "the blue dog under"]']
    one = torchrun(1, "example.py", "--ckpt_dir", assets["tiny"], *args)
    two = torchrun(2, "example.py", "--ckpt_dir", mp2_assets / "tiny", *args)
    for proc in (one, two):
        lines = proc.stdout.splitlines()
        assert sum(1 for l in lines if l == "=" * 34) == 2  # one separator per completion, exactly 34 '='
        assert proc.stdout.count("Loaded in") == 1  # only rank 0 prints
    blocks = one.stdout.split("=" * 34)
    first, second = blocks[0].strip().splitlines()[-1], blocks[1].strip()
    assert first.startswith("a red cat") and len(first) > len("a red cat")  # prompt, then the completion
    assert second.startswith("the blue dog under") and len(second) > len("the blue dog under")
    assert one.stdout.split("seconds", 1)[1] == two.stdout.split("seconds", 1)[1]


@pytest.mark.slow
def test_example_refuses_wrong_process_count(assets, mp2_assets):
    proc = torchrun(1, "example.py", "--ckpt_dir", mp2_assets / "tiny", "--tokenizer_path", assets["tokenizer"], check=False)
    assert proc.returncode != 0
    assert "model-parallel size 2 does not divide the 1 process(es)" in proc.stderr and "--nproc_per_node 2" in proc.stderr
