"""The offline demo: stand-in models and data made here, then the real scripts run on them.

    make demo                                  # = python -m llama_caption demo
    python -m llama_caption demo --scale small # the reduced demo the tests run

1. A synthetic COCO-format dataset (llama_caption.demo.shapes).
2. Stand-ins, cached between runs: a CLIP (the clip package's own class) trained contrastively
   on the training captions, checked zero-shot per attribute; a LLaMA (our model class)
   pretrained on the same captions and written in Meta's format with a sentencepiece tokenizer.
   `--images/--annotations` build them from any COCO-format captions dataset instead.
3. torchrun -m llama_caption features, train and caption, unchanged,
   exactly as on COCO: with both stand-ins frozen, a projection learns by cross-entropy (the MLP
   and the transformer mapper, each in its own folder, on the same data), the better one by
   validation CIDEr is fine-tuned by SCST (CIDEr-D optimisation), and each captions val.
4. A control run that captions every image from another image's features, and the attribute
   accuracy (shape, colour, background) of each.

With `--images DIR --annotations FILE` the whole demo runs on that COCO-format dataset instead:
the stand-ins are built from it, and the validation images are `--val_images/--val_annotations`
or, without them, a held-out tenth of the given images (attribute accuracy is for the synthetic
set only).
"""

import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from typing import Dict, List, Optional

import torch

from ... import distributed
from ...config import Config, command, setting
from ...data import load_coco, open_rgb
from ...errors import UserError
from ...evaluation import METRIC_ORDER
from ...fileio import check_output_dir, write_json
from ..testing import build_tiny_clip, demo_layout
from ...vision import EncoderSpec, check_encoder_flags, import_clip
from .shapes import BACKGROUNDS, SHAPE_COLOURS, SHAPES, SYNONYMS, make_dataset
from .standins import build_llama, text_embeddings, train_clip

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

SCALES = {
    # train/val images, CLIP steps, LLaMA steps, cross-entropy epochs, SCST epochs
    "full": dict(train=2000, val=200, image_size=32, clip_steps=1200, llama_steps=600, epochs=3, batch_size=64,
                 lr=2e-3, scst_epochs=2, scst_batch=32, scst_lr=1e-3),
    "small": dict(train=300, val=50, image_size=32, clip_steps=250, llama_steps=150, epochs=2, batch_size=32,
                  lr=2e-3, scst_epochs=1, scst_batch=16, scst_lr=1e-3),
}
# The transformer mapper's size for the demo, and its cross-entropy learning rate (it trains
# better at half the MLP's).
PROJECTION_FLAGS = {"transformer": ["--mapper_width", 128, "--mapper_layers", 2]}
XE_LR = {"transformer": 1e-3}
LLAMA_PARAMS = dict(dim=128, n_layers=4, n_heads=4, multiple_of=64, norm_eps=1e-5)
CLIP_SETTINGS = dict(width=64, layers=2, patch=8, embed_dim=128, batch_size=128)


def stamp_ok(path: str, settings: dict) -> bool:
    try:
        with open(path) as f:
            return json.load(f) == settings
    except (OSError, json.JSONDecodeError):
        return False


def preprocess_all(paths: List[str], resolution: int) -> torch.Tensor:
    tf = import_clip().clip._transform(resolution)
    return torch.stack([tf(open_rgb(p)) for p in paths])


# ---------------------------------------------------------------------------------------------
# Reading attributes back out of captions (for the synthetic dataset's accuracy figures).
# ---------------------------------------------------------------------------------------------

SHAPE_WORDS = {w.split()[0]: s for s, words in SYNONYMS.items() for w in words}
SHAPE_WORDS.update({"round": "circle", "box": "square", "three-sided": "triangle"})
COLOUR_WORDS = set(SHAPE_COLOURS) | set(BACKGROUNDS)


def parse_attributes(caption: str) -> Dict[str, Optional[str]]:
    """Shape, colour and background named by a caption: the colour word nearest before the
    shape word is the shape's colour, the other colour word the background."""
    words = re.findall(r"[a-z\-]+", caption.lower())
    shape_pos = next((i for i, w in enumerate(words) if w in SHAPE_WORDS), None)
    colours = [(i, w) for i, w in enumerate(words) if w in COLOUR_WORDS]
    out = {"shape": SHAPE_WORDS[words[shape_pos]] if shape_pos is not None else None, "colour": None, "background": None}
    if shape_pos is not None:
        before = [c for c in colours if c[0] < shape_pos]
        if before:
            out["colour"] = before[-1][1]
            colours.remove(before[-1])
    if colours:
        out["background"] = colours[0][1]
    return out


