"""The offline demo: stand-in models and data made here, then the real scripts run on them.

    make demo                                  # = python -m llama_caption demo
    python -m llama_caption demo --scale small # the reduced demo the tests run

1. A synthetic COCO-format dataset (llama_caption.demo.shapes).
2. Stand-ins, cached between runs: a CLIP (the clip package's own class) trained contrastively
   on the training captions, checked zero-shot per attribute; a LLaMA (our model class)
   pretrained on the same captions and written in Meta's format with a sentencepiece tokenizer.
   `--images/--annotations` build them from any COCO-format captions dataset instead.
3. python -m llama_caption features, train, caption and evaluate, unchanged (SCST under torchrun,
   data-parallel), exactly as on COCO: with both stand-ins frozen, a projection learns by
   cross-entropy (the MLP and the transformer mapper, each in its own folder, on the same data),
   the better one by validation CIDEr (computed here, in-process) is fine-tuned by SCST (CIDEr-D
   optimisation), and each captions val. One `evaluate` scores every stage's captions at the end:
   METEOR's Java start (about 10 s of the 12 s that scoring takes here) is paid once.
4. A control run that captions every image from another image's features, and the attribute
   accuracy (shape, colour, background) of each.

On two cores or more, steps that do not depend on each other run side by side, sharing the cores
(cpu_plan: one thread each on two): the two stand-ins (each in a child process), the two
feature caches, the two cross-entropy runs and their captioning, the SCST captions and the
control; scoring and SCST run alone (SCST data-parallel on two processes). Each step's seconds
are logged and kept in the report (stage_seconds). ^C stops every step at once.

`--seed` seeds the stand-ins, the projections and SCST (the images stay the same); `python -m
llama_caption demo-check` runs the demo under other CPU kernel paths and seeds (check.py).

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
import threading
import time
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional

import torch

from ... import distributed
from ...config import Config, command, setting
from ...data import load_coco, open_rgb
from ...errors import UserError
from ...evaluation import METRIC_ORDER, metrics_path
from ...fileio import check_output_dir, write_json
from ...rerank import RULES
from ..testing import build_tiny_clip, demo_layout
from ...vision import EncoderSpec, check_encoder_flags, import_clip
from .shapes import BACKGROUNDS, SHAPE_COLOURS, SHAPES, SYNONYMS, make_dataset
from .standins import build_llama, text_embeddings, train_clip

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

SCALES = {
    # train/val images, CLIP steps and learning rate, LLaMA steps and learning rate, cross-entropy
    # epochs, batch and learning rate, SCST's, its sampling temperature; the seed (--seed's default)
    "full": dict(train=2000, val=200, image_size=32, clip_steps=800, clip_lr=2e-3, llama_steps=500, llama_lr=6e-3, epochs=2,
                 batch_size=64, lr=4e-3, scst_epochs=1, scst_batch=8, scst_lr=2e-4, scst_temperature=0.5, seed=0),
    "small": dict(train=300, val=50, image_size=32, clip_steps=250, clip_lr=1e-3, llama_steps=150, llama_lr=6e-3, epochs=2,
                  batch_size=32, lr=2e-3, scst_epochs=1, scst_batch=16, scst_lr=2e-4, scst_temperature=0.5, seed=0),
}
# The transformer mapper's size for the demo, and its cross-entropy learning rate (it trains
# better at a lower one than the MLP's).
PROJECTION_FLAGS = {"transformer": ["--mapper_width", 128, "--mapper_layers", 2]}
XE_LR = {"transformer": 1e-3}
LLAMA_PARAMS = dict(dim=128, n_layers=2, n_heads=4, multiple_of=64, norm_eps=1e-5)
LLAMA_TEXTS_PER_SEQUENCE = 3
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


def standin_settings(s: dict, which: str) -> dict:
    """The scale's settings a stand-in depends on (its own steps and rate, the data's size, the
    seed): a changed SCST or cross-entropy setting does not rebuild the stand-ins."""
    return {k: v for k, v in s.items() if k.startswith(which + "_") or k in ("train", "val", "image_size", "seed")}


def standin_stamp(which: str, paths: Dict[str, str], s: dict, images: str, annotations: str) -> tuple:
    """A stand-in's ("clip" or "llama") stamp file, the settings it must hold, and whether the
    cached one matches them."""
    own = {"clip": CLIP_SETTINGS} if which == "clip" else {"llama": LLAMA_PARAMS,
                                                            "texts_per_sequence": LLAMA_TEXTS_PER_SEQUENCE}
    settings = {"scale": standin_settings(s, which), **own, "images": os.path.abspath(images),
                "annotations": os.path.abspath(annotations)}
    stamp = os.path.join(paths["standins"], f"{which}_settings.json")
    made = paths["clip"] if which == "clip" else os.path.join(paths["ckpt_dir"], "params.json")
    return stamp, settings, stamp_ok(stamp, settings) and os.path.isfile(made)


def clip_standin_stamp(paths: Dict[str, str], s: dict, images: str, annotations: str) -> tuple:
    return standin_stamp("clip", paths, s, images, annotations)


def build_clip_standin(paths: Dict[str, str], s: dict, log, images: str, annotations: str) -> None:
    """Train and save the stand-in CLIP unless the cached one matches the settings."""
    stamp, settings, cached = clip_standin_stamp(paths, s, images, annotations)
    if cached:
        log(f"stand-in CLIP: reusing {paths['clip']}")
        return
    recs = captioned_records(images, annotations)
    t0 = time.time()
    log(f"training the stand-in CLIP on {len(recs)} images ({s['clip_steps']} steps)...")
    pixels = preprocess_all([r.path for r in recs], s["image_size"])
    cs = CLIP_SETTINGS
    model = train_clip(pixels, [r.captions for r in recs], steps=s["clip_steps"], lr=s["clip_lr"],
                       batch_size=cs["batch_size"], width=cs["width"], layers=cs["layers"], patch=cs["patch"],
                       embed_dim=cs["embed_dim"], seed=s["seed"], log=log)
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


def llama_standin_stamp(paths: Dict[str, str], s: dict, images: str, annotations: str) -> tuple:
    return standin_stamp("llama", paths, s, images, annotations)


def build_llama_standin(paths: Dict[str, str], s: dict, log, images: str, annotations: str) -> None:
    """Pretrain and save the stand-in LLaMA unless the cached one matches the settings."""
    stamp, settings, cached = llama_standin_stamp(paths, s, images, annotations)
    if cached:
        log(f"stand-in LLaMA: reusing {paths['ckpt_dir']}")
        return
    recs = captioned_records(images, annotations)
    t0 = time.time()
    log(f"pretraining the stand-in LLaMA ({s['llama_steps']} steps)...")
    build_llama(paths["standins"], [r.captions for r in recs], LLAMA_PARAMS, vocab_size=256,
                steps=s["llama_steps"], lr=s["llama_lr"], per_sequence=LLAMA_TEXTS_PER_SEQUENCE, seed=s["seed"], log=log)
    log(f"  LLaMA stand-in saved in {paths['ckpt_dir']} (Meta's format) ({time.time() - t0:.0f} s)")
    write_json(stamp, settings)


def cpu_plan() -> tuple:
    """(slots, threads): how many commands the demo runs side by side, and the threads of each.

    The demo's models are so small that a process gains little from a second thread (and on a
    busy machine an OpenMP team of two can wait on a descheduled thread), while two
    single-threaded processes use two cores fully; so on two cores or more two commands run at
    once (the two cross-entropy runs, their captioning, the two feature caches, ...), with the
    cores shared between them. OMP_NUM_THREADS, when set, is the threads of each."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:
        cores = os.cpu_count() or 1
    slots = 2 if cores >= 2 else 1
    threads = int(os.environ["OMP_NUM_THREADS"]) if os.environ.get("OMP_NUM_THREADS", "").isdigit() else None
    return slots, max(1, threads or cores // slots)


def last_lines(text: str, n: int = 30) -> str:
    """The last n lines of captured stderr, progress bars reduced to their final state."""
    lines = [l.split("\r")[-1] for l in (text or "").splitlines()]
    return "\n".join([l for l in lines if l.strip()][-n:])


def launch(*args, log=print, quiet=False, nproc: int = 1, threads: Optional[int] = None,
           progress: bool = True) -> str:
    """Run one of the project's commands as a user would: `python -m llama_caption ...` for one
    process, under torchrun for several (nproc CPU processes; torchrun's own start costs about 5 s
    on two cores, which one process does not need).

    quiet: neither its output nor its progress bars are shown (only its errors); progress False:
    its output is shown when it ends, its progress bars not at all (another command is running)."""
    if nproc == 1:
        cmd = [sys.executable, *map(str, args)]
        log("$ python " + " ".join(map(str, args)))
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc), "--standalone",
               *map(str, args)]
        log(f"$ torchrun --nproc_per_node {nproc} " + " ".join(map(str, args)))
    env = dict(os.environ, OMP_NUM_THREADS=str(threads or cpu_plan()[1]), PYTHONWARNINGS="ignore")
    capture = quiet or not progress
    proc = subprocess.run(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE if capture else None, text=True)
    if proc.stdout and not quiet:
        log(proc.stdout.rstrip())
    if proc.returncode != 0:
        what = " ".join(map(str, args[:2])) if args[0] == "-m" else args[0]
        errors = [l for l in (proc.stderr or "").splitlines() if l.startswith("error: ")]
        if capture and not errors:
            log(last_lines(proc.stderr))
        raise UserError(f"{what} failed (exit {proc.returncode})" + (f": {errors[-1][7:]}" if errors else
                                                                     "; see its messages above"))
    return proc.stdout


