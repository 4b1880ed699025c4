"""--quantize int8|int4|nf4: the frozen LLaMA's block weights quantized as they load (quantize.py).

Tolerances: weight-only int8 keeps each weight to 1/254 of its row's largest (per-row scales),
so logits move by about a percent of their spread; int4 and NF4 keep 16 levels per 64 weights
(int4: per 32 where a slice's width is not a multiple of 64), about ten times coarser. The fused
int8/int4 kernels also round the activations to bf16 (a few parts in a thousand). The bounds below are a few times what the stand-in LLaMA shows (printed
with -s), tight enough that a wrong scale, a transposed weight or a lost model-parallel
reduction (errors of the logits' own size) fails them."""

import json

import pytest
import torch
from safetensors.torch import load_file

import captioning_inference
import captioning_training
from conftest import run_cli, torchrun
from llama_caption.data import load_coco, open_rgb
from llama_caption.errors import UserError
from llama_caption.llama import quantize
from llama_caption.llama.checkpoint import load_llama
from llama_caption.llama.continuous import ContinuousDecoder, Request
from llama_caption.llama.generation import generate
from llama_caption.llama.model import ModelArgs
from llama_caption.llama.quantize import Int4Weight, Int8Weight, QuantizedLinear, check_kernels, quantize_model, weight_bytes
from llama_caption.llama.static_decode import StaticDecoder
from llama_caption.opening import CaptionerSettings
from llama_caption.tools.testing import open_trained, random_model

# Relative error ||quantized - full|| / ||full|| of the logits, and the least cosine similarity
# of the prefix gradients, per mode.
LOGIT_ERROR = {"int8": 0.03, "int4": 0.25, "nf4": 0.25}
GRAD_COSINE = {"int8": 0.995, "int4": 0.9, "nf4": 0.9}
CAPTION_AGREEMENT = {"int8": 0.9, "int4": 0.6, "nf4": 0.6}
# The model-parallel test's text (tests/quant_worker.py) moves the 4-bit modes' logits more (0.27 here).
MP_LOGIT_ERROR = {"int8": 0.03, "int4": 0.4, "nf4": 0.4}
QUANTIZED = ("int8", "int4", "nf4")


def relative(a, b):
    return ((a - b).norm() / b.norm()).item()


@pytest.fixture(scope="module")
def features(cap, trained, process_group):
    """The nine drawn images' CLIP features and 27 blends of two of them: 36 prefixes."""
    encoder = open_trained(cap["ckpt_dir"], cap["tokenizer"], trained, process_group, max_gen_len=20).encoder
    recs = load_coco(cap["images"], cap["ann"]) + load_coco(cap["val_images"], cap["val_ann"])
    with torch.no_grad():
        feats = encoder(torch.stack([encoder.preprocess(open_rgb(r.path)) for r in recs]))
    g = torch.Generator().manual_seed(0)
    pairs = torch.randint(0, len(feats), (27, 2), generator=g)
    w = torch.rand(27, 1, generator=g)
    return torch.cat([feats, w * feats[pairs[:, 0]] + (1 - w) * feats[pairs[:, 1]]])


@pytest.fixture(scope="module")
def captioners(cap, trained, process_group):
    return {mode: open_trained(cap["ckpt_dir"], cap["tokenizer"], trained, process_group, max_gen_len=20,
                               quantize=mode).captioner
            for mode in ("none",) + QUANTIZED}


def test_the_block_linears_and_the_output_layer_are_quantized_and_memory_shrinks(cap, process_group):
    sizes = {}
    for mode in ("none",) + QUANTIZED:
        model, _ = load_llama(cap["ckpt_dir"], cap["tokenizer"], 64, quantize=mode)
        layers = {n: m.mode for n, m in model.named_modules() if isinstance(m, QuantizedLinear)}
        blocks = {n for n in layers if n.startswith("layers.")}
        assert len(blocks) == (0 if mode == "none" else 7 * model.args.n_layers)
        assert all(layers[n] == mode for n in blocks)
        # int8 and int4 multiply the output layer in int8 (per row); nf4 keeps it.
        assert layers.get("output") == {"int8": "int8", "int4": "int8"}.get(mode)
        assert set(layers) == blocks | ({"output"} if mode in ("int8", "int4") else set())
        assert isinstance(model.tok_embeddings.weight, torch.nn.Parameter)
        assert all(not p.requires_grad for p in model.parameters())
        sizes[mode] = weight_bytes(model)
    # The tiny stand-in's embedding (kept) is a large share; the blocks and the output layer shrink.
    print("weight bytes", sizes)
    assert sizes["int4"] < sizes["int8"] < sizes["none"] and sizes["nf4"] < sizes["none"]


