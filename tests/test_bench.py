"""The benchmark's three decoders agree, on a tiny random model (the figures come from the bench)."""

import json
import os

import pytest
import torch

from llama_caption.tools.bench import CONFIGS, decode_bench, hf_model
from llama_caption.llama.model import ModelArgs
from llama_caption.tools.testing import random_model

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


@pytest.mark.slow
def test_ours_seed_and_transformers_produce_the_same_captions(tiny):
    model, c = tiny
    res = decode_bench(model, c, torch.device("cpu"), lambda m: None)
    # Ours on packed and on plain weights, at batch 1 and 8; the no-cache baseline on both weights.
    assert res["captions_identical"] == {"batch8": True, "no_cache_packed": True, "ours_plain": True, "no_cache": True,
                                         "hf_batch8": True}
    assert set(res["ours"]) == {1, 8} and all(r["captions_s"] > 0 for r in res["ours"].values())


@pytest.mark.slow
def test_load_benchmark_reports_each_format_and_rank(tmp_path):
    """bench_load on the tiny shape at MP 2: both formats load on two ranks, each holding half
    the weights (the figures themselves are printed by `python -m llama_caption bench-load`)."""
    from conftest import run_cli
    from llama_caption.tools import bench_load

    out = tmp_path / "load.json"
    # Full precision only: each load is a torchrun launch; the quantized modes' weight bytes per rank
    # are tests/test_quantize.py's (memory, and model parallelism through quant_worker.py).
    proc = run_cli(bench_load.main, "--shape", "tiny", "--mp", 2, "--out", out, "--dir", tmp_path / "scratch")
    assert proc.returncode == 0, proc.stderr[-2000:]
    import json

    res = json.load(open(out))
    assert [(r["format"], r["mp"], r["quantize"]) for r in res["loads"]] == [
        ("hugging face", 2, "none"), ("meta", 2, "none")]
    for row in res["loads"]:
        assert len(row["ranks"]) == 2
        # Tied embeddings: the output layer is not a second copy, so a rank holds half the file's
        # weights, plus the replicated norms (5 x 64 bf16 values).
        assert all(r["share_bytes"] == res["weight_bytes"] // 2 + 5 * 64 for r in row["ranks"])
    assert "hugging face" in proc.stdout and "meta" in proc.stdout


@pytest.mark.slow
def test_static_decoder_rows_report_the_eager_captions(tiny):
    from llama_caption.tools.bench import decode_prefixes, static_decoder_bench
    from llama_caption.llama.generation import generate

    model, c = tiny
    prefix = decode_prefixes(model, c, torch.device("cpu"))
    reference = generate(model, [[1]] * len(prefix), prefix=prefix, eos_id=-1, max_gen_len=c["gen_len"])
    res = static_decoder_bench(model, c, torch.device("cpu"), ["static"], prefix, reference, lambda m: None)
    assert set(res["static"]) == set(c["batches"])
    assert all(r["identical"] == c["images"] and r["captions_s"] > 0 for r in res["static"].values())
    # Per batch size (bench passes the eager decoder's captions at each): each row is held to its own.
    first, last = c["batches"][0], c["batches"][-1]
    per_batch = {b: list(reference) for b in c["batches"]}
    per_batch[last][0] = per_batch[last][0] + [7]
    res = static_decoder_bench(model, c, torch.device("cpu"), ["static"], prefix, per_batch, lambda m: None)
    assert res["static"][first]["identical"] == c["images"] and res["static"][last]["identical"] == c["images"] - 1
    # A mode that cannot run is reported in its row, and the others are kept.
    res = static_decoder_bench(model, c, torch.device("cpu"), ["cuda_graph", "static"], prefix, reference,
                               lambda m: None)
    assert "needs the model on a CUDA device" in res["cuda_graph"]["error"] and "error" not in res["static"]


def test_bench_serve_deepen_stacks_layers_that_leave_the_captions_as_they_were(cap, trained, tmp_path):
    """bench-serve --deepen: the stacked LLaMA (added layers with zero output projections) and the
    checkpoint copy that records it write the captions of the LLaMA as it was."""
    import json

    import captioning_inference
    from conftest import run_cli
    from llama_caption.tools.bench_serve import BenchServeConfig, deepen

    cfg = BenchServeConfig(ckpt_dir=cap["ckpt_dir"], tokenizer_path=cap["tokenizer"], checkpoint=trained,
                           images=cap["val_images"], deepen=5)
    deepen(cfg, str(tmp_path), print)
    assert json.load(open(tmp_path / "llama" / "params.json"))["n_layers"] == 5
    captions = []
    for llama, ckpt in ((cap["ckpt_dir"], trained), (cfg.ckpt_dir, cfg.checkpoint)):
        out = tmp_path / f"{len(captions)}.json"
        proc = run_cli(captioning_inference.main, "--ckpt_dir", llama, "--tokenizer_path", cap["tokenizer"],
                       "--checkpoint", ckpt, "--images", cap["val_images"], "--out", out, "--num_workers", 0)
        assert proc.returncode == 0, proc.stderr[-2000:]
        captions.append([r["caption"] for r in json.load(open(out))])
    assert captions[0] == captions[1] and len(captions[0]) == 3
    # What it cannot stack is one line each, before anything is written.
    from llama_caption.errors import UserError

    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "params.json").write_text("{bad")
    (bad / "consolidated.00.pth").write_bytes(b"garbage")
    for ckpt_dir, n, says in ((str(bad), 5, "is not valid JSON"), (cap["ckpt_dir"], 10 ** 7, "stack fewer layers"),
                              (cap["ckpt_dir"], 2, "must be above the LLaMA's 2 layers")):
        with pytest.raises(UserError, match=says):
            deepen(BenchServeConfig(ckpt_dir=ckpt_dir, checkpoint=trained, images="x", deepen=n), str(tmp_path / "no"),
                   print)
    (bad / "params.json").write_text(open(os.path.join(cap["ckpt_dir"], "params.json")).read())
    with pytest.raises(UserError, match="as a weights-only torch checkpoint"):
        deepen(BenchServeConfig(ckpt_dir=str(bad), checkpoint=trained, images="x", deepen=5), str(tmp_path / "no"), print)
    assert not (tmp_path / "no").exists()


