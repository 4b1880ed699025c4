"""Where papers report: Karpathy's splits of COCO, Flickr8k and Flickr30k, nocaps by domain,
CLIP-S and RefCLIP-S, the gallery of the worst captions, and the training dashboard.

Every expected score is computed here independently: pycocoevalcap's scorers called directly on
each subset, and CLIP-S from the CLIP's own encode_image/encode_text."""

import json
import os
import shutil

import pytest
import torch
from PIL import Image

import captioning_inference
import captioning_training
from conftest import run_cli
from llama_caption import clipscore, evaluation, features
from llama_caption.data import NOCAPS_DOMAINS, load_karpathy, load_split
from llama_caption.errors import UserError
from llama_caption.results import write_gallery
from llama_caption.vision import import_clip

DOMAINS = NOCAPS_DOMAINS


def coco_images(cap):
    """(COCO image entry, its folder, its split name, its captions) of the drawn train and val sets."""
    out = []
    for ann, folder, split in ((cap["ann"], "train2014", "train"), (cap["val_ann"], "val2014", "val")):
        data = json.load(open(ann))
        for im in data["images"]:
            caps = [a["caption"] for a in data["annotations"] if a["image_id"] == im["id"]]
            out.append((im, folder, split, caps))
    return out


KARPATHY_SPLIT_OF = {"train": ["train", "train", "restval", "train", "restval", "val"], "val": ["test", "test", "test"]}


def write_karpathy(cap, root, dataset):
    """Karpathy's format for the drawn images: COCO's keeps its folders and cocoid; Flickr's are
    renamed into one flat folder and known by imgid. Returns (json path, images root, truth)."""
    root.mkdir(parents=True, exist_ok=True)
    images, truth, flat = [], {}, root / "images"
    flat.mkdir(exist_ok=True)
    counters = {"train": 0, "val": 0}
    for k, (im, folder, split, caps) in enumerate(coco_images(cap)):
        where = KARPATHY_SPLIT_OF[split][counters[split]]
        counters[split] += 1
        entry = {"imgid": k, "split": where, "sentids": list(range(5 * k, 5 * k + len(caps))),
                 "sentences": [{"raw": c, "tokens": c.lower().split(), "imgid": k} for c in caps]}
        if dataset == "coco":
            entry.update(filepath=folder, filename=im["file_name"], cocoid=im["id"])
            path, image_id = os.path.join(cap["root"], "coco", folder, im["file_name"]), im["id"]
        else:
            name = f"{1000092795 + 17 * k}.jpg"
            shutil.copy(os.path.join(cap["root"], "coco", folder, im["file_name"]), flat / name)
            entry.update(filename=name)
            path, image_id = str(flat / name), k
        images.append(entry)
        truth[image_id] = (where, path, caps)
    path = root / f"dataset_{dataset}.json"
    json.dump({"images": images, "dataset": dataset}, open(path, "w"))
    return str(path), str(root / "images") if dataset != "coco" else os.path.join(cap["root"], "coco"), truth


def write_nocaps(cap, root):
    """A nocaps-style file (COCO's format, each image with a domain) over the drawn val images and
    three train images, in one folder, named by file_name."""
    root.mkdir(parents=True, exist_ok=True)
    (root / "images").mkdir(exist_ok=True)
    images, anns, domain_of = [], [], {}
    for k, (im, folder, _, caps) in enumerate(coco_images(cap)[3:]):
        name = f"{k:04x}deadbeef.jpg"
        shutil.copy(os.path.join(cap["root"], "coco", folder, im["file_name"]), root / "images" / name)
        domain_of[k] = DOMAINS[k % 3]
        images.append({"id": k, "file_name": name, "domain": DOMAINS[k % 3], "open_images_id": f"x{k}"})
        anns += [{"image_id": k, "id": 10 * k + j, "caption": c} for j, c in enumerate(caps)]
    path = root / "nocaps_val_4500_captions.json"
    json.dump({"licenses": [], "info": {}, "images": images, "annotations": anns}, open(path, "w"))
    return str(path), str(root / "images"), domain_of


