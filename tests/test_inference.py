import contextlib
import dataclasses
import io
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch
from PIL import Image

import captioning_inference
from conftest import REPO, run_cli, torchrun
from llama_caption import evaluation
from llama_caption.data import load_coco, open_rgb
from llama_caption.llama.generation import beam_search, generate, sequence_score
from llama_caption.tools.testing import build_tiny_clip, open_trained, score_continuations


def infer_args(cap, trained, out, *extra, images=None):
    return ["--ckpt_dir", cap["ckpt_dir"], "--tokenizer_path", cap["tokenizer"], "--checkpoint", trained,
            "--images", images or cap["val_images"], "--out", out, "--num_workers", 0, *extra]


@pytest.mark.slow
def test_results_load_with_coco_and_have_one_caption_per_image(cap, trained, tmp_path):
    from pycocotools.coco import COCO

    out = tmp_path / "res.json"
    proc = run_cli(captioning_inference.main, *infer_args(cap, trained, out, "--annotations", cap["val_ann"],
                                                          "--num_images", 2, "--gallery", 2))
    assert proc.returncode == 0, proc.stderr
    with contextlib.redirect_stdout(io.StringIO()):
        coco = COCO(cap["val_ann"])
        res = coco.loadRes(str(out))
    ids = sorted(coco.getImgIds())[:2]
    assert sorted(res.getImgIds()) == ids
    assert [len(res.getAnnIds(imgIds=[i])) for i in ids] == [1, 1]
    assert all(a["caption"].strip() for a in res.dataset["annotations"])
    assert "CIDEr" in proc.stdout and (tmp_path / "res.metrics.json").exists()
    assert "img/s" in proc.stderr
    page = (tmp_path / "res.gallery.html").read_text()
    assert page.count("<figure>") == 2
    # Images are linked relatively, so the page opens from disk.
    src = page.split('<img src="')[1].split('"')[0]
    assert not os.path.isabs(src) and (tmp_path / src).resolve().exists()


@pytest.mark.slow
def test_metrics_equal_the_pycocoevalcap_scorers_called_directly(cap, trained, tmp_path):
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider
    from pycocoevalcap.meteor.meteor import Meteor
    from pycocoevalcap.rouge.rouge import Rouge
    from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

    out = tmp_path / "res.json"
    # Captions of varied quality: the references of other images, and some of their own.
    ann = json.load(open(cap["ann"]))
    ids = [im["id"] for im in ann["images"]]
    caps = {i: [a["caption"] for a in ann["annotations"] if a["image_id"] == i] for i in ids}
    results = [{"image_id": i, "caption": caps[ids[(k + (k % 2)) % len(ids)]][k % 5]} for k, i in enumerate(ids[:5])]
    json.dump(results, open(out, "w"))
    proc = run_cli(evaluation.main, "--annotations", cap["ann"], "--results", out)
    assert proc.returncode == 0, proc.stderr
    ours = json.load(open(tmp_path / "res.metrics.json"))["metrics"]
    tok = PTBTokenizer()
    gts = tok.tokenize({r["image_id"]: [{"caption": c} for c in caps[r["image_id"]]] for r in results})
    res = tok.tokenize({r["image_id"]: [{"caption": r["caption"]}] for r in results})
    bleu, _ = Bleu(4).compute_score(gts, res)
    expected = {"Bleu_1": bleu[0], "Bleu_2": bleu[1], "Bleu_3": bleu[2], "Bleu_4": bleu[3],
                "METEOR": Meteor().compute_score(gts, res)[0], "ROUGE_L": Rouge().compute_score(gts, res)[0],
                "CIDEr": Cider().compute_score(gts, res)[0]}
    assert set(ours) == set(expected)
    for k, v in expected.items():
        assert ours[k] == pytest.approx(v, abs=1e-9), k
    assert 0 < ours["CIDEr"] and ours["Bleu_1"] < 1  # neither all wrong nor all right
    assert "CIDEr" in proc.stdout