def test_logits_and_prefix_gradients_stay_close(captioners, features, cap):
    captions = [c for c in cap["few_captions"]] * 2
    ids = captioners["none"].caption_ids(captions)
    feats = features[:len(ids)]
    out = {}
    for mode, c in captioners.items():
        c.projection.zero_grad()
        prefix = c.projection(feats).detach().requires_grad_()
        tokens, _ = c.targets(ids)
        logits = c.llama(embeddings=torch.cat([prefix, c.llama.embed(tokens)], dim=1))
        loss, n = c.loss(feats, ids)
        loss.backward()
        grad = torch.cat([p.grad.flatten() for p in c.projection.parameters()])
        torch.autograd.backward(logits.logsumexp(-1).sum())
        out[mode] = (logits.detach(), grad, prefix.grad, loss.item() / n)
    for mode in QUANTIZED:
        err = relative(out[mode][0], out["none"][0])
        cos = torch.nn.functional.cosine_similarity(out[mode][1], out["none"][1], dim=0).item()
        cos_prefix = torch.nn.functional.cosine_similarity(out[mode][2].flatten(), out["none"][2].flatten(), dim=0).item()
        print(f"{mode}: logits relative error {err:.4f}, projection-gradient cosine {cos:.4f}, "
              f"prefix-gradient cosine {cos_prefix:.4f}, loss {out[mode][3]:.4f} vs {out['none'][3]:.4f}")
        assert err < LOGIT_ERROR[mode]
        assert cos > GRAD_COSINE[mode] and cos_prefix > GRAD_COSINE[mode]
        assert out[mode][1].abs().sum() > 0


def test_greedy_captions_mostly_agree(captioners, features):
    base = captioners["none"].generate(features, max_gen_len=20)
    assert len(set(base)) > 3
    for mode in QUANTIZED:
        mine = captioners[mode].generate(features, max_gen_len=20)
        rate = sum(a == b for a, b in zip(mine, base)) / len(base)
        print(f"{mode}: {rate:.0%} of {len(base)} greedy captions equal full precision's")
        assert rate >= CAPTION_AGREEMENT[mode]


def test_a_mode_without_a_kernel_is_one_line_and_bad_modes_are_refused(cap, trained, tmp_path):
    assert check_kernels("int8", "cpu", torch.float32) == "fused"  # all run here
    assert check_kernels("int4", "cpu", torch.bfloat16) == "fused"
    assert check_kernels("nf4", "cpu", torch.float32) == "bitsandbytes"
    for mode in QUANTIZED:  # a device no kernel computes on
        with pytest.raises(UserError) as e:
            check_kernels(mode, "meta", torch.float32)
        msg = str(e.value)
        assert msg.startswith(f"--quantize {mode} has no working kernel on meta") and "\n" not in msg
    proc = run_cli(captioning_inference.main, "--ckpt_dir", cap["ckpt_dir"], "--tokenizer_path", cap["tokenizer"],
                   "--checkpoint", trained, "--images", cap["val_images"], "--out", tmp_path / "r.json",
                   "--quantize", "int3")
    assert proc.returncode == 2 and "--quantize 'int3' must be one of none, int8, int4, nf4" in proc.stderr
    proc = run_cli(captioning_inference.main, "--ckpt_dir", cap["ckpt_dir"], "--tokenizer_path", cap["tokenizer"],
                   "--checkpoint", trained, "--images", cap["val_images"], "--out", tmp_path / "r.json",
                   "--quantize", "nf4", "--decoder", "compile", "--num_workers", 0)
    assert proc.returncode == 2 and "--decoder compile is not measured with --quantize nf4" in proc.stderr
    assert not list(tmp_path.iterdir())


@pytest.mark.slow
def test_captions_record_the_quantization_and_a_rerun_in_another_mode_is_refused(cap, trained, tmp_path):
    def caption(mode, *extra):
        return run_cli(captioning_inference.main, "--ckpt_dir", cap["ckpt_dir"], "--tokenizer_path", cap["tokenizer"],
                       "--checkpoint", trained, "--images", cap["val_images"], "--out", tmp_path / "r.json",
                       "--num_workers", 0, "--quantize", mode, *extra)

    proc = caption("int4")
    assert proc.returncode == 0, proc.stderr
    assert "was trained with the LLaMA at full precision; captioning with it at int4 weight-only" in proc.stdout + proc.stderr
    assert json.load(open(tmp_path / "r.run.json"))["llama"]["quantize"] == "int4"
    before = (tmp_path / "r.json").read_text()
    proc = caption("none")
    assert proc.returncode == 2 and "llama.quantize" in proc.stderr and "--overwrite" in proc.stderr
    assert (tmp_path / "r.json").read_text() == before


