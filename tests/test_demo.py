"""The reduced demo: the same code path as `make demo` with fewer images and steps."""

import json
import os
import random
import subprocess
import sys

import pytest

from conftest import REPO
from llama_caption.tools.demo.build import attribute_accuracy, parse_attributes
from llama_caption.tools.demo.shapes import TEMPLATES, SYNONYMS, random_attributes


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


def run_demo(*args):
    env = {k: v for k, v in os.environ.items() if k != "OMP_NUM_THREADS"}  # the demo uses every core
    proc = subprocess.run([sys.executable, "-m", "llama_caption", "demo", "--scale", "small", *map(str, args)],
                          cwd=REPO, env=dict(env, PYTHONPATH=REPO), capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


@pytest.mark.slow
def test_reduced_demo_captions_depend_on_the_image(tmp_path, process_group):
    proc = run_demo("--root", tmp_path)
    runs = sorted((tmp_path / "small" / "runs").iterdir())
    assert [r.name for r in runs] == ["001"]
    report = json.load(open(runs[0] / "demo_report.json"))
    stages = report["stages"]
    # Cross-entropy with the MLP and with the transformer mapper on the same data, the better one
    # fine-tuned by SCST, the shuffled control from the final weights.
    assert list(stages) == ["xe-mlp", "xe-transformer", "scst", "control"]
    best = report["best_projection"]
    assert stages[f"xe-{best}"]["metrics"]["CIDEr"] == max(stages[k]["metrics"]["CIDEr"] for k in ("xe-mlp", "xe-transformer"))
    cap, ctl = stages["scst"], stages["control"]
    # The shuffled control keeps the language; only the image is taken away.
    assert cap["attributes"]["colour"] >= ctl["attributes"]["colour"] + 0.2
    assert cap["attributes"]["background"] >= ctl["attributes"]["background"] + 0.2
    assert cap["attributes"]["all three"] > ctl["attributes"]["all three"]
    assert cap["metrics"]["CIDEr"] >= 1.5 * ctl["metrics"]["CIDEr"]
    for line in ("cross-entropy, MLP", "cross-entropy, mapper", f"SCST (from {best})", "shuffled control", "gallery:",
                 "best of 5 (sampled at temperature 0.5)", "best by MBR (CIDEr)", "best by CLIP-S"):
        assert line in proc.stdout
    # The best-of block: greedy is the final captions themselves; each rule's pick is scored.
    block = report["best_of"]["ways"]
    assert block["greedy"]["CIDEr"] == cap["metrics"]["CIDEr"] and set(block) == {"greedy", "logprob", "clip", "mbr"}
    assert all(v["seconds_per_image"] > 0 and v["CLIP-S"] is not None for v in block.values())
    assert (runs[0] / "scst" / "captions.gallery.html").exists()
    assert (runs[0] / "scst" / "loss_curve.png").exists()
    scst_rows = [json.loads(l) for l in open(runs[0] / "scst" / "metrics.jsonl")]
    assert any("reward" in r for r in scst_rows) and any("val_cider" in r for r in scst_rows)
    # The benchmark's cache-vs-on-the-fly comparison on these stand-ins: the same batches reach
    # the same model both ways (equal first losses), and only the on-the-fly run calls CLIP.
    from llama_caption.tools.bench import cache_vs_fly_bench

    calls = []
    bench = cache_vs_fly_bench(calls.append, steps=2, batch=8, root=str(tmp_path), scale="small")
    fly, cache = bench["on_the_fly"], bench["cache"]
    assert abs(fly["first_loss"] - cache["first_loss"]) < 1e-4 * abs(fly["first_loss"])
    assert fly["batch_ms"]["encode"] > cache["batch_ms"]["encode"]
    assert bench["ratio"] == cache["samples_s"] / fly["samples_s"] and len(calls) == 3


def stripes_dataset(folder, n=40, seed=0):
    """A COCO-format set that is not the shapes: stripes of two colours, across or down."""
    from PIL import Image

    rng = random.Random(seed)
    colours = {"red": (220, 30, 30), "blue": (30, 30, 220), "green": (30, 180, 30), "white": (240, 240, 240)}
    os.makedirs(folder / "img")
    images, anns = [], []
    for i in range(n):
        a, b = rng.sample(sorted(colours), 2)
        across = rng.random() < 0.5
        im = Image.new("RGB", (32, 32), colours[a])
        for k in range(0, 32, 8):
            box = (0, k, 32, k + 4) if across else (k, 0, k + 4, 32)
            im.paste(colours[b], box)
        name = f"s{i:03d}.png"
        im.save(folder / "img" / name)
        images.append({"id": 100 + i, "file_name": name})
        way = "horizontal" if across else "vertical"
        for j, text in enumerate([f"{way} {a} and {b} stripes", f"{a} stripes crossed by {b} ones going {way}",
                                  f"a {way} pattern of {a} and {b}"]):
            anns.append({"id": 1000 + 10 * i + j, "image_id": 100 + i, "caption": text})
    json.dump({"images": images, "annotations": anns}, open(folder / "captions.json", "w"))
    return folder / "img", folder / "captions.json"


@pytest.mark.slow
def test_demo_on_another_coco_format_dataset_with_an_open_clip_encoder(tmp_path, process_group):
    """The demo end to end on a COCO-format set made here (not the shapes), with an open_clip
    encoder instead of the stand-in CLIP (the MLP only, no SCST, to keep the suite short): the
    stand-in LLaMA is built from that set, a tenth of it is held out for validation, and the
    checkpoint records the open_clip encoder."""
    from llama_caption.captioner import load_projection
    from llama_caption.tools.demo.build import SCALES, build_llama_standin, new_run_folder, prepare_data, DemoConfig
    from llama_caption.runs import find_checkpoint
    from llama_caption.tools.testing import build_tiny_open_clip

    images, ann = stripes_dataset(tmp_path / "stripes")
    cfg, weights = build_tiny_open_clip(str(tmp_path / "oc"), "stripes-vit",
                                        {"image_size": 32, "layers": 1, "width": 64, "patch_size": 8})
    args = ["--root", tmp_path / "root", "--images", images, "--annotations", ann, "--clip_model", "open_clip:" + cfg,
            "--clip_pretrained", weights, "--projections", '["mlp"]', "--scst_epochs", 0, "--best_of", 0]
    proc = run_demo(*args)
    assert "held out 4 of 40 images" in proc.stdout and "training the stand-in CLIP" not in proc.stdout
    (run,) = [p for p in (tmp_path / "root").glob("small-*/runs/001")]
    report = json.load(open(run / "demo_report.json"))
    assert list(report["stages"]) == ["xe-mlp", "control"]
    assert all("attributes" not in v for v in report["stages"].values())  # only the synthetic set has them
    val = json.load(open(run / "xe-mlp" / "captions.json"))
    assert sorted(r["image_id"] for r in val) == [100, 110, 120, 130]
    assert not (tmp_path / "root" / "small").exists()  # the synthetic set was not drawn
    _, made, _ = load_projection(find_checkpoint(str(run / "xe-mlp")))
    assert made.encoder.identity.startswith("open_clip:stripes-vit+sha256:")
    # A second run reuses the stand-in LLaMA built from this set, and gets a new run folder.
    demo = DemoConfig(images=str(images), annotations=str(ann), root=str(tmp_path / "root"), scale="small")
    paths, logged = prepare_data(demo, SCALES["small"], lambda m: None), []
    build_llama_standin(paths, SCALES["small"], logged.append, paths["train_images"], paths["train_ann"])
    assert logged == [f"stand-in LLaMA: reusing {paths['ckpt_dir']}"]
    assert new_run_folder(paths["runs"]).endswith("002")


def test_a_dataset_too_small_for_the_demo_is_refused_before_the_stand_ins(cap, tmp_path):
    from llama_caption.errors import UserError
    from llama_caption.tools.demo.build import DemoConfig, run_demo

    with pytest.raises(UserError, match="6 captioned training image.*batches of 32 captions.*SCST on 16 images"):
        run_demo(DemoConfig(scale="small", root=str(tmp_path / "r"), images=cap["images"], annotations=cap["ann"],
                            val_images=cap["val_images"], val_annotations=cap["val_ann"]), log=lambda m: None)
    with pytest.raises(UserError, match="0 validation image"):
        run_demo(DemoConfig(scale="small", root=str(tmp_path / "r"), images=cap["images"], annotations=cap["ann"],
                            val_images=cap["images"], val_annotations=cap["val_ann"], scst_epochs=0), log=lambda m: None)
    assert not list((tmp_path / "r").rglob("standins/*"))  # nothing was built


def test_demo_report_prints_clip_s_beside_cider(capsys):
    """The report's table and closing lines: CLIP-S (by the demo's own CLIP) beside CIDEr, final
    captions against the shuffled control."""
    from llama_caption.tools.demo.build import print_report

    metrics = {"xe-mlp": {"CIDEr": 0.8, "CLIP-S": 0.61, "RefCLIP-S": 0.7}, "scst": {"CIDEr": 1.1, "CLIP-S": 0.66},
               "control": {"CIDEr": 0.2, "CLIP-S": 0.41}}
    report = {"best_projection": "mlp", "final": "/runs/001/scst", "seconds": 12.0,
              "stages": {k: {"metrics": m} for k, m in metrics.items()}}
    stages = {k: {"metrics": m, "results": [{"image_id": 1, "caption": "a red circle"}]} for k, m in metrics.items()}
    print_report(report, stages, None, "/runs/001")
    out = capsys.readouterr().out
    head = next(l for l in out.splitlines() if "CIDEr" in l and "CLIP-S" in l)
    assert head.split() == ["CIDEr", "CLIP-S", "RefCLIP-S"]
    scst_row = next(l for l in out.splitlines() if l.startswith("SCST"))
    assert scst_row.split()[-3:] == ["110.00", "66.00", "-"]
    assert "CLIP-S (the demo's CLIP): SCST 66.0, shuffled control 41.0 (+25.0)" in out
    assert "CIDEr: cross-entropy (mlp) 80.0, after SCST 110.0 (+30.0), shuffled control 20.0" in out


def check_report(xe: float, scst, control: float, all_three: float) -> dict:
    stages = {"xe-mlp": {"metrics": {"CIDEr": xe}}, "control": {"metrics": {"CIDEr": control}}}
    if scst is not None:
        stages["scst"] = {"metrics": {"CIDEr": scst}}
    (stages["scst"] if scst is not None else stages["xe-mlp"])["attributes"] = {"all three": all_three}
    return {"best_projection": "mlp", "stages": stages}


def test_demo_check_measures_each_claim_against_its_floor():
    from llama_caption.tools.demo.check import conclusions, misses

    row = conclusions(check_report(2.5, 2.65, 0.8, 0.55))
    assert row["scst_gain"] == pytest.approx(15.0) and row["control_ratio"] == pytest.approx(265 / 80)
    assert misses(row) == []
    assert misses(conclusions(check_report(2.5, 2.55, 0.8, 0.55))) == ["scst_gain"]  # +5 CIDEr
    assert misses(conclusions(check_report(2.5, 2.65, 0.8, 0.49))) == ["all_three"]
    assert misses(conclusions(check_report(2.5, 2.65, 0.9, 0.55))) == ["control_ratio"]  # 2.9x
    # A demo without SCST cannot show SCST's gain: that is a miss, not a pass.
    assert misses(conclusions(check_report(2.5, None, 0.5, 0.6))) == ["scst_gain"]


def test_demo_check_runs_each_case_under_its_kernels(tmp_path, monkeypatch, capsys):
    """Each (kernel path, seed) is one demo process with that path's variables and its own root;
    the report it wrote is read back and a missed floor fails the check."""
    import subprocess as sp

    from llama_caption.tools.demo import check

    calls = []

    def fake_demo(cmd, env, **kw):  # stands for the demo process: writes the report a demo writes
        calls.append((cmd, {k: env.get(k) for k in ("ATEN_CPU_CAPABILITY", "ONEDNN_MAX_CPU_ISA")}))
        root, seed = cmd[cmd.index("--root") + 1], int(cmd[cmd.index("--seed") + 1])
        run = os.path.join(root, "small" + (f"-seed{seed}" if seed else ""), "runs", "001")
        os.makedirs(run, exist_ok=True)
        if "avx2" in root and seed == 4:  # a case whose demo fails: reported, and the others still run
            return sp.CompletedProcess(cmd, 2, "error: something\n", None)
        report = dict(check_report(2.5, 2.7 if seed == 0 else 2.55, 0.8, 0.6), cpu_capability=env.get("ATEN_CPU_CAPABILITY") or "AVX512")
        json.dump(report, open(os.path.join(run, "demo_report.json"), "w"))
        return sp.CompletedProcess(cmd, 0, "demo output\n", None)

    monkeypatch.setattr(check.subprocess, "run", fake_demo)
    cfg = check.DemoCheckConfig(isas=["native", "avx2"], seeds=[0, 4], root=str(tmp_path), scale="small")
    with pytest.raises(SystemExit) as exit_:
        check.run_check(cfg, log=print)
    assert exit_.value.code == 1
    assert [c[1] for c in calls] == [{"ATEN_CPU_CAPABILITY": None, "ONEDNN_MAX_CPU_ISA": None}] * 2 + \
        [{"ATEN_CPU_CAPABILITY": "avx2", "ONEDNN_MAX_CPU_ISA": "AVX2"}] * 2
    assert [c[0][c[0].index("--root") + 1] for c in calls] == [str(tmp_path / "native")] * 2 + [str(tmp_path / "avx2")] * 2
    saved = json.load(open(tmp_path / "check.json"))
    assert [(c["isa"], c["seed"], round(c.get("scst_gain", -1), 1)) for c in saved["cases"]] == \
        [("native", 0, 20.0), ("native", 4, 5.0), ("avx2", 0, 20.0), ("avx2", 4, -1)]
    out = capsys.readouterr().out
    assert out.count("MISSED scst_gain") == 1 and "2 of 4 case(s) hold every floor" in out
    assert "the demo failed (exit 2)" in out
    assert "avx2 (avx2)" in out


def test_demo_seed_gives_each_seed_its_own_stand_ins(tmp_path):
    from llama_caption.tools.demo.build import DemoConfig, prepare_data, SCALES

    logged = []
    zero = prepare_data(DemoConfig(scale="small", root=str(tmp_path)), SCALES["small"], logged.append)
    two = prepare_data(DemoConfig(scale="small", root=str(tmp_path), seed=2), SCALES["small"], logged.append)
    assert zero["standins"] == str(tmp_path / "small" / "standins")
    assert two["standins"] == str(tmp_path / "small-seed2" / "standins")
    with pytest.raises(Exception, match="--seed"):
        DemoConfig(seed=-1)


def test_stand_ins_are_rebuilt_only_for_their_own_settings(tmp_path):
    """A changed SCST or cross-entropy setting keeps the cached stand-ins; their own steps or the
    seed rebuild them."""
    from llama_caption.tools.demo.build import SCALES, clip_standin_stamp, llama_standin_stamp
    from llama_caption.tools.testing import demo_layout

    paths = demo_layout(str(tmp_path))
    base = dict(SCALES["small"], seed=0)
    for stamp_of in (clip_standin_stamp, llama_standin_stamp):
        settings = stamp_of(paths, base, "imgs", "ann.json")[1]
        assert stamp_of(paths, dict(base, scst_lr=1.0, scst_batch=3, lr=9.0, epochs=7), "imgs", "ann.json")[1] == settings
        assert stamp_of(paths, dict(base, seed=1), "imgs", "ann.json")[1] != settings
    assert clip_standin_stamp(paths, dict(base, clip_steps=1), "imgs", "ann.json")[1] != \
        clip_standin_stamp(paths, base, "imgs", "ann.json")[1]
    assert llama_standin_stamp(paths, dict(base, llama_lr=1.0), "imgs", "ann.json")[1] != \
        llama_standin_stamp(paths, base, "imgs", "ann.json")[1]


def test_demo_check_refuses_bad_flags_before_any_demo(tmp_path):
    from llama_caption.errors import UserError
    from llama_caption.tools.demo.check import DemoCheckConfig

    (tmp_path / "afile").write_text("")
    for flags, says in (({"out": str(tmp_path)}, "is a folder"), ({"root": str(tmp_path / "afile")}, "is a file"),
                        ({"seeds": [1, 1]}, "lists a value twice"), ({"seeds": [-1]}, "is negative"),
                        ({"isas": ["avx3"]}, "not one of native, avx2, default")):
        with pytest.raises(UserError, match=says):
            DemoCheckConfig(**dict({"root": str(tmp_path / "r")}, **flags))
    assert DemoCheckConfig(root=str(tmp_path / "r"), seeds=[2 ** 40]).seeds == [2 ** 40]  # the demo's own range


def test_demo_best_of_flag_is_checked(tmp_path):
    from llama_caption.errors import UserError
    from llama_caption.tools.demo.build import DemoConfig

    for n in (1, 33, -2):
        with pytest.raises(UserError, match=f"--best_of must be 0 \\(no block\\) or from 2 to 32, got {n}"):
            DemoConfig(root=str(tmp_path), best_of=n)
    assert DemoConfig(root=str(tmp_path), best_of=0).best_of == 0
