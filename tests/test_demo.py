"""The reduced demo: the same code path as `make demo` with fewer images and steps."""

import json
import os
import random
import subprocess
import sys

from conftest import REPO
from llama_caption.demo.build import attribute_accuracy, parse_attributes
from llama_caption.demo.shapes import TEMPLATES, SYNONYMS, random_attributes


def test_attribute_parser_reads_every_caption_template():
    rng = random.Random(0)
    for _ in range(300):
        a = random_attributes(rng)
        for t in TEMPLATES:
            cap = t.format(size=a["size"], colour=a["colour"], shape=a["shape"],
                           syn=rng.choice(SYNONYMS[a["shape"]]), bg=a["background"])
            got = parse_attributes(cap)
            assert got == {"shape": a["shape"], "colour": a["colour"], "background": a["background"]}, cap
    assert parse_attributes("a picture") == {"shape": None, "colour": None, "background": None}
    truth = {"1": {"shape": "circle", "colour": "red", "background": "blue"}}
    acc = attribute_accuracy([{"image_id": 1, "caption": "a red square on a blue background"}], truth)
    assert acc == {"shape": 0.0, "colour": 1.0, "background": 1.0, "all three": 0.0}


def test_reduced_demo_captions_depend_on_the_image(tmp_path, process_group):
    env = {k: v for k, v in os.environ.items() if k != "OMP_NUM_THREADS"}  # the demo uses every core
    proc = subprocess.run([sys.executable, "-m", "llama_caption.demo", "--scale", "small", "--root", str(tmp_path)],
                          cwd=REPO, env=dict(env, PYTHONPATH=REPO), capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    runs = sorted((tmp_path / "small" / "runs").iterdir())
    assert [r.name for r in runs] == ["001"]
    report = json.load(open(runs[0] / "demo_report.json"))
    cap, ctl = report["captions"], report["control"]
    # The shuffled control keeps the language; only the image is taken away.
    assert cap["attributes"]["colour"] >= ctl["attributes"]["colour"] + 0.2
    assert cap["attributes"]["background"] >= ctl["attributes"]["background"] + 0.2
    assert cap["attributes"]["all three"] > ctl["attributes"]["all three"]
    assert cap["metrics"]["CIDEr"] >= 1.5 * ctl["metrics"]["CIDEr"]
    assert "shuffled control" in proc.stdout and "gallery:" in proc.stdout
    assert (runs[0] / "captions.gallery.html").exists()
    assert (runs[0] / "loss_curve.png").exists()
    # The benchmark's cache-vs-on-the-fly comparison on these stand-ins: the same batches reach
    # the same model both ways (equal first losses), and only the on-the-fly run calls CLIP.
    from llama_caption.bench import cache_vs_fly_bench

    calls = []
    bench = cache_vs_fly_bench(calls.append, steps=2, batch=8, root=str(tmp_path), scale="small")
    fly, cache = bench["on_the_fly"], bench["cache"]
    assert abs(fly["first_loss"] - cache["first_loss"]) < 1e-4 * abs(fly["first_loss"])
    assert fly["batch_ms"]["encode"] > cache["batch_ms"]["encode"]
    assert bench["ratio"] == cache["samples_s"] / fly["samples_s"] and len(calls) == 3
    # The same demo with an open_clip encoder instead of the stand-in CLIP: the stand-in LLaMA is
    # reused, the run goes to a new folder, and the checkpoint records the open_clip encoder.
    from llama_caption.captioner import load_projection
    from llama_caption.runs import find_checkpoint
    from llama_caption.testing import build_tiny_open_clip

    cfg, weights = build_tiny_open_clip(str(tmp_path / "oc"), "demo-oc-vit",
                                        {"image_size": 32, "layers": 2, "width": 64, "patch_size": 8})
    proc = subprocess.run([sys.executable, "-m", "llama_caption.demo", "--scale", "small", "--root", str(tmp_path),
                           "--clip_model", "open_clip:" + cfg, "--clip_pretrained", weights],
                          cwd=REPO, env=dict(env, PYTHONPATH=REPO), capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "stand-in LLaMA: reusing" in proc.stdout and "training the stand-in CLIP" not in proc.stdout
    assert sorted(r.name for r in (tmp_path / "small" / "runs").iterdir()) == ["001", "002"]
    assert report == json.load(open(runs[0] / "demo_report.json"))  # the first run is untouched
    _, second, _ = load_projection(find_checkpoint(str(tmp_path / "small" / "runs" / "002")))
    assert second.encoder.identity.startswith("open_clip:demo-oc-vit+sha256:")
    assert "CIDEr" in json.load(open(tmp_path / "small" / "runs" / "002" / "demo_report.json"))["captions"]["metrics"]