def caption_args(cap, trained, out, *extra):
    return ["--ckpt_dir", cap["ckpt_dir"], "--tokenizer_path", cap["tokenizer"], "--checkpoint", trained, "--out", out,
            "--num_workers", 0, "--batch_size", 4, *extra]


def reference_clip_scores(clip_file, items):
    """CLIP-S and RefCLIP-S by Hessel et al.'s formula, from the CLIP's own encoders. items:
    (image path, caption, references)."""
    clip = import_clip()
    model, preprocess = clip.load(clip_file, device="cpu", jit=False)
    out = []
    with torch.no_grad():
        for path, caption, refs in items:
            image = model.encode_image(preprocess(Image.open(path).convert("RGB"))[None]).float()[0]
            ids = clip.tokenize(["A photo depicts " + t for t in [caption] + refs], context_length=model.context_length,
                                truncate=True)
            texts = model.encode_text(ids).float()
            image = image / image.norm()
            texts = texts / texts.norm(dim=-1, keepdim=True)
            c = 2.5 * max(float(image @ texts[0]), 0.0)
            best = max(max(float(texts[0] @ texts[j]) for j in range(1, len(texts))), 0.0) if refs else None
            out.append((c, None if best is None else (2 * c * best / (c + best) if c + best else 0.0)))
    return out


@pytest.fixture(scope="module")
def flipped_clip(tmp_path_factory):
    """A tiny CLIP whose text features point the other way: where the random one's cosines are
    negative (CLIP-S clamped to 0), this one's are positive."""
    from llama_caption.tools.testing import build_tiny_clip

    clip = import_clip()
    torch.manual_seed(0)
    model = clip.model.CLIP(embed_dim=64, image_resolution=32, vision_layers=2, vision_width=64, vision_patch_size=8,
                            context_length=16, vocab_size=49408, transformer_width=64, transformer_heads=1,
                            transformer_layers=1)
    model.text_projection.data.neg_()
    return build_tiny_clip(str(tmp_path_factory.mktemp("flipped") / "clip.pt"), model=model)


# --- Karpathy's files ---------------------------------------------------------------------------

@pytest.mark.parametrize("dataset", ["coco", "flickr8k", "flickr30k"])
def test_karpathy_splits_of_the_three_datasets(cap, tmp_path, dataset):
    path, images, truth = write_karpathy(cap, tmp_path, dataset)
    for split, members in (("train", ("train", "restval")), ("val", ("val",)), ("test", ("test",))):
        records = load_karpathy(path, images, split)
        want = {i: t for i, t in truth.items() if t[0] in members}
        assert {r.image_id: (r.path, r.captions) for r in records} == {i: (p, c) for i, (_, p, c) in want.items()}
        assert all(os.path.isfile(r.path) and r.dataset == dataset for r in records)


def test_bad_karpathy_files_are_one_line_errors_and_nothing_is_written(cap, trained, tmp_path):
    path, images, _ = write_karpathy(cap, tmp_path / "k", "flickr8k")
    data = json.load(open(path))
    dup = dict(data, images=data["images"] + [dict(data["images"][0], filename="other.jpg")])
    no_id = dict(data, images=[{k: v for k, v in im.items() if k != "imgid"} for im in data["images"]])
    cases = {"coco.json": (json.load(open(cap["ann"])), "test", "not one of Karpathy's files"),
             "list.json": ([], "test", "has no 'images' list"),
             "dup.json": (dup, "test", "two images have the id 0"),
             "noid.json": (no_id, "test", "has imgid None"),
             "ok.json": (data, "nosuch", "--split"),
             "nosplit.json": (dict(data, images=[im for im in data["images"] if im["split"] != "test"]), "test",
                              "no image in split 'test'"),
             "noraw.json": (dict(data, images=[dict(data["images"][0], sentences=[{"tokens": ["a"]}])] + data["images"][1:]),
                            "test", "has no raw text"),
             "nosentences.json": (dict(data, images=[{k: v for k, v in data["images"][0].items() if k != "sentences"}]
                                       + data["images"][1:]), "test", "sentences is missing"),
             "outside.json": (dict(data, images=[dict(data["images"][0], filename="/etc/hostname")] + data["images"][1:]),
                              "test", "outside the images folder"),
             "mixed.json": (dict(data, images=[dict(im, cocoid=100 + i) for i, im in enumerate(data["images"][:-1])]
                                 + data["images"][-1:]), "test", "has no cocoid while others do")}
    for name, (content, split, message) in cases.items():
        json.dump(content, open(tmp_path / name, "w"))
        out = tmp_path / name.replace(".json", "") / "res.json"
        proc = run_cli(captioning_inference.main, *caption_args(cap, trained, out, "--images", images, "--karpathy_split",
                                                                tmp_path / name, "--split", split))
        assert proc.returncode == 2, (name, proc.stderr)
        errors = [l for l in proc.stderr.splitlines() if l.startswith("error:")]
        assert len(errors) == 1 and message in errors[0], (name, proc.stderr)
        assert not out.parent.exists() or not os.listdir(out.parent)


