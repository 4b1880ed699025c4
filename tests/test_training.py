import pytest
import json
import math
import os
import re

import torch
import torch.nn.functional as F
from PIL import Image
from safetensors.torch import load_file, save_file

import captioning_training
from conftest import run_cli, run_python, torchrun
from llama_caption import features
from llama_caption.captioner import IGNORE, Captioner, CaptionStyle
from llama_caption.llama.checkpoint import load_llama
from llama_caption.data import CaptionDataset, StepBatches, collate, load_coco, open_rgb
from llama_caption.features import FeatureCache
from llama_caption.projection import Projection
from llama_caption.tools.testing import build_tiny_clip, open_trained
from llama_caption.vision import ClipEncoder, EncoderSpec

def train_args(cap, out_dir, *extra, ann=None):
    return ["--ckpt_dir", cap["ckpt_dir"], "--tokenizer_path", cap["tokenizer"], "--clip_model", cap["clip"],
            "--train_images", cap["images"], "--train_annotations", ann or cap["ann"], "--out_dir", out_dir,
            "--num_workers", 0, "--log_every", 1, *extra]


def test_loss_counts_exactly_the_caption_and_eos_positions(cap, process_group):
    llama, tok = load_llama(cap["ckpt_dir"], cap["tokenizer"], max_seq_len=40)
    proj = Projection("linear", True, 64, 64, prefix_len=3, hidden=64)
    c = Captioner(llama, tok, proj, CaptionStyle())
    caps = ["A red circle on a blue background.", "a square"]
    ids = c.caption_ids(caps)
    assert ids[0] == tok.encode("a red circle on a blue background", False, False)  # cleaned
    tokens, labels = c.targets(ids)
    assert tokens[0, 0] == tok.bos_id and tokens[1, 0] == tok.bos_id
    assert (labels[:, :3] == IGNORE).all()  # the prefix carries no label
    for i, x in enumerate(ids):
        counted = (labels[i] != IGNORE).nonzero().flatten().tolist()
        assert counted == list(range(3, 3 + len(x) + 1))  # n caption tokens + EOS, nothing else
        assert labels[i, 3:3 + len(x) + 1].tolist() == x + [tok.eos_id]
    assert tok.pad_id not in labels.tolist()
    # The loss equals cross-entropy computed position by position, and padding does not change it.
    feats = torch.randn(2, 64)
    total, n = c.caption_loss(feats, caps)
    assert n == sum(len(x) + 1 for x in ids)
    with torch.no_grad():
        alone, n1 = c.caption_loss(feats[1:], caps[1:])
        prefix = proj(feats[1:])
        seq = [tok.bos_id] + ids[1]
        emb = torch.cat([prefix, llama.embed(torch.tensor([seq]))], 1)
        logits = llama(embeddings=emb)[0]
        manual = sum(F.cross_entropy(logits[3 + j], torch.tensor((ids[1] + [tok.eos_id])[j]), reduction="sum")
                     for j in range(len(ids[1]) + 1))
    torch.testing.assert_close(alone, manual)
    both = sum(F.cross_entropy(llama(embeddings=torch.cat([proj(feats[i:i + 1]), llama.embed(torch.tensor([[tok.bos_id] + ids[i]]))], 1))[0, 3:].detach(),
                               torch.tensor(ids[i] + [tok.eos_id]), reduction="sum") for i in range(2))
    torch.testing.assert_close(total.detach(), both, rtol=1e-5, atol=1e-4)


def test_long_captions_are_truncated_and_counted(cap, process_group):
    llama, tok = load_llama(cap["ckpt_dir"], cap["tokenizer"], max_seq_len=12)
    c = Captioner(llama, tok, Projection("linear", True, 64, 64, prefix_len=3, hidden=64))
    long = " ".join(["a red circle on a blue background"] * 4)
    ids = c.caption_ids([long, "a square"])
    assert len(ids[0]) == 12 - 3 - 1 and c.truncated == 1
    _, n = c.caption_loss(torch.randn(2, 64), [long, "a square"])  # fits max_seq_len
    assert n == 9 + len(ids[1]) + 1


