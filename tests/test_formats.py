"""Llama 1/2/3.x in Meta's layout and Hugging Face's, and their tokenizers (issue 16).

The references are independent of our code: transformers' LlamaForCausalLM (its own files, its
own forward and `generate`), tiktoken's own file loader, and the `tokenizers` library.
"""

import base64
import json
import re
import os
import shutil

import pytest
import torch
from safetensors.torch import load_file

from conftest import caption_lines, run_cli, torchrun
from llama_caption.llama.checkpoint import load_llama, open_checkpoint
from llama_caption.llama.meta import load_shard
from llama_caption.llama.convert import convert
from llama_caption.errors import UserError
from llama_caption.llama.model import rope_frequencies
from llama_caption.llama.convert import reshard
from llama_caption.tools.testing import write_hf_checkpoint
from llama_caption.llama.tokenizer import load_tokenizer

transformers = pytest.importorskip("transformers")  # installed by `make install` (the bench extra)

# Meta's Llama 3 split pattern, as written in llama-models' tokenizer.py (the reference here).
META_PATTERN = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                r"|\s*[\r\n]+|\s+(?!\S)|\s+")
SENTENCES = ["a red cat on the blue house", "The 3 dogs' 1234 bones!\nnew line  two spaces",
             "héllo wörld — ünïcode", "<|eot_id|> is text here", "don't we'll they're"]


def byte_symbols():
    """GPT-2's byte-level alphabet: byte -> the character standing for it."""
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    table, extra = {}, 0
    for b in range(256):
        if b in keep:
            table[b] = chr(b)
        else:
            table[b] = chr(256 + extra)
            extra += 1
    return table


def train_byte_bpe(lines, vocab_size):
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(META_PATTERN), behavior="isolated"),
                                                 pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tok.train_from_iterator(lines, trainer)
    return tok


META_SPECIALS = ["<|begin_of_text|>", "<|end_of_text|>", "<|reserved_special_token_0|>", "<|reserved_special_token_1|>",
                 "<|finetune_right_pad_id|>", "<|step_id|>", "<|start_header_id|>", "<|end_header_id|>", "<|eom_id|>",
                 "<|eot_id|>", "<|python_tag|>", "<|image|>"] + [f"<|reserved_special_token_{i}|>" for i in range(2, 246)]


def hf_model(config_kwargs, seed, dtype, folder, max_shard_size="20KB"):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(initializer_range=0.2, rms_norm_eps=1e-5, max_position_embeddings=256, **config_kwargs)
    model = LlamaForCausalLM(config).to(dtype)
    model.save_pretrained(folder, max_shard_size=max_shard_size)
    return folder


def hf_reference(folder):
    from transformers import LlamaForCausalLM

    return LlamaForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def formats(assets, tmp_path_factory):
    root = tmp_path_factory.mktemp("formats")
    bpe = train_byte_bpe(caption_lines(600, seed=5) + SENTENCES * 3, 400)
    n_base = bpe.get_vocab_size()
    symbols = {c: b for b, c in byte_symbols().items()}
    ranks = {bytes(symbols[c] for c in token): i for token, i in bpe.get_vocab().items()}
    tiktoken_file = root / "llama3_tokenizer.model"
    with open(tiktoken_file, "w") as f:
        for token, rank in sorted(ranks.items(), key=lambda kv: kv[1]):
            f.write(f"{base64.b64encode(token).decode()} {rank}\n")
    bpe.add_special_tokens(META_SPECIALS)
    vocab3 = n_base + 256
    # Llama-3-like: GQA, rope theta 500000, llama3 scaling from a 16-token original context, tied
    # embeddings, bf16, sharded safetensors with an index, a tokenizer.json.
    llama3 = hf_model(dict(vocab_size=vocab3, hidden_size=64, intermediate_size=160, num_hidden_layers=2,
                           num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True, rope_theta=500000.0,
                           rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                         "high_freq_factor": 4.0, "original_max_position_embeddings": 16},
                           bos_token_id=n_base, eos_token_id=n_base + 1), 0, torch.bfloat16, str(root / "hf_llama3"))
    bpe.save(os.path.join(llama3, "tokenizer.json"))
    # Llama-2-like: multi-head attention, untied, fp32, with the sentencepiece tokenizer.model.
    llama2 = hf_model(dict(vocab_size=assets["vocab"], hidden_size=64, intermediate_size=192, num_hidden_layers=2,
                           num_attention_heads=4, tie_word_embeddings=False, bos_token_id=1, eos_token_id=2),
                      1, torch.float32, str(root / "hf_llama2"), max_shard_size="40KB")
    shutil.copy(assets["tokenizer"], os.path.join(llama2, "tokenizer.model"))
    return {"root": root, "tiktoken": str(tiktoken_file), "n_base": n_base, "bpe": bpe, "llama3": llama3,
            "llama2": llama2, "tokenizer_json": os.path.join(llama3, "tokenizer.json")}