def test_caption_takes_one_reference_file_not_two(cap, trained, tmp_path):
    path, images, _ = write_karpathy(cap, tmp_path / "k", "coco")
    out = tmp_path / "both" / "res.json"
    proc = run_cli(captioning_inference.main, *caption_args(cap, trained, out, "--images", images, "--karpathy_split", path,
                                                            "--annotations", cap["val_ann"]))
    assert proc.returncode == 2 and "one of the two" in proc.stderr, proc.stderr
    assert not out.parent.exists()


def test_a_feature_cache_of_another_dataset_is_refused(cap, tmp_path):
    """Flickr's imgid and COCO's ids are both small whole numbers: a cache of one is not the other's."""
    path, images, _ = write_karpathy(cap, tmp_path / "k", "flickr30k")
    proc = run_cli(features.main, "--clip_model", cap["clip"], "--images", images, "--karpathy_split", path,
                   "--split", "train", "--out", tmp_path / "feats", "--num_workers", 0)
    assert proc.returncode == 0, proc.stderr
    assert json.load(open(tmp_path / "feats" / "meta.json"))["dataset"] == "flickr30k"
    coco = load_split(cap["images"], cap["ann"], None, "train", "--train_images", "--train_annotations")
    with pytest.raises(UserError, match="flickr30k images but this split is coco's"):
        features.FeatureCache(str(tmp_path / "feats")).check_dataset(coco[0].dataset)


def test_training_and_captioning_on_flickr_through_the_scripts(cap, tmp_path):
    path, images, truth = write_karpathy(cap, tmp_path / "k", "flickr8k")
    run = tmp_path / "run"
    proc = run_cli(captioning_training.main, "--ckpt_dir", cap["ckpt_dir"], "--tokenizer_path", cap["tokenizer"],
                   "--clip_model", cap["clip"], "--train_images", images, "--karpathy_split", path, "--out_dir", run,
                   "--num_workers", 0, "--epochs", 1, "--batch_size", 4, "--warmup_steps", 1)
    assert proc.returncode == 0, proc.stderr
    out = tmp_path / "res.json"
    proc = run_cli(captioning_inference.main, *caption_args(cap, str(run), out, "--images", images, "--karpathy_split",
                                                            path, "--split", "test", "--evaluate", False))
    assert proc.returncode == 0, proc.stderr
    assert sorted(r["image_id"] for r in json.load(open(out))) == sorted(i for i, t in truth.items() if t[0] == "test")


# --- nocaps ---------------------------------------------------------------------------------------

def test_nocaps_images_missing_is_one_line_and_nothing_is_written(cap, trained, tmp_path):
    path, images, _ = write_nocaps(cap, tmp_path / "n")
    os.remove(os.path.join(images, sorted(os.listdir(images))[1]))
    out = tmp_path / "out" / "res.json"
    proc = run_cli(captioning_inference.main, *caption_args(cap, trained, out, "--images", images, "--annotations", path))
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1].startswith("error: 1 of the 6 nocaps image(s)") and "--num_images" in proc.stderr
    assert not out.parent.exists()
    bad = json.load(open(path))
    bad["images"][0]["domain"] = "far-domain"
    json.dump(bad, open(tmp_path / "bad.json", "w"))
    proc = run_cli(captioning_inference.main, *caption_args(cap, trained, out, "--images", images, "--annotations",
                                                            tmp_path / "bad.json"))
    assert proc.returncode == 2 and "far-domain" in proc.stderr and not out.parent.exists()