def test_images_open_as_rgb_in_any_mode(tmp_path):
    Image.new("L", (8, 8), 100).save(tmp_path / "l.png")
    Image.new("RGBA", (8, 8), (255, 0, 0, 0)).save(tmp_path / "rgba.png")  # fully transparent red
    Image.new("P", (8, 8), 3).save(tmp_path / "p.png")
    Image.new("CMYK", (8, 8), (0, 255, 255, 0)).save(tmp_path / "cmyk.jpg")  # red in CMYK
    Image.fromarray(__import__("numpy").full((8, 8), 65535, dtype="uint16")).save(tmp_path / "i16.png")
    assert open_rgb(tmp_path / "l.png").getpixel((0, 0)) == (100, 100, 100)
    assert open_rgb(tmp_path / "rgba.png").getpixel((0, 0)) == (255, 255, 255)  # composited over white
    assert open_rgb(tmp_path / "p.png").mode == "RGB"
    r, g, b = open_rgb(tmp_path / "cmyk.jpg").getpixel((0, 0))
    assert r > 200 and g < 60 and b < 60
    assert Image.open(tmp_path / "i16.png").mode.startswith("I")
    assert open_rgb(tmp_path / "i16.png").getpixel((0, 0)) == (255, 255, 255)


def test_step_batches_of_two_ranks_make_the_batches_of_one():
    one = list(StepBatches(50, micro=8, accum=2, dp_size=1, dp_rank=0, seed=3, epoch=1))
    r0 = list(StepBatches(50, micro=4, accum=2, dp_size=2, dp_rank=0, seed=3, epoch=1))
    r1 = list(StepBatches(50, micro=4, accum=2, dp_size=2, dp_rank=1, seed=3, epoch=1))
    assert len(one) == len(r0) == 2 * (50 // 16)
    for m in range(len(one)):
        assert sorted(r0[m] + r1[m]) == sorted(one[m])
        assert not set(r0[m]) & set(r1[m])
    resumed = list(StepBatches(50, micro=8, accum=2, dp_size=1, dp_rank=0, seed=3, epoch=1, start_step=1))
    assert resumed == one[2:]
    assert list(StepBatches(50, 8, 2, 1, 0, seed=3, epoch=2)) != one


def test_one_caption_per_image_is_the_same_draw_everywhere(cap):
    recs = load_coco(cap["images"], cap["ann"])
    ds = CaptionDataset(recs, transform=lambda im: torch.zeros(1), captions="one", seed=5)
    assert len(ds) == len(recs)
    ds.set_epoch(0)
    e0 = [ds.caption(i) for i in range(len(ds))]
    again = CaptionDataset(recs, transform=None, captions="one", seed=5)
    assert [again.caption(i) for i in range(len(ds))] == e0
    ds.set_epoch(1)
    assert [ds.caption(i) for i in range(len(ds))] != e0
    assert all(ds.caption(i) in recs[i].captions for i in range(len(ds)))
    assert len(CaptionDataset(recs, transform=None, captions="all")) == 5 * len(recs)


def run_train(cap, out_dir, *extra, ann=None, nproc=1, check=True):
    """Training as the command line runs it: under torchrun for several processes, else in this
    process (the same code, without the start-up time)."""
    if nproc > 1:
        return torchrun(nproc, "captioning_training.py", *train_args(cap, out_dir, *extra, ann=ann), check=check)
    proc = run_cli(captioning_training.main, *train_args(cap, out_dir, *extra, ann=ann))
    if check:
        assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def final_weights(out_dir):
    latest = open(f"{out_dir}/checkpoints/latest").read().strip()
    return load_file(f"{out_dir}/checkpoints/{latest}/projection.safetensors")


def test_an_objective_registered_outside_training_py_runs_in_the_loop(cap, tmp_path, monkeypatch):
    """The loop reaches an objective through the Objective seam alone (objectives/): a third one,
    registered here, is checked, prepared, stepped with the global step and validated, and its
    own figures are logged, with no edit to training.py."""
    from llama_caption import objectives
    from llama_caption.objectives.xe import CrossEntropy

    calls = []

    class Counted(CrossEntropy):  # cross-entropy's update, with figures of its own
        @staticmethod
        def check(cfg):
            calls.append(("check", cfg.objective))

        def prepare(self, trainer, env):
            calls.append(("prepare", len(trainer.data)))

        def step(self, trainer, micro_batches, env, step):
            calls.append(("step", step))
            result = super().step(trainer, micro_batches, env, step)
            result.extra["counted"] = float(step)
            return result

        def validate(self, trainer, env):
            return {"val_steps": float(sum(1 for c in calls if c[0] == "step"))}

    monkeypatch.setitem(objectives.OBJECTIVES, "counted", Counted)
    out = tmp_path / "run"
    run_train(cap, out, "--objective", "counted", "--epochs", 2, "--batch_size", 8, "--val_images", cap["val_images"],
              "--val_annotations", cap["val_ann"])
    steps = [n for what, n in calls if what == "step"]
    assert calls[:2] == [("check", "counted"), ("prepare", 30)] and steps == list(range(6))  # 30 captions / 8, twice
    rows = [json.loads(line) for line in open(out / "metrics.jsonl")]
    assert [r["counted"] for r in rows if "loss" in r] == [float(s) for s in steps]
    assert [r["val_steps"] for r in rows if "val_steps" in r] == [3.0, 6.0]
    assert any(not torch.equal(w, 0 * w) for w in final_weights(out).values())


@pytest.mark.slow
def test_training_memorises_a_few_images_and_greedy_reproduces_them(cap, tmp_path, process_group):
    out = tmp_path / "run"
    proc = run_train(cap, out, "--epochs", 60, "--batch_size", 4, "--lr", 3e-3, "--warmup_steps", 5,
                     "--projection", "linear", ann=cap["few"])
    rows = [json.loads(l) for l in open(out / "metrics.jsonl")]
    assert rows[-1]["loss"] < 0.05 and rows[0]["loss"] > 5 * rows[-1]["loss"]
    assert (out / "loss_curve.png").stat().st_size > 1000
    assert "samples_s=" in proc.stderr  # the tqdm bar reports throughput
    opened = open_trained(cap["ckpt_dir"], cap["tokenizer"], str(out), process_group)
    captioner, encoder = opened.captioner, opened.encoder
    recs = load_coco(cap["images"], cap["few"])
    pixels = torch.stack([encoder.preprocess(open_rgb(r.path)) for r in recs])
    got = captioner.generate(encoder(pixels), max_gen_len=40)
    assert got == [CaptionStyle().clean(r.captions[0]) for r in recs]


@pytest.mark.slow
def test_two_data_parallel_ranks_equal_one_process(cap, tmp_path):
    args = ["--epochs", 2, "--batch_size", 8, "--lr", 1e-3]
    two = run_train(cap, tmp_path / "dp2", *args, nproc=2)
    run_train(cap, tmp_path / "dp1", *args, nproc=1)
    sums = dict(re.findall(r"\[rank (\d)\] projection sha256 (\w+)", two.stderr))
    assert set(sums) == {"0", "1"} and sums["0"] == sums["1"]  # identical on both ranks, bit for bit
    a, b = final_weights(tmp_path / "dp2"), final_weights(tmp_path / "dp1")
    assert a.keys() == b.keys()
    for k in a:
        # Summation order differs between the two; Adam magnifies such rounding in tiny gradients.
        torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-5)