def test_tiktoken_file_encodes_as_tiktoken_with_metas_specials(formats):
    import tiktoken
    from tiktoken.load import load_tiktoken_bpe

    ours = load_tokenizer(formats["tiktoken"])
    n = formats["n_base"]
    assert ours.kind.startswith("tiktoken") and ours.n_words == n + 256
    os.environ["TIKTOKEN_CACHE_DIR"] = ""  # tiktoken's loader must read this very file, not a cache
    ranks = load_tiktoken_bpe(formats["tiktoken"])
    specials = {name: n + i for i, name in enumerate(META_SPECIALS)}
    reference = tiktoken.Encoding("ref", pat_str=META_PATTERN, mergeable_ranks=ranks, special_tokens=specials)
    for s in SENTENCES:
        assert ours.encode(s, bos=True, eos=True) == [n] + reference.encode(s, disallowed_special=()) + [n + 1]
        if "<|" not in s:  # the library matches special tokens inside text; Meta's encode does not
            assert ours.encode(s, bos=False, eos=False) == formats["bpe"].encode(s, add_special_tokens=False).ids
        assert ours.decode(ours.encode(s, bos=False, eos=False)) == s
    # Meta's ids: BOS, EOS and the end-of-turn token, the pad token, the last reserved one.
    assert (ours.bos_id, ours.eos_id, ours.pad_id) == (n, n + 1, n + 4)
    assert set(ours.stop_ids) == {n + 1, n + 8, n + 9}
    assert ours.enc.encode("<|eot_id|>", allowed_special="all") == [n + 9]
    assert ours.enc.encode("<|reserved_special_token_245|>", allowed_special="all") == [n + 255]


def test_tokenizer_json_encodes_as_the_tokenizers_library(formats):
    from tokenizers import Tokenizer

    ours = load_tokenizer(formats["tokenizer_json"])
    lib = Tokenizer.from_file(formats["tokenizer_json"])
    n = formats["n_base"]
    assert ours.n_words == n + 256 and (ours.bos_id, ours.eos_id) == (n, n + 1)  # from config.json beside it
    assert n + 9 in ours.stop_ids
    for s in SENTENCES:
        assert ours.encode(s, bos=True, eos=False) == [n] + lib.encode(s, add_special_tokens=False).ids
        assert ours.decode(ours.encode(s, bos=False, eos=False)) == s


def tokens_for(vocab, seed=0, shape=(2, 24)):
    return torch.randint(3, vocab, shape, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("which", ["llama2", "llama3"])
def test_hugging_face_folder_gives_transformers_logits(formats, process_group, which):
    folder = formats[which]
    model, tok = load_llama(folder, max_seq_len=64)  # no tokenizer path: the folder's own
    ref = hf_reference(folder)
    tokens = tokens_for(tok.n_words)  # 24 positions: past the 16-token original context of the scaling
    with torch.no_grad():
        ours, theirs = model(tokens), ref(tokens).logits
    torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-4)
    assert ours.abs().max() > 1  # logits of some size, not all near zero
    if which == "llama3":
        assert model.output.weight is model.tok_embeddings.weight  # tied, one tensor
        plain = rope_frequencies(type(model.args)(**dict(vars(model.args), rope_scaling=None)))
        assert not torch.allclose(plain, rope_frequencies(model.args))  # the scaling matters in this model
        assert tok.kind == "tokenizer.json"
    else:
        assert tok.kind == "sentencepiece"


def test_hub_style_config_reads_the_same(formats, tmp_path, process_group):
    """Files on the hub have top-level rope_theta and rope_scaling; transformers 5 writes
    rope_parameters. Both give the same model."""
    folder = shutil.copytree(formats["llama3"], tmp_path / "hub")
    config = json.load(open(folder / "config.json"))
    params = config.pop("rope_parameters")
    config["rope_theta"] = params.pop("rope_theta")
    config["rope_scaling"] = params
    json.dump(config, open(folder / "config.json", "w"))
    assert open_checkpoint(str(folder)).args == open_checkpoint(formats["llama3"]).args