class Jobs:
    """The demo's steps as named jobs with dependencies, run at most `slots` at a time in the
    order they were added (a job of width w takes w slots); each job is a function run in a
    thread of this process, which waits on its command or child process. Records each job's
    seconds; the first error is raised once the running jobs have ended."""

    def __init__(self, slots: int, log):
        self.slots, self.log = slots, log
        self.jobs: Dict[str, tuple] = {}
        self.seconds: Dict[str, float] = {}
        self.results: Dict[str, object] = {}

    def add(self, name: str, fn, after=(), width: int = 1) -> None:
        """A job that starts once the jobs `after` (those added before it) have ended."""
        self.jobs[name] = (fn, tuple(a for a in after if a in self.jobs), min(width, self.slots))

    def run(self) -> Dict[str, object]:
        from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait

        waiting, running, error = list(self.jobs), {}, None
        with ThreadPoolExecutor(self.slots) as pool:
            while waiting or running:
                busy = sum(self.jobs[n][2] for n in running.values())
                for name in list(waiting) if error is None else []:
                    fn, after, width = self.jobs[name]
                    if all(a in self.results for a in after) and busy + width <= self.slots:
                        waiting.remove(name)
                        running[pool.submit(self._timed, name, fn)] = name
                        busy += width
                if not running:
                    break
                done, _ = wait(running, return_when=FIRST_COMPLETED)
                for f in done:
                    name = running.pop(f)
                    try:
                        self.results[name] = f.result()
                    except BaseException as e:  # re-raised once the others have ended
                        error = error or e
        if error is not None:
            raise error
        return self.results

    def _timed(self, name: str, fn):
        t0 = time.time()
        out = fn()
        self.seconds[name] = time.time() - t0
        self.log(f"[{name}: {self.seconds[name]:.0f} s]")
        return out