@pytest.mark.slow
def test_resumed_run_equals_uninterrupted_run(cap, tmp_path):
    args = ["--epochs", 3, "--batch_size", 4, "--lr", 1e-3, "--grad_accum", 2, "--save_every", 100]
    run_train(cap, tmp_path / "full", *args)
    stopped = run_train(cap, tmp_path / "cut", *args, "--stop_after_steps", 4)
    assert "stopped after step 4" in stopped.stderr
    resumed = run_train(cap, tmp_path / "cut", *args, "--resume")
    assert "resumed from" in resumed.stderr and "at step 4" in resumed.stderr
    a, b = final_weights(tmp_path / "full"), final_weights(tmp_path / "cut")
    for k in a:
        assert torch.equal(a[k], b[k]), k
    steps = [json.loads(l)["step"] for l in open(tmp_path / "cut" / "metrics.jsonl") if "loss" in json.loads(l)]
    assert steps == sorted(set(steps))  # no step logged twice after resuming
    # A different configuration is refused, and the checkpoint is left as it was.
    before = final_weights(tmp_path / "cut")
    bad = run_train(cap, tmp_path / "cut", *args[:-4], "--lr", 5e-4, "--resume", "--save_every", 100, check=False)
    assert bad.returncode != 0 and "another configuration" in bad.stderr and "lr: 0.001 -> 0.0005" in bad.stderr
    after = final_weights(tmp_path / "cut")
    assert all(torch.equal(before[k], after[k]) for k in before)