def test_results_file_not_in_coco_format_is_refused(cap, tmp_path):
    bad = tmp_path / "r.json"
    for content, msg in (('{"image_id": 1}', "not in the COCO results format"),
                         ('[{"image_id": "1", "caption": "x"}]', "not in the COCO results format"),
                         ('[{"image_id": 1, "caption": "a"}, {"image_id": 1, "caption": "b"}]', "more than one caption"),
                         ('[{"image_id": 424242, "caption": "a"}]', "do not know"), ("[", "not valid JSON")):
        bad.write_text(content)
        proc = run_cli(evaluation.main, "--annotations", cap["ann"], "--results", bad)
        assert proc.returncode == 2 and msg in proc.stderr, (content, proc.stderr)


@pytest.mark.slow
def test_several_results_files_are_scored_as_each_alone(cap, tmp_path):
    """evaluate A B scores each file as `evaluate A` and `evaluate B` would, with one METEOR
    process for both; every file is checked before any is scored."""
    ann = json.load(open(cap["ann"]))
    ids = [im["id"] for im in ann["images"]]
    caps = {i: [a["caption"] for a in ann["annotations"] if a["image_id"] == i] for i in ids}
    a, b = tmp_path / "a.json", tmp_path / "b.json"
    json.dump([{"image_id": i, "caption": caps[i][k % 5]} for k, i in enumerate(ids[:5])], open(a, "w"))
    json.dump([{"image_id": i, "caption": caps[ids[(k + 1) % 5]][0]} for k, i in enumerate(ids[:5])], open(b, "w"))
    alone = {}
    for f in (a, b):
        proc = run_cli(evaluation.main, "--annotations", cap["ann"], "--results", f, "--out", tmp_path / f"{f.stem}.alone.json")
        assert proc.returncode == 0, proc.stderr
        alone[f.stem] = json.load(open(tmp_path / f"{f.stem}.alone.json"))["metrics"]
    proc = run_cli(evaluation.main, a, b, "--annotations", cap["ann"])
    assert proc.returncode == 0, proc.stderr
    for f in ("a", "b"):
        together = json.load(open(tmp_path / f"{f}.metrics.json"))["metrics"]
        assert together.keys() == alone[f].keys()
        for k, v in alone[f].items():
            assert together[k] == pytest.approx(v, abs=1e-9), (f, k)
    assert alone["a"]["CIDEr"] > alone["b"]["CIDEr"]  # their own references against another image's
    # One METEOR process per Python process, replaced when it has ended.
    first = evaluation.meteor()
    assert evaluation.meteor() is first
    first.meteor_p.kill()
    first.meteor_p.wait()
    assert evaluation.meteor() is not first and evaluation.meteor().meteor_p.poll() is None
    # Bad input: refused before anything is written.
    for p in tmp_path.glob("*.metrics.json"):
        p.unlink()
    (tmp_path / "empty.json").write_text("[]")
    shutil.copy(b, tmp_path / "a.metrics.json")  # a results file named like a's metrics
    (tmp_path / "folder.json").mkdir()
    for args, msg in (((a, tmp_path / "none.json"), "none.json not found"), ((a, a), "is given twice"),
                      ((a, tmp_path / "." / "a.json"), "is given twice"),
                      ((a, b, "--out", tmp_path / "m.json"), "--out names one metrics file"),
                      ((b, tmp_path / "empty.json"), "holds no captions"),
                      ((b, tmp_path / "folder.json"), "is a folder"),
                      ((a, tmp_path / "a.metrics.json"), "would overwrite the results file")):
        proc = run_cli(evaluation.main, *args, "--annotations", cap["ann"])
        assert proc.returncode == 2 and msg in proc.stderr, (args, proc.stderr)
    assert [p.name for p in tmp_path.glob("*.metrics.json")] == ["a.metrics.json"] and not (tmp_path / "m.json").exists()
    assert json.load(open(tmp_path / "a.metrics.json")) == json.load(open(b))  # the results file is untouched


def features_of(encoder, paths):
    return encoder(torch.stack([encoder.preprocess(open_rgb(p)) for p in paths]))


