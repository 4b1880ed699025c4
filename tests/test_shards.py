"""webdataset shards: patterns, the split over ranks and workers, bad samples and shards, the
resumable position, training, feature shards and captioning from shards (docs/shards.md).

Shards are written as img2dataset writes them (KEY.jpg, KEY.txt, KEY.json in NNNNN.tar, and
NNNNN.parquet beside it), with webdataset's own TarWriter and pyarrow."""

import io
import json
import os
import random
import re
import shutil
from collections import Counter

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image
from webdataset import TarWriter

import captioning_training
from conftest import free_port, run_cli
from llama_caption import features, inference, shards
from llama_caption.errors import UserError
from llama_caption.features import FeatureCache
from llama_caption.tools.demo.shapes import SHAPE_COLOURS, draw
from llama_caption.vision import ClipEncoder, EncoderSpec


def jpeg(colour, size=32, seed=0):
    im = draw({"shape": ("circle", "square", "triangle")[seed % 3], "colour": colour, "background": "white", "size": "large"},
              size, random.Random(seed))
    buf = io.BytesIO()
    im.save(buf, "JPEG", quality=90)
    return buf.getvalue()


def write_shard(path, samples, parquet=True):
    """samples: (key, {ext: bytes or str}) pairs; img2dataset's parquet (key, status) beside it."""
    with open(path, "wb") as f, TarWriter(f, encoder=False) as sink:
        for key, files in samples:
            sink.write({"__key__": key, **{k: v.encode() if isinstance(v, str) else v for k, v in files.items()}})
    if parquet:
        pq.write_table(pa.table({"key": [k for k, _ in samples], "status": ["success"] * len(samples)}),
                       os.path.splitext(path)[0] + ".parquet")


def make_shards(folder, sizes=(7, 5, 6, 4), bad=True):
    """Shards 00000.tar ... with sizes[i] samples each; with `bad`: in shard 0 a corrupt JPEG, a
    sample with no caption and one with no image; shard 3 truncated after its second sample; a
    garbage file 00004.tar. Returns {good keys: caption} (what training can use)."""
    os.makedirs(folder, exist_ok=True)
    good, n = {}, 0
    for s, size in enumerate(sizes):
        samples = []
        for j in range(size):
            key = f"{s:05d}{j:04d}"
            colour = SHAPE_COLOURS[n % len(SHAPE_COLOURS)]
            caption = f"a {colour} shape number {n}"
            samples.append((key, {"jpg": jpeg(colour, seed=n), "txt": caption, "json": json.dumps({"alt": caption.upper()})}))
            n += 1
        if bad and s == 0:
            samples[1][1]["jpg"] = b"\xff\xd8 not really a jpeg"
            del samples[2][1]["txt"]
            del samples[3][1]["jpg"]
        write_shard(os.path.join(folder, f"{s:05d}.tar"), samples)
        if bad and s == 3:  # cut inside the third sample's image
            path = os.path.join(folder, f"{s:05d}.tar")
            raw = open(path, "rb").read()
            cut = raw.index(b"000030002.jpg") + 512 + 100  # 100 bytes into the third sample's image
            open(path, "wb").write(raw[:cut])
            samples = samples[:2]
        good.update({f"{s:05d}.tar/{k}": f["txt"] for j, (k, f) in enumerate(samples)
                     if not (bad and s == 0 and j in (1, 2, 3))})
    if bad:
        open(os.path.join(folder, f"{len(sizes):05d}.tar"), "wb").write(b"this is not a tar file" * 50)
    return good


def pattern(folder, n):
    return os.path.join(str(folder), "{00000..%05d}.tar" % (n - 1))


# --- patterns, the split, reading ---------------------------------------------------------------

def test_patterns_expand_in_order_and_bad_ones_are_one_line(tmp_path):
    make_shards(tmp_path / "a", sizes=(2, 2, 2), bad=False)
    a = [str(tmp_path / "a" / f"{i:05d}.tar") for i in range(3)]
    assert shards.expand(pattern(tmp_path / "a", 3), "--x") == a
    assert shards.expand(f"{a[2]}::{a[0]}", "--x") == [a[2], a[0]]
    assert shards.expand([a[1], pattern(tmp_path / "a", 1)], "--x") == [a[1], a[0]]
    assert shards.expand("pipe:cat /nowhere/{0..1}.tar", "--x") == ["pipe:cat /nowhere/0.tar", "pipe:cat /nowhere/1.tar"]
    with pytest.raises(UserError, match=r"--train_shards .*matches no file .*quote the pattern"):
        shards.expand(str(tmp_path / "b" / "{0..3}.tar"), "--train_shards")
    with pytest.raises(UserError, match=r"--x .*: 2 of its 5 files do not exist \(first: .*00003.tar\)"):
        shards.expand(pattern(tmp_path / "a", 5), "--x")
    with pytest.raises(UserError, match=r"named twice"):
        shards.expand([a[0], a[0]], "--x")
    fp = shards.fingerprint(a)
    assert fp == shards.fingerprint(list(a)) and fp != shards.fingerprint(a[:2])
    with open(a[1], "ab") as f:
        f.write(b"\0" * 512)
    assert shards.fingerprint(a) != fp  # a shard that changed size changes the list's identity


