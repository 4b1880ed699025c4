"""SCST's pieces: the CIDEr-D reward against pycocoevalcap, keyed sampling, advantages, and the
direction of one policy-gradient step (tiny models)."""

import json
import os
import random
import re
import shutil

import pytest
import torch

from conftest import COLOURS, PLACES, THINGS
from llama_caption.llama.checkpoint import load_llama
from llama_caption.llama.decoding import Decoding
from llama_caption.projection import Projection
from llama_caption.scst import (CiderD, advantages, sample_captions, sample_keys, sequence_logprobs,
                                tokenize)


SAMPLE_12 = Decoding(max_gen_len=12, temperature=1.0)  # sample_captions' limits (its keys carry the seed)


def caption_sets(seed, images=6):
    rng = random.Random(seed)
    words = lambda: f"a {rng.choice(COLOURS)} {rng.choice(THINGS)} {rng.choice(PLACES)} the {rng.choice(THINGS)}"  # noqa: E731
    refs = {i: [words() + rng.choice(["", " .", " today", " in the park"]) for _ in range(rng.randint(2, 5))]
            for i in range(images)}
    cands = {i: [words(), refs[i][0], " ".join(refs[i][-1].split()[:3]), "the the the"] for i in refs}
    return refs, cands


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_cider_d_equals_pycocoevalcap_with_the_same_document_frequencies(seed):
    from pycocoevalcap.cider.cider_scorer import CiderScorer

    refs, cands = caption_sets(seed)
    refs = {i: [tokenize(r) for r in rs] for i, rs in refs.items()}
    ours = CiderD(refs, pretokenized=True)
    for j in range(4):  # one candidate per image in each set
        scorer = CiderScorer(n=4, sigma=6.0)
        for i in refs:
            scorer += (tokenize(cands[i][j]), refs[i])
        _, theirs = scorer.compute_score()
        mine = ours.scores(list(refs), [tokenize(cands[i][j]) for i in refs])
        assert mine == pytest.approx(list(theirs), rel=1e-9, abs=1e-12)
    assert max(ours.score(i, refs[i][0]) for i in refs) > 1.0  # a reference itself scores high


def test_tokenize_drops_punctuation_and_case():
    assert tokenize("A Dog's bone, on the TABLE.") == "a dog's bone on the table"


def test_mean_baseline_advantages_sum_to_zero_per_image():
    r = torch.tensor([[1.0, 2.0, 4.0, 0.5], [0.0, 0.0, 3.0, 1.0]])
    a = advantages(r, "mean")
    assert torch.allclose(a.sum(1), torch.zeros(2), atol=1e-6)
    assert a[0, 2] == pytest.approx(4.0 - (1.0 + 2.0 + 0.5) / 3)
    g = advantages(r, "greedy", torch.tensor([1.0, 2.0]))
    assert torch.equal(g, r - torch.tensor([[1.0], [2.0]]))
    with pytest.raises(ValueError):
        advantages(r[:, :1], "mean")


@pytest.fixture(scope="module")
def small(assets, process_group):
    llama, tok = load_llama(assets["tiny"], assets["tokenizer"], max_seq_len=40)
    torch.manual_seed(0)
    proj = Projection("mlp", True, 16, llama.args.dim, 3, 32)
    return llama, tok, proj


