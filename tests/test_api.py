"""The Python API (`llama_caption.load`) and several captioners over one frozen LLaMA.

Every caption is compared with what `caption` (captioning_inference.py) writes offline for the
same images, or with the captioner opened alone.
"""

import json
import os
import subprocess
import sys

import pytest
import torch
from PIL import Image
from safetensors import safe_open
from safetensors.torch import save_file

import llama_caption
from conftest import REPO
from llama_caption.errors import UserError
from llama_caption.llama.decoding import Decoding
from llama_caption.opening import caption_parts, named_checkpoints, run_name

def opened(cap, checkpoint, **settings):
    return llama_caption.load(cap["ckpt_dir"], checkpoint, tokenizer_path=cap["tokenizer"], device="cpu",
                              batch_size=4, **settings)


@pytest.fixture(scope="module")
def both(cap, trained, other, process_group):
    return opened(cap, {"coco": trained, "moved": other})


def photo_names(photos):
    return sorted(os.listdir(photos))[:4]


def test_paths_pil_images_bytes_and_tensors_are_captioned_as_caption_writes(both, photos, offline):
    names = photo_names(photos)
    paths = [os.path.join(photos, n) for n in names]
    expected = [offline["captions"][n] for n in names]
    assert both.caption(paths) == expected
    assert both.caption(paths[0]) == expected[0]  # one image: one caption, not a list
    assert both.caption([Image.open(p) for p in paths]) == expected
    assert both.caption([open(p, "rb").read() for p in paths]) == expected
    tensors = torch.stack([both.opened["coco"].preprocess(Image.open(p).convert("RGB")) for p in paths])
    assert both.caption(tensors) == expected
    assert both.caption(paths, model="coco") == expected
    # Batches of 4 at most: five images are two batches with the same captions.
    assert both.caption(paths + paths[:1]) == expected + expected[:1]


def test_a_caption_s_score_is_its_mean_token_log_probability(both, photos):
    """The score equals what the training loss (another code path: Captioner.loss, over the caption
    re-tokenized and its end token) says of the same caption."""
    paths = [os.path.join(photos, n) for n in photo_names(photos)]
    scored = both.caption(paths, scores=True)
    op = both.opened["coco"]
    feats = op.encoder(torch.stack([op.preprocess(Image.open(p).convert("RGB")) for p in paths]))
    for i, s in enumerate(scored):
        assert s["caption"] == both.caption(paths[i])
        ids = op.captioner.caption_ids([s["caption"]])
        total, count = op.captioner.loss(feats[i:i + 1], ids)
        assert count == len(ids[0]) + 1
        assert s["logprob"] == pytest.approx(-float(total) / count, abs=1e-4)
        assert s["logprob"] < 0
    # A caption cut at max_gen_len has no end-token target: its mean is over its tokens alone.
    cut = both.caption(paths[0], max_gen_len=2, scores=True)
    ids = op.captioner.caption_ids([cut["caption"]])[0]
    assert len(ids) == 2
    bos = op.captioner.tokenizer.bos_id
    logits = op.captioner.llama(embeddings=torch.cat([op.captioner.prefix(feats[:1]),
                                                      op.captioner.llama.embed(torch.tensor([[bos, ids[0]]]))], 1))
    P = op.captioner.prefix_len  # positions P and P+1 predict the caption's two tokens
    logp = torch.log_softmax(logits[0, P:P + 2].float(), -1)
    assert cut["logprob"] == pytest.approx(float((logp[0, ids[0]] + logp[1, ids[1]]) / 2), abs=1e-4)


def test_several_captioners_share_one_llama_and_each_captions_as_it_does_alone(cap, both, trained, other, photos,
                                                                            offline):
    a, b = both.opened["coco"], both.opened["moved"]
    assert a.captioner.llama is b.captioner.llama and a.captioner.decoder is b.captioner.decoder
    assert a.encoder is b.encoder  # one CLIP, loaded once
    assert a.captioner.projection is not b.captioner.projection
    paths = [os.path.join(photos, n) for n in sorted(os.listdir(photos))]
    alone = opened(cap, other)
    moved = alone.caption(paths)
    assert both.caption(paths, model="moved") == moved
    assert moved != [offline["captions"][os.path.basename(p)] for p in paths]  # another captioner indeed
    # One batch holding both captioners' images: each caption is its captioner's alone.
    px = torch.stack([a.preprocess(Image.open(p).convert("RGB")) for p in paths])
    mixed = caption_parts([(b, px[:4]), (a, px[4:]), (b, px[4:])], Decoding(max_gen_len=30))
    texts = [c.text for c in mixed]
    assert texts == moved[:4] + [offline["captions"][os.path.basename(p)] for p in paths[4:]] + moved[4:]
    assert both.names == ["coco", "moved"] and "coco" in repr(both)