def tokenized(references, results):
    from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

    tok = PTBTokenizer()
    gts = tok.tokenize({r["image_id"]: [{"caption": c} for c in references[r["image_id"]]] for r in results})
    res = tok.tokenize({r["image_id"]: [{"caption": r["caption"]}] for r in results})
    return gts, res


@pytest.mark.slow
def test_nocaps_per_domain_scores_clip_s_and_the_worst_first_gallery(cap, trained, flipped_clip, tmp_path):
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider

    path, images, domain_of = write_nocaps(cap, tmp_path / "n")
    out = tmp_path / "res.json"
    proc = run_cli(captioning_inference.main, *caption_args(cap, trained, out, "--images", images, "--annotations", path,
                                                            "--clipscore_model", flipped_clip, "--gallery", 4,
                                                            "--gallery_order", "worst"))
    assert proc.returncode == 0, proc.stderr
    record = json.load(open(tmp_path / "res.metrics.json"))
    results = json.load(open(out))
    data = json.load(open(path))
    refs = {im["id"]: [a["caption"] for a in data["annotations"] if a["image_id"] == im["id"]] for im in data["images"]}
    # Each domain scored as a corpus of its own by pycocoevalcap, called here directly.
    for name in DOMAINS:
        subset = [r for r in results if domain_of[r["image_id"]] == name]
        gts, res = tokenized(refs, subset)
        got = record["domains"][name]
        assert got["images"] == len(subset) == 2
        assert got["metrics"]["CIDEr"] == pytest.approx(Cider().compute_score(gts, res)[0], abs=1e-9)
        assert got["metrics"]["Bleu_1"] == pytest.approx(Bleu(4).compute_score(gts, res)[0][0], abs=1e-9)
    gts, res = tokenized(refs, results)
    cider, each = Cider().compute_score(gts, res)
    assert record["metrics"]["CIDEr"] == pytest.approx(cider, abs=1e-9)
    lines = proc.stdout.splitlines()
    table = lines[next(i for i, l in enumerate(lines) if l.startswith("nocaps caption metrics")):][:7]
    assert [l.split("|")[0].strip() for l in table[3:]] == ["overall (6)"] + [f"{d} (2)" for d in DOMAINS]
    assert "CLIP-S" in table[1] and "RefCLIP-S" in table[1]
    # CLIP-S and RefCLIP-S from the CLIP's own encoders, per image, per domain and overall.
    expected = dict(zip([r["image_id"] for r in results], reference_clip_scores(
        flipped_clip, [(os.path.join(images, next(im["file_name"] for im in data["images"] if im["id"] == r["image_id"])),
                       r["caption"], refs[r["image_id"]]) for r in results])))
    per_image = {row["image_id"]: row for row in record["per_image"]}
    for i, (c, ref) in expected.items():
        assert per_image[i]["CLIP-S"] == pytest.approx(c, abs=1e-5)
        assert per_image[i]["RefCLIP-S"] == pytest.approx(ref, abs=1e-5)
    mean = lambda xs: sum(xs) / len(xs)  # noqa: E731
    assert record["metrics"]["CLIP-S"] == pytest.approx(mean([c for c, _ in expected.values()]), abs=1e-5)
    assert record["metrics"]["RefCLIP-S"] == pytest.approx(mean([r for _, r in expected.values()]), abs=1e-5)
    for name in DOMAINS:
        assert record["domains"][name]["metrics"]["CLIP-S"] == pytest.approx(
            mean([c for i, (c, _) in expected.items() if domain_of[i] == name]), abs=1e-5)
    assert any(c > 0 for c, _ in expected.values())  # the flipped CLIP: not all clamped to 0
    assert record["clipscore"]["model"] == flipped_clip and record["clipscore"]["identity"].startswith("sha256:")
    # The gallery: the four lowest CIDEr (pycocoevalcap's own per-image scores) first.
    worst = [i for _, i in sorted(zip(each, gts))][:4]
    page = (tmp_path / "res.gallery.html").read_text()
    assert [int(x.split('"')[0]) for x in page.split('alt="image ')[1:]] == worst
    assert "lowest CIDEr" in page and "CLIP-S" in page