def test_keyed_samples_do_not_depend_on_the_batch(small):
    llama, tok, proj = small
    feats = torch.randn(3, 16, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        prefix = proj(feats).repeat_interleave(2, 0)
    keys = sample_keys(7, 5, [10, 11, 12], 2, "cpu")
    together, _ = sample_captions(llama, prefix, tok.bos_id, tok.eos_id, SAMPLE_12, keys)
    alone, _ = sample_captions(llama, prefix[2:4], tok.bos_id, tok.eos_id, SAMPLE_12, sample_keys(7, 5, [11], 2, "cpu"))
    assert together[2:4] == alone
    assert together[2] != together[3] or together[0] != together[1]  # samples of one image differ
    other_step, _ = sample_captions(llama, prefix, tok.bos_id, tok.eos_id, SAMPLE_12, sample_keys(7, 6, [10, 11, 12], 2, "cpu"))
    assert other_step != together


def test_logprobs_equal_the_sum_of_stepwise_logprobs(small):
    llama, tok, proj = small
    feats = torch.randn(2, 16, generator=torch.Generator().manual_seed(2))
    prefix = proj(feats)
    tokens, ended = [[5, 9, 12], [7]], [True, False]
    got = sequence_logprobs(llama, prefix, tokens, ended, tok.bos_id, tok.eos_id)
    for i in range(2):  # the slow way: the whole sequence, log-softmax at each position
        seq = [tok.bos_id] + tokens[i]
        emb = torch.cat([prefix[i:i + 1], llama.embed(torch.tensor([seq]))], 1)
        logp = torch.log_softmax(llama(embeddings=emb)[0], -1)
        targets = tokens[i] + ([tok.eos_id] if ended[i] else [])
        want = sum(logp[3 + j, t] for j, t in enumerate(targets))
        assert float(got[i]) == pytest.approx(float(want), rel=1e-5, abs=1e-5)


def test_one_step_raises_above_baseline_samples_and_lowers_the_others(small):
    llama, tok, _ = small
    torch.manual_seed(3)
    proj = Projection("mlp", True, 16, llama.args.dim, 3, 32)
    feats = torch.randn(1, 16, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        prefix = proj(feats).repeat_interleave(4, 0)
    tokens, ended = sample_captions(llama, prefix, tok.bos_id, tok.eos_id, Decoding(max_gen_len=10, temperature=1.0), sample_keys(0, 0, [1], 4, "cpu"))
    rewards = torch.tensor([[3.0, 0.0, 2.5, 0.1]])
    adv = advantages(rewards, "mean").flatten()
    opt = torch.optim.SGD(proj.parameters(), lr=1e-3)
    before = sequence_logprobs(llama, proj(feats).repeat_interleave(4, 0), tokens, ended, tok.bos_id, tok.eos_id)
    (-(adv * before).sum()).backward()
    opt.step()
    with torch.no_grad():
        after = sequence_logprobs(llama, proj(feats).repeat_interleave(4, 0), tokens, ended, tok.bos_id, tok.eos_id)
    change = after - before.detach()
    assert change[0] > 0 and change[1] < 0  # the best sample up, the worst down
    assert all((c > 0) == (a > 0) for c, a in zip(change.tolist(), adv.tolist())), (change, adv)
    assert float((adv * change).sum()) > 0


@pytest.mark.parametrize("flags, message", [
    ({"scst_temperature": 0}, "--scst_temperature must be in [0.001, 100] (SCST samples: 0, greedy, draws nothing to compare), got 0.0"),
    ({"scst_temperature": 200}, "--scst_temperature must be in [0.001, 100] (SCST samples: 0, greedy, draws nothing to compare), got 200.0"),
    ({"scst_temperature": 1e-40}, "--scst_temperature must be in [0.001, 100] (SCST samples: 0, greedy, draws nothing to compare), got 1e-40"),
    ({"seed": -1}, "--seed must be between 0 and 9223372036854775807, got -1"),
])
def test_scst_sampling_flags_have_the_limits_of_decoding_settings(flags, message):
    """SCST draws its samples with a Decoding (--max_caption_len, --scst_temperature, --seed):
    Decoding's limits and messages under train's flag names, and SCST's own: no greedy
    temperature. Cross-entropy samples nothing, and keeps no such limits."""
    from llama_caption.errors import UserError
    from llama_caption.training import TrainConfig

    base = dict(ckpt_dir="llama", clip_model="ViT-B/32", out_dir="run", train_images="coco", init_from="xe")
    with pytest.raises(UserError, match=re.escape(message)):
        TrainConfig(**base, objective="scst", **flags)
    assert TrainConfig(**base, objective="xe", **flags).objective == "xe"


# SCST through captioning_training.py, from the cross-entropy run of the `trained` fixture.

def scst_args(cap, trained, out_dir, *extra):
    return ["--ckpt_dir", cap["ckpt_dir"], "--tokenizer_path", cap["tokenizer"], "--clip_model", cap["clip"],
            "--train_images", cap["images"], "--train_annotations", cap["ann"], "--out_dir", out_dir,
            "--num_workers", 0, "--log_every", 1, "--objective", "scst", "--init_from", trained,
            "--scst_samples", 3, "--batch_size", 2, "--lr", 1e-3, "--warmup_steps", 0, "--max_caption_len", 12, *extra]


def scst_run(cap, trained, out_dir, *extra, nproc=1):
    import captioning_training
    from conftest import run_cli, torchrun

    if nproc > 1:
        return torchrun(nproc, "captioning_training.py", *scst_args(cap, trained, out_dir, *extra))
    proc = run_cli(captioning_training.main, *scst_args(cap, trained, out_dir, *extra))
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def weights_of(out_dir):
    from safetensors.torch import load_file

    latest = open(f"{out_dir}/checkpoints/latest").read().strip()
    return load_file(f"{out_dir}/checkpoints/{latest}/projection.safetensors")


def test_scst_run_logs_reward_and_validation_cider(cap, trained, tmp_path):
    import json
    import os

    out = tmp_path / "scst"
    proc = scst_run(cap, trained, out, "--epochs", 2, "--val_images", cap["val_images"], "--val_annotations",
                    cap["val_ann"])
    assert "SCST: CIDEr-D reward" in proc.stderr and "val cider" in proc.stderr
    rows = [json.loads(line) for line in open(out / "metrics.jsonl")]
    steps = [r for r in rows if "reward" in r]
    assert len(steps) == 6 and all(r["reward"] >= 0 and r["sample_len"] > 0 for r in steps)  # 6 images / 2, 2 epochs
    assert [r["epoch"] for r in rows if "val_cider" in r] == [1, 2]
    assert os.path.getsize(out / "loss_curve.png") > 1000
    # The run started from the cross-entropy weights: its first steps are near them, not random.
    start = weights_of(trained)
    got = weights_of(out)
    assert all(float((got[k] - start[k]).abs().max()) < 0.1 for k in start)


@pytest.mark.slow
def test_scst_two_data_parallel_ranks_equal_one_process_and_resume_equals_uninterrupted(cap, trained, tmp_path):
    args = ["--epochs", 2, "--batch_size", 4]
    scst_run(cap, trained, tmp_path / "one", *args)
    scst_run(cap, trained, tmp_path / "two", *args, nproc=2)
    a, b = weights_of(tmp_path / "one"), weights_of(tmp_path / "two")
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=1e-4, atol=1e-5)
    assert any(not torch.equal(a[k], weights_of(trained)[k]) for k in a)  # it did learn something
    cut = scst_run(cap, trained, tmp_path / "cut", *args, "--stop_after_steps", 1)
    assert "stopped after step 1" in cut.stderr
    scst_run(cap, trained, tmp_path / "cut", *args, "--resume")
    c = weights_of(tmp_path / "cut")
    assert all(torch.equal(c[k], a[k]) for k in a)


@pytest.mark.parametrize("what", ["no_init", "one_sample", "other_projection", "other_prefix", "other_llama",
                                  "no_samples", "wider_llama", "reward", "negative_weight", "nan_weight",
                                  "zero_weights", "huge_weight", "weight_unused"])
def test_scst_bad_flags_are_one_line_errors_and_write_nothing(cap, trained, assets, tmp_path, what):
    import captioning_training
    from conftest import run_cli

    out = tmp_path / "x"
    args = scst_args(cap, trained, out)
    if what == "no_init":
        i = args.index("--init_from")
        del args[i:i + 2]
        msg = "--objective scst needs --init_from"
    elif what == "one_sample":
        args += ["--scst_samples", 1]
        msg = "--scst_samples 1: the mean baseline needs at least 2"
    elif what == "other_projection":
        args += ["--projection", "linear"]
        msg = "is another captioner: its projection is 'mlp', this run's 'linear'"
    elif what == "other_prefix":
        args += ["--prefix_len", 4]
        msg = "is another captioner: its prefix_len is 10, this run's 4"
    elif what == "no_samples":  # the greedy baseline needs no second sample, but one at least
        args += ["--scst_samples", 0, "--scst_baseline", "greedy"]
        msg = "--scst_samples must be at least 1, got 0"
    elif what == "reward":
        args += ["--scst_reward", "bleu"]
        msg = "--scst_reward 'bleu' must be one of cider, clip, cider+clip"
    elif what == "negative_weight":
        args += ["--scst_reward", "cider+clip", "--scst_clip_weight", -0.5]
        msg = "--scst_clip_weight must be from 0 to 100, got -0.5"
    elif what == "nan_weight":
        args += ["--scst_reward", "cider+clip", "--scst_cider_weight", "1e999"]  # fire reads it as inf
        msg = "--scst_cider_weight must be a finite number"
    elif what == "huge_weight":  # finite, but the reward would overflow
        args += ["--scst_reward", "cider+clip", "--scst_clip_weight", 1e308]
        msg = "--scst_clip_weight must be from 0 to 100, got 1e+308"
    elif what == "weight_unused":
        args += ["--scst_reward", "cider", "--scst_clip_weight", 5]
        msg = "--scst_clip_weight weighs a term of --scst_reward cider+clip; with --scst_reward cider the reward is"
    elif what == "zero_weights":
        args += ["--scst_reward", "cider+clip", "--scst_cider_weight", 0, "--scst_clip_weight", 0]
        msg = "--scst_cider_weight and --scst_clip_weight are both 0"
    elif what == "wider_llama":  # named as the LLaMA, not as the projection sizes derived from its width
        from llama_caption.llama.model import ModelArgs
        from llama_caption.llama.tokenizer import load_tokenizer
        from llama_caption.tools.testing import random_state_dict, write_meta_checkpoint

        params = dict(dim=128, n_layers=1, n_heads=2, multiple_of=32, norm_eps=1e-5, vocab_size=-1)
        vocab = load_tokenizer(cap["tokenizer"]).n_words
        write_meta_checkpoint(str(tmp_path / "wide"), params, random_state_dict(ModelArgs.from_params(params, vocab_size=vocab)))
        args[args.index("--ckpt_dir") + 1] = str(tmp_path / "wide")
        msg = f"was trained with the LLaMA in {cap['ckpt_dir']}, not the one in --ckpt_dir {tmp_path / 'wide'} (widths 64 and 128)"
    else:  # the same width, another vocabulary
        args[args.index("--ckpt_dir") + 1], args[args.index("--tokenizer_path") + 1] = assets["tiny"], assets["tokenizer"]
        # (the architecture the checkpoint recorded: named by what differs)
        msg = f"was trained with another LLaMA than the one in --ckpt_dir {assets['tiny']} (vocabulary 96 against 128)"
    proc = run_cli(captioning_training.main, *args)
    assert proc.returncode == 2 and msg in proc.stderr, proc.stderr[-2000:]
    assert proc.stderr.strip().splitlines()[-1].startswith("error: ")
    assert not (out / "checkpoints").exists() and not (out / "metrics.jsonl").exists()


def test_a_resumed_scst_run_needs_not_its_init_from_folder(cap, trained, tmp_path):
    """--resume takes the weights from the run's own checkpoint: the --init_from folder may be gone."""
    init = tmp_path / "init"
    shutil.copytree(trained, init)
    out = tmp_path / "scst"
    assert scst_run(cap, str(init), out, "--stop_after_steps", 1).returncode == 0
    shutil.rmtree(init)
    proc = scst_run(cap, str(init), out, "--resume")
    assert proc.returncode == 0 and "resumed from" in proc.stderr, proc.stderr[-2000:]


def test_init_from_an_mlp_run_ignores_the_mapper_flags(cap, trained, tmp_path):
    """The mapper's sizes do not apply to an MLP projection: another --mapper_width is no difference."""
    proc = scst_run(cap, trained, tmp_path / "scst", "--mapper_width", 128, "--stop_after_steps", 1)
    assert proc.returncode == 0, proc.stderr[-2000:]


@pytest.mark.slow
def test_scst_with_an_int4_llama_samples_and_rewards(cap, trained, tmp_path):
    """--quantize reaches SCST's sampling and its policy gradient; --init_from a full-precision
    run is allowed and said."""
    import json

    out = tmp_path / "scst_int4"
    proc = scst_run(cap, trained, out, "--epochs", 1, "--quantize", "int4")
    assert "was trained with the LLaMA at full precision; this run uses int4 weight-only" in proc.stderr + proc.stdout
    steps = [json.loads(line) for line in open(out / "metrics.jsonl") if '"reward"' in line]
    assert len(steps) == 3 and all(r["reward"] >= 0 and r["sample_len"] > 0 for r in steps)
    start, got = weights_of(trained), weights_of(out)
    assert any(float((got[k] - start[k]).abs().max()) > 0 for k in start)  # the policy gradient arrived


def test_the_reward_is_the_weighted_sum_of_cider_d_and_clip_s(cap, process_group):
    """--scst_reward cider+clip on a small batch: weights x CIDEr-D + weights x CLIP-S, the CLIP-S
    computed here by hand from the clip package (2.5 x max(cos, 0) of the image embedding and
    "A photo depicts " + caption)."""
    import clip as clip_package
    from PIL import Image

    from llama_caption.objectives.scst import Scst
    from llama_caption.rerank import clip_ranker
    from llama_caption.vision import EncoderSpec, load_encoder

    spec = EncoderSpec.of(cap["clip"])
    encoder = load_encoder(spec, "cpu")
    names = sorted(os.listdir(cap["images"]))[:2]
    feats = encoder(torch.stack([encoder.preprocess(Image.open(os.path.join(cap["images"], n)).convert("RGB"))
                                 for n in names]))
    refs = {1: ["a red circle on the grass", "a red ball on grass"], 2: ["a blue square near a house"]}
    scst = Scst(2, "mean", SAMPLE_12, 0, "cider+clip", (2.0, 0.5))
    scst.cider, scst.clip = CiderD(refs), clip_ranker(spec, "cpu")
    captions = ["a red circle on grass", "a blue house", "a red circle on grass"]
    ids, rows = [1, 2, 2], feats[[0, 1, 1]]
    got = scst.rewards(ids, captions, rows)
    model, _ = clip_package.load(cap["clip"], device="cpu", jit=False)
    with torch.no_grad():
        tokens = clip_package.tokenize(["A photo depicts " + c for c in captions],
                                       context_length=model.context_length, truncate=True)
        text = model.encode_text(tokens).float()
    cos = torch.nn.functional.cosine_similarity(rows.float(), text, dim=-1)
    expected = [2.0 * CiderD(refs).score(i, c) + 0.5 * 2.5 * max(float(x), 0.0) for i, c, x in zip(ids, captions, cos)]
    assert got.tolist() == pytest.approx(expected, abs=1e-5)
    assert got[0] != got[2]  # the same caption, another image: another reward


def test_an_scst_step_with_a_cider_and_clip_s_reward(cap, trained, tmp_path):
    proc = scst_run(cap, trained, tmp_path / "scst", "--scst_reward", "cider+clip", "--scst_clip_weight", 0.5,
                    "--stop_after_steps", 1)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "SCST: reward 1 x CIDEr-D" in proc.stderr and "+ 0.5 x CLIP-S" in proc.stderr
    rows = [json.loads(line) for line in open(tmp_path / "scst" / "metrics.jsonl")]
    assert any("reward" in r for r in rows)