def attribute_accuracy(results: List[dict], truth: Dict[str, dict]) -> Dict[str, float]:
    hits = {"shape": 0, "colour": 0, "background": 0, "all three": 0}
    for r in results:
        got, true = parse_attributes(r["caption"]), truth[str(r["image_id"])]
        ok = [got[a] == true[a] for a in ("shape", "colour", "background")]
        for a, o in zip(("shape", "colour", "background"), ok):
            hits[a] += o
        hits["all three"] += all(ok)
    return {k: v / max(1, len(results)) for k, v in hits.items()}


@torch.no_grad()
def clip_zero_shot(model, images: torch.Tensor, truth: List[dict]) -> Dict[str, float]:
    """Per attribute: the image against its caption with that attribute set to each value."""
    img = torch.nn.functional.normalize(model.encode_image(images).float(), dim=-1)
    acc = {}
    for attr, values in (("shape", SHAPES), ("colour", SHAPE_COLOURS), ("background", BACKGROUNDS)):
        right = 0
        for i, t in enumerate(truth):
            cands = []
            for v in values:
                b = dict(t, **{attr: v})
                cands.append(f"a {b['size']} {b['colour']} {b['shape']} on a {b['background']} background")
            right += values[int((text_embeddings(model, cands) @ img[i]).argmax())] == t[attr]
        acc[attr] = right / len(truth)
    return acc


def captioned_records(images: str, annotations: str):
    recs = [r for r in load_coco(images, annotations) if r.captions and os.path.isfile(r.path)]
    if not recs:
        raise UserError(f"{annotations} has no captioned images under {images}")
    return recs


def build_clip_standin(paths: Dict[str, str], s: dict, log, images: str, annotations: str) -> None:
    """Train and save the stand-in CLIP unless the cached one matches the settings."""
    settings = {"scale": s, "clip": CLIP_SETTINGS, "images": os.path.abspath(images),
                "annotations": os.path.abspath(annotations)}
    stamp = os.path.join(paths["standins"], "clip_settings.json")
    if stamp_ok(stamp, settings) and os.path.isfile(paths["clip"]):
        log(f"stand-in CLIP: reusing {paths['clip']}")
        return
    recs = captioned_records(images, annotations)
    t0 = time.time()
    log(f"training the stand-in CLIP on {len(recs)} images ({s['clip_steps']} steps)...")
    pixels = preprocess_all([r.path for r in recs], s["image_size"])
    cs = CLIP_SETTINGS
    model = train_clip(pixels, [r.captions for r in recs], steps=s["clip_steps"], batch_size=cs["batch_size"],
                       width=cs["width"], layers=cs["layers"], patch=cs["patch"], embed_dim=cs["embed_dim"], log=log)
    build_tiny_clip(paths["clip"], model=model)
    log(f"  CLIP stand-in saved as {paths['clip']} ({time.time() - t0:.0f} s)")
    if os.path.isdir(paths["features"]):  # the caches of the CLIP it replaces
        shutil.rmtree(paths["features"])
        log(f"  removed {paths['features']}: features of the previous stand-in CLIP")
    if os.path.isfile(paths["val_attrs"]) and images == paths["train_images"]:
        with open(paths["val_attrs"]) as f:
            truth = json.load(f)
        val = load_coco(paths["val_images"], paths["val_ann"])
        acc = clip_zero_shot(model, preprocess_all([r.path for r in val], s["image_size"]),
                             [truth[str(r.image_id)] for r in val])
        write_json(os.path.join(paths["standins"], "clip_zero_shot.json"), acc, indent=1)
        log("  CLIP stand-in zero-shot accuracy on val: " + ", ".join(f"{k} {v:.0%}" for k, v in acc.items()))
    write_json(stamp, settings)


