"""The best of several captions: each rule on hand-made candidates, the candidates' settings,
and `caption --num_candidates` end to end (reproducible candidates, each rule's pick, provenance)."""

import json
import os

import pytest
import torch

import captioning_inference
from conftest import run_cli
from llama_caption.errors import UserError
from llama_caption.llama.decoding import Decoding
from llama_caption.rerank import MAX_CANDIDATES, BestOf, Candidate, mbr_scores, pick
from llama_caption.scst import nucleus


def cands(*rows):
    return [Candidate(text, [], True, logprob=lp, clip_s=cs) for text, lp, cs in rows]


def test_each_rule_picks_what_its_definition_says():
    c = cands(("a red circle on white", -0.9, 1.1), ("a red circle on a white background", -0.2, 0.7),
              ("a blue house near a tree", -0.5, 2.0))
    assert pick(c, "logprob") == 1  # the highest mean log-probability
    assert pick(c, "clip") == 2  # the highest CLIP-S
    for x, m in zip(c, mbr_scores([x.text for x in c])):
        x.mbr = m
    # The outlier shares no n-gram with the others: its consensus is 0; the two circles agree.
    assert c[2].mbr == 0 and c[0].mbr > 0 and c[1].mbr > 0
    assert pick(c, "mbr") in (0, 1)
    # Ties go to the earlier candidate.
    assert pick(cands(("x", -1.0, 1.0), ("y", -1.0, 1.0)), "logprob") == 0


def test_mbr_prefers_the_caption_the_others_agree_with():
    texts = ["a dog on the grass", "a dog on the grass", "a cat on a sofa", "a dog running on the grass"]
    scores = mbr_scores(texts)
    assert scores[0] == scores[1] > scores[3] > scores[2]
    assert mbr_scores(["alone"]) == [0.0]
    # Words every candidate shares weigh nothing: they cannot tell candidates apart.
    assert mbr_scores(["a b", "a b"]) == [0.0, 0.0]


def test_candidate_settings_are_checked_before_any_work():
    sampled, greedy = Decoding(temperature=0.7), Decoding()
    assert BestOf(5, "mbr").check(sampled).active
    assert BestOf(3).check(Decoding(num_beams=3)).active
    for best_of, decoding, message in [
        (BestOf(0), sampled, "--num_candidates must be a whole number from 1 to 32, got 0"),
        (BestOf(MAX_CANDIDATES + 1), sampled, "from 1 to 32, got 33"),
        (BestOf(5, "bleu"), sampled, "--rerank 'bleu' must be one of logprob, clip, mbr"),
        (BestOf(2), greedy, "--num_candidates 2 needs 2 different captions per image: sample them (--temperature "
                            "above 0) or take the best beams (--num_beams at least 2)"),
        (BestOf(4), Decoding(num_beams=3), "--num_beams at least 4"),
    ]:
        with pytest.raises(UserError) as e:
            best_of.check(decoding)
        assert message in str(e.value)


def test_nucleus_keeps_the_most_probable_tokens_up_to_top_p():
    logits = torch.log(torch.tensor([[0.5, 0.05, 0.3, 0.15]], dtype=torch.float64))
    kept = torch.isfinite(nucleus(logits, 0.75))[0].tolist()
    assert kept == [True, False, True, False]  # 0.5, then 0.3 crosses 0.75
    assert torch.isfinite(nucleus(logits, 0.85))[0].tolist() == [True, False, True, True]
    assert torch.isfinite(nucleus(logits, 0.4))[0].tolist() == [True, False, False, False]


def caption(cap, trained, photos, out, *extra):
    proc = run_cli(captioning_inference.main, "--ckpt_dir", cap["ckpt_dir"], "--tokenizer_path", cap["tokenizer"],
                   "--checkpoint", trained, "--images", photos, "--out", out, "--num_workers", 0, *extra)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return {os.path.basename(r["file_name"]): r for r in json.load(open(out))}


def test_caption_candidates_are_reproducible_and_each_rule_picks_its_best(cap, trained, photos, offline, tmp_path):
    sampled = ["--num_candidates", 4, "--temperature", 1.0, "--keep_candidates"]
    a = caption(cap, trained, photos, tmp_path / "a.json", *sampled, "--batch_size", 2)
    b = caption(cap, trained, photos, tmp_path / "b.json", *sampled, "--batch_size", 5, "--rerank", "mbr")
    # Each image's candidates come from its own key: another batch size gives the same ones.
    assert {n: r["candidates"] for n, r in a.items()} == {n: r["candidates"] for n, r in b.items()}
    assert len({c["caption"] for r in a.values() for c in r["candidates"]}) > len(a)  # they differ
    for rows, rule in ((a, "logprob"), (b, "mbr")):
        for r in rows.values():
            best = max(r["candidates"], key=lambda c: c[rule])[rule]
            assert r["caption"] == next(c["caption"] for c in r["candidates"] if c[rule] == best)
    run = json.load(open(tmp_path / "b.run.json"))
    assert run["decoding"]["num_candidates"] == 4 and run["decoding"]["rerank"] == "mbr"
    assert run["decoding"]["keep_candidates"] is True
    # A rerun without --keep_candidates is another file (its rows would hold no candidates): refused.
    proc = run_cli(captioning_inference.main, "--ckpt_dir", cap["ckpt_dir"], "--tokenizer_path", cap["tokenizer"],
                   "--checkpoint", trained, "--images", photos, "--out", tmp_path / "b.json", "--num_workers", 0,
                   "--num_candidates", 4, "--temperature", 1.0, "--rerank", "mbr")
    assert proc.returncode == 2 and "holds captions made with other settings (decoding." in proc.stderr, proc.stderr[-1000:]
    # Beams: the best beam first (what --num_beams alone writes), then the others, all different.
    beams = caption(cap, trained, photos, tmp_path / "beams.json", "--num_candidates", 3, "--num_beams", 3,
                    "--keep_candidates", "--rerank", "clip")
    alone = caption(cap, trained, photos, tmp_path / "beam.json", "--num_beams", 3)
    for n, r in beams.items():
        assert r["candidates"][0]["caption"] == alone[n]["caption"]
        assert all("clip_s" in c for c in r["candidates"])
        assert r["caption"] == max(r["candidates"], key=lambda c: c["clip_s"])["caption"]
    assert json.load(open(tmp_path / "beams.run.json"))["decoding"]["rerank_clip"].startswith("sha256:")


def test_caption_candidate_flags_are_one_line_errors(cap, trained, photos, tmp_path):
    for extra, message in [
        (["--num_candidates", 3], "--num_candidates 3 needs 3 different captions per image"),
        (["--num_candidates", 40, "--temperature", 1], "--num_candidates must be a whole number from 1 to 32"),
        (["--rerank", "best"], "--rerank 'best' must be one of logprob, clip, mbr"),
        (["--keep_candidates"], "--keep_candidates keeps the candidates of --num_candidates > 1"),
    ]:
        proc = run_cli(captioning_inference.main, "--ckpt_dir", cap["ckpt_dir"], "--tokenizer_path", cap["tokenizer"],
                       "--checkpoint", trained, "--images", photos, "--out", tmp_path / "x.json", *extra)
        assert proc.returncode == 2 and message in proc.stderr, proc.stderr[-2000:]
        assert not (tmp_path / "x.json").exists()