@pytest.mark.slow
def test_training_with_an_int4_llama_lowers_the_loss_and_records_it(cap, tmp_path):
    out = tmp_path / "run"
    proc = run_cli(captioning_training.main, "--ckpt_dir", cap["ckpt_dir"], "--tokenizer_path", cap["tokenizer"],
                   "--clip_model", cap["clip"], "--train_images", cap["images"], "--train_annotations", cap["few"],
                   "--out_dir", out, "--num_workers", 0, "--epochs", 12, "--batch_size", 4, "--warmup_steps", 2,
                   "--lr", 3e-3, "--quantize", "int4", "--log_every", 1)
    assert proc.returncode == 0, proc.stderr[-2000:]
    losses = [json.loads(line)["loss"] for line in open(out / "metrics.jsonl") if '"loss"' in line]
    print("int4 training losses", [round(x, 3) for x in losses])
    assert len(losses) >= 10 and sum(losses[-3:]) / 3 < 0.7 * sum(losses[:3]) / 3
    assert json.load(open(out / "config.json"))["quantize"] == "int4"


@pytest.mark.slow
def test_two_model_parallel_ranks_match_one(cap, tmp_path, process_group):
    """Each rank quantizes its own slices. A column-parallel layer's int8 rows are one rank's rows;
    a row-parallel layer's rows are cut in two, each half with its own scale, and NF4's 64-weight
    blocks fall elsewhere when a slice's width is not a multiple of 64 (the tiny model's 96 and
    32; Llama 2 7B's 1376 at MP 8): the two quantizations differ by as much as either differs
    from full precision, and both stay within the mode's bound."""
    modes = ("none",) + QUANTIZED
    import quant_worker

    torchrun(2, "tests/quant_worker.py", tmp_path / "mp2.safetensors", cap["tokenizer"], cap["ckpt_dir"], *modes)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # size 1 in this process, on one thread as a torchrun rank
    try:
        one = quant_worker.compute(cap["tokenizer"], cap["ckpt_dir"], modes)
    finally:
        torch.set_num_threads(threads)
    two = load_file(tmp_path / "mp2.safetensors")
    assert torch.allclose(two["none.logits"], one["none.logits"], atol=1e-4)
    for mode in QUANTIZED:
        err_mp = relative(two[f"{mode}.logits"], one[f"{mode}.logits"])
        err_full = relative(two[f"{mode}.logits"], one["none.logits"])
        cos = torch.nn.functional.cosine_similarity(two[f"{mode}.grad"].flatten(), one[f"{mode}.grad"].flatten(), dim=0)
        print(f"{mode}: MP 2 vs MP 1 logits {err_mp:.5f}, vs full precision {err_full:.4f}, prefix-gradient cosine {cos:.5f}")
        err_one = relative(one[f"{mode}.logits"], one["none.logits"])
        assert err_full < MP_LOGIT_ERROR[mode] and err_one < MP_LOGIT_ERROR[mode]
        assert err_mp < 2 * max(err_full, err_one)
        full_cos = torch.nn.functional.cosine_similarity(two[f"{mode}.grad"].flatten(), one["none.grad"].flatten(), dim=0)
        assert cos > 0.85 and full_cos > 0.85


def test_example_completes_with_int8_weights_as_with_full_ones(cap, process_group):
    """example.py (`complete`) takes --quantize: the stand-in completes a caption's start the same
    way at int8 (its logits move by well under a percent)."""
    import example

    outs = {}
    for mode in ("none", "int8"):
        proc = run_cli(example.main, "--ckpt_dir", cap["ckpt_dir"], "--tokenizer_path", cap["tokenizer"],
                       "--temperature", 0, "--max_gen_len", 8, "--max_seq_len", 32, "--quantize", mode,
                       "--prompts", json.dumps([c.split()[0] + " " + c.split()[1] for c in cap["few_captions"][:2]]))
        assert proc.returncode == 0, proc.stderr
        outs[mode] = proc.stdout.split("\n", 1)[1]  # after "Loaded in ... seconds"
    assert outs["int8"] == outs["none"] and outs["none"].count("=" * 34) == 2