def build_llama_standin(paths: Dict[str, str], s: dict, log, images: str, annotations: str) -> None:
    """Pretrain and save the stand-in LLaMA unless the cached one matches the settings."""
    settings = {"scale": s, "llama": LLAMA_PARAMS, "images": os.path.abspath(images),
                "annotations": os.path.abspath(annotations)}
    stamp = os.path.join(paths["standins"], "llama_settings.json")
    if stamp_ok(stamp, settings) and os.path.isfile(os.path.join(paths["ckpt_dir"], "params.json")):
        log(f"stand-in LLaMA: reusing {paths['ckpt_dir']}")
        return
    recs = captioned_records(images, annotations)
    t0 = time.time()
    log(f"pretraining the stand-in LLaMA ({s['llama_steps']} steps)...")
    build_llama(paths["standins"], [r.captions for r in recs], LLAMA_PARAMS, vocab_size=256,
                steps=s["llama_steps"], log=log)
    log(f"  LLaMA stand-in saved in {paths['ckpt_dir']} (Meta's format) ({time.time() - t0:.0f} s)")
    write_json(stamp, settings)


def torchrun(*args, log=print, quiet=False) -> str:
    """Run one of the project's scripts under torchrun (one CPU process), as a user would."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "1", "--standalone", *map(str, args)]
    env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", str(os.cpu_count() or 1)),
               PYTHONWARNINGS="ignore")
    log("$ torchrun --nproc_per_node 1 " + " ".join(map(str, args)))
    proc = subprocess.run(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE if quiet else None, text=True)
    if proc.stdout and not quiet:
        log(proc.stdout.rstrip())
    if proc.returncode != 0:
        what = " ".join(map(str, args[:2])) if args[0] == "-m" else args[0]
        errors = [l for l in (proc.stderr or "").splitlines() if l.startswith("error: ")]
        raise UserError(f"{what} failed (exit {proc.returncode})" + (f": {errors[-1][7:]}" if errors else
                                                                     "; see its messages above"))
    return proc.stdout


def encoder_flags(cfg, paths: Dict[str, str]) -> List[str]:
    """The encoder every script is given: the user's (--clip_model, --clip_pretrained) or the stand-in CLIP."""
    if not cfg.clip_model:
        return ["--clip_model", paths["clip"]]
    return ["--clip_model", cfg.clip_model] + (["--clip_pretrained", cfg.clip_pretrained] if cfg.clip_pretrained else [])


def features_dir(cfg, paths: Dict[str, str]) -> str:
    """The stand-in CLIP's caches in features/, another encoder's in features-<its identity's hash>/."""
    if not cfg.clip_model:
        return paths["features"]
    identity = EncoderSpec.of(cfg.clip_model, pretrained=cfg.clip_pretrained).identity
    return paths["features"] + "-" + hashlib.sha256(identity.encode()).hexdigest()[:10]


def ensure_features(paths: Dict[str, str], encoder: List[str], folder: str, log=print) -> str:
    """Feature caches of both splits (the features command, skipped when complete)."""
    for split in ("train", "val"):
        torchrun("-m", "llama_caption", "features", *encoder, "--images", paths[f"{split}_images"],
                 "--annotations", paths[f"{split}_ann"], "--out", os.path.join(folder, split), "--num_workers", 0,
                 "--batch_size", 256, log=log, quiet=True)
    return os.path.join(folder, "train")