def logged_rows(run_dir):
    """metrics.jsonl without its timings."""
    rows = [json.loads(l) for l in open(run_dir / "metrics.jsonl")]
    return [{k: v for k, v in r.items() if k != "samples_per_s"} for r in rows]


def logged_run_args(cap):
    return ["--epochs", 2, "--batch_size", 2, "--lr", 1e-3, "--log_every", 1, "--val_images", cap["val_images"],
            "--val_annotations", cap["val_ann"], "--captions", "one", "--save_every", 100]


@pytest.fixture(scope="module")
def uninterrupted_rows(cap, tmp_path_factory):
    """The rows an uninterrupted run logs: the reference both resume points are compared with."""
    out = tmp_path_factory.mktemp("uninterrupted") / "full"
    run_train(cap, out, *logged_run_args(cap))
    return logged_rows(out)


@pytest.mark.parametrize("where", ["epoch end", "mid-epoch"])
@pytest.mark.slow
def test_a_resumed_run_logs_every_row_the_uninterrupted_run_logs(cap, tmp_path, where, uninterrupted_rows):
    args = logged_run_args(cap)
    full = uninterrupted_rows
    per_epoch = max(r["step"] for r in full if r["epoch"] == 1)
    assert per_epoch > 1 and [r for r in full if "val_loss" in r][0]["step"] == per_epoch
    stop = per_epoch if where == "epoch end" else per_epoch - 1
    run_train(cap, tmp_path / "cut", *args, "--stop_after_steps", stop)
    run_train(cap, tmp_path / "cut", *args, "--resume")
    assert logged_rows(tmp_path / "cut") == full


def extract(cap, out, *extra, images=None, ann=None):
    return run_cli(features.main, "--clip_model", cap["clip"], "--images", images or cap["images"],
                   "--annotations", ann or cap["ann"], "--out", out, "--num_workers", 0, "--batch_size", 2, *extra)


def test_feature_cache_gives_the_same_loss_as_on_the_fly(cap, process_group, tmp_path):
    proc = extract(cap, tmp_path / "feats")
    assert proc.returncode == 0, proc.stderr
    cache = FeatureCache(str(tmp_path / "feats"))
    assert len(cache) == 6 and cache.meta["feature"] == "pooled" and cache.meta["clip_model"] == cap["clip"]
    enc = ClipEncoder(EncoderSpec.of(cap["clip"]))
    recs = load_coco(cap["images"], cap["ann"])
    llama, tok = load_llama(cap["ckpt_dir"], cap["tokenizer"], max_seq_len=64)
    c = Captioner(llama, tok, Projection("mlp", True, 64, 64, prefix_len=4, hidden=64))
    on_fly = collate([CaptionDataset(recs, enc.preprocess)[i] for i in (0, 7, 13)])
    cached = collate([CaptionDataset(recs, features=cache)[i] for i in (0, 7, 13)])
    assert on_fly["caption"] == cached["caption"]
    a, _ = c.caption_loss(enc(on_fly["pixels"]), on_fly["caption"])
    b, _ = c.caption_loss(cached["features"], cached["caption"])
    torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)


def test_feature_extraction_resumes_after_a_crash(cap, tmp_path):
    out = tmp_path / "feats"
    assert extract(cap, out, "--chunk", 1).returncode == 0
    parts = sorted(out.glob("part-*.safetensors"))
    assert len(parts) == 3  # 6 images, 2 a batch, one part per batch
    full = FeatureCache(str(out))
    ref = {i: full.get(i) for i in full.index}
    os.remove(out / "meta.json")
    os.remove(parts[1])  # as if the run died after its first part
    proc = extract(cap, out, "--chunk", 1)
    assert proc.returncode == 0 and "wrote 6 feature vectors" in proc.stdout
    again = FeatureCache(str(out))
    assert len(list(out.glob("part-*.safetensors"))) == 3  # only the lost part was recomputed
    for i, v in ref.items():
        torch.testing.assert_close(again.get(i), v)


def test_feature_cache_from_another_clip_model_is_refused(cap, tmp_path):
    assert extract(cap, tmp_path / "feats").returncode == 0
    other = str(tmp_path / "other_clip.pt")
    build_tiny_clip(other, seed=7)
    proc = run_train(dict(cap, clip=other), tmp_path / "run", "--features", tmp_path / "feats", check=False)
    assert proc.returncode != 0 and "--features" in proc.stderr and "extract the features again" in proc.stderr
    patch = run_train(cap, tmp_path / "run2", "--features", tmp_path / "feats", "--feature_kind", "patch", check=False)
    assert patch.returncode != 0 and "feature='pooled'" in patch.stderr