def encoder_flags(cfg, paths: Dict[str, str]) -> List[str]:
    """The encoder every script is given: the user's (--clip_model, --clip_pretrained) or the stand-in CLIP."""
    if not cfg.clip_model:
        return ["--clip_model", paths["clip"]]
    return ["--clip_model", cfg.clip_model] + (["--clip_pretrained", cfg.clip_pretrained] if cfg.clip_pretrained else [])


def clipscore_flags(cfg, paths: Dict[str, str]) -> List[str]:
    """CLIP-S is computed with the encoder the demo trains on (the stand-in CLIP, or the user's):
    ViT-B/32 is not at hand offline, and the stand-in knows these images."""
    flags = encoder_flags(cfg, paths)
    return ["--clipscore_model", flags[1]] + (["--clipscore_pretrained", flags[3]] if len(flags) > 2 else [])


def features_dir(cfg, paths: Dict[str, str]) -> str:
    """The stand-in CLIP's caches in features/, another encoder's in features-<its identity's hash>/."""
    if not cfg.clip_model:
        return paths["features"]
    identity = EncoderSpec.of(cfg.clip_model, pretrained=cfg.clip_pretrained).identity
    return paths["features"] + "-" + hashlib.sha256(identity.encode()).hexdigest()[:10]


def features(paths: Dict[str, str], encoder: List[str], folder: str, split: str, log=print, **run) -> str:
    """The feature cache of one split (the features command; it only checks a complete one)."""
    out = os.path.join(folder, split)
    launch("-m", "llama_caption", "features", *encoder, "--images", paths[f"{split}_images"],
             "--annotations", paths[f"{split}_ann"], "--out", out, "--num_workers", 0,
             "--batch_size", 256, log=log, quiet=True, **run)
    return out


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
    scst_epochs: Optional[int] = setting(None, "SCST epochs after cross-entropy (default: the scale's, 1; 0: none).")
    best_of: int = setting(5, "the last block: greedy against the best of this many sampled captions by each --rerank rule, from the final weights (0: no block; at most 32).")
    seed: int = setting(0, "seed of the stand-ins' training, the projections' initialisation and data order, and SCST's sampling (the synthetic images are the same for every seed).")

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
        self.at_least(0, "scst_epochs", "seed")
        if self.best_of != 0 and not 2 <= self.best_of <= 32:
            raise UserError(f"--best_of must be 0 (no block) or from 2 to 32, got {self.best_of}")
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
    seeded = f"-seed{cfg.seed}" if cfg.seed else ""  # another seed's stand-ins and runs beside seed 0's
    if not cfg.images:
        paths = demo_layout(cfg.root, cfg.scale + seeded)
        make_dataset(paths["data"], s["train"], s["val"], seed=0, image_size=s["image_size"])
        log(f"dataset: {s['train']} train and {s['val']} val images in COCO's layout under {paths['data']}")
        return paths
    given = [os.path.abspath(p) if p else None for p in (cfg.images, cfg.annotations, cfg.val_images, cfg.val_annotations)]
    key = hashlib.sha256(json.dumps(given).encode()).hexdigest()[:10]
    paths = demo_layout(cfg.root, f"{cfg.scale}-{key}{seeded}")
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