@pytest.mark.slow
def test_the_servers_model_identity_records_the_quantization(cap, trained, process_group):
    from llama_caption.serve.server import ServeConfig, Service

    svc = Service(ServeConfig(ckpt_dir=cap["ckpt_dir"], tokenizer_path=cap["tokenizer"], checkpoint=trained,
                              device="cpu", quantize="int4", max_gen_len=10))
    svc.load(process_group)
    assert svc.info["llama"]["quantize"] == "int4"
    layers = {n: m.mode for n, m in svc.runner.captioner.llama.named_modules() if isinstance(m, QuantizedLinear)}
    assert layers.pop("output") == "int8" and layers and set(layers.values()) == {"int4"}


# The fused int8/int4 layers and the decoders over them.

@pytest.fixture(scope="module")
def random_llamas(process_group):
    """A random tiny LLaMA per fused mode (and nf4), quantized in place (dim 64: int4 groups of 64)."""
    args = ModelArgs(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=96, max_seq_len=40)
    out = {}
    for mode in QUANTIZED:
        model = random_model(args, torch.device("cpu"), torch.float32, std=0.3)
        assert quantize_model(model, mode) == 7 * args.n_layers + (mode != "nf4")  # the output layer too
        out[mode] = model
    return out


@pytest.mark.parametrize("cls", [Int8Weight, Int4Weight])
def test_a_fused_layer_multiplies_and_differentiates_from_its_codes_alone(cls):
    """Forwards the kernel's product, backwards grad_y @ W with W dequantized on the fly: both near
    full precision's, and no full-precision copy of the weight is held."""
    g = torch.Generator().manual_seed(0)
    w = torch.randn(96, 192, generator=g)  # 192 inputs: int4 groups of 64
    layer = cls(w)
    held = list(layer.buffers())
    assert all(t.dtype in (torch.int8, torch.uint8, torch.bfloat16) for t in held)
    assert sum(t.numel() * t.element_size() for t in held) < w.numel() * (1.2 if cls is Int8Weight else 0.7)
    x = torch.randn(3, 5, 192, generator=g, requires_grad=True)
    y = layer(x)
    grad = torch.randn(y.shape, generator=g)
    y.backward(grad)
    bound = 0.02 if cls is Int8Weight else 0.15  # int8: 1% of quantization, int4 about 9% here
    assert y.shape == (3, 5, 96) and relative(y.detach(), x.detach() @ w.T) < bound
    assert relative(x.grad, grad @ w) < bound
    with torch.no_grad():  # no gradient asked for: the kernel alone, the same numbers
        assert torch.equal(layer(x), y.detach())


def prompts_and_prefix(n=3, seed=0):
    prefix = torch.randn(n, 3, 64, generator=torch.Generator().manual_seed(seed)) * 0.5
    return [[1, 5, 9, 4], [1, 7], [1, 3, 3, 8, 2, 6, 11]][:n], prefix


def continuous_tokens(model, prompts, prefix, mode):
    decoder = ContinuousDecoder(model, 2, eos_id=2, mode=mode)
    reqs = [Request(prefix[i], p, 12, tag=i) for i, p in enumerate(prompts)]
    return [tokens for _, tokens in sorted(decoder.run(reqs))]


def check_decoder(model, decoder: str):
    """A quantized model's greedy tokens under `decoder` are the eager decoder's (generation.generate
    over the same quantized layers), and the first step's logits are within 1e-2 of the eager
    forward's: the fused kernels give each row the same numbers whatever the batch's shape."""
    prompts, prefix = prompts_and_prefix()
    want = generate(model, prompts, eos_id=2, max_gen_len=12, prefix=prefix)
    assert any(len(t) > 3 for t in want)
    if decoder.startswith("continuous"):
        got = continuous_tokens(model, prompts, prefix, decoder.split("-")[1])
        assert got == [generate(model, [p], eos_id=2, max_gen_len=12, prefix=prefix[i:i + 1])[0]
                       for i, p in enumerate(prompts)]
        return
    static = StaticDecoder(model, decoder, sizes=(4,))
    assert static.generate(prompts, eos_id=2, max_gen_len=12, prefix=prefix) == want
    step = static.steps[4]
    eager = model(tokens=torch.tensor([[1, 5]] * 4), start_pos=0)[:, -1]  # the same text, one pass
    cache_run = StaticDecoder(model, decoder, sizes=(4,))
    cache_run.generate([[1]] * 4, eos_id=-1, max_gen_len=1)  # prefill BOS into a fresh cache
    s = cache_run.steps[4]
    s.tokens.fill_(5), s.slot.fill_(1), s.positions.fill_(1)
    s.key_mask.copy_((torch.arange(s.window) <= 1)[None, None, None, :].expand_as(s.key_mask))
    assert step is not None and relative(s.run(), eager) < 1e-2