def test_bad_input_gets_one_line(cap, both, trained, other, photos, tmp_path):
    one = os.path.join(photos, photo_names(photos)[0])
    with pytest.raises(UserError, match=r"model 'nope' is not loaded: the captioners are coco, moved"):
        both.caption(one, model="nope")
    with pytest.raises(TypeError, match=r"unknown setting 'beams'"):
        both.caption(one, beams=2)
    with pytest.raises(UserError, match=r"temperature must be"):
        both.caption(one, temperature=-1)
    with pytest.raises(UserError, match=r"max_gen_len must be between 1 and 30 \(load\(\)'s max_gen_len"):
        both.caption(one, max_gen_len=31)
    with pytest.raises(UserError, match=r"missing.jpg is not an image that can be read"):
        both.caption(str(tmp_path / "missing.jpg"))
    (tmp_path / "empty.jpg").write_bytes(b"")
    with pytest.raises(UserError, match=r"empty.jpg is not an image"):
        both.caption([str(tmp_path / "empty.jpg")])
    with pytest.raises(UserError, match=r"image 0 is not an image"):
        both.caption(b"not an image")
    with pytest.raises(TypeError, match=r"image 0 is a int: give a file path, a PIL image"):
        both.caption([3])
    with pytest.raises(UserError, match=r"no images"):
        both.caption([])
    # Tensors: the preprocessing's shape, finite values; a NaN call leaves the next one unharmed.
    good = both.opened["coco"].preprocess(Image.open(one).convert("RGB"))
    with pytest.raises(UserError, match=r"image 0 is a tensor of shape \(3, 64, 64\): this captioner takes \(3, 32, 32\)"):
        both.caption(torch.zeros(3, 64, 64))
    with pytest.raises(UserError, match=r"image 0 is a tensor of shape \(1, 1, 3, 32, 32\)"):
        both.caption(torch.zeros(1, 1, 3, 32, 32))
    with pytest.raises(UserError, match=r"image 1 is a tensor with NaN or infinite values"):
        both.caption([good, torch.full_like(good, float("nan"))])
    assert both.caption(good) == both.caption(one)
    with pytest.raises(TypeError, match=r"scores must be True or False, got 'no'"):
        both.caption(one, scores="no")
    assert both.caption(one, temperature="0.7", seed=None) == both.caption(one, temperature=0.7)  # as a request reads them
    with pytest.raises(UserError, match=r"checkpoint must be a run folder, a list of them or \{name: folder\}, got int"):
        llama_caption.load(cap["ckpt_dir"], 5)
    with pytest.raises(TypeError, match=r"unknown setting 'chekpoint'"):
        llama_caption.load(cap["ckpt_dir"], trained, chekpoint="x")
    with pytest.raises(UserError, match=r"names the captioner 'x' twice"):
        named_checkpoints([f"x={trained}", f"x={other}"])
    with pytest.raises(UserError, match=r"names the captioner 'run' twice"):
        named_checkpoints(f"{trained},{trained}")
    with pytest.raises(UserError, match=r"'a b' is not a captioner name"):
        named_checkpoints(f"a b={trained}")
    with pytest.raises(UserError, match=r"names no trained run"):
        named_checkpoints([])
    assert named_checkpoints(f"{trained},m={other}") == {"run": trained, "m": other}
    assert run_name(os.path.join(trained, "checkpoints", "step-0000005")) == "run"
    with pytest.raises(UserError, match=r"--quantize 'int3' must be one of"):
        opened(cap, trained, quantize="int3")
    not_a_run = tmp_path / "not_a_run"
    not_a_run.mkdir()
    with pytest.raises(UserError, match=str(not_a_run)):
        opened(cap, {"a": trained, "b": str(not_a_run)})


def test_a_run_trained_on_another_llama_is_refused_by_its_recorded_architecture(cap, trained, tmp_path):
    """Training records the LLaMA's architecture in the checkpoint: a run made on another LLaMA is
    refused at load even when the LLaMA's folder is gone (its flags' ckpt_dir names nothing)."""
    import shutil

    run = tmp_path / "elsewhere"
    shutil.copytree(trained, run)
    ckpt = run / "checkpoints" / (run / "checkpoints" / "latest").read_text().strip()
    path = str(ckpt / "projection.safetensors")
    with safe_open(path, "pt") as f:
        meta, weights = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}
    spec = json.loads(meta["captioner"])
    assert spec["llama_architecture"][0] == 64  # recorded by training: width, layers, heads, kv heads, vocabulary
    spec["llama_architecture"][1] += 2  # two more layers
    flags = dict(json.loads(meta["config"]), ckpt_dir=str(tmp_path / "gone"))
    save_file(weights, path, metadata=dict(meta, captioner=json.dumps(spec), config=json.dumps(flags)))
    with pytest.raises(UserError, match=r"trained with another LLaMA than the one in --ckpt_dir .* \(layers 4 against 2\)"):
        opened(cap, {"a": trained, "b": str(run)})


@pytest.mark.slow
def test_load_in_a_plain_python_process_makes_its_own_group(cap, trained, photos, offline):
    """No torchrun and no process group: load() makes a one-process group itself."""
    names = photo_names(photos)[:3]
    script = (
        "import json, sys, llama_caption\n"
        "from PIL import Image\n"
        f"cap = llama_caption.load({cap['ckpt_dir']!r}, {trained!r}, tokenizer_path={cap['tokenizer']!r}, device='cpu')\n"
        f"paths = [{', '.join(repr(os.path.join(photos, n)) for n in names)}]\n"
        "out = [cap.caption(paths[0]), cap.caption(Image.open(paths[1])), cap.caption(open(paths[2], 'rb').read())]\n"
        "print(json.dumps(out))\n")
    env = dict(os.environ, PYTHONPATH=REPO, OMP_NUM_THREADS="1")
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(k, None)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, cwd=REPO, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert json.loads(proc.stdout.strip().splitlines()[-1]) == [offline["captions"][n] for n in names]