def caption(paths, checkpoint: str, name: str, folder: str, log, extra=(), **run) -> str:
    """The caption command on the validation images, unscored (`score` scores several results
    files in one process: METEOR's Java start, most of a scoring, is paid once); the results path."""
    res = os.path.join(folder, f"{name}.json")
    launch("-m", "llama_caption", "caption", "--ckpt_dir", paths["ckpt_dir"], "--tokenizer_path", paths["tokenizer"],
           "--checkpoint", checkpoint, "--images", paths["val_images"], "--annotations", paths["val_ann"], "--out", res,
           "--batch_size", 50, "--num_workers", 0, "--evaluate", False, *extra, log=log, **run)
    return res


def score(paths, results: List[str], scoring: List[str], log, **run) -> Dict[str, dict]:
    """The evaluate command on results files of the validation images (metrics written beside
    each); each file's results and metrics."""
    launch("-m", "llama_caption", "evaluate", *results, "--annotations", paths["val_ann"], "--images",
           paths["val_images"], *scoring, log=log, **run)
    out = {}
    for res in results:
        with open(res) as f, open(metrics_path(res)) as m:
            out[res] = {"results": json.load(f), "metrics": json.load(m)["metrics"]}
    return out


def print_flush(message: str) -> None:
    print(message, flush=True)


STANDINS = {"CLIP": (clip_standin_stamp, build_clip_standin), "LLaMA": (llama_standin_stamp, build_llama_standin)}


def standin_process(which: str, paths: Dict[str, str], s: dict, images: str, annotations: str, threads: int) -> None:
    """Build one stand-in (CLIP or LLaMA) in a child process: the two are built side by side."""
    import contextlib

    torch.set_num_threads(threads)
    model_parallel = which == "LLaMA"  # our LLaMA class needs the (size 1) model-parallel group
    with distributed.session(mp_size=1, device="cpu", quiet=True) if model_parallel else contextlib.nullcontext():
        STANDINS[which][1](paths, s, print_flush, images, annotations)


