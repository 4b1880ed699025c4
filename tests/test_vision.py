"""open_clip encoders beside the `clip` package's: tiny models from registered configs, saved to
files and loaded back by path (no download)."""

import json
import os

import pytest
import torch
from PIL import Image

import captioning_inference
import captioning_training
from conftest import run_cli
from llama_caption.captioner import load_projection
from llama_caption.errors import UserError
from llama_caption.features import FeatureCache, FeaturesConfig, extract
from llama_caption.runs import find_checkpoint
from llama_caption.tools.testing import build_tiny_open_clip
from llama_caption.vision import EncoderSpec, load_encoder

open_clip = pytest.importorskip("open_clip")

VIT = {"image_size": 32, "layers": 3, "width": 64, "patch_size": 8}
TIMM = {"timm_model_name": "test_vit", "timm_model_pretrained": False, "timm_pool": "avg", "timm_proj": "linear",
        "image_size": 160}


@pytest.fixture(scope="module")
def oc(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("open_clip"))
    vit_cfg, vit_w = build_tiny_open_clip(root, "tiny-oc-vit", VIT, seed=0)
    _, vit_w2 = build_tiny_open_clip(root, "tiny-oc-vit", VIT, seed=1)
    timm_cfg, timm_w = build_tiny_open_clip(root, "tiny-oc-timm", TIMM, seed=0)
    return {"vit": (vit_cfg, vit_w), "vit_other": (vit_cfg, vit_w2), "timm": (timm_cfg, timm_w)}


def spec(oc, which, kind="pooled", layer=-2):
    cfg, weights = oc[which]
    return EncoderSpec.of("open_clip:" + cfg, kind, layer, weights)


def reference(oc, which):
    """open_clip's own model and preprocessing for the same files."""
    cfg, weights = oc[which]
    open_clip.add_model_config(cfg)
    model, _, preprocess = open_clip.create_model_and_transforms(os.path.splitext(os.path.basename(cfg))[0],
                                                                 pretrained=weights)
    return model.eval(), preprocess


def pictures(cap, n=3):
    names = sorted(os.listdir(cap["images"]))[:n]
    return [Image.open(os.path.join(cap["images"], f)).convert("RGB") for f in names]


@pytest.mark.parametrize("which", ["vit", "timm"])
def test_pooled_features_equal_open_clips_encode_image(oc, cap, which):
    encoder = load_encoder(spec(oc, which))
    model, preprocess = reference(oc, which)
    images = pictures(cap)
    ours = torch.stack([encoder.preprocess(im) for im in images])
    torch.testing.assert_close(ours, torch.stack([preprocess(im) for im in images]))  # the model's own transform
    size = 32 if which == "vit" else 160
    assert ours.shape[-2:] == (size, size)
    with torch.no_grad():
        torch.testing.assert_close(encoder(ours), model.encode_image(ours), rtol=1e-5, atol=1e-5)
    assert encoder.feature_shape == (32,)


@pytest.mark.parametrize("which, grid, width", [("vit", 16, 64), ("timm", 100, 64)])
def test_patch_tokens_are_the_chosen_blocks_output_without_class_tokens(oc, cap, which, grid, width):
    encoder = load_encoder(spec(oc, which, "patch", -2))
    assert encoder.feature_shape == (grid, width)
    images = torch.stack([encoder.preprocess(im) for im in pictures(cap, 2)])
    feats = encoder(images)
    assert feats.shape == (2, grid, width)
    # Independently: a hook on the penultimate block of open_clip's own model, run end to end.
    model, _ = reference(oc, which)
    blocks = model.visual.trunk.blocks if which == "timm" else model.visual.transformer.resblocks
    seen = []
    blocks[-2].register_forward_hook(lambda m, i, o: seen.append(o))
    with torch.no_grad():
        model.encode_image(images)
    prefix = model.visual.trunk.num_prefix_tokens if which == "timm" else 1
    out = seen[0] if which == "timm" or model.visual.transformer.batch_first else seen[0].transpose(0, 1)
    torch.testing.assert_close(feats, out[:, prefix:], rtol=1e-5, atol=1e-5)