def test_shards_are_dealt_to_ranks_by_samples_each_once():
    counts = [50, 10, 40, 30, 30, 5, 0]
    for dp in (1, 2, 3):
        owned = shards.assign(counts, dp)
        flat = [i for o in owned for i in o]
        assert sorted(flat) == list(range(len(counts)))
        loads = [sum(counts[i] for i in o) for o in owned]
        assert max(loads) - min(loads) <= max(counts)
    assert shards.assign(counts, 2) == [[0, 4, 5], [1, 2, 3, 6]]  # 50+30+5 and 40+30+10+0 samples


def test_bad_samples_and_shards_are_skipped_and_counted(tmp_path):
    good = make_shards(tmp_path)
    urls = shards.expand(pattern(tmp_path, 5), "--x")
    assert [shards.count_shard(u) for u in urls[:4]] == [7, 5, 6, 4]  # from the parquet files
    os.remove(tmp_path / "00003.parquet")
    assert shards.count_shard(urls[3]) == 2  # counted in the tar: two samples before the cut
    names = [shards.shard_name(u) for u in urls]
    decode = lambda raw, name: shards.decode(raw, name, lambda im: torch.tensor(im.getpixel((16, 16))), None, True)  # noqa: E731
    stream = shards.ShardStream(urls, names, list(range(5)), {}, decode, chunk=3)
    items = [x for chunk in stream for x in shards.unpack(chunk)]
    seen = {x["image_id"]: x["caption"] for x in items if "image_id" in x}
    assert seen == good
    bad = {x["bad"]: x["reason"] for x in items if "bad" in x}
    assert set(bad) == {"00000.tar/000000001", "00000.tar/000000002", "00000.tar/000000003"}
    assert "OSError" in bad["00000.tar/000000001"] or "UnidentifiedImage" in bad["00000.tar/000000001"]
    assert bad["00000.tar/000000002"].startswith("no caption") and bad["00000.tar/000000003"] == "no image"
    ends = {x["end"]: x for x in items if "end" in x}
    assert [ends[i]["total"] for i in range(5)] == [7, 5, 6, 2, 0]
    assert not ends[0]["errors"] and ends[3]["errors"] and ends[4]["errors"]  # the truncated tar, the garbage file
    # A caption from a json field instead of the .txt.
    raw = next(shards.read_shard(urls[1], []))
    assert shards.decode(raw, "x", lambda im: 0, "alt", True)["caption"] == "A BLUE SHAPE NUMBER 7"
    assert shards.decode(raw, "x", lambda im: 0, "nothing", True)["reason"].startswith("no caption")


def epoch_batches(data, epoch, micro_batches, start_step=0):
    """`micro_batches` micro-batches of one rank: each its good sample ids and its skipped ones."""
    it = data.batches(epoch, start_step)
    return [(b["image_id"], [name for name, _ in b["bad"]]) for b in (next(it) for _ in range(micro_batches))]


def epoch_keys(data, epoch, micro_batches, start_step=0):
    """The good sample ids of `micro_batches` micro-batches of one rank, and the number of them
    that were empty."""
    batches = epoch_batches(data, epoch, micro_batches, start_step)
    return [i for good, _ in batches for i in good], sum(1 for good, bad in batches if not good and not bad)


def rank_data(urls, counts, fp, rank, micro=2, num_workers=0):
    names = [shards.shard_name(u) for u in urls]
    decode = lambda raw, name: shards.decode(raw, name, lambda im: torch.zeros(1), None, True)  # noqa: E731
    return shards.ShardTraining(urls, names, counts, fp, decode, micro, 1, 2, rank, seed=0, num_workers=num_workers)