@dataclass
class DemoConfig(Config):
    scale: str = setting("full", "full (the README's figures) or small (the reduced demo the tests run).")
    root: str = setting("demo_runs", "where data, stand-ins and runs are kept (reused by later runs; each run gets a new folder).")
    images: Optional[str] = setting(None, "build the stand-in models from this COCO-format images folder instead of the synthetic one.")
    annotations: Optional[str] = setting(None, "the captions JSON that goes with --images.")
    clip_model: Optional[str] = setting(None, "an image encoder of your own instead of the stand-in CLIP (as in training: a `clip` file or open_clip:ARCH).")
    clip_pretrained: Optional[str] = setting(None, "with --clip_model open_clip:ARCH: its weights file or tag.")
    val_images: Optional[str] = setting(None, "with --images: the validation images (default: a held-out tenth of --images).")
    val_annotations: Optional[str] = setting(None, "the captions JSON that goes with --val_images.")
    projections: List[str] = setting(("mlp", "transformer"), "the projections trained by cross-entropy and compared; the best goes on to SCST.")
    scst_epochs: Optional[int] = setting(None, "SCST epochs after cross-entropy (default: the scale's, 2 full, 1 small; 0: none).")

    def check(self) -> None:
        self.one_of("scale", SCALES)
        if (self.images is None) != (self.annotations is None):
            raise UserError("--images and --annotations go together")
        if (self.val_images is None) != (self.val_annotations is None):
            raise UserError("--val_images and --val_annotations go together")
        if self.val_images and not self.images:
            raise UserError("--val_images goes with --images (the synthetic set has its own validation split)")
        if not self.projections:
            raise UserError("--projections needs at least one of mlp, linear, transformer")
        for p in self.projections:
            if p not in ("mlp", "linear", "transformer"):
                raise UserError(f"--projections: {p!r} is not one of mlp, linear, transformer")
        self.at_least(0, "scst_epochs")
        if self.clip_model:
            check_encoder_flags(self.clip_model, self.clip_pretrained)
        elif self.clip_pretrained:
            raise UserError("--clip_pretrained goes with --clip_model")


def new_run_folder(runs: str) -> str:
    """runs/001, runs/002, ...: a demo run never writes over an earlier one."""
    os.makedirs(runs, exist_ok=True)
    taken = [int(d) for d in os.listdir(runs) if d.isdigit()]
    return os.path.join(runs, f"{max(taken, default=0) + 1:03d}")


def held_out_split(images: str, annotations: str, out: str, log) -> Dict[str, str]:
    """A COCO captions file cut in two: every tenth image (by id, at least one) for validation.
    Writes out/train.json and out/val.json (the original entries, filtered)."""
    data = json.load(open(annotations, encoding="utf-8"))
    ids = sorted(captioned_records(images, annotations), key=lambda r: r.image_id)
    val_ids = {r.image_id for r in ids[::10]}
    if len(val_ids) == len(ids):
        raise UserError(f"{annotations} has {len(ids)} captioned image(s): too few to hold some out; give --val_images")
    for name, keep in (("train", lambda i: i not in val_ids), ("val", lambda i: i in val_ids)):
        part = dict(data, images=[im for im in data["images"] if keep(im["id"])],
                    annotations=[a for a in data["annotations"] if keep(a["image_id"])])
        write_json(os.path.join(out, f"{name}.json"), part)
    log(f"held out {len(val_ids)} of {len(ids)} images of {annotations} for validation")
    return {"train": os.path.join(out, "train.json"), "val": os.path.join(out, "val.json")}


def prepare_data(cfg: DemoConfig, s: dict, log) -> Dict[str, str]:
    """The layout of this demo: the synthetic set (drawn once), or the user's dataset with its own
    stand-ins, feature caches and runs under root/<scale>-<hash of its paths>."""
    if not cfg.images:
        paths = demo_layout(cfg.root, cfg.scale)
        make_dataset(paths["data"], s["train"], s["val"], seed=0, image_size=s["image_size"])
        log(f"dataset: {s['train']} train and {s['val']} val images in COCO's layout under {paths['data']}")
        return paths
    given = [os.path.abspath(p) if p else None for p in (cfg.images, cfg.annotations, cfg.val_images, cfg.val_annotations)]
    key = hashlib.sha256(json.dumps(given).encode()).hexdigest()[:10]
    paths = demo_layout(cfg.root, f"{cfg.scale}-{key}")
    paths.update(train_images=cfg.images, val_images=cfg.val_images or cfg.images, val_attrs="")
    if cfg.val_images:
        paths.update(train_ann=cfg.annotations, val_ann=cfg.val_annotations)
    else:
        split = held_out_split(cfg.images, cfg.annotations, paths["data"], log)
        paths.update(train_ann=split["train"], val_ann=split["val"])
    check_split_sizes(cfg, s, paths)
    log(f"dataset: {cfg.images} ({paths['train_ann']}), validation {paths['val_images']} ({paths['val_ann']}); "
        f"stand-ins and runs under {paths['root']}")
    return paths


