"""open_clip encoders beside the `clip` package's: tiny models from registered configs, saved to
files and loaded back by path (no download)."""

import json
import os
import shutil

import pytest
import torch
from PIL import Image

import captioning_inference
import captioning_training
from conftest import run_cli
from llama_caption.captioner import PROJECTION_FILE, CaptionerConfig, CaptionStyle, load_projection, save_projection
from llama_caption.errors import UserError
from llama_caption.features import FeatureCache, FeaturesConfig, extract
from llama_caption.fileio import sha256_file
from llama_caption.runs import find_checkpoint
from llama_caption.tools.testing import build_tiny_open_clip
from llama_caption.vision import CONFIG_PART, EncoderSpec, canonical_sha256, load_encoder, same_encoder

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


@pytest.fixture(scope="module")
def oc_quick(oc, tmp_path_factory):
    """Another config named tiny-oc-vit.json, for the same weights: QuickGELU, as OpenAI's CLIP
    weights need and open_clip's plain configs lack (same shapes, other features)."""
    with open(oc["vit"][0]) as f:
        cfg = json.load(f)
    path = str(tmp_path_factory.mktemp("open_clip_quick") / "tiny-oc-vit.json")
    with open(path, "w") as f:
        json.dump(dict(cfg, quick_gelu=True), f)
    return path


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


def test_identity_records_the_weights_and_caches_refuse_another_encoder(oc, oc_quick, cap, process_group, tmp_path):
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
    # Another config of the same name, with the same weights, is another encoder too.
    quick = EncoderSpec.of("open_clip:" + oc_quick, pretrained=a.pretrained)
    with pytest.raises(UserError, match="extract the features again"):
        cache.check(quick)


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
@pytest.mark.slow
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


def test_the_model_config_is_part_of_an_open_clip_identity(oc, oc_quick, cap, tmp_path):
    cfg, weights = oc["vit"]
    a = EncoderSpec.of("open_clip:" + cfg, pretrained=weights)
    quick = EncoderSpec.of("open_clip:" + oc_quick, pretrained=weights)
    prefix = f"open_clip:tiny-oc-vit+sha256:{sha256_file(weights)}{CONFIG_PART}"
    assert a.identity == prefix + canonical_sha256(json.load(open(cfg)))
    assert quick.identity.startswith(prefix) and quick.identity != a.identity
    # The difference is real: the same weights give other features under the other config.
    images = torch.stack([load_encoder(a).preprocess(im) for im in pictures(cap, 2)])
    assert not torch.allclose(load_encoder(a)(images), load_encoder(quick)(images), atol=1e-4)
    # The same config written another way (key order, spacing) is the same encoder.
    relaid = tmp_path / "relaid" / "tiny-oc-vit.json"
    relaid.parent.mkdir()
    relaid.write_text(json.dumps(dict(reversed(list(json.load(open(cfg)).items()))), indent=3))
    assert EncoderSpec.of(f"open_clip:{relaid}", pretrained=weights).identity == a.identity
    # A built-in name: the config open_clip holds for it.
    builtin = EncoderSpec.of("open_clip:ViT-B-32", pretrained="openai")
    assert builtin.identity == "open_clip:ViT-B-32+openai" + CONFIG_PART + \
        canonical_sha256(open_clip.get_model_config("ViT-B-32"))


def test_an_identity_recorded_before_the_config_was_part_of_it_is_accepted(oc, oc_quick):
    cfg, weights = oc["vit"]
    new = EncoderSpec.of("open_clip:" + cfg, pretrained=weights).identity
    old = new.partition(CONFIG_PART)[0]  # what caches and checkpoints recorded before
    assert old == f"open_clip:tiny-oc-vit+sha256:{sha256_file(weights)}"
    assert same_encoder(old, new) and same_encoder(new, new)
    # The old form never said which config: any config of that name and those weights matches it.
    assert same_encoder(old, EncoderSpec.of("open_clip:" + oc_quick, pretrained=weights).identity)
    # Not the rest: other weights, a recorded config that differs, a recorded config part the
    # current identity lacks, other `clip` files.
    other = EncoderSpec.of("open_clip:" + cfg, pretrained=oc["vit_other"][1]).identity
    assert not same_encoder(old, other)
    assert not same_encoder(new, EncoderSpec.of("open_clip:" + oc_quick, pretrained=weights).identity)
    assert not same_encoder(new, old)
    assert not same_encoder("sha256:" + "0" * 64, "sha256:" + "1" * 64)


def write_checkpoint(folder, encoder: EncoderSpec) -> str:
    """A checkpoint of an untrained linear projection (2 prefix tokens) from `encoder`'s 32-wide
    features to the cap fixture's 64-wide LLaMA."""
    captioner = CaptionerConfig.build(encoder, (32,), "linear", 2, None, 64, CaptionStyle())
    torch.manual_seed(0)
    os.makedirs(folder)
    save_projection(os.path.join(folder, PROJECTION_FILE), captioner.new_projection().state_dict(), captioner,
                    {"clip_model": encoder.clip_model, "clip_pretrained": encoder.pretrained})
    return str(folder)


def caption_args(cap, ckpt, out, *extra):
    return ["--ckpt_dir", cap["ckpt_dir"], "--tokenizer_path", cap["tokenizer"], "--checkpoint", ckpt,
            "--images", cap["val_images"], "--out", out, "--num_workers", 0, "--max_gen_len", 3, *extra]