@pytest.mark.parametrize("num_workers", [0, 2])
def test_two_ranks_read_each_sample_once_and_a_resumed_epoch_makes_the_same_batches(tmp_path, num_workers):
    good = make_shards(tmp_path, sizes=(7, 5, 6, 4, 3, 5, 2))
    urls = shards.expand(pattern(tmp_path, 8), "--x")
    counts, fp = [shards.count_shard(u) for u in urls], shards.fingerprint(urls)
    ranks = [rank_data(urls, counts, fp, r, num_workers=num_workers) for r in range(2)]
    steps = ranks[0].steps_per_epoch
    assert steps == ranks[1].steps_per_epoch == max(-(-sum(counts[i] for i in o) // 2) for o in ranks[0].owned)
    full = [epoch_batches(d, 0, steps) for d in ranks]
    keys = [[i for good, _ in f for i in good] for f in full]
    assert not set(keys[0]) & set(keys[1]) and sorted(keys[0] + keys[1]) == sorted(good)
    # Stop after each number of micro-batches, keep the position as a checkpoint does, resume both
    # ranks: the same micro-batches as the uninterrupted epoch, in the same order, whatever shards
    # were finished or part-way through (once, the unfinished shards were shuffled again).
    for stop in range(1, steps):
        cut = [rank_data(urls, counts, fp, r, num_workers=num_workers) for r in range(2)]
        first = [epoch_batches(d, 0, stop) for d in cut]
        states = [d.position.to_dict(fp) for d in cut]
        saved = cut[0].state(0, lambda obj: states)
        assert saved["epoch"] == 0 and sorted(saved["turns"]) == ["0", "1"]
        again = [rank_data(urls, counts, fp, r, num_workers=num_workers) for r in range(2)]
        for d in again:
            d.restore(saved)
        rest = [epoch_batches(d, 0, steps - stop, start_step=stop) for d in again]
        assert [first[r] + rest[r] for r in range(2)] == full, stop
    # The next epoch starts afresh; a changed shard list is refused in one line.
    assert sorted(epoch_keys(again[0], 1, steps)[0] + epoch_keys(again[1], 1, steps)[0]) == sorted(good)
    assert cut[0].state(1, lambda obj: [obj]) == {"fingerprint": fp, "epoch": 1, "done": [], "partial": {}, "turns": {},
                                                  "dp_size": 2}
    with pytest.raises(UserError, match=r"dealt to 2 data-parallel ranks, this run has 1"):
        shards.ShardTraining(urls, urls, counts, fp, None, 2, 1, 1, 0, 0, 0).restore(saved)
    with pytest.raises(UserError, match=r"--resume: --train_shards names other shards, or shards that changed"):
        rank_data(urls[:4], counts[:4], shards.fingerprint(urls[:4]), 0).restore(saved)


def test_a_resume_with_other_workers_says_its_batches_differ_and_still_reads_each_sample_once(tmp_path):
    good = make_shards(tmp_path, bad=False)
    urls = shards.expand(pattern(tmp_path, 4), "--x")
    counts, fp = [shards.count_shard(u) for u in urls], shards.fingerprint(urls)
    cut = rank_data(urls, counts, fp, 0, num_workers=0)
    first = epoch_keys(cut, 0, 3)[0]
    saved = cut.state(0, lambda obj: [obj, rank_data(urls, counts, fp, 1).position.to_dict(fp)])
    said = []
    again = rank_data(urls, counts, fp, 0, num_workers=2)
    again.log = said.append
    again.restore(saved)
    rest = epoch_keys(again, 0, cut.steps_per_epoch - 3, start_step=3)[0]
    assert len(said) == 1 and "--num_workers 2 reads in 2 stream(s), the checkpoint's run in 1" in said[0] and "not those of an uninterrupted run" in said[0]
    mine = {k for i in cut.owned[0] for k in good if k.startswith(shards.shard_name(urls[i]))}
    assert sorted(first + rest) == sorted(mine)


def test_a_shard_source_built_from_its_checkpoint_record_reads_the_rest_of_the_epoch(tmp_path, process_group):
    """training_data builds a resumed run's shard source complete, from the record its
    checkpoint_state put in trainer.json: the two halves of the epoch read each sample once."""
    from types import SimpleNamespace

    from llama_caption.training_data import training_data

    good = make_shards(tmp_path / "s")
    cfg = SimpleNamespace(train_shards=[pattern(tmp_path / "s", 5)], caption_field=None, samples_per_epoch=None,
                          grad_accum=1, seed=0, num_workers=0, out_dir=str(tmp_path))
    env = SimpleNamespace(dp_size=1, dp_rank=0, rank=0, world_size=1, is_main=True, log=print)
    source = lambda saved: training_data(cfg, env, None, lambda im: torch.zeros(1), 2, "all", saved)  # noqa: E731
    cut = source(None)
    steps = cut.steps_per_epoch
    first = epoch_keys(cut, 0, 3)[0]
    saved = dict({"epoch": 0, "step": 3}, **cut.checkpoint_state(0))
    assert saved["shards"]["epoch"] == 0 and saved["shards"]["partial"]
    rest = epoch_keys(source(saved), 0, steps - 3, start_step=3)[0]
    assert sorted(first + rest) == sorted(good) and len(set(first + rest)) == len(first + rest)
    assert first + rest == epoch_keys(source(None), 0, steps)[0]  # in the uninterrupted order
    assert cut.checkpoint_state(1) == {"shards": {"fingerprint": cut.fingerprint, "epoch": 1, "done": [], "partial": {},
                                                  "turns": {}, "dp_size": 1}}  # at an epoch's end: the next one's start


def test_resampled_streaming_draws_full_batches_for_the_steps_asked(tmp_path):
    good = make_shards(tmp_path)
    urls = shards.expand(pattern(tmp_path, 5), "--x")
    names = [shards.shard_name(u) for u in urls]
    decode = lambda raw, name: shards.decode(raw, name, lambda im: torch.zeros(1), None, True)  # noqa: E731
    data = shards.ShardTraining(urls, names, None, shards.fingerprint(urls), decode, 3, 1, 2, 1, seed=0, num_workers=0,
                                samples_per_epoch=100)
    assert data.steps_per_epoch == 100 // 6
    keys, empty = epoch_keys(data, 0, 40)  # more than an epoch's worth: the stream does not end
    assert empty == 0 and set(keys) <= set(good) and len(set(keys)) < len(keys)  # drawn with replacement
    assert Counter(k.split("/")[0] for k in keys).keys() == {"00000.tar", "00001.tar", "00002.tar", "00003.tar"}
    again = epoch_keys(data, 1, 10)[0]
    assert again != keys[:len(again)]  # another draw each epoch


# --- training, features and captions from shards ------------------------------------------------

def shard_train_args(cap, out_dir, shard_pattern, *extra):
    return ["--ckpt_dir", cap["ckpt_dir"], "--tokenizer_path", cap["tokenizer"], "--clip_model", cap["clip"],
            "--train_shards", shard_pattern, "--out_dir", out_dir, "--num_workers", 0, "--log_every", 1,
            "--batch_size", 4, "--warmup_steps", 1, "--save_every", 100, *extra]


def logged(run_dir):
    """(step, epoch, sample) rows of every data-parallel rank's --log_samples file."""
    rows = []
    for path in sorted((run_dir / "samples").glob("dp-*.tsv")):
        rows += [tuple(l.rstrip("\n").split("\t")) for l in open(path) if l.strip()]
    return [(int(s), int(e), k) for s, e, k in rows]


@pytest.mark.slow
def test_a_killed_shard_run_resumes_exactly_where_it_stopped_and_a_changed_list_is_refused(cap, tmp_path):
    good = make_shards(tmp_path / "shards")
    pat = pattern(tmp_path / "shards", 5)
    full = run_cli(captioning_training.main, *shard_train_args(cap, tmp_path / "full", pat, "--epochs", 2, "--log_samples", True))
    assert full.returncode == 0, full.stderr[-3000:]
    assert "6 unreadable image(s) skipped, 2 shard(s) cut short by read errors" in full.stderr
    full_rows = logged(tmp_path / "full")
    assert sorted(k for _, e, k in full_rows if e == 1) == sorted(good)
    steps = max(s for s, _, _ in full_rows)
    # As if killed after step 3, whose checkpoint was never written: the checkpoint is step 2's.
    args = shard_train_args(cap, tmp_path / "cut", pat, "--epochs", 2, "--log_samples", True, "--save_every", 2)
    assert run_cli(captioning_training.main, *args, "--stop_after_steps", 3).returncode == 0
    ckpts = tmp_path / "cut" / "checkpoints"
    shutil.rmtree(ckpts / "step-0000003")
    (ckpts / "latest").write_text("step-0000002\n")
    trainer = json.load(open(ckpts / "step-0000002" / "trainer.json"))
    assert trainer["shards"]["epoch"] == 0 and trainer["shards"]["partial"]
    # A shard that changed since is refused in one line, and nothing is lost.
    shard1 = (tmp_path / "shards" / "00001.tar").read_bytes()
    (tmp_path / "shards" / "00001.tar").write_bytes(shard1 + b"\0" * 1024)
    bad = run_cli(captioning_training.main, *args, "--resume", True)
    assert bad.returncode == 2 and "names other shards, or shards that changed" in bad.stderr
    assert (ckpts / "latest").read_text() == "step-0000002\n"
    (tmp_path / "shards" / "00001.tar").write_bytes(shard1)
    resumed = run_cli(captioning_training.main, *args, "--resume", True)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resumed from" in resumed.stderr and "at step 2" in resumed.stderr
    rows = logged(tmp_path / "cut")
    keys = [k for _, e, k in rows if e == 1]
    assert sorted(keys) == sorted(good) and len(set(keys)) == len(keys)  # the union is one epoch, nothing twice
    assert max(s for s, _, _ in rows) == steps
    # Exact: the same samples in the same steps, and the same final weights, as the run never stopped
    # (the resumed epoch once shuffled its unfinished shards again).
    assert rows == full_rows
    digest = lambda err: re.findall(r"projection sha256 (\w+)", err)[-1]  # noqa: E731
    assert digest(resumed.stderr) == digest(full.stderr)
    # Stage two: the projection pretrained on shards starts a COCO run.
    coco = run_cli(captioning_training.main, "--ckpt_dir", cap["ckpt_dir"], "--tokenizer_path", cap["tokenizer"],
                   "--clip_model", cap["clip"], "--train_images", cap["images"], "--train_annotations", cap["ann"],
                   "--out_dir", tmp_path / "coco", "--num_workers", 0, "--epochs", 1, "--batch_size", 4,
                   "--init_from", tmp_path / "full")
    assert coco.returncode == 0, coco.stderr[-3000:]


def test_flags_that_do_not_fit_shards_are_refused(cap, tmp_path):
    make_shards(tmp_path / "s", sizes=(3,), bad=False)
    pat = pattern(tmp_path / "s", 1)
    cases = [(["--train_images", cap["images"]], "one of the two"),
             (["--train_annotations", cap["ann"]], "leave out --train_annotations"),
             (["--objective", "scst", "--init_from", tmp_path], "--objective scst needs each image's reference captions"),
             (["--captions", "one"], "--captions one"),
             ([], "matches no file")]
    for extra, message in cases:
        shard = pat if extra else str(tmp_path / "none" / "{0..2}.tar")
        proc = run_cli(captioning_training.main, *shard_train_args(cap, tmp_path / "r", shard, *extra))
        assert proc.returncode == 2 and message in proc.stderr, (extra, proc.stderr[-500:])
    proc = run_cli(inference.main, "--ckpt_dir", cap["ckpt_dir"], "--tokenizer_path", cap["tokenizer"], "--checkpoint",
                   tmp_path, "--shards", pat, "--out", tmp_path / "x.json")
    assert proc.returncode == 2 and "--out names the folder" in proc.stderr
    # A caption field no sample has: the epoch uses nothing, which is an error, not a finished run.
    proc = run_cli(captioning_training.main, *shard_train_args(cap, tmp_path / "nope", pat, "--caption_field", "nope"))
    assert proc.returncode == 2 and "epoch 1 used no sample" in proc.stderr and "--caption_field 'nope'" in proc.stderr
    assert re.search(r"every one was skipped \(\d+ here;", proc.stderr)


def test_feature_shards_hold_the_encoders_features_and_train(cap, tmp_path):
    good = make_shards(tmp_path / "shards")
    pat = pattern(tmp_path / "shards", 5)
    out = tmp_path / "feats"
    proc = run_cli(features.main, "--clip_model", cap["clip"], "--shards", pat, "--out", out, "--num_workers", 0,
                   "--batch_size", 4)
    assert proc.returncode == 0, proc.stderr[-3000:]
    # Extraction needs no caption: only the corrupt image and the sample with none are skipped.
    assert "wrote 18 feature vectors in 5 shard(s)" in proc.stdout
    assert "2 unreadable sample(s) skipped, 2 shard(s) cut short" in proc.stdout
    cache = FeatureCache(str(out))
    assert cache.meta["count"] == 18 and [x["count"] for x in cache.meta["shards"]] == [5, 5, 6, 2, 0]
    # A sample's features are the encoder's, under the input's key, with its caption.
    enc = ClipEncoder(EncoderSpec.of(cap["clip"]))
    raw = next(shards.read_shard(str(out / "00001.tar"), []))
    src = next(shards.read_shard(str(tmp_path / "shards" / "00001.tar"), []))
    assert raw["__key__"] == src["__key__"] and raw["txt"] == src["txt"]
    item = shards.decode(raw, "00001.tar", None, None, True)
    want = enc(enc.preprocess(Image.open(io.BytesIO(src["jpg"])).convert("RGB"))[None])[0]
    torch.testing.assert_close(item["features"], want, rtol=1e-5, atol=1e-5)
    again = run_cli(features.main, "--clip_model", cap["clip"], "--shards", pat, "--out", out, "--num_workers", 0)
    assert again.returncode == 0 and "already complete" in again.stdout
    run = run_cli(captioning_training.main, *shard_train_args(cap, tmp_path / "run", pat, "--epochs", 1, "--features",
                                                              out, "--log_samples", True))
    assert run.returncode == 0, run.stderr[-3000:]
    assert sorted(k for _, _, k in logged(tmp_path / "run")) == sorted(good)
    # The identity checks stay: features of another CLIP, or of other shards, are refused.
    from llama_caption.tools.testing import build_tiny_clip

    other = str(tmp_path / "other.pt")
    build_tiny_clip(other, seed=5)
    args = shard_train_args(dict(cap, clip=other), tmp_path / "r2", pat, "--features", out)
    proc = run_cli(captioning_training.main, *args)
    assert proc.returncode == 2 and "extract the features again" in proc.stderr
    proc = run_cli(captioning_training.main, *shard_train_args(cap, tmp_path / "r3", pattern(tmp_path / "shards", 4),
                                                               "--features", out))
    assert proc.returncode == 2 and "was extracted from other shards" in proc.stderr


def coco_shards(cap, folder, per_shard=4):
    """The drawn COCO images (train and val) as shards: key = file stem. Returns {key: path}."""
    paths = sorted(os.path.join(d, f) for d in (cap["images"], cap["val_images"]) for f in os.listdir(d))
    os.makedirs(folder, exist_ok=True)
    for s in range(0, len(paths), per_shard):
        write_shard(os.path.join(folder, f"{s // per_shard:05d}.tar"),
                    [(os.path.splitext(os.path.basename(p))[0], {"png": open(p, "rb").read(), "txt": "x"})
                     for p in paths[s:s + per_shard]])
    return {os.path.splitext(os.path.basename(p))[0]: p for p in paths}


def caption_args(cap, trained, *extra):
    return ["--ckpt_dir", cap["ckpt_dir"], "--tokenizer_path", cap["tokenizer"], "--checkpoint", trained,
            "--num_workers", 0, "--batch_size", 4, *extra]


@pytest.mark.slow
def test_captioning_shards_gives_the_folders_captions_and_a_rerun_redoes_only_missing_shards(cap, trained, tmp_path):
    by_key = coco_shards(cap, tmp_path / "shards")
    n = len(os.listdir(tmp_path / "shards")) // 2
    pat = pattern(tmp_path / "shards", n)
    proc = run_cli(inference.main, *caption_args(cap, trained, "--shards", pat, "--out", tmp_path / "out"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"{n} shard(s): 0 already captioned" in proc.stderr and re.search(r"images/s", proc.stderr)
    rows = [json.loads(l) for i in range(n) for l in open(tmp_path / "out" / f"{i:05d}.jsonl")]
    got = {r["key"]: r["caption"] for r in rows}
    assert sorted(got) == sorted(by_key)
    folder = run_cli(inference.main, *caption_args(cap, trained, "--images", cap["images"], cap["val_images"],
                                                   "--out", tmp_path / "folder.json"))
    assert folder.returncode == 0, folder.stderr[-3000:]
    want = {os.path.splitext(os.path.basename(r["file_name"]))[0]: r["caption"]
            for r in json.load(open(tmp_path / "folder.json"))}
    assert got == want and len(set(want.values())) > 1
    # Continuous batching over 3 slots: the same captions, each shard's in its order.
    cont = run_cli(inference.main, *caption_args(cap, trained, "--shards", pat, "--out", tmp_path / "cont",
                                                 "--decoder", "continuous", "--batch_size", 3))
    assert cont.returncode == 0, cont.stderr[-3000:]
    assert [json.loads(l) for i in range(n) for l in open(tmp_path / "cont" / f"{i:05d}.jsonl")] == rows
    # A rerun skips finished shards: only the one whose results are gone is captioned again.
    first = (tmp_path / "out" / "00000.jsonl").stat().st_mtime_ns
    os.remove(tmp_path / "out" / "00001.jsonl")
    again = run_cli(inference.main, *caption_args(cap, trained, "--shards", pat, "--out", tmp_path / "out"))
    assert again.returncode == 0 and f"{n} shard(s): {n - 1} already captioned in" in again.stderr
    assert (tmp_path / "out" / "00000.jsonl").stat().st_mtime_ns == first
    assert [json.loads(l) for l in open(tmp_path / "out" / "00001.jsonl")] == [r for r in rows if r["key"] in
                                                                               {json.loads(l)["key"] for l in open(tmp_path / "out" / "00001.jsonl")}]
    # Other settings are refused; parquet results hold the same captions.
    other = run_cli(inference.main, *caption_args(cap, trained, "--shards", pat, "--out", tmp_path / "out",
                                                  "--max_gen_len", 5))
    assert other.returncode == 2 and "made with other settings" in other.stderr
    pq_run = run_cli(inference.main, *caption_args(cap, trained, "--shards", pat, "--out", tmp_path / "pq",
                                                   "--out_format", "parquet"))
    assert pq_run.returncode == 0, pq_run.stderr[-3000:]
    table = pa.concat_tables([pq.read_table(tmp_path / "pq" / f"{i:05d}.parquet") for i in range(n)])
    assert dict(zip(table.column("key").to_pylist(), table.column("caption").to_pylist())) == got
    assert (os.stat(tmp_path / "pq" / "00000.parquet").st_mode & 0o777) == 0o666 & ~current_umask()
    # Another format into the same folder is other settings too; --overwrite on some of the shards
    # clears every results file, so no later run takes the old ones for done.
    fmt = run_cli(inference.main, *caption_args(cap, trained, "--shards", pat, "--out", tmp_path / "out",
                                                "--out_format", "parquet"))
    assert fmt.returncode == 2 and "made with other settings" in fmt.stderr
    assert not list((tmp_path / "out").glob("*.parquet"))
    some = run_cli(inference.main, *caption_args(cap, trained, "--shards", str(tmp_path / "shards" / "00000.tar"),
                                                 "--out", tmp_path / "out", "--max_gen_len", 5, "--overwrite", True))
    assert some.returncode == 0, some.stderr[-3000:]
    assert sorted(os.listdir(tmp_path / "out")) == ["00000.jsonl", "00000.shard.json", "run.json"]
    rest = run_cli(inference.main, *caption_args(cap, trained, "--shards", pat, "--out", tmp_path / "out",
                                                 "--max_gen_len", 5))
    assert rest.returncode == 0 and f"{n} shard(s): 1 already captioned in" in rest.stderr


def current_umask():
    mask = os.umask(0)
    os.umask(mask)
    return mask


@pytest.mark.slow
def test_a_damaged_shard_keeps_its_readable_captions_and_is_not_retried_unless_asked(cap, trained, tmp_path):
    """A truncated tar: its readable samples are captioned and written, its record says damaged
    with its counts, and the summary counts what is on disk. A rerun leaves it (a damaged shard
    stays damaged) unless --retry_damaged; once mended (it changed), a rerun captions all of it."""
    coco_shards(cap, tmp_path / "shards")
    shard = tmp_path / "shards" / "00000.tar"
    whole = shard.read_bytes()
    shard.write_bytes(whole[:len(whole) * 2 // 3])
    args = caption_args(cap, trained, "--shards", str(shard), "--out", tmp_path / "out")
    cut = run_cli(inference.main, *args)
    assert cut.returncode == 0, cut.stderr[-3000:]
    lines = open(tmp_path / "out" / "00000.jsonl").read().splitlines()
    record = json.load(open(tmp_path / "out" / "00000.shard.json"))
    assert 0 < len(lines) < 4 and record["captions"] == len(lines) and record["damaged"]
    assert record["source"] == {"path": str(shard), "size": shard.stat().st_size, "mtime_ns": shard.stat().st_mtime_ns}
    assert f"this run wrote {len(lines)} caption(s) for 1 shard(s)" in cut.stderr and "1 shard(s) damaged" in cut.stderr
    holds = f"holds {len(lines)} caption(s) for 1 of the 1 shard(s)"
    assert holds in cut.stderr
    again = run_cli(inference.main, *args)
    assert again.returncode == 0 and "1 already captioned" in again.stderr, again.stderr[-2000:]
    assert "1 shard(s) recorded as damaged are not read again" in again.stderr and "this run wrote 0 caption(s)" in again.stderr
    assert holds in again.stderr and "1 shard(s) damaged" in again.stderr  # the rerun counts what is on disk too
    retry = run_cli(inference.main, *args, "--retry_damaged", True)
    assert retry.returncode == 0 and "1 damaged shard(s) read again" in retry.stderr, retry.stderr[-2000:]
    assert f"this run wrote {len(lines)} caption(s)" in retry.stderr
    shard.write_bytes(whole)  # mended: the shard changed since it was captioned
    mended = run_cli(inference.main, *args)
    assert mended.returncode == 0 and "1 shard(s) changed since they were captioned" in mended.stderr
    assert len(open(tmp_path / "out" / "00000.jsonl").read().splitlines()) == 4
    assert json.load(open(tmp_path / "out" / "00000.shard.json"))["damaged"] is None


@pytest.mark.slow
def test_a_rerun_recognises_a_shard_by_what_it_is_not_its_name(cap, trained, tmp_path):
    """img2dataset names every collection's shards 00000.tar ...: another collection's shard of a
    name --out already holds is refused in one line (the captions there are kept); the same shard
    copied with its size and time is done; results with no record are captioned again."""
    coco_shards(cap, tmp_path / "a")
    os.makedirs(tmp_path / "b")
    write_shard(str(tmp_path / "b" / "00000.tar"), [("other", {"png": open(sorted(
        os.path.join(cap["val_images"], f) for f in os.listdir(cap["val_images"]))[0], "rb").read(), "txt": "x"})])
    out = tmp_path / "out"
    first = run_cli(inference.main, *caption_args(cap, trained, "--shards", str(tmp_path / "a" / "00000.tar"), "--out", out))
    assert first.returncode == 0, first.stderr[-3000:]
    held = (out / "00000.jsonl").read_bytes()
    other = run_cli(inference.main, *caption_args(cap, trained, "--shards", str(tmp_path / "b" / "00000.tar"), "--out", out))
    assert other.returncode == 2 and other.stderr.count("error:") == 1, other.stderr[-2000:]
    assert "holds the captions of another shard" in other.stderr and str(tmp_path / "a" / "00000.tar") in other.stderr
    assert (out / "00000.jsonl").read_bytes() == held
    os.makedirs(tmp_path / "moved")
    shutil.copy2(tmp_path / "a" / "00000.tar", tmp_path / "moved" / "00000.tar")  # keeps size and time
    moved = run_cli(inference.main, *caption_args(cap, trained, "--shards", str(tmp_path / "moved" / "00000.tar"),
                                                  "--out", out))
    assert moved.returncode == 0 and "1 already captioned" in moved.stderr, moved.stderr[-2000:]
    os.remove(out / "00000.shard.json")
    redo = run_cli(inference.main, *caption_args(cap, trained, "--shards", str(tmp_path / "a" / "00000.tar"), "--out", out))
    assert redo.returncode == 0 and "1 results file(s) with no record of their shard" in redo.stderr
    assert (out / "00000.jsonl").read_bytes() == held and (out / "00000.shard.json").is_file()


# --- several processes ----------------------------------------------------------------------------

def launch(nodes_or_procs, args, two_nodes=False, timeout=240):
    """captioning_training.py / -m llama_caption under torchrun: 2 ranks on one launcher, or 2
    launchers ("nodes") of 1 rank each meeting at a c10d rendezvous on 127.0.0.1."""
    import subprocess
    import sys

    from conftest import REPO

    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=REPO)
    args, port = [str(a) for a in args], free_port()
    base = [sys.executable, "-m", "torch.distributed.run"]
    if not two_nodes:
        cmds = [base + ["--nproc_per_node", "2", "--master_addr", "127.0.0.1", "--master_port", str(port), *args]]
    else:
        cmds = [base + ["--nnodes", "2", "--nproc_per_node", "1", "--rdzv_backend", "c10d", "--rdzv_id", "t",
                        "--rdzv_endpoint", f"127.0.0.1:{port}", *args] for _ in range(2)]
    procs = [subprocess.Popen(c, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=REPO) for c in cmds]
    outs = [p.communicate(timeout=timeout) for p in procs]
    for p, (o, e) in zip(procs, outs):
        assert p.returncode == 0, e[-3000:]
    return "\n".join(e for _, e in outs)


@pytest.mark.slow
def test_two_ranks_see_every_sample_once_per_epoch(cap, tmp_path):
    good = make_shards(tmp_path / "shards", sizes=(7, 5, 6, 4, 3, 5))
    # One shard through a pipe: URL, as webdataset reads remote shards.
    pat = [pattern(tmp_path / "shards", 5), f"pipe:cat {tmp_path / 'shards' / '00005.tar'}"]
    err = launch(2, ["captioning_training.py", *shard_train_args(cap, tmp_path / "run", "::".join(pat),
                                                                 "--epochs", 2, "--log_samples", True,
                                                                 "--num_workers", 2)])
    pipe_keys = {k for k in good if k.startswith("00005.tar/")}
    assert len(pipe_keys) == 5
    assert "6 unreadable image(s) skipped, 1 shard(s) cut short" in err, err[-3000:]  # 3 per epoch
    # Each is named once, whichever rank read it, though it was skipped in both epochs.
    for key in ("000000001", "000000002", "000000003"):
        assert err.count(f"skipped unreadable image 00000.tar/{key} ") == 1, err[-3000:]
    files = sorted((tmp_path / "run" / "samples").glob("dp-*.tsv"))
    assert len(files) == 2
    ranks = [[l.rstrip("\n").split("\t") for l in open(f)] for f in files]
    for epoch in ("1", "2"):
        keys = [[k for _, e, k in r if e == epoch] for r in ranks]
        assert not set(keys[0]) & set(keys[1])  # none twice across ranks
        assert sorted(keys[0] + keys[1]) == sorted(good)  # every sample exactly once per epoch
    steps = {int(s) for r in ranks for s, _, _ in r}
    assert max(steps) == 2 * max(int(s) for r in ranks for s, e, _ in r if e == "1")


@pytest.mark.slow
def test_two_nodes_on_loopback_train_and_caption_shards(cap, tmp_path):
    good = make_shards(tmp_path / "shards", sizes=(4, 3, 5), bad=False)
    pat = pattern(tmp_path / "shards", 3)
    launch(2, ["captioning_training.py", *shard_train_args(cap, tmp_path / "run", pat, "--epochs", 1,
                                                           "--log_samples", True)], two_nodes=True)
    assert sorted(k for _, _, k in logged(tmp_path / "run")) == sorted(good)
    err = launch(2, ["-m", "llama_caption", "caption", *caption_args(cap, tmp_path / "run", "--shards", pat, "--out",
                                                                      tmp_path / "out")], two_nodes=True)
    keys = {json.loads(l)["key"] for i in range(3) for l in open(tmp_path / "out" / f"{i:05d}.jsonl")}
    assert keys == {k.split("/")[1] for k in good}
    assert "[dp 0]" in err and "[dp 1]" in err  # both nodes captioned shards