def check_split_sizes(cfg: DemoConfig, s: dict, paths: Dict[str, str]) -> None:
    """Before minutes of stand-in building: enough captions for one training batch (and images
    for one SCST batch), and two validation images for the shuffled control."""
    val = [r for r in load_coco(paths["val_images"], paths["val_ann"]) if os.path.isfile(r.path)]
    if len(val) < 2:
        raise UserError(f"{paths['val_ann']}: {len(val)} validation image(s) found under {paths['val_images']}: the demo "
                        f"needs at least 2 (the control captions each from another's features)")
    train = captioned_records(paths["train_images"], paths["train_ann"])
    n_caps = sum(len(r.captions) for r in train)
    scst = (s["scst_epochs"] if cfg.scst_epochs is None else cfg.scst_epochs) > 0
    need_images = s["scst_batch"] if scst else 1
    if n_caps < s["batch_size"] or len(train) < need_images:
        raise UserError(f"{paths['train_ann']}: {len(train)} captioned training image(s) with {n_caps} caption(s); the "
                        f"{cfg.scale} demo trains on batches of {s['batch_size']} captions" +
                        (f" and SCST on {need_images} images" if scst else "") + ": give a larger --images set")


def caption(paths, checkpoint: str, name: str, folder: str, log, extra=()) -> dict:
    """captioning_inference.py on the validation images; its results and metrics."""
    res = os.path.join(folder, f"{name}.json")
    printed = torchrun("-m", "llama_caption", "caption", "--ckpt_dir", paths["ckpt_dir"], "--tokenizer_path",
                       paths["tokenizer"], "--checkpoint", checkpoint, "--images", paths["val_images"],
                       "--annotations", paths["val_ann"], "--out", res, "--batch_size", 50, "--num_workers", 0,
                       *extra, log=log)
    with open(res) as f, open(os.path.join(folder, f"{name}.metrics.json")) as m:
        return {"results": json.load(f), "printed": printed, "metrics": json.load(m)["metrics"]}


def run_demo(cfg: DemoConfig, log=print) -> dict:
    check_output_dir(cfg.root, "--root")
    s = SCALES[cfg.scale]
    t_start = time.time()
    paths = prepare_data(cfg, s, log)
    with distributed.session(mp_size=1, device="cpu", quiet=False):  # the stand-in LLaMA is built in this process
        if not cfg.clip_model:
            build_clip_standin(paths, s, log, paths["train_images"], paths["train_ann"])
        build_llama_standin(paths, s, log, paths["train_images"], paths["train_ann"])
    encoder, feats = encoder_flags(cfg, paths), features_dir(cfg, paths)
    ensure_features(paths, encoder, feats, log)
    run = new_run_folder(paths["runs"])
    common = ["--ckpt_dir", paths["ckpt_dir"], "--tokenizer_path", paths["tokenizer"], *encoder,
              "--train_images", paths["train_images"], "--train_annotations", paths["train_ann"],
              "--features", os.path.join(feats, "train"), "--val_images", paths["val_images"],
              "--val_annotations", paths["val_ann"], "--val_features", os.path.join(feats, "val"), "--prefix_len", 4,
              "--num_workers", 0, "--log_every", 20, "--save_every", 100000]
    stages, seconds = {}, {}
    for proj in cfg.projections:
        folder = os.path.join(run, f"xe-{proj}")
        t0 = time.time()
        torchrun("-m", "llama_caption", "train", *common, "--out_dir", folder, "--projection", proj, "--epochs", s["epochs"],
                 "--batch_size", s["batch_size"], "--lr", XE_LR.get(proj, s["lr"]), "--warmup_steps", 50,
                 *PROJECTION_FLAGS.get(proj, []), log=log)
        seconds[f"xe-{proj}"] = time.time() - t0
        stages[f"xe-{proj}"] = caption(paths, folder, "captions", folder, log, ["--gallery", 24])
    best = max(cfg.projections, key=lambda p: stages[f"xe-{p}"]["metrics"]["CIDEr"])
    final = os.path.join(run, f"xe-{best}")
    scst_epochs = s["scst_epochs"] if cfg.scst_epochs is None else cfg.scst_epochs
    if scst_epochs:
        final = os.path.join(run, "scst")
        t0 = time.time()
        torchrun("-m", "llama_caption", "train", *common, "--out_dir", final, "--projection", best,
                 *PROJECTION_FLAGS.get(best, []),
                 "--objective", "scst", "--init_from", os.path.join(run, f"xe-{best}"), "--scst_samples", 5,
                 "--epochs", scst_epochs, "--batch_size", s["scst_batch"], "--lr", s["scst_lr"], "--warmup_steps", 0,
                 "--max_caption_len", 20, log=log)
        seconds["scst"] = time.time() - t0
        stages["scst"] = caption(paths, final, "captions", final, log, ["--gallery", 24])
    stages["control"] = caption(paths, final, "control", final, log, ["--gallery", 0, "--control_shuffle", "True"])
    truth = None
    if paths["val_attrs"] and os.path.isfile(paths["val_attrs"]):
        with open(paths["val_attrs"]) as f:
            truth = json.load(f)
    report = {"best_projection": best, "final": final, "stages": {}, "stage_seconds": seconds}
    for name, out in stages.items():
        report["stages"][name] = {"metrics": out["metrics"]}
        if truth:
            report["stages"][name]["attributes"] = attribute_accuracy(out["results"], truth)
    report["seconds"] = time.time() - t_start
    zs = os.path.join(paths["standins"], "clip_zero_shot.json")
    if os.path.isfile(zs) and not cfg.clip_model and truth:
        with open(zs) as f:
            report["clip_zero_shot"] = json.load(f)
    write_json(os.path.join(run, "demo_report.json"), report, indent=1)
    print_report(report, stages, truth, run)
    return report