@pytest.fixture(scope="module")
def model(cap, trained, process_group):
    opened = open_trained(cap["ckpt_dir"], cap["tokenizer"], trained, process_group, max_gen_len=30)
    captioner, encoder = opened.captioner, opened.encoder
    recs = load_coco(cap["images"], cap["ann"]) + load_coco(cap["val_images"], cap["val_ann"])
    return captioner, features_of(encoder, [r.path for r in recs])


def test_batched_greedy_equals_one_by_one(model):
    captioner, feats = model
    batched = captioner.generate(feats, max_gen_len=30)
    alone = [captioner.generate(feats[i:i + 1], max_gen_len=30)[0] for i in range(len(feats))]
    assert batched == alone and len(set(batched)) > 1


def test_beam_search_with_one_beam_is_greedy_and_more_beams_score_higher(model):
    captioner, feats = model
    llama, tok = captioner.llama, captioner.tokenizer
    prefix = captioner.projection(feats).detach()
    prompts = [[tok.bos_id]] * len(feats)
    # A prefix of noise leaves the model unsure, where beams and greedy part ways.
    noisy = prefix + 3 * torch.randn(prefix.shape, generator=torch.Generator().manual_seed(0))
    for pre in (prefix, noisy):
        greedy = generate(llama, prompts, prefix=pre, eos_id=tok.eos_id, max_gen_len=30)
        assert beam_search(llama, prompts, prefix=pre, eos_id=tok.eos_id, max_gen_len=30, num_beams=1) == greedy
        beams = beam_search(llama, prompts, prefix=pre, eos_id=tok.eos_id, max_gen_len=30, num_beams=3)
        g = score_continuations(llama, prompts, greedy, eos_id=tok.eos_id, prefix=pre)
        b = score_continuations(llama, prompts, beams, eos_id=tok.eos_id, prefix=pre)
        for x, y, gs, bs in zip(greedy, beams, g, b):
            assert sequence_score(bs, len(y) + 1, 1.0) >= sequence_score(gs, len(x) + 1, 1.0) - 1e-9
    assert beams != greedy  # on the noisy prefix beam search found something better somewhere


def own_images(folder, cap, copies):
    folder.mkdir()
    src = sorted(os.listdir(cap["images"]))
    for k in range(copies):
        for name in src:
            os.link(os.path.join(cap["images"], name), folder / f"{k:03d}_{name}")
    return folder