def build_standin(which: str, paths: Dict[str, str], s: dict, log, threads: int) -> None:
    """A stand-in from the cache, or built in a child process (^C stops it at once)."""
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    stamp_of, build = STANDINS[which]
    if stamp_of(paths, s, paths["train_images"], paths["train_ann"])[2]:
        build(paths, s, log, paths["train_images"], paths["train_ann"])  # says it reuses it
        return
    with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as child:
        child.submit(standin_process, which, paths, s, paths["train_images"], paths["train_ann"], threads).result()


@dataclass
class DemoRun:
    """What the demo's stages share: its settings, the data layout, this run's folder, the job
    runner and how each command runs (threads, progress bars)."""

    cfg: DemoConfig
    s: dict
    paths: Dict[str, str]
    folder: str
    jobs: Jobs
    say: Callable[[str], None]
    slots: int
    threads: int
    features: str  # the feature caches' folder

    @property
    def opts(self) -> dict:  # progress bars only when one command runs at a time
        return dict(threads=self.threads, progress=self.slots == 1)

    @property
    def scst_epochs(self) -> int:
        return self.s["scst_epochs"] if self.cfg.scst_epochs is None else self.cfg.scst_epochs

    def common(self) -> List[str]:
        """The flags every training command gets: the stand-ins, the data and the feature caches."""
        p = self.paths
        return ["--ckpt_dir", p["ckpt_dir"], "--tokenizer_path", p["tokenizer"], *encoder_flags(self.cfg, p),
                "--train_images", p["train_images"], "--train_annotations", p["train_ann"],
                "--features", os.path.join(self.features, "train"), "--val_images", p["val_images"],
                "--val_annotations", p["val_ann"], "--val_features", os.path.join(self.features, "val"),
                "--prefix_len", 4, "--num_workers", 0, "--log_every", 20, "--save_every", 100000, "--seed", self.cfg.seed]

    def best(self) -> str:
        return self.jobs.results["pick"]

    def final(self) -> str:
        return os.path.join(self.folder, "scst" if self.scst_epochs else f"xe-{self.best()}")


def start_run(cfg: DemoConfig, log) -> DemoRun:
    """The data (drawn or checked), a new run folder, and the job runner for this machine."""
    check_output_dir(cfg.root, "--root")
    s = dict(SCALES[cfg.scale], seed=cfg.seed)  # the stand-ins' stamps hold the seed: one cache per seed
    lock = threading.Lock()

    def say(message: str) -> None:  # jobs run side by side: one message at a time
        with lock:
            log(message)
            sys.stdout.flush()

    paths = prepare_data(cfg, s, say)
    slots, threads = cpu_plan()
    run = DemoRun(cfg, s, paths, new_run_folder(paths["runs"]), Jobs(slots, say), say, slots, threads,
                  features_dir(cfg, paths))
    say(f"this run: {run.folder}; up to {slots} command(s) at a time, {threads} thread(s) each" +
        ("; a command's progress bars are shown when it runs alone" if slots > 1 else ""))
    return run


def add_standins(d: DemoRun) -> None:
    """The two stand-ins side by side; the feature caches as soon as the CLIP is there."""
    d.jobs.add("stand-in LLaMA", lambda: build_standin("LLaMA", d.paths, d.s, d.say, d.threads))
    if not d.cfg.clip_model:
        d.jobs.add("stand-in CLIP", lambda: build_standin("CLIP", d.paths, d.s, d.say, d.threads))
    encoder = encoder_flags(d.cfg, d.paths)
    for split in ("train", "val"):
        d.jobs.add(f"features {split}", lambda split=split: features(d.paths, encoder, d.features, split, d.say,
                                                                     threads=d.threads), after=["stand-in CLIP"])