STAGE_LABELS = {"xe-mlp": "cross-entropy, MLP", "xe-linear": "cross-entropy, linear",
                "xe-transformer": "cross-entropy, mapper", "scst": "SCST", "control": "shuffled control"}


def print_report(report, stages, truth, run: str) -> None:
    print("\n" + "=" * 78)
    print("llama_caption demo: val images captioned by the trained projections")
    first = next(iter(stages.values()))["metrics"]
    names = [m for m in METRIC_ORDER if m in first]
    print(f"\n{'':24}" + "".join(f"{m:>9}" for m in names))
    for k in stages:
        label = STAGE_LABELS.get(k, k) + (f" (from {report['best_projection']})" if k == "scst" else "")
        print(f"{label:24}" + "".join(f"{report['stages'][k]['metrics'][m] * 100:9.2f}" for m in names))
    if truth:
        print("\nattribute accuracy        shape   colour  background  all three")
        for k in stages:
            a = report["stages"][k]["attributes"]
            print(f"{STAGE_LABELS.get(k, k):24}{a['shape']:7.0%}{a['colour']:9.0%}{a['background']:12.0%}"
                  f"{a['all three']:11.0%}")
    if "clip_zero_shot" in report:
        z = report["clip_zero_shot"]
        print(f"CLIP stand-in zero-shot: shape {z['shape']:.0%}, colour {z['colour']:.0%}, background {z['background']:.0%}")
    final = "scst" if "scst" in stages else f"xe-{report['best_projection']}"
    print("\nexamples (generated caption" + (" | true shape, colour, background):" if truth else "):"))
    for r in stages[final]["results"][:6]:
        if truth:
            t = truth[str(r["image_id"])]
            print(f"  {r['caption']:50} | {t['size']} {t['colour']} {t['shape']}, {t['background']} background")
        else:
            print(f"  {r['caption']}")
    cider = {k: v["metrics"]["CIDEr"] * 100 for k, v in report["stages"].items()}
    xe = cider[f"xe-{report['best_projection']}"]
    line = f"\nCIDEr: cross-entropy ({report['best_projection']}) {xe:.1f}"
    if "scst" in cider:
        line += f", after SCST {cider['scst']:.1f} ({cider['scst'] - xe:+.1f})"
    print(line + f", shuffled control {cider['control']:.1f}; demo took {report['seconds']:.0f} s")
    folder = report["final"]
    print(f"gallery: {os.path.join(folder, 'captions.gallery.html')}")
    print(f"curves: {os.path.join(folder, 'loss_curve.png')}")
    print(f"report: {os.path.join(run, 'demo_report.json')}")


main = command(DemoConfig, run_demo, "Build the stand-ins (cached), train the projection with the real scripts, caption val.")