@pytest.mark.parametrize("mode", QUANTIZED)
@pytest.mark.parametrize("decoder", ["static", "continuous-static"])
def test_every_quantized_mode_decodes_under_the_fixed_shape_and_continuous_decoders(random_llamas, mode, decoder):
    with torch.no_grad():
        check_decoder(random_llamas[mode], decoder)


@pytest.mark.slow  # torch.compile starts a compiler
@pytest.mark.parametrize("mode, decoder", [("int8", "compile"), ("int4", "continuous-compile")])
def test_the_compiled_decoders_take_the_fused_kernels(random_llamas, mode, decoder):
    """Each fused mode through one of the two compiled decoders (each compile of a new graph
    costs 10-30 s on 2 cores; the two decoders share the compiled step's code, tests/test_continuous.py)."""
    try:
        with torch.no_grad():
            check_decoder(random_llamas[mode], decoder)
    finally:  # each model compiles its own variants: leave the next test dynamo's whole recompile budget
        torch._dynamo.reset()


def test_a_mode_without_its_fused_kernel_falls_back_or_is_refused_in_one_line(monkeypatch, capsys):
    def broken(self, x):
        raise RuntimeError("no kernel for this device\nmore detail")

    quantize._kernel.cache_clear()
    try:
        monkeypatch.setattr(Int8Weight, "product", broken)
        monkeypatch.setattr(Int4Weight, "product", broken)
        assert check_kernels("int8", "cpu", torch.float32) == "torchao"  # int8: torchao's eager layer
        err = capsys.readouterr().err.strip()
        assert err == ("--quantize int8: no fused kernel on cpu in float32 (no kernel for this device): falling back to "
                       "torchao's eager int8 layer (the same memory, slower decoding)")
        layer = QuantizedLinear(torch.nn.Linear(64, 32, bias=False), torch.randn(32, 64), "int8", "cpu",
                                torch.float32, "torchao")
        assert layer.library == "torchao" and layer(torch.randn(2, 64)).shape == (2, 32)
        with pytest.raises(UserError) as e:  # int4: no other kernel for its codes
            check_kernels("int4", "cpu", torch.float32)
        assert str(e.value) == ("--quantize int4 has no working kernel on cpu in float32 (PyTorch int4pack: no kernel "
                                "for this device): use --quantize nf4, int8 or another device")
    finally:
        quantize._kernel.cache_clear()
    with pytest.raises(UserError, match=r"^--quantize int4: a 24x64 weight slice does not fit the int4 kernels"):
        Int4Weight(torch.randn(24, 64))  # 24 outputs: not a multiple of 16


def test_auto_decoder_takes_cuda_graphs_with_the_fused_modes_only():
    for mode, want in (("none", "cuda_graph"), ("int8", "cuda_graph"), ("int4", "cuda_graph"), ("nf4", "eager")):
        settings = CaptionerSettings.__new__(CaptionerSettings)
        settings.decoder, settings.quantize = "auto", mode
        settings.resolve_decoder(torch.device("cuda"))
        assert settings.decoder == want
        settings.decoder = "auto"
        settings.resolve_decoder(torch.device("cpu"))
        assert settings.decoder == "static"


def test_the_plan_puts_the_output_layer_in_int8_where_the_fused_int8_kernel_runs(monkeypatch, capsys):
    def plans():
        quantize._kernel.cache_clear()
        quantize._fused_runs.cache_clear()
        return {m: quantize.plan(m, "cpu", torch.float32) for m in ("none",) + QUANTIZED}

    try:
        got = plans()
        assert {m: p.output for m, p in got.items()} == {"none": None, "int8": "int8", "int4": "int8", "nf4": None}
        assert got["int4"].layer_mode("output.weight") == "int8" and got["int4"].layer_mode("layers.1.attention.wq.weight") == "int4"
        assert got["int8"].layer_mode("tok_embeddings.weight") is None and got["int8"].layer_mode("norm.weight") is None
        assert got["none"].layer_mode("layers.0.feed_forward.w1.weight") is None

        def broken(self, x):
            raise RuntimeError("no kernel")

        monkeypatch.setattr(Int8Weight, "product", broken)  # int8's fused kernel gone: int4's output layer stays
        got = plans()
        assert got["int8"].kernel == "torchao" and got["int8"].output is None
        assert got["int4"].kernel == "fused" and got["int4"].output is None
        assert "falling back to torchao" in capsys.readouterr().err
    finally:
        quantize._kernel.cache_clear()
        quantize._fused_runs.cache_clear()