# --- Karpathy test splits scored from the file itself -------------------------------------------------

@pytest.mark.slow
def test_flickr30k_test_split_is_scored_from_its_own_references_and_clip_s_skips_cleanly(cap, trained, flipped_clip,
                                                                                        tmp_path, monkeypatch):
    from pycocoevalcap.cider.cider import Cider

    monkeypatch.setattr(clipscore, "CLIP_CACHE", str(tmp_path / "empty-cache"))  # ViT-B/32 not downloaded
    path, images, truth = write_karpathy(cap, tmp_path / "k", "flickr30k")
    out = tmp_path / "res.json"
    proc = run_cli(captioning_inference.main, *caption_args(cap, trained, out, "--images", images, "--karpathy_split",
                                                            path, "--split", "test"))
    assert proc.returncode == 0, proc.stderr
    skipped = [l for l in (proc.stdout + proc.stderr).splitlines() if "CLIP-S skipped" in l]
    assert len(skipped) == 1 and "ViT-B/32" in skipped[0] and "clip.load('ViT-B/32')" in skipped[0]
    results = json.load(open(out))
    record = json.load(open(tmp_path / "res.metrics.json"))
    assert "CLIP-S" not in record["metrics"] and "clipscore" not in record
    refs = {i: t[2] for i, t in truth.items()}
    gts, res = tokenized(refs, results)
    assert sorted(gts) == sorted(i for i, t in truth.items() if t[0] == "test")
    assert record["metrics"]["CIDEr"] == pytest.approx(Cider().compute_score(gts, res)[0], abs=1e-9)
    # The evaluate command with the same Karpathy file gives the same scores, and CLIP-S from --images.
    proc = run_cli(evaluation.main, "--results", out, "--karpathy_split", path, "--split", "test", "--images", images,
                   "--clipscore_model", flipped_clip, "--out", tmp_path / "again.json")
    assert proc.returncode == 0, proc.stderr
    again = json.load(open(tmp_path / "again.json"))
    assert {k: v for k, v in again["metrics"].items() if "CLIP" not in k} == record["metrics"]
    expected = reference_clip_scores(flipped_clip, [(truth[r["image_id"]][1], r["caption"], refs[r["image_id"]])
                                                   for r in results])
    assert again["metrics"]["CLIP-S"] == pytest.approx(sum(c for c, _ in expected) / len(expected), abs=1e-5)
    # A results file of another split's images: one line naming the file, nothing written.
    proc = run_cli(evaluation.main, "--results", out, "--karpathy_split", path, "--split", "val", "--out",
                   tmp_path / "val.json")
    assert proc.returncode == 2 and "do not know" in proc.stderr and not (tmp_path / "val.json").exists()


# --- CLIP-S on its own ----------------------------------------------------------------------------------

@pytest.mark.parametrize("which", ["random", "flipped"])
def test_clip_s_and_ref_clip_s_equal_the_formula_from_the_encoders_own_features(cap, flipped_clip, which):
    from llama_caption.data import load_coco

    clip_file = cap["clip"] if which == "random" else flipped_clip

    records = {r.image_id: r for r in load_coco(cap["images"], cap["ann"])}
    ids = sorted(records)
    # Captions of varied fit: each image's own, another image's, and one with no references.
    results = [{"image_id": i, "caption": records[ids[(k + k % 2) % len(ids)]].captions[k % 3]} for k, i in enumerate(ids)]
    records[ids[-1]].captions = []
    settings = clipscore.ClipScoreSettings(clipscore_model=clip_file)
    per_image, about = clipscore.compute(settings, results, records, "cpu")
    expected = reference_clip_scores(clip_file, [(records[r["image_id"]].path, r["caption"],
                                                  records[r["image_id"]].captions) for r in results])
    assert all(c == 0 for c, _ in expected) if which == "random" else all(c > 0 for c, _ in expected)
    for r, (c, ref) in zip(results, expected):
        assert per_image[r["image_id"]]["CLIP-S"] == pytest.approx(c, abs=1e-5)
        if ref is None:
            assert "RefCLIP-S" not in per_image[r["image_id"]]
        else:
            assert per_image[r["image_id"]]["RefCLIP-S"] == pytest.approx(ref, abs=1e-5)
    assert about["prefix"] == "A photo depicts " and about["weight"] == 2.5 and about["images"] == len(results)