def test_example_greedy_equals_transformers_generate(formats, process_group):
    import example

    folder = formats["llama3"]
    tok = load_tokenizer(formats["tokenizer_json"])
    prompts = ["a red cat", "the blue dog under the"]
    proc = run_cli(example.main, "--ckpt_dir", folder, "--temperature", 0, "--max_gen_len", 12, "--max_seq_len", 64,
                   "--prompts", json.dumps(prompts))
    assert proc.returncode == 0, proc.stderr
    printed = [b.strip() for b in proc.stdout.split("=" * 34)[:2]]
    printed[0] = printed[0].split("\n", 1)[1]  # after "Loaded in ... seconds"
    ref = hf_reference(folder)
    for prompt, text in zip(prompts, printed):
        ids = tok.encode(prompt, bos=True, eos=False)
        out = ref.generate(torch.tensor([ids]), max_new_tokens=12, do_sample=False, eos_token_id=list(tok.stop_ids),
                           pad_token_id=tok.eos_id)[0, len(ids):].tolist()
        new = next((out[:i] for i, t in enumerate(out) if t in tok.stop_ids), out)
        assert len(new) > 0
        assert text == tok.decode(ids[1:] + new).strip()


def test_convert_loads_to_the_same_logits_and_reshards_bit_exact(formats, tmp_path, process_group):
    src = formats["llama3"]
    convert(src, str(tmp_path / "meta1"), 1, quiet=True)
    params = json.load(open(tmp_path / "meta1" / "params.json"))
    # Meta's Llama 3 params.json, the short-context scaling kept in our extra entry.
    assert params["vocab_size"] == formats["n_base"] + 256 and params["use_scaled_rope"] is True
    assert params["rope_scaling"]["original_max_position_embeddings"] == 16
    hf_model_, _ = load_llama(src, max_seq_len=64)
    meta_model, tok = load_llama(str(tmp_path / "meta1"), max_seq_len=64)
    assert tok.kind == "tokenizer.json"  # copied beside the shards
    tokens = tokens_for(tok.n_words)
    with torch.no_grad():
        assert torch.equal(meta_model(tokens), hf_model_(tokens))
    # Meta's Llama 3 tokenizer.model (tiktoken) beside the shards is preferred, and encodes alike.
    shutil.copy(formats["tiktoken"], tmp_path / "meta1" / "tokenizer.model")
    again, tiktok = load_llama(str(tmp_path / "meta1"), max_seq_len=64)
    assert tiktok.kind.startswith("tiktoken") and tiktok.encode(SENTENCES[0], True, True) == tok.encode(SENTENCES[0], True, True)
    # convert -> reshard 1->2 equals convert at 2, tensor for tensor; the embedding split on the vocabulary.
    reshard(str(tmp_path / "meta1"), 2, str(tmp_path / "re2"), quiet=True)
    convert(src, str(tmp_path / "meta2"), 2, quiet=True)
    for r in (0, 1):
        a = load_shard(f"{tmp_path}/re2/consolidated.0{r}.pth")
        b = load_shard(f"{tmp_path}/meta2/consolidated.0{r}.pth")
        assert a.keys() == b.keys()
        assert all(torch.equal(a[k], b[k]) for k in a)
        assert a["tok_embeddings.weight"].shape == ((formats["n_base"] + 256) // 2, 64)
    # A Llama-2-like model converts to Llama 1/2's layout: vocab_size -1, the embedding split on its width.
    convert(formats["llama2"], str(tmp_path / "meta2_l2"), 2, quiet=True)
    assert json.load(open(tmp_path / "meta2_l2" / "params.json"))["vocab_size"] == -1
    assert load_shard(f"{tmp_path}/meta2_l2/consolidated.00.pth")["tok_embeddings.weight"].shape == (formats_vocab(formats), 32)
    # reshard given a Hugging Face folder converts it; convert given Meta's layout says to reshard.
    reshard(formats["llama2"], 1, str(tmp_path / "via_reshard"), quiet=True)
    assert json.load(open(tmp_path / "via_reshard" / "params.json")) == json.load(open(tmp_path / "meta2_l2" / "params.json"))
    with pytest.raises(UserError, match="already in Meta's layout: use python -m llama_caption reshard"):
        convert(str(tmp_path / "meta1"), str(tmp_path / "again"), 1)


def formats_vocab(formats):
    return json.load(open(os.path.join(formats["llama2"], "config.json")))["vocab_size"]


@pytest.mark.slow
def test_model_parallel_2_equals_transformers(formats, tmp_path):
    """Two gloo ranks, each reading only its slices of the Hugging Face files (and of the
    converted Meta shards, embedding split on the vocabulary): transformers' logits, and the
    greedy tokens of transformers' generate."""
    convert(formats["llama3"], str(tmp_path / "meta2"), 2, quiet=True)
    for r in (0, 1):  # as Llama 3.2's files may be: no output.weight, the output layer is the embedding
        shard = f"{tmp_path}/meta2/consolidated.0{r}.pth"
        sd = {k: v.clone() for k, v in load_shard(shard).items()}  # not views of the file it rewrites
        del sd["output.weight"]
        torch.save(sd, shard)
    torchrun(2, "tests/mp_worker.py", tmp_path, "auto", formats["llama3"], formats["llama2"], tmp_path / "meta2")
    for i, name in enumerate(["llama3", "llama2", "llama3"]):
        got = load_file(f"{tmp_path}/logits{i}.safetensors")
        ref = hf_reference(formats[name])
        with torch.no_grad():
            theirs = ref(got["tokens"]).logits
        torch.testing.assert_close(got["logits"], theirs, rtol=1e-4, atol=1e-4)
        completions = json.load(open(f"{tmp_path}/completions{i}.json"))
        tok = load_tokenizer(formats["tokenizer_json"] if name == "llama3" else os.path.join(formats[name], "tokenizer.model"))
        for ids, ours in zip(completions["prompts"], completions["greedy"]):
            out = ref.generate(torch.tensor([ids]), max_new_tokens=10, do_sample=False, eos_token_id=tok.eos_id,
                               pad_token_id=tok.eos_id)[0, len(ids):].tolist()
            assert ours == (out[:out.index(tok.eos_id)] if tok.eos_id in out else out)


def hf_copy(formats, tmp_path, edit=None, which="llama3"):
    folder = shutil.copytree(formats[which], tmp_path / "broken")
    if edit:
        config = json.load(open(folder / "config.json"))
        edit(config)
        json.dump(config, open(folder / "config.json", "w"))
    return folder


def broken_hf(formats, tmp_path, what):
    if what == "architecture":
        return hf_copy(formats, tmp_path, lambda c: c.update(model_type="mistral", architectures=["MistralForCausalLM"])), \
            "architecture 'MistralForCausalLM' is not LlamaForCausalLM"
    if what == "rope_scaling":
        return hf_copy(formats, tmp_path, lambda c: c["rope_parameters"].update(rope_type="yarn")), \
            "rope_scaling of type 'yarn' is not supported"
    if what == "bias":
        return hf_copy(formats, tmp_path, lambda c: c.update(attention_bias=True)), "attention_bias is true"
    if what == "missing_shard":
        folder = hf_copy(formats, tmp_path)
        os.remove(folder / "model-00002-of-00010.safetensors")
        return folder, "model-00002-of-00010.safetensors is named in"
    if what == "no_tokenizer":
        folder = hf_copy(formats, tmp_path)
        os.remove(folder / "tokenizer.json")
        return folder, "no tokenizer.model or tokenizer.json in"
    if what == "bad_tokenizer":
        folder = hf_copy(formats, tmp_path)
        (folder / "tokenizer.json").write_text('{"model": 1}')
        return folder, "is not a Hugging Face tokenizer.json"
    if what == "neither":
        (tmp_path / "empty").mkdir()
        return tmp_path / "empty", "holds neither params.json"
    return broken_hf_fields(formats, tmp_path, what) or broken_hf_tensors(formats, tmp_path, what)


def broken_hf_fields(formats, tmp_path, what):
    """config.json fields of the wrong type or range."""
    edits = {
        "quantized": (lambda c: c.update(quantization_config={"quant_method": "bitsandbytes", "load_in_8bit": True}),
                      "the weights are quantized (bitsandbytes"),
        "string_number": (lambda c: c.update(hidden_size="64"), "hidden_size is '64': it should be a whole number"),
        "zero_heads": (lambda c: c.update(num_attention_heads=0), "num_attention_heads is 0: it should be a whole number of at least 1"),
        "zero_eps": (lambda c: c.update(rms_norm_eps=0), "rms_norm_eps is 0: it should be a positive number"),
        "rope_scaling_string": (lambda c: c.update(rope_scaling="llama3"), "rope_scaling is 'llama3': it should be a JSON object"),
        "rope_factor_negative": (lambda c: c.update(rope_scaling=dict(c["rope_parameters"], factor=-8)),
                                 "rope_scaling.factor is -8: it should be a positive number"),
        "eos_empty": (lambda c: c.update(eos_token_id=[]), "eos_token_id is []: it should be a token id or a non-empty list"),
        "bos_beyond": (lambda c: c.update(bos_token_id=10 ** 6), "bos_token_id 1000000 is beyond the vocabulary"),
        "heads_not_dividing": (lambda c: c.update(num_attention_heads=3, num_key_value_heads=3, head_dim=None),
                               "the width 64 is not a multiple of the 3 heads"),
    }
    if what in edits:
        edit, msg = edits[what]
        return hf_copy(formats, tmp_path, edit), msg
    return None


def edit_tensors(folder, edit):
    """Rewrite the safetensors shard(s) of a folder through `edit(name, tensors)`."""
    from safetensors.torch import load_file, save_file

    for path in sorted(folder.glob("*.safetensors")):
        tensors = load_file(str(path))
        edit(path, tensors)
        save_file(tensors, str(path), metadata={"format": "pt"})


def broken_hf_tensors(formats, tmp_path, what):
    """Weights that are not what config.json describes, or that we cannot use as they are."""
    folder = hf_copy(formats, tmp_path)
    q = "model.layers.0.self_attn.q_proj.weight"

    def int8_with_scales(path, t):
        if q in t:
            t[q] = t[q].to(torch.int8)
            t[q.replace("weight", "SCB")] = torch.ones(t[q].shape[0])

    def bool_tensor(path, t):
        if q in t:
            t[q] = t[q] > 0

    def extra(path, t):
        if q in t:
            t["model.layers.0.self_attn.q_proj.bias"] = torch.zeros(t[q].shape[0], dtype=t[q].dtype)

    def narrow(path, t):
        if q in t:
            t[q] = t[q][:, :32].contiguous()

    edits = {"int8": (int8_with_scales, "q_proj.SCB, which a LlamaForCausalLM of config.json does not have"),
             "bool": (bool_tensor, "q_proj.weight is BOOL: only F32, F16 and BF16 weights are read"),
             "extra_tensor": (extra, "q_proj.bias, which a LlamaForCausalLM of config.json does not have"),
             "wrong_shape": (narrow, "q_proj.weight has shape (64, 32), config.json implies (64, 64)")}
    if what in edits:
        edit, msg = edits[what]
        edit_tensors(folder, edit)
        return folder, msg
    index = json.load(open(folder / "model.safetensors.index.json"))
    if what == "index_wrong_shard":
        files = sorted(set(index["weight_map"].values()))
        index["weight_map"][q] = next(f for f in files if f != index["weight_map"][q])
        json.dump(index, open(folder / "model.safetensors.index.json", "w"))
        return folder, f"puts {q} in"
    if what == "truncated_single":
        from safetensors.torch import load_file, save_file

        merged = {}
        for name in sorted(set(index["weight_map"].values())):
            merged.update(load_file(str(folder / name)))
            os.remove(folder / name)
        os.remove(folder / "model.safetensors.index.json")
        save_file(merged, str(folder / "model.safetensors"), metadata={"format": "pt"})
        data = (folder / "model.safetensors").read_bytes()
        (folder / "model.safetensors").write_bytes(data[: len(data) // 2])
        return folder, "model.safetensors as safetensors"
    raise AssertionError(what)


HF_ERRORS = ["architecture", "rope_scaling", "bias", "missing_shard", "no_tokenizer", "bad_tokenizer", "neither",
             "quantized", "string_number", "zero_heads", "zero_eps", "rope_scaling_string", "rope_factor_negative",
             "eos_empty", "bos_beyond", "heads_not_dividing", "int8", "bool", "extra_tensor", "wrong_shape",
             "index_wrong_shard", "truncated_single"]


@pytest.mark.parametrize("what", HF_ERRORS)
def test_bad_hugging_face_folders_get_one_line_errors(formats, tmp_path, process_group, what):
    import example

    folder, msg = broken_hf(formats, tmp_path, what)
    with pytest.raises(UserError) as e:
        load_llama(str(folder))
    assert msg in str(e.value) and "\n" not in str(e.value)
    proc = run_cli(example.main, "--ckpt_dir", folder, "--max_gen_len", 2, "--max_seq_len", 64)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1].startswith("error: ") and msg in proc.stderr
    assert "Traceback" not in proc.stderr


def test_model_parallel_flag_is_checked(formats, assets, process_group):
    import example

    proc = run_cli(example.main, "--ckpt_dir", formats["llama3"], "--model_parallel", 3, "--max_seq_len", 64)
    assert proc.returncode == 2 and "--model_parallel 3 must divide n_heads 4" in proc.stderr
    proc = run_cli(example.main, "--ckpt_dir", assets["tiny"], "--tokenizer_path", assets["tokenizer"], "--model_parallel", 2)
    # A Meta checkpoint loads at any model-parallel size now: one process cannot hold two ranks.
    assert proc.returncode == 2 and "model-parallel size 2 does not divide the 1 process(es)" in proc.stderr


@pytest.mark.slow
def test_training_and_inference_on_a_hugging_face_stand_in(cap, tmp_path, process_group):
    """The demo's stand-in LLaMA written as a Hugging Face folder (tokenizer.model inside, no
    --tokenizer_path): the same logits as Meta's files, and a projection trains and captions."""
    import captioning_inference
    import captioning_training

    meta = cap["ckpt_dir"]
    args = open_checkpoint(meta).args
    sd = load_shard(os.path.join(meta, "consolidated.00.pth"))
    args = type(args)(**dict(vars(args), vocab_size=sd["tok_embeddings.weight"].shape[0], max_seq_len=2048))
    hf = str(tmp_path / "hf")
    write_hf_checkpoint(hf, args, dict(sd), dtype=torch.float32, max_shard_bytes=60_000)
    shutil.copy(cap["tokenizer"], os.path.join(hf, "tokenizer.model"))
    a, tok = load_llama(meta, cap["tokenizer"], 64)
    b, _ = load_llama(hf, None, 64)
    tokens = tokens_for(tok.n_words)
    with torch.no_grad():
        torch.testing.assert_close(b(tokens), a(tokens), rtol=1e-5, atol=1e-5)
    run = tmp_path / "run"
    proc = run_cli(captioning_training.main, "--ckpt_dir", hf, "--clip_model", cap["clip"], "--train_images",
                   cap["images"], "--train_annotations", cap["few"], "--out_dir", run, "--num_workers", 0,
                   "--epochs", 2, "--batch_size", 4)
    assert proc.returncode == 0, proc.stderr[-2000:]
    out = tmp_path / "results.json"
    proc = run_cli(captioning_inference.main, "--ckpt_dir", hf, "--checkpoint", run, "--images", cap["val_images"],
                   "--annotations", cap["val_ann"], "--out", out, "--max_gen_len", 8)
    assert proc.returncode == 0, proc.stderr[-2000:]
    results = json.load(open(out))
    assert len(results) == 3 and all(isinstance(r["caption"], str) for r in results)
    made_by = json.load(open(tmp_path / "results.run.json"))
    assert made_by["llama"]["format"] == "hugging face"


def test_meta_use_scaled_rope_is_metas_fixed_scaling():
    """A Meta params.json with use_scaled_rope (Llama 3.1+) and no numbers: the frequencies are
    those of the llama3 scaling with factor 8, low 1, high 4, original context 8192, as
    transformers computes them; Llama 3.0 (no use_scaled_rope) is the plain rotary base."""
    from transformers import LlamaConfig
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    from llama_caption.llama.model import ModelArgs

    config = LlamaConfig(hidden_size=256, num_attention_heads=2, max_position_embeddings=131072, rope_theta=500000.0,
                         rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                       "high_freq_factor": 4.0, "original_max_position_embeddings": 8192})
    theirs = ROPE_INIT_FUNCTIONS["llama3"](config, "cpu")[0]
    params = {"dim": 256, "n_layers": 1, "n_heads": 2, "rope_theta": 500000.0, "vocab_size": 128256}
    ours = rope_frequencies(ModelArgs.from_params(dict(params, use_scaled_rope=True)))
    torch.testing.assert_close(ours, theirs, rtol=1e-6, atol=0)
    plain = rope_frequencies(ModelArgs.from_params(params))
    assert not torch.allclose(plain, theirs)
    torch.testing.assert_close(plain, 1.0 / 500000.0 ** (torch.arange(0, 128, 2).float() / 128))


def test_convert_checks_the_weights_before_writing(formats, tmp_path):
    """A tensor of the wrong shape or dtype is refused from the headers: no --out is left behind."""
    for what in ("wrong_shape", "int8"):
        folder, msg = broken_hf_tensors(formats, tmp_path / what, what)
        with pytest.raises(UserError, match=re.escape(msg)):
            convert(str(folder), str(tmp_path / what / "meta"), 2, quiet=True)
        assert not (tmp_path / what / "meta").exists()