def add_cross_entropy(d: DemoRun) -> None:
    """Cross-entropy with each projection side by side, each captioning val when it is done; then
    the better one by validation CIDEr."""
    for proj in d.cfg.projections:
        folder = os.path.join(d.folder, f"xe-{proj}")
        d.jobs.add(f"xe-{proj}", lambda proj=proj, folder=folder: launch(
            "-m", "llama_caption", "train", *d.common(), "--out_dir", folder, "--projection", proj,
            "--epochs", d.s["epochs"], "--batch_size", d.s["batch_size"], "--lr", XE_LR.get(proj, d.s["lr"]),
            "--warmup_steps", 50, *PROJECTION_FLAGS.get(proj, []), log=d.say, **d.opts),
                   after=["stand-in LLaMA", "features train", "features val"])
        d.jobs.add(f"caption xe-{proj}", lambda folder=folder: caption(d.paths, folder, "captions", folder, d.say,
                                                                       ["--gallery", 24], **d.opts), after=[f"xe-{proj}"])
    xe = [f"caption xe-{p}" for p in d.cfg.projections]
    d.jobs.add("pick", lambda: pick_best(d.paths, {p: d.jobs.results[f"caption xe-{p}"] for p in d.cfg.projections}),
               after=xe)


def add_scst(d: DemoRun) -> None:
    """SCST from the better projection, alone, data-parallel over the slots; then its captions."""
    if not d.scst_epochs:
        return
    d.jobs.add("scst", lambda: launch(
        "-m", "llama_caption", "train", *d.common(), "--out_dir", d.final(), "--projection", d.best(),
        *PROJECTION_FLAGS.get(d.best(), []), "--objective", "scst",
        "--init_from", os.path.join(d.folder, f"xe-{d.best()}"), "--scst_samples", 5,
        "--scst_temperature", d.s["scst_temperature"], "--epochs", d.scst_epochs, "--batch_size", d.s["scst_batch"],
        "--lr", d.s["scst_lr"], "--warmup_steps", 0, "--max_caption_len", 20, log=d.say, nproc=d.slots,
        threads=d.threads), after=["pick"], width=d.slots)
    d.jobs.add("caption scst", lambda: caption(d.paths, d.final(), "captions", d.final(), d.say, ["--gallery", 24],
                                               **d.opts), after=["scst"])


def add_best_of(d: DemoRun) -> None:
    """Greedy against the best of --best_of candidates by each rerank rule, from the final
    weights, each timed (tools/demo/best_of.py); scored with the stages."""
    if not d.cfg.best_of:
        return
    p = d.paths
    d.jobs.add("best of", lambda: launch(
        "-m", "llama_caption.tools.demo.best_of", "--ckpt_dir", p["ckpt_dir"], "--tokenizer_path", p["tokenizer"],
        "--checkpoint", d.final(), "--annotations", p["val_ann"], "--images", p["val_images"],
        "--out_dir", os.path.join(d.final(), "best_of"), "--n", d.cfg.best_of, "--temperature", d.s["scst_temperature"],
        log=d.say, **d.opts), after=["scst", "pick"])


def best_of_files(d: DemoRun) -> Dict[str, str]:
    """The best-of block's results files that were written (no clip.json when the CLIP reads no text)."""
    files = {way: os.path.join(d.final(), "best_of", f"{way}.json") for way in ("greedy",) + RULES}
    return {way: path for way, path in files.items() if os.path.isfile(path)}


def add_control_and_scoring(d: DemoRun) -> None:
    """The shuffled control from the final weights, then one evaluate of every stage's captions
    and the best-of block's (METEOR's Java start, most of a scoring, paid once)."""
    d.jobs.add("caption control", lambda: caption(d.paths, d.final(), "control", d.final(), d.say,
                                                  ["--gallery", 0, "--control_shuffle", "True"], **d.opts),
               after=["scst", "pick"])
    captions = [f"caption {name}" for name in stage_names(d)]
    best_of = (lambda: list(best_of_files(d).values())) if d.cfg.best_of else list
    d.jobs.add("score", lambda: score(d.paths, [d.jobs.results[c] for c in captions] + best_of(),
                                      clipscore_flags(d.cfg, d.paths), d.say, **d.opts),
               after=captions + (["best of"] if d.cfg.best_of else []))


def stage_names(d: DemoRun) -> List[str]:
    return [f"xe-{p}" for p in d.cfg.projections] + (["scst"] if d.scst_epochs else []) + ["control"]