def test_a_checkpoint_refuses_another_config_of_the_same_name(oc, oc_quick, cap, process_group, tmp_path):
    cfg, weights = oc["vit"]
    own = tmp_path / "config" / "tiny-oc-vit.json"  # a copy: it is rewritten below
    own.parent.mkdir()
    shutil.copy(cfg, own)
    trained = EncoderSpec.of(f"open_clip:{own}", pretrained=weights)
    ckpt = write_checkpoint(tmp_path / "ckpt", trained)
    proc = run_cli(captioning_inference.main, *caption_args(cap, ckpt, tmp_path / "a.json"))
    assert proc.returncode == 0, proc.stderr[-2000:]
    # The other config named (as files that moved would be): refused, both identities in full.
    quick = EncoderSpec.of("open_clip:" + oc_quick, pretrained=weights)
    proc = run_cli(captioning_inference.main, *caption_args(cap, ckpt, tmp_path / "b.json", "--clip_model",
                                                            "open_clip:" + oc_quick, "--clip_pretrained", weights))
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1, proc.stderr
    assert f"({trained.identity})" in lines[0] and f"({quick.identity})" in lines[0]
    assert not (tmp_path / "b.json").exists()
    # The recorded config file rewritten with the other content: refused when the encoder loads.
    shutil.copy(oc_quick, own)
    proc = run_cli(captioning_inference.main, *caption_args(cap, ckpt, tmp_path / "c.json"))
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1, proc.stderr
    assert lines[0] == (f"error: image encoder open_clip:{own} with weights {weights} has changed: its files now "
                        f"give identity {quick.identity}, not the recorded {trained.identity}: restore the config "
                        f"and weights it was made with")
    assert not (tmp_path / "c.json").exists()


def test_a_checkpoint_recorded_without_the_config_still_captions(oc, cap, process_group, tmp_path):
    cfg, weights = oc["vit"]
    current = EncoderSpec.of("open_clip:" + cfg, pretrained=weights)
    old = EncoderSpec(current.clip_model, current.identity.partition(CONFIG_PART)[0], pretrained=weights)
    ckpt = write_checkpoint(tmp_path / "ckpt", old)
    proc = run_cli(captioning_inference.main, *caption_args(cap, ckpt, tmp_path / "a.json"))
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert len(json.load(open(tmp_path / "a.json"))) == 3
    assert json.load(open(tmp_path / "a.run.json"))["clip"] == old.identity


def test_a_feature_cache_recorded_without_the_config_is_still_accepted(oc, tmp_path):
    cfg, weights = oc["vit"]
    current = EncoderSpec.of("open_clip:" + cfg, pretrained=weights)
    meta = dict(current.cache_meta(), clip_identity=current.identity.partition(CONFIG_PART)[0], count=0, shape=[32])
    (tmp_path / "meta.json").write_text(json.dumps(meta))
    FeatureCache(str(tmp_path)).check(current)


def test_a_checkpoint_recorded_without_the_config_accepts_its_moved_files(oc, cap, process_group, tmp_path):
    cfg, weights = oc["vit"]
    current = EncoderSpec.of("open_clip:" + cfg, pretrained=weights)
    old = EncoderSpec("open_clip:" + str(tmp_path / "gone.json"), current.identity.partition(CONFIG_PART)[0],
                      pretrained=str(tmp_path / "gone.bin"))
    ckpt = write_checkpoint(tmp_path / "ckpt", old)
    proc = run_cli(captioning_inference.main, *caption_args(cap, ckpt, tmp_path / "a.json", "--clip_model",
                                                            "open_clip:" + cfg, "--clip_pretrained", weights))
    assert proc.returncode == 0, proc.stderr[-2000:]


@pytest.mark.parametrize("content, problem", [
    (b'{"embed_dim": 32,', "is not valid JSON (line 1 column 18: Expecting property name enclosed in double quotes)"),
    (b"[1, 2]", "holds a JSON list, not an object"),
    (b"\xff\xfe{}", "is not UTF-8 text"),
    (json.dumps({"embed_dim": 32, "text_cfg": {}}).encode(), "is not an open_clip model config: it has no vision_cfg"),
    (json.dumps({"vision_cfg": {}}).encode(), "it has no embed_dim and no text_cfg"),
    (json.dumps({"embed_dim": 32, "vision_cfg": 5, "text_cfg": {}}).encode(), "vision_cfg must be a JSON object, got 5"),
    (json.dumps({"embed_dim": "32", "vision_cfg": {}, "text_cfg": {}}).encode(), "embed_dim must be a positive whole number"),
])
def test_a_malformed_open_clip_config_is_one_line_naming_the_file(oc, cap, tmp_path, content, problem):
    path = tmp_path / "bad-oc.json"
    path.write_bytes(content)
    with pytest.raises(UserError, match="^--clip_model open_clip:") as e:
        EncoderSpec.of(f"open_clip:{path}", pretrained=oc["vit"][1])
    assert str(path) in str(e.value) and problem in str(e.value)
    proc = run_cli(captioning_training.main, "--ckpt_dir", cap["ckpt_dir"], "--tokenizer_path", cap["tokenizer"],
                   "--train_images", cap["images"], "--train_annotations", cap["ann"], "--num_workers", 0,
                   "--clip_model", f"open_clip:{path}", "--clip_pretrained", oc["vit"][1], "--out_dir", tmp_path / "run")
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1 and str(path) in lines[0] and problem in lines[0], proc.stderr
    assert "built-ins" not in proc.stderr and not (tmp_path / "run").exists()


def test_a_local_dir_config_without_model_cfg_is_one_line(oc, tmp_path):
    (tmp_path / "open_clip_config.json").write_text(json.dumps({"embed_dim": 32}))
    with pytest.raises(UserError, match=f"{tmp_path / 'open_clip_config.json'} has no model_cfg object"):
        EncoderSpec.of(f"open_clip:local-dir:{tmp_path}")
