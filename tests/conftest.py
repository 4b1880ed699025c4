"""Tiny models in the real formats, made once per session, and process-group fixtures."""

import json
import os
import random
import socket
import subprocess
import sys

import pytest
import torch

from llama_caption import distributed
from llama_caption.tools.demo.shapes import make_dataset
from llama_caption.tools.demo.standins import build_llama
from llama_caption.llama.model import ModelArgs
from llama_caption.tools.testing import build_tiny_clip, random_state_dict, train_tokenizer, write_meta_checkpoint

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
COLOURS = "red green blue yellow black white orange purple".split()
THINGS = "cat dog circle square house tree boat car bird horse".split()
PLACES = "on under near above beside behind".split()


def caption_lines(n=400, seed=0):
    """A few hundred varied sentences for training the test tokenizer."""
    rng = random.Random(seed)
    return [f"a {rng.choice(COLOURS)} {rng.choice(THINGS)} {rng.choice(PLACES)} the {rng.choice(COLOURS)} {rng.choice(THINGS)}"
            for _ in range(n)]


TINY = dict(dim=64, n_layers=2, n_heads=4, multiple_of=32, norm_eps=1e-5, vocab_size=-1)
TINY_GQA = dict(TINY, n_kv_heads=2, rope_theta=500000.0)


WORKER = os.environ.get("PYTEST_XDIST_WORKER")  # `make test` runs pytest-xdist workers, one per core
if WORKER:
    torch.set_num_threads(1)  # the workers share the cores: two threads each would wait on each other


def shared(tmp_path_factory, name, make):
    """A session fixture's value, made once for the whole run: each pytest-xdist worker is a
    process with a session of its own, so the first to ask makes it (under a lock) in a folder
    every worker sees and the others read what it wrote. `make(folder)` gives a JSON value."""
    import fcntl
    from pathlib import Path

    base = tmp_path_factory.getbasetemp()
    base = base.parent if WORKER else base
    done = base / f"shared-{name}.json"
    with open(base / f"shared-{name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not done.exists():
            folder = base / f"shared-{name}"
            folder.mkdir()
            done.write_text(json.dumps(make(folder), default=str))
        value = json.loads(done.read_text())
    return {k: Path(v) if k == "root" else v for k, v in value.items()} if isinstance(value, dict) else value


@pytest.fixture(scope="session")
def assets(tmp_path_factory):
    return shared(tmp_path_factory, "assets", make_assets)


def make_assets(root):
    tok = train_tokenizer(caption_lines(), 128, str(root / "tokenizer.model"))
    out = {"root": root, "tokenizer": str(root / "tokenizer.model"), "vocab": tok.n_words}
    for name, params in (("tiny", TINY), ("tiny_gqa", TINY_GQA)):
        args = ModelArgs.from_params(params, vocab_size=tok.n_words)
        # A larger std than LLaMA's init gives peaked, tie-free logits, so greedy comparisons are sharp.
        write_meta_checkpoint(str(root / name), params, random_state_dict(args, seed=0, std=0.2))
        out[name] = str(root / name)
    return out


@pytest.fixture(scope="session")
def process_group():
    """One gloo process with model-parallel size 1, shared by the in-process tests."""
    env = distributed.setup(mp_size=1, device="cpu", quiet=False)
    yield env
    distributed.teardown()


@pytest.fixture(autouse=True)
def quick_tests_start_no_process(request, monkeypatch):
    """The quick tier (`make test-fast`, -m "not slow") starts no process: a test that does
    fails here until it is marked slow. (Session fixtures are made before this guard.)"""
    if request.node.get_closest_marker("slow") is None:
        def refuse(self, args, *rest, **kwargs):
            raise AssertionError(f"{request.node.nodeid} starts a process ({str(args)[:100]}): mark it @pytest.mark.slow")

        monkeypatch.setattr(subprocess.Popen, "__init__", refuse)
    yield


@pytest.fixture(autouse=True)
def restore_global_state():
    dtype, grad = torch.get_default_dtype(), torch.is_grad_enabled()
    yield
    torch.set_default_dtype(dtype)
    torch.set_grad_enabled(grad)


def torchrun(nproc, script, *args, timeout=300, check=True):
    """Run `script` under torchrun with `nproc` CPU processes (gloo); returns the CompletedProcess."""
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=REPO)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc),
           "--master_addr", "127.0.0.1", "--master_port", str(free_port()), script, *map(str, args)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env, cwd=REPO)
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return proc


def run_python(*args, timeout=300):
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=REPO)
    return subprocess.run([sys.executable, *map(str, args)], capture_output=True, text=True,
                          timeout=timeout, env=env, cwd=REPO)


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


LLAMA = dict(dim=64, n_layers=2, n_heads=4, multiple_of=32, norm_eps=1e-5)