@pytest.mark.slow
def test_interrupted_run_resumes_without_recaptioning(cap, trained, tmp_path):
    imgs = own_images(tmp_path / "imgs", cap, 15)  # 90 images, one per batch
    full = tmp_path / "full.json"
    ref = run_cli(captioning_inference.main, *infer_args(cap, trained, full, "--batch_size", 1, images=imgs))
    assert ref.returncode == 0, ref.stderr
    out = tmp_path / "cut.json"
    env = dict(os.environ, PYTHONPATH=REPO, OMP_NUM_THREADS="1")
    proc = subprocess.Popen([sys.executable, "captioning_inference.py",
                             *map(str, infer_args(cap, trained, out, "--batch_size", 1, images=imgs))],
                            cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    partial = tmp_path / "cut.json.partial.jsonl"
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        if partial.exists() and sum(1 for _ in open(partial)) >= 20:
            break
        time.sleep(0.01)
    assert proc.poll() is None, "the run finished before it could be interrupted"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    done_before = sum(1 for _ in open(partial))
    assert 20 <= done_before < 90
    again = run_cli(captioning_inference.main, *infer_args(cap, trained, out, "--batch_size", 1, images=imgs))
    assert again.returncode == 0, again.stderr
    assert f"{done_before} already captioned" in again.stderr
    assert len([l for l in again.stdout.splitlines() if "\t" in l]) == 90 - done_before  # only the rest
    assert json.load(open(out)) == json.load(open(full))
    assert not partial.exists()


@pytest.mark.slow
def test_two_data_parallel_ranks_give_the_same_results(cap, trained, tmp_path):
    args = ["--annotations", cap["val_ann"], "--evaluate", "False", "--batch_size", 2]
    torchrun(2, "captioning_inference.py", *infer_args(cap, trained, tmp_path / "two.json", *args))
    assert run_cli(captioning_inference.main, *infer_args(cap, trained, tmp_path / "one.json", *args)).returncode == 0
    two, one = json.load(open(tmp_path / "two.json")), json.load(open(tmp_path / "one.json"))
    assert two == one and len(one) == 3


def test_own_files_folder_with_png_grayscale_jpeg_and_broken_file(cap, trained, tmp_path):
    folder = tmp_path / "mine"
    folder.mkdir()
    shutil.copy(os.path.join(cap["images"], sorted(os.listdir(cap["images"]))[0]), folder / "shape.png")
    Image.open(folder / "shape.png").convert("L").save(folder / "gray.jpg")
    (folder / "broken.jpg").write_bytes(b"\xff\xd8\xff garbage")
    (folder / "notes.txt").write_text("not an image, not listed")
    out = tmp_path / "mine.json"
    proc = run_cli(captioning_inference.main, *infer_args(cap, trained, out, images=folder))
    assert proc.returncode == 0, proc.stderr
    lines = [l.split("\t") for l in proc.stdout.splitlines() if "\t" in l]
    assert sorted(os.path.basename(f) for f, _ in lines) == ["gray.jpg", "shape.png"]
    assert all(c.strip() for _, c in lines)
    results = json.load(open(out))
    assert sorted(os.path.basename(r["file_name"]) for r in results) == ["gray.jpg", "shape.png"]
    assert "1 unreadable image(s) skipped" in proc.stderr and "broken.jpg" in proc.stderr


def test_bad_checkpoints_and_missing_java(cap, trained, tmp_path, monkeypatch):
    # A checkpoint folder with no config.
    from safetensors.torch import save_file

    (tmp_path / "noconf").mkdir()
    save_file({"net.0.weight": torch.zeros(2, 2)}, tmp_path / "noconf" / "projection.safetensors")
    args = infer_args(cap, trained, tmp_path / "r.json")
    args[args.index("--checkpoint") + 1] = tmp_path / "noconf"
    proc = run_cli(captioning_inference.main, *args)
    assert proc.returncode == 2 and "carries no training config" in proc.stderr
    # Another CLIP model than the one it was trained with.
    other = str(tmp_path / "other.pt")
    build_tiny_clip(other, seed=3)
    proc = run_cli(captioning_inference.main, *infer_args(cap, trained, tmp_path / "r.json", "--clip_model", other))
    assert proc.returncode == 2 and "use the CLIP model it was trained with" in proc.stderr
    # A LLaMA of another width.
    from llama_caption.llama.model import ModelArgs
    from llama_caption.tools.testing import random_state_dict, write_meta_checkpoint

    wide = {"dim": 128, "n_layers": 1, "n_heads": 2, "multiple_of": 32, "norm_eps": 1e-5}
    write_meta_checkpoint(str(tmp_path / "wide"), wide, random_state_dict(ModelArgs.from_params(wide, vocab_size=96)))
    args = infer_args(cap, trained, tmp_path / "r.json")
    args[args.index("--ckpt_dir") + 1] = tmp_path / "wide"
    proc = run_cli(captioning_inference.main, *args)
    assert proc.returncode == 2 and "projects to LLaMA width 64" in proc.stderr and "width 128" in proc.stderr
    # No Java: the captions are written, then evaluation says what is missing.
    env_path = tmp_path / "bin"
    env_path.mkdir()
    out = tmp_path / "nojava.json"
    monkeypatch.setenv("PATH", str(env_path))
    proc = run_cli(captioning_inference.main, *infer_args(cap, trained, out, "--annotations", cap["val_ann"]))
    assert proc.returncode == 2 and "needs Java" in proc.stderr
    assert len(json.load(open(out))) == 3


def test_a_checkpoint_of_the_first_format_still_loads(cap, trained, model, tmp_path, process_group):
    """Before the typed CaptionerSpec (then CaptionerConfig), projection.safetensors carried only the training flags
    (with --feature, since renamed --feature_kind) plus the CLIP identity and LLaMA width."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    from llama_caption.captioner import CaptionerSpec
    from llama_caption.runs import find_checkpoint

    with safe_open(os.path.join(find_checkpoint(trained), "projection.safetensors"), "pt") as f:
        meta, weights = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}
    flags = json.loads(meta["config"])
    captioner_cfg = json.loads(meta["captioner"])
    old = {("feature" if k == "feature_kind" else k): v for k, v in flags.items()}
    old.update(clip_identity=captioner_cfg["encoder"]["identity"], llama_dim=captioner_cfg["llama_dim"])
    (tmp_path / "old").mkdir()
    save_file(weights, str(tmp_path / "old" / "projection.safetensors"), metadata={"config": json.dumps(old)})
    opened = open_trained(cap["ckpt_dir"], cap["tokenizer"], str(tmp_path / "old"), process_group, max_gen_len=30)
    captioner, cfg = opened.captioner, opened.spec
    # The first format recorded no LLaMA architecture (the new one does; its folder is still checked)
    assert cfg == dataclasses.replace(CaptionerSpec.from_dict(captioner_cfg), llama_architecture=None)
    new, feats = model
    assert captioner.generate(feats, max_gen_len=30) == new.generate(feats, max_gen_len=30)


def test_static_decoder_gives_the_eager_captions(cap, trained, tmp_path):
    """--decoder static (fixed-shape KV cache, the batch of 3 padded to 4) writes the same
    captions as the eager decoder; cuda_graph is refused on the CPU, and with beam search."""
    runs = {}
    for decoder in ("eager", "static", "auto"):
        out = tmp_path / f"{decoder}.json"
        proc = run_cli(captioning_inference.main, *infer_args(cap, trained, out, "--decoder", decoder, "--batch_size", 4))
        assert proc.returncode == 0, proc.stderr
        runs[decoder] = json.load(open(out))
    assert runs["static"] == runs["eager"] == runs["auto"] and len(runs["eager"]) == 3
    # auto is the static decoder on a CPU, and the results' provenance says which ran.
    assert json.load(open(tmp_path / "auto.run.json"))["decoding"]["decoder"] == "static"
    assert "decoder" not in json.load(open(tmp_path / "eager.run.json"))["decoding"]
    proc = run_cli(captioning_inference.main, *infer_args(cap, trained, tmp_path / "g.json", "--decoder", "cuda_graph"))
    assert proc.returncode == 2 and "--decoder cuda_graph needs a CUDA device" in proc.stderr
    proc = run_cli(captioning_inference.main, *infer_args(cap, trained, tmp_path / "b.json", "--decoder", "static",
                                                          "--num_beams", 3))
    assert proc.returncode == 2 and "beam search (--num_beams > 1) runs eagerly" in proc.stderr


def test_continuous_decoder_writes_the_batch_decoders_captions_as_they_end(cap, trained, tmp_path):
    """--decoder continuous over 2 slots, refilled as captions end (9 images of own files, and
    shorter captions for some by --max_gen_len): the static decoder's captions, in the results'
    order; sampling draws per image, so the slots and the batch size do not change a caption."""
    imgs = tmp_path / "imgs"
    imgs.mkdir()
    for folder in (cap["images"], cap["val_images"]):
        for name in os.listdir(folder):
            shutil.copy(os.path.join(folder, name), imgs / name)
    runs = {}
    for decoder, batch in (("static", 4), ("continuous", 2), ("continuous", 5)):
        out = tmp_path / f"{decoder}{batch}.json"
        proc = run_cli(captioning_inference.main, *infer_args(cap, trained, out, "--decoder", decoder, "--batch_size", batch,
                                                              images=str(imgs)))
        assert proc.returncode == 0, proc.stderr[-3000:]
        runs[decoder, batch] = json.load(open(out))
        assert len(proc.stdout.splitlines()) == 9  # each caption printed once, as it ended
    assert runs["continuous", 2] == runs["static", 4] == runs["continuous", 5] and len(runs["static", 4]) == 9
    assert json.load(open(tmp_path / "continuous2.run.json"))["decoding"]["decoder"] == "continuous"
    sampled = []
    for batch in (2, 3):
        out = tmp_path / f"sampled{batch}.json"
        proc = run_cli(captioning_inference.main, *infer_args(cap, trained, out, "--decoder", "continuous", "--batch_size",
                                                              batch, "--temperature", 1.5, "--seed", 7, images=str(imgs)))
        assert proc.returncode == 0, proc.stderr[-3000:]
        sampled.append(json.load(open(out)))
    assert sampled[0] == sampled[1] and sampled[0] != runs["static", 4]


@pytest.mark.parametrize("batch_size", [1, 2])
def test_the_shuffled_control_never_captions_an_image_from_its_own_features(cap, trained, tmp_path, batch_size):
    """Each image is captioned from the next image's features (by id, the last from the first):
    greedy, its caption is the one the next image gets normally, whatever the batching."""
    plain = run_cli(captioning_inference.main, *infer_args(cap, trained, tmp_path / "plain.json"))
    assert plain.returncode == 0, plain.stderr
    control = run_cli(captioning_inference.main, *infer_args(cap, trained, tmp_path / "control.json",
                                                             "--control_shuffle", True, "--batch_size", batch_size))
    assert control.returncode == 0, control.stderr
    normal = {r["file_name"]: r["caption"] for r in json.load(open(tmp_path / "plain.json"))}
    shuffled = {r["file_name"]: r["caption"] for r in json.load(open(tmp_path / "control.json"))}
    files = sorted(normal)  # own files get ids in path order
    assert len(files) == 3 and set(shuffled) == set(files) and len(set(normal.values())) > 1
    for i, f in enumerate(files):
        assert shuffled[f] == normal[files[(i + 1) % len(files)]]
    one = run_cli(captioning_inference.main, *infer_args(cap, trained, tmp_path / "one.json", "--control_shuffle", True,
                                                         "--num_images", 1))
    assert one.returncode == 2 and "--control_shuffle needs at least 2 images" in one.stderr
    assert not list(tmp_path.glob("one*"))  # refused before anything was written


@pytest.mark.slow
def test_compiled_decoder_runs_with_the_default_packed_weights(cap, trained, tmp_path):
    """--decoder compile on a CPU with --pack_weights left on (torch.compile cannot trace the
    packed layers): the compiled step runs on the plain weights and gives the eager captions."""
    eager = run_cli(captioning_inference.main, *infer_args(cap, trained, tmp_path / "eager.json", "--decoder", "eager"))
    assert eager.returncode == 0, eager.stderr
    compiled = run_cli(captioning_inference.main, *infer_args(cap, trained, tmp_path / "compiled.json", "--decoder", "compile"))
    assert compiled.returncode == 0, compiled.stderr[-3000:]
    assert "--decoder compile: LLaMA's weights are not packed" in compiled.stderr
    assert json.load(open(tmp_path / "compiled.json")) == json.load(open(tmp_path / "eager.json"))


def test_auto_decoder_is_cuda_graph_on_one_gpu_only():
    """--decoder auto: static on a CPU; on CUDA the CUDA-graph decoder (the same captions in fp32
    on an H200, 2.5x eager at 7B: docs/captioning.md), except for beam search, across
    model-parallel ranks, with --quantize and in the server, where it stays eager."""
    from llama_caption.opening import CaptionerSettings

    def auto(device, **kw):
        quantize = kw.pop("quantize", "none")
        s = CaptionerSettings(ckpt_dir="x", tokenizer_path="x", checkpoint="x", decoder="auto", quantize=quantize)
        s.resolve_decoder(torch.device(device), **kw)
        return s.decoder

    assert auto("cpu") == "static" and auto("cpu", beams=True) == "eager"
    assert auto("cuda") == "cuda_graph"
    assert auto("cuda", beams=True) == auto("cuda", mp_size=2) == auto("cuda", graphs=False) == "eager"
    assert auto("cuda", quantize="int8") == auto("cuda", quantize="int4") == "cuda_graph"  # fused kernels
    assert auto("cuda", quantize="nf4") == "eager"
    s = CaptionerSettings(ckpt_dir="x", tokenizer_path="x", checkpoint="x", decoder="static")
    s.resolve_decoder(torch.device("cuda"), mp_size=2)
    assert s.decoder == "static"  # an explicit choice is kept