def test_identity_records_the_weights_and_caches_refuse_another_encoder(oc, cap, process_group, tmp_path):
    a, b = spec(oc, "vit"), spec(oc, "vit_other")
    assert a.identity != b.identity and a.identity.startswith("open_clip:tiny-oc-vit+sha256:")
    # The same config and weights named by another path are the same encoder.
    moved = tmp_path / "moved.bin"
    moved.write_bytes(open(oc["vit"][1], "rb").read())
    assert EncoderSpec.of(a.clip_model, pretrained=str(moved)).identity == a.identity
    out = tmp_path / "feats"
    extract(FeaturesConfig(clip_model=a.clip_model, clip_pretrained=a.pretrained, images=cap["images"],
                           annotations=cap["ann"], out=str(out), num_workers=0, batch_size=4))
    cache = FeatureCache(str(out))
    cache.check(a)
    with pytest.raises(UserError, match="extract the features again"):
        cache.check(b)


def test_bad_encoder_flags_are_one_line_errors(oc, cap, tmp_path):
    cfg, weights = oc["vit"]
    base = ["--ckpt_dir", cap["ckpt_dir"], "--tokenizer_path", cap["tokenizer"], "--train_images", cap["images"],
            "--train_annotations", cap["ann"], "--num_workers", 0]
    for extra, message in (
            (["--clip_model", "open_clip:" + cfg], "needs --clip_pretrained"),
            (["--clip_model", "open_clip:" + cfg, "--clip_pretrained", tmp_path / "missing.bin"],
             "--clip_pretrained " + str(tmp_path / "missing.bin") + " is neither a file nor a pretrained tag"),
            (["--clip_model", "open_clip:NoSuchArch", "--clip_pretrained", weights], "open_clip has no model"),
            (["--clip_model", cap["clip"], "--clip_pretrained", weights], "--clip_pretrained is for --clip_model open_clip")):
        proc = run_cli(captioning_training.main, *base, *extra, "--out_dir", tmp_path / "run")
        lines = proc.stderr.strip().splitlines()
        assert proc.returncode == 2 and len(lines) == 1 and message in lines[0], proc.stderr


@pytest.mark.parametrize("which, kind", [("vit", "pooled"), ("timm", "patch")])
def test_training_and_inference_with_an_open_clip_encoder(oc, cap, process_group, tmp_path, which, kind):
    cfg, weights = oc[which]
    run = tmp_path / "run"
    proc = run_cli(captioning_training.main, "--ckpt_dir", cap["ckpt_dir"], "--tokenizer_path", cap["tokenizer"],
                   "--clip_model", "open_clip:" + cfg, "--clip_pretrained", weights, "--feature_kind", kind,
                   "--train_images", cap["images"], "--train_annotations", cap["ann"], "--out_dir", run,
                   "--num_workers", 0, "--epochs", 2, "--batch_size", 4, "--projection", "linear")
    assert proc.returncode == 0, proc.stderr[-2000:]
    _, trained, _ = load_projection(find_checkpoint(str(run)))
    # Pooled: --prefix_len (10) tokens; patch: one per patch of the timm tower's 10x10 grid.
    assert trained.prefix_len == (10 if kind == "pooled" else 100) and trained.encoder.pretrained == weights
    out = tmp_path / "res.json"
    proc = run_cli(captioning_inference.main, "--ckpt_dir", cap["ckpt_dir"], "--tokenizer_path", cap["tokenizer"],
                   "--checkpoint", run, "--images", cap["val_images"], "--annotations", cap["val_ann"], "--out", out,
                   "--num_workers", 0, "--evaluate", False, "--max_gen_len", 5)
    assert proc.returncode == 0, proc.stderr[-2000:]
    results = json.load(open(out))
    assert len(results) == 3 and all(isinstance(r["caption"], str) for r in results)
    made_by = json.load(open(tmp_path / "res.run.json"))
    assert made_by["clip"] == spec(oc, which).identity


def test_the_encoders_table_reports_what_the_encoders_give(oc):
    from llama_caption.tools.bench import encoder_bench

    rows = encoder_bench(["tiny-oc-vit", "tiny-oc-timm"], 2, lambda m: None)
    assert rows["tiny-oc-vit"]["patch_tokens"] == 16 and rows["tiny-oc-vit"]["patch_width"] == 64
    assert rows["tiny-oc-timm"]["patch_tokens"] == 100 and rows["tiny-oc-timm"]["image_size"] == [160, 160]
    assert all(r["pooled_dim"] == 32 and r["ms_per_image"] > 0 for r in rows.values())