def test_bad_images_are_skipped_and_counted(cap, tmp_path):
    data = json.load(open(cap["ann"]))
    imgs = tmp_path / "imgs"
    imgs.mkdir()
    for im in data["images"]:
        os.link(os.path.join(cap["images"], im["file_name"]), imgs / im["file_name"])
    # A truncated JPEG, a file that is not an image, and an annotation with no file behind it.
    Image.new("RGB", (32, 32), (200, 10, 10)).save(imgs / "trunc.jpg", quality=95)
    raw = open(imgs / "trunc.jpg", "rb").read()
    open(imgs / "trunc.jpg", "wb").write(raw[: len(raw) // 2])
    open(imgs / "junk.jpg", "w").write("not an image")
    for k, name in enumerate(["trunc.jpg", "junk.jpg", "missing.jpg"]):
        data["images"].append({"id": 900 + k, "file_name": name, "width": 32, "height": 32})
        data["annotations"].append({"id": 9000 + k, "image_id": 900 + k, "caption": "a broken picture"})
    json.dump(data, open(tmp_path / "ann.json", "w"))
    args = train_args(cap, tmp_path / "run", "--epochs", 1, "--batch_size", 8, "--captions", "one", "--warmup_steps", 1)
    i = args.index("--train_images")
    args[i + 1], args[i + 3] = imgs, tmp_path / "ann.json"
    proc = run_cli(captioning_training.main, *args)
    assert proc.returncode == 0, proc.stderr
    assert "1 annotated image(s) not found" in proc.stderr and "missing.jpg" in proc.stderr
    assert "2 unreadable image(s) skipped" in proc.stderr
    assert "trunc.jpg" in proc.stderr and "junk.jpg" in proc.stderr


@pytest.mark.slow
def test_malformed_annotations_name_the_file(cap, tmp_path):
    bad = tmp_path / "captions.json"
    bad.write_text('{"images": [')
    # Plain python (no torchrun launcher, which adds a traceback of its own when a child fails).
    proc = run_python("captioning_training.py", *train_args(cap, tmp_path / "run", ann=str(bad)))
    assert proc.returncode != 0
    assert f"error: {bad} is not valid JSON" in proc.stderr and "Traceback" not in proc.stderr
    bad.write_text('{"images": [{"id": 1}], "annotations": []}')
    proc = run_cli(captioning_training.main, *train_args(cap, tmp_path / "run", ann=str(bad)))
    assert proc.returncode == 2 and "has no file_name" in proc.stderr


@pytest.mark.slow
def test_nan_loss_stops_with_a_message(cap, tmp_path):
    assert extract(cap, tmp_path / "feats").returncode == 0
    for part in (tmp_path / "feats").glob("part-*.safetensors"):
        t = load_file(part)
        t["features"] = torch.full_like(t["features"], float("nan"))
        save_file(t, part)
    proc = run_train(cap, tmp_path / "run", "--features", tmp_path / "feats", "--max_bad_steps", 2,
                     "--batch_size", 2, "--epochs", 1, check=False)
    assert proc.returncode != 0
    assert "non-finite loss at step 1" in proc.stderr and "NaN/inf for 2 steps in a row" in proc.stderr
    # It names only what exists: no checkpoint was saved (once it pointed at a checkpoints folder).
    assert "no checkpoint was saved before it" in proc.stderr and "checkpoints" not in proc.stderr.splitlines()[-1]
    # The failed start reached no checkpoint: the same folder takes a new run (its old log dropped).
    assert (tmp_path / "run" / "config.json").exists() and not (tmp_path / "run" / "checkpoints").exists()
    again = run_train(cap, tmp_path / "run", "--batch_size", 2, "--epochs", 1, "--log_every", 1)
    assert "stopped before its first checkpoint: it is started over" in again.stderr
    rows = [json.loads(l) for l in open(tmp_path / "run" / "metrics.jsonl")]
    assert [r["step"] for r in rows] == list(range(1, len(rows) + 1)) and all(math.isfinite(r["loss"]) for r in rows)