def test_ref_clip_s_clips_the_reference_term_at_0_as_the_paper_defines_it():
    """Where every reference cosine is negative the authors' script gives a RefCLIP-S below 0;
    the paper's definition (ours) clips that term at 0, so the harmonic mean is 0."""
    caption = torch.tensor([1.0, 0.0])
    away = torch.tensor([[-0.6, 0.8], [-1.0, 0.0]])  # cosines -0.6 and -1
    assert clipscore.ref_clip_s(0.5, caption, away) == 0.0  # the script: 2*0.5*-0.6/(0.5-0.6) = 6.0
    near = torch.tensor([[0.6, 0.8], [-1.0, 0.0]])  # best cosine 0.6
    assert clipscore.ref_clip_s(0.5, caption, near) == pytest.approx(2 * 0.5 * 0.6 / 1.1)
    assert clipscore.ref_clip_s(0.0, caption, near) == 0.0


def test_clip_s_with_an_open_clip_model(cap, tmp_path):
    import open_clip

    from llama_caption.data import load_coco
    from llama_caption.tools.testing import build_tiny_open_clip

    text = {"context_length": 16, "vocab_size": 49408, "width": 64, "heads": 1, "layers": 1}
    config, weights = build_tiny_open_clip(str(tmp_path), "tiny-clips", {"image_size": 32, "layers": 1, "width": 64,
                                                                         "patch_size": 8}, seed=3, text_cfg=text)
    records = {r.image_id: r for r in load_coco(cap["images"], cap["ann"])}
    results = [{"image_id": i, "caption": r.captions[0]} for i, r in records.items()]
    settings = clipscore.ClipScoreSettings(clipscore_model="open_clip:" + config, clipscore_pretrained=weights)
    per_image, about = clipscore.compute(settings, results, records, "cpu")
    model, _, preprocess = open_clip.create_model_and_transforms("tiny-clips", pretrained=weights)
    tokenizer = open_clip.get_tokenizer("tiny-clips")
    model.eval()
    with torch.no_grad():
        for r in results:
            image = model.encode_image(preprocess(Image.open(records[r["image_id"]].path).convert("RGB"))[None])[0]
            text = model.encode_text(tokenizer(["A photo depicts " + r["caption"]]))[0]
            cos = float(image @ text / (image.norm() * text.norm()))
            assert per_image[r["image_id"]]["CLIP-S"] == pytest.approx(2.5 * max(cos, 0), abs=1e-5)
    assert about["identity"].startswith("open_clip:tiny-clips+sha256:")


def test_clip_s_model_not_in_the_cache_is_skipped_in_one_line(cap, tmp_path, monkeypatch):
    monkeypatch.setattr(clipscore, "CLIP_CACHE", str(tmp_path))
    said = []
    settings = clipscore.ClipScoreSettings()
    assert settings.clipscore_model == "ViT-B/32"
    assert clipscore.compute(settings, [], {}, "cpu", log=said.append) is None
    assert len(said) == 1 and said[0].startswith("CLIP-S skipped: ViT-B/32 is not in") and "clip.load" in said[0]
    with pytest.raises(UserError, match="--clipscore_model 'ViT-B/99'"):
        clipscore.ClipScoreSettings(clipscore_model="ViT-B/99")
    with pytest.raises(UserError, match="--clipscore_pretrained"):
        clipscore.ClipScoreSettings(clipscore_model="open_clip:ViT-B-32")


