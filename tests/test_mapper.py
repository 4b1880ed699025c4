"""The transformer mapper (--projection transformer): a fixed prefix from pooled or patch features,
gradients only in the mapper, and a trained mapper that captions through captioning_inference.py."""

import json

import torch

from conftest import run_cli
from llama_caption.captioner import Captioner, CaptionerConfig, CaptionStyle
from llama_caption.llama.checkpoint import load_llama
from llama_caption.vision import EncoderSpec


def spec_for(kind, shape, prefix_len=4):
    enc = EncoderSpec("clip.pt", "sha256:x", kind, None if kind == "pooled" else -2)
    return CaptionerConfig.build(enc, shape, "transformer", prefix_len, None, 64, CaptionStyle(), mapper_width=64,
                                 mapper_layers=2)


def test_mapper_makes_prefix_len_tokens_from_pooled_and_patch_features():
    pooled = spec_for("pooled", (32,))
    patch = spec_for("patch", (49, 48))
    assert pooled.prefix_len == patch.prefix_len == 4  # not one token per patch
    torch.manual_seed(0)
    p = pooled.new_projection()
    assert p(torch.randn(3, 32)).shape == (3, 4, 64)
    q = patch.new_projection()
    out = q(torch.randn(3, 49, 48))
    assert out.shape == (3, 4, 64)
    # Every patch reaches the prefix: changing one patch changes the output.
    x = torch.randn(1, 49, 48)
    y = x.clone()
    y[0, 30] += 1.0
    assert not torch.allclose(q(x), q(y))
    # Through a saved-and-read config, the same module shape.
    again = CaptionerConfig.from_dict(json.loads(json.dumps(patch.to_dict())))
    assert again == patch
    assert {k: v.shape for k, v in again.new_projection().state_dict().items()} == \
        {k: v.shape for k, v in q.state_dict().items()}


def test_gradients_reach_only_the_mapper(assets, process_group):
    llama, tok = load_llama(assets["tiny"], assets["tokenizer"], max_seq_len=32)
    spec = spec_for("patch", (9, 48))
    cap = Captioner(llama, tok, spec.new_projection())
    loss, n = cap.caption_loss(torch.randn(2, 9, 48), ["a red cat on the tree", "the blue dog"])
    loss.backward()
    assert n > 0 and all(p.grad is not None and p.grad.abs().sum() > 0 for p in cap.projection.parameters())
    assert all(p.grad is None and not p.requires_grad for p in llama.parameters())


def test_trained_mapper_captions_through_inference(cap, tmp_path):
    import captioning_inference
    import captioning_training

    run = tmp_path / "run"
    proc = run_cli(captioning_training.main, "--ckpt_dir", cap["ckpt_dir"], "--tokenizer_path", cap["tokenizer"],
                   "--clip_model", cap["clip"], "--train_images", cap["images"], "--train_annotations", cap["few"],
                   "--out_dir", run, "--num_workers", 0, "--epochs", 2, "--batch_size", 4,
                   "--projection", "transformer", "--mapper_width", 64, "--mapper_layers", 1, "--prefix_len", 4)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "projection transformer (" in proc.stderr  # the parameter count is printed at start
    out = tmp_path / "res.json"
    proc = run_cli(captioning_inference.main, "--ckpt_dir", cap["ckpt_dir"], "--tokenizer_path", cap["tokenizer"],
                   "--checkpoint", run, "--images", cap["val_images"], "--out", out, "--num_workers", 0,
                   "--max_gen_len", 6)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert len(json.load(open(out))) == 3