def test_bench_captioners_opens_one_llama_and_one_clip_for_several_runs(tmp_path, process_group):
    """bench-captioners' worker, in this process: three runs written over the tiny LLaMA open as
    three captioners sharing one LLaMA and one CLIP, each projection training's default mlp."""
    from llama_caption.tools.bench_captioners import CaptionersBenchConfig, worker, write_runs
    from llama_caption.tools.bench_load import write_hf_by_layer

    write_hf_by_layer(str(tmp_path), "tiny", print)
    runs = write_runs(str(tmp_path), str(tmp_path / "hf"), 3, print)
    out = tmp_path / "figures.json"
    worker(CaptionersBenchConfig(worker=str(tmp_path / "hf"), runs=[",".join(runs)], out=str(out), shape="tiny"))
    got = json.load(open(out))
    assert (got["captioners"], got["llamas"], got["encoders"]) == (3, 1, 1)
    dim, feature, prefix = 64, 128, 10  # the tiny shape's width, the stand-in CLIP's, training's default prefix
    assert got["projection_bytes"] == 4 * (feature * dim + dim + dim * prefix * dim + prefix * dim)
    assert got["rss"] > got["llama_bytes"]  # (what loading added can be below 0 at this size: freed pages)


def test_timed_in_turns_runs_the_functions_in_rounds_and_keeps_each_ones_fastest(monkeypatch):
    from llama_caption.tools import bench

    calls, clock = [], iter([0.0, 5.0, 5.0, 6.0, 6.0, 9.0, 9.0, 9.5, 9.5, 12.0, 12.0, 14.0])
    monkeypatch.setattr(bench.time, "perf_counter", lambda: next(clock))

    def fn(name):
        return lambda: calls.append(name) or f"{name}{len(calls)}"

    got = bench.timed_in_turns({"a": fn("a"), "b": fn("b")}, torch.device("cpu"), rounds=3, min_seconds=0)
    assert calls == ["a", "b"] + ["a", "b"] * 3  # one warm-up each, then a, b in turn
    # a's runs took 5, 3, 2.5 s and b's 1, 0.5, 2 s: each keeps its fastest run's output.
    assert got == {"a": ("a7", 2.5), "b": ("b6", 0.5)}