# --- the gallery ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("order,key", [("worst", "CIDEr"), ("worst_clip_s", "CLIP-S")])
def test_gallery_shows_the_worst_captions_first_with_their_scores(cap, tmp_path, order, key):
    from llama_caption.data import load_coco

    records = {r.image_id: r for r in load_coco(cap["images"], cap["ann"])}
    results = [{"image_id": i, "caption": f"caption {i}"} for i in sorted(records)]
    values = [0.7, 0.1, 0.5, 0.1, 0.9, 0.3]
    per_image = {r["image_id"]: {"CIDEr": v, "CLIP-S": 1 - v} for r, v in zip(results, values)}
    shown = write_gallery(str(tmp_path / "g.html"), results, records, 3, per_image, order)
    page = (tmp_path / "g.html").read_text()
    got = [int(x.split('"')[0]) for x in page.split('alt="image ')[1:]]
    ranked = sorted(per_image, key=lambda i: (per_image[i][key], i))
    assert shown == 3 and got == ranked[:3]
    assert f"{key} {per_image[got[0]][key] * 100:.1f}" in page


def test_worst_gallery_needs_scores(cap, trained, tmp_path):
    out = tmp_path / "res.json"
    proc = run_cli(captioning_inference.main, *caption_args(cap, trained, out, "--images", cap["val_images"],
                                                            "--gallery", 2, "--gallery_order", "worst"))
    assert proc.returncode == 2 and "--gallery_order worst" in proc.stderr and not out.exists()


# --- the dashboard --------------------------------------------------------------------------------------

def test_tensorboard_dashboard_logs_what_metrics_jsonl_logs_and_captions(cap, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run = tmp_path / "run"
    proc = run_cli(captioning_training.main, "--ckpt_dir", cap["ckpt_dir"], "--tokenizer_path", cap["tokenizer"],
                   "--clip_model", cap["clip"], "--train_images", cap["images"], "--train_annotations", cap["ann"],
                   "--val_images", cap["val_images"], "--val_annotations", cap["val_ann"], "--out_dir", run,
                   "--num_workers", 0, "--epochs", 2, "--batch_size", 4, "--warmup_steps", 1, "--log_every", 1,
                   "--report_to", "tensorboard", "--report_captions", 2)
    assert proc.returncode == 0, proc.stderr
    rows = [json.loads(l) for l in open(run / "metrics.jsonl")]
    events = EventAccumulator(str(run / "tensorboard"), size_guidance={"scalars": 0, "tensors": 0}).Reload()
    for key, tag in (("loss", "train/loss"), ("lr", "train/lr"), ("samples_per_s", "train/samples_per_s"),
                     ("val_loss", "val/loss")):
        want = [(r["step"], r[key]) for r in rows if key in r]
        got = [(e.step, e.value) for e in events.Scalars(tag)]
        assert len(want) >= 2 and [s for s, _ in got] == [s for s, _ in want]
        assert [v for _, v in got] == pytest.approx([v for _, v in want], rel=1e-6)
    texts = events.Tensors("val/captions/text_summary")
    assert [t.step for t in texts] == [r["step"] for r in rows if "val_loss" in r]
    table = texts[-1].tensor_proto.string_val[0].decode()
    val = json.load(open(cap["val_ann"]))
    first = sorted(im["id"] for im in val["images"])[:2]
    assert [int(line.split("|")[1]) for line in table.splitlines()[2:]] == first
    assert next(a["caption"] for a in val["annotations"] if a["image_id"] == first[0]) in table
    assert (run / "loss_curve.png").exists()


def test_a_dashboard_whose_package_is_missing_is_refused_before_any_work(cap, tmp_path):
    import importlib.util

    if importlib.util.find_spec("wandb") is not None:
        pytest.skip("wandb is installed")
    proc = run_cli(captioning_training.main, "--ckpt_dir", cap["ckpt_dir"], "--clip_model", cap["clip"],
                   "--train_images", cap["images"], "--train_annotations", cap["ann"], "--out_dir", tmp_path / "run",
                   "--report_to", "wandb")
    assert proc.returncode == 2 and "pip install wandb" in proc.stderr and not (tmp_path / "run").exists()