def pick_best(paths: Dict[str, str], results: Dict[str, str]) -> str:
    """The projection whose validation captions have the highest CIDEr (pycocoevalcap's, on
    lowercased words without punctuation: the final table's PTB tokenizer gives the same words on
    the synthetic set, and needs a Java start that the final scoring pays once for all)."""
    from pycocoevalcap.cider.cider import Cider

    refs: Dict[int, List[str]] = {}
    with open(paths["val_ann"], encoding="utf-8") as f:
        for a in json.load(f)["annotations"]:
            refs.setdefault(a["image_id"], []).append(plain_words(a["caption"]))

    def cider(path: str) -> float:
        with open(path, encoding="utf-8") as f:
            res = {r["image_id"]: [plain_words(r["caption"])] for r in json.load(f)}
        return Cider().compute_score({i: refs[i] for i in res}, res)[0]

    return max(results, key=lambda p: cider(results[p]))


def plain_words(text: str) -> str:
    return " ".join(re.findall(r"[a-z0-9'\-]+", text.lower()))


def demo_report(d: DemoRun, stages: Dict[str, dict], truth: Optional[dict], seconds: float) -> dict:
    """What demo_report.json holds: each stage's metrics (and attribute accuracy on the synthetic
    set), what `make serve` opens, the seconds of each step."""
    p = d.paths
    report = {"best_projection": d.best(), "final": d.final(), "stages": {}, "slots": d.slots, "threads": d.threads,
              "seed": d.cfg.seed, "cpu_capability": torch.backends.cpu.get_cpu_capability(),
              # relative to this report's folder: a copied or moved demo_runs/ still serves
              "serve": {k: os.path.relpath(v, d.folder) for k, v in dict(
                  ckpt_dir=p["ckpt_dir"], tokenizer_path=p["tokenizer"], checkpoint=d.final(),
                  images=p["val_images"], annotations=p["val_ann"],
                  **({} if d.cfg.clip_model else {"clip_model": p["clip"]})).items()},
              "stage_seconds": {k: round(v, 1) for k, v in d.jobs.seconds.items()}}
    for name, out in stages.items():
        report["stages"][name] = {"metrics": out["metrics"]}
        if truth:
            report["stages"][name]["attributes"] = attribute_accuracy(out["results"], truth)
    report["seconds"] = seconds
    zs = os.path.join(p["standins"], "clip_zero_shot.json")
    if os.path.isfile(zs) and not d.cfg.clip_model and truth:
        with open(zs) as f:
            report["clip_zero_shot"] = json.load(f)
    return report


def best_of_report(d: DemoRun, scored: Dict[str, dict]) -> dict:
    """Each way's CIDEr, CLIP-S and seconds per image (the best-of block)."""
    files = best_of_files(d)
    with open(os.path.join(d.final(), "best_of", "times.json")) as f:
        times = json.load(f)
    ways = {way: {"CIDEr": scored[path]["metrics"]["CIDEr"], "CLIP-S": scored[path]["metrics"].get("CLIP-S"),
                  "seconds_per_image": times["seconds_per_image"][way]} for way, path in files.items()}
    return {"n": times["n"], "temperature": times["temperature"], "ways": ways}


def best_of_lines(block: dict) -> List[str]:
    lines = [f"\nbest of {block['n']} (sampled at temperature {block['temperature']:g}) against greedy, final weights:",
             f"{'':24}{'CIDEr':>8}{'CLIP-S':>8}{'ms/image':>10}"]
    labels = {"greedy": "greedy", "logprob": "best by log-prob", "clip": "best by CLIP-S", "mbr": "best by MBR (CIDEr)"}
    for way, v in block["ways"].items():
        clip_s = f"{v['CLIP-S'] * 100:8.1f}" if v["CLIP-S"] is not None else f"{'-':>8}"
        lines.append(f"{labels[way]:24}{v['CIDEr'] * 100:8.1f}{clip_s}{v['seconds_per_image'] * 1000:10.2f}")
    return lines


def val_attributes(paths: Dict[str, str]) -> Optional[dict]:
    """The true attributes of the synthetic validation images (None for a user's dataset)."""
    if not (paths["val_attrs"] and os.path.isfile(paths["val_attrs"])):
        return None
    with open(paths["val_attrs"]) as f:
        return json.load(f)