def test_a_tied_output_layer_stays_the_embedding(assets, tmp_path, process_group):
    """Llama 3.2's tied embeddings: quantizing the output layer would add a copy, so it stays the
    embedding (one tensor) while the blocks are quantized; the same for a model quantized in place."""
    import shutil

    from llama_caption.llama.meta import load_shard

    tied = tmp_path / "tied"
    shutil.copytree(assets["tiny"], tied)
    sd = {k: v.clone() for k, v in load_shard(f"{tied}/consolidated.00.pth").items() if k != "output.weight"}
    torch.save(sd, f"{tied}/consolidated.00.pth")
    model, _ = load_llama(str(tied), assets["tokenizer"], 32, quantize="int8")
    assert model.output.weight is model.tok_embeddings.weight
    assert sum(isinstance(m, QuantizedLinear) for m in model.modules()) == 7 * model.args.n_layers
    assert model.pack_weights()  # the tied output layer is still a plain one, packed for the CPU
    made = random_model(model.args, torch.device("cpu"), torch.float32)
    made.output.weight = made.tok_embeddings.weight
    assert quantize_model(made, "int4") == 7 * model.args.n_layers and made.output.weight is made.tok_embeddings.weight


def test_bench_quantize_times_each_mode_and_compares_it_with_full_precision(tmp_path, process_group, capsys, monkeypatch):
    from llama_caption.tools import bench_quantize
    from llama_caption.tools.bench import CONFIGS
    from llama_caption.tools.bench_quantize import QuantBenchConfig, bench

    with pytest.raises(UserError, match=r"^--batches \[1, 1\] names a batch size twice"):
        QuantBenchConfig(batches=[1, 1], demo="").check()
    # A shape whose fp32 reference does not fit in memory is refused before anything is made.
    assert bench_quantize.cpu_bytes(CONFIGS["7b"]) > 40 * 2**30 > 2**30 > bench_quantize.cpu_bytes(CONFIGS["cpu"])
    with monkeypatch.context() as m:
        m.setattr(bench_quantize.os, "sysconf", lambda name: 4096 if name == "SC_PAGE_SIZE" else 1000)
        with pytest.raises(UserError, match=r"^--config cpu on the CPU needs about 0 GiB .* more than the 0 GiB free"):
            bench_quantize.check_cpu_memory(QuantBenchConfig(demo=""), CONFIGS["cpu"])

    out = tmp_path / "q.json"
    cfg = QuantBenchConfig(config="tiny", quantize=["int8", "int4"], batches=[4, 1], demo="", out=str(out), device="cpu")
    cfg.check()
    res = bench(cfg)
    table = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| int8 |")]
    assert len(table) == 1 and table[0].count("GB/s") == 1  # batch 1's read rate, though batch 1 came second
    rows = res["decode"]
    assert list(rows) == ["none", "int8", "int4"] and json.load(open(out))["decode"].keys() == rows.keys()
    # Packed for oneDNN at none; int8 and int4 quantize every linear layer, so nothing is packed.
    assert [rows[m]["packed"] for m in rows] == [True, False, False]
    for mode, row in rows.items():
        assert set(row["batches"]) == {1, 4} and row["decoder"] == "static"
        assert row["batches"][1]["captions"] == 8 and row["batches"][4]["batch"] == 4
        if mode == "none":
            assert all(r["same_captions"] == 1.0 for r in row["batches"].values())
        else:
            for b, r in row["batches"].items():
                assert row["speed_vs_none"][b] == r["captions_s"] / rows["none"]["batches"][b]["captions_s"]
    # int8 and int4 hold their block and output weights in fewer bytes; one step reads all but the embedding.
    assert rows["int4"]["weight_bytes"] < rows["int8"]["weight_bytes"] < rows["none"]["weight_bytes"]
    emb = 512 * 64 * 4  # the tiny config's 512 words x 64, fp32
    assert rows["none"]["step_bytes"] == rows["none"]["weight_bytes"] - emb