@pytest.fixture(scope="session")
def cap(tmp_path_factory, process_group):
    """A drawn COCO-format dataset, a pretrained stand-in LLaMA, a tiny CLIP file."""
    return shared(tmp_path_factory, "cap", make_cap)


def make_cap(root):
    paths = make_dataset(str(root / "coco"), train=6, val=3, seed=1, image_size=32)
    data = json.load(open(paths["train"]))
    # Four images with one caption each: the set a projection can learn by heart.
    few = dict(data, images=data["images"][:4])
    few["annotations"] = [next(a for a in data["annotations"] if a["image_id"] == im["id"]) for im in few["images"]]
    json.dump(few, open(root / "few.json", "w"))
    groups = [[a["caption"] for a in data["annotations"] if a["image_id"] == im["id"]] for im in data["images"]]
    out = build_llama(str(root), groups, LLAMA, vocab_size=96, steps=200, seed=0)
    build_tiny_clip(str(root / "clip.pt"), seed=0)
    return dict(out, root=root, images=str(root / "coco" / "train2014"), ann=paths["train"], few=str(root / "few.json"),
                val_images=str(root / "coco" / "val2014"), val_ann=paths["val"], clip=str(root / "clip.pt"),
                few_captions=[a["caption"] for a in few["annotations"]])


@pytest.fixture(scope="session")
def trained(cap, tmp_path_factory):
    """A projection trained on the drawn dataset for a few seconds: it captions well enough."""
    return shared(tmp_path_factory, "trained", lambda folder: make_trained(cap, folder))


def make_trained(cap, folder):
    import captioning_training

    out = folder / "run"
    proc = run_cli(captioning_training.main, "--ckpt_dir", cap["ckpt_dir"], "--tokenizer_path", cap["tokenizer"],
                   "--clip_model", cap["clip"], "--train_images", cap["images"], "--train_annotations", cap["ann"],
                   "--out_dir", out, "--num_workers", 0, "--epochs", 20, "--batch_size", 4, "--warmup_steps", 5,
                   "--lr", 3e-3)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return str(out)


def run_cli(main, *args):
    """Run an entry point's fire command in this process, as `python script.py ARGS` would, and
    return what a subprocess would (returncode, stdout, stderr). Skips the ~8 s of starting
    Python, torch and the launcher; the multi-process tests still use torchrun."""
    import contextlib
    import io

    import fire

    out, err = io.StringIO(), io.StringIO()
    code = 0
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            fire.Fire(main, command=[str(a) for a in args])
        except SystemExit as e:
            code = e.code if isinstance(e.code, int) else 1
    return subprocess.CompletedProcess(args, code, out.getvalue(), err.getvalue())


@pytest.fixture(scope="session")
def photos(cap, tmp_path_factory):
    """Nine drawn images in one folder (the dataset's train and val images)."""
    import shutil

    folder = tmp_path_factory.mktemp("photos")
    for src in (cap["images"], cap["val_images"]):
        for name in sorted(os.listdir(src)):
            shutil.copy(os.path.join(src, name), folder / name)
    return str(folder)


@pytest.fixture(scope="session")
def offline(cap, trained, photos, tmp_path_factory):
    """What `caption` writes for the photos (greedy, max_gen_len 30): file name -> caption, and the run file."""
    import captioning_inference

    out = tmp_path_factory.mktemp("offline") / "results.json"
    proc = run_cli(captioning_inference.main, "--ckpt_dir", cap["ckpt_dir"], "--tokenizer_path", cap["tokenizer"],
                   "--checkpoint", trained, "--images", photos, "--out", out, "--num_workers", 0)
    assert proc.returncode == 0, proc.stderr[-2000:]
    rows = json.load(open(out))
    assert len(rows) == 9
    run_file = str(out)[:-5] + ".run.json"
    return {"captions": {os.path.basename(r["file_name"]): r["caption"] for r in rows}, "results": str(out),
            "run": json.load(open(run_file))}


@pytest.fixture(scope="session")
def other(trained, tmp_path_factory):
    """A second captioner over the same LLaMA: `trained`'s run with its projection's weights
    moved (each by 30% of its own spread, seeded), so its captions differ."""
    import shutil

    from safetensors import safe_open
    from safetensors.torch import save_file

    run = tmp_path_factory.mktemp("other") / "other"
    shutil.copytree(trained, run)
    ckpt = run / "checkpoints" / (run / "checkpoints" / "latest").read_text().strip()
    path = str(ckpt / "projection.safetensors")
    with safe_open(path, "pt") as f:
        meta, weights = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}
    gen = torch.Generator().manual_seed(5)
    moved = {k: (v + 0.3 * v.float().std() * torch.randn(v.shape, generator=gen)).to(v.dtype) if v.numel() > 1 else v
             for k, v in weights.items()}
    save_file(moved, path, metadata=meta)
    return str(run)