def run_demo(cfg: DemoConfig, log=print) -> dict:
    t_start = time.time()
    d = start_run(cfg, log)
    for add in (add_standins, add_cross_entropy, add_scst, add_best_of, add_control_and_scoring):
        add(d)
    d.jobs.run()
    scored = d.jobs.results["score"]
    stages = {name: scored[d.jobs.results[f"caption {name}"]] for name in stage_names(d)}
    truth = val_attributes(d.paths)
    report = demo_report(d, stages, truth, time.time() - t_start)
    if d.cfg.best_of:
        report["best_of"] = best_of_report(d, scored)
    write_json(os.path.join(d.folder, "demo_report.json"), report, indent=1)
    print_report(report, stages, truth, d.folder)
    return report


def clip_s_line(report: dict, final: str) -> Optional[str]:
    """CLIP-S (x100, by the demo's own CLIP) of the final captions beside the shuffled control's,
    which sees other images: the gap is how much the captions fit their own image."""
    clip_s = {k: v["metrics"]["CLIP-S"] * 100 for k, v in report["stages"].items() if "CLIP-S" in v["metrics"]}
    if final not in clip_s:
        return None
    line = f"CLIP-S (the demo's CLIP): {STAGE_LABELS.get(final, final)} {clip_s[final]:.1f}"
    if "control" in clip_s:
        line += f", shuffled control {clip_s['control']:.1f} ({clip_s[final] - clip_s['control']:+.1f})"
    return line


STAGE_LABELS = {"xe-mlp": "cross-entropy, MLP", "xe-linear": "cross-entropy, linear",
                "xe-transformer": "cross-entropy, mapper", "scst": "SCST", "control": "shuffled control"}


def newest_demo_run(root: str = "demo_runs") -> Dict[str, str]:
    """The newest finished demo run under `root` (the demo's --root, one scale's folder in it, its
    runs/ folder or a run's own folder): its LLaMA, tokenizer, final checkpoint and validation
    images (what `make serve` and `bench-serve` use)."""
    import glob

    reports = [p for pattern in ("*/runs/*", "runs/*", "*", "") for p in
               glob.glob(os.path.join(glob.escape(root), pattern, "demo_report.json"))]
    for path in sorted(reports, key=os.path.getmtime, reverse=True):
        try:
            with open(path, encoding="utf-8") as f:
                found = json.load(f).get("serve")
        except (OSError, ValueError):
            continue
        if not isinstance(found, dict) or not all(isinstance(v, str) for v in found.values()):
            continue
        found = {k: os.path.normpath(os.path.join(os.path.dirname(path), v)) for k, v in found.items()}
        if all(os.path.exists(found.get(k) or "") for k in ("ckpt_dir", "checkpoint", "images")):
            return found
    raise UserError(f"no finished demo run under {root}/ (with its models still there): run `make demo` first")


def print_report(report, stages, truth, run: str) -> None:
    print("\n" + "=" * 78)
    print("llama_caption demo: val images captioned by the trained projections")
    first = next(iter(stages.values()))["metrics"]
    names = [m for m in METRIC_ORDER if m in first]
    print(f"\n{'':24}" + "".join(f"{m:>10}" for m in names))
    for k in stages:
        label = STAGE_LABELS.get(k, k) + (f" (from {report['best_projection']})" if k == "scst" else "")
        values = report["stages"][k]["metrics"]
        print(f"{label:24}" + "".join(f"{values[m] * 100:10.2f}" if m in values else f"{'-':>10}" for m in names))
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
    clip_line = clip_s_line(report, final)
    if clip_line:
        print(clip_line)
    if report.get("best_of"):
        print("\n".join(best_of_lines(report["best_of"])))
    folder = report["final"]
    print(f"gallery: {os.path.join(folder, 'captions.gallery.html')}")
    print(f"curves: {os.path.join(folder, 'loss_curve.png')}")
    print(f"report: {os.path.join(run, 'demo_report.json')}")


main = command(DemoConfig, run_demo, "Build the stand-ins (cached), train the projection with the real scripts, caption val.")
