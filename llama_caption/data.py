"""COCO 2014 captions (pycocotools), nocaps, Karpathy's splits of COCO, Flickr8k and Flickr30k,
robust image loading, batching.

Records are (image_id, path, captions), with the dataset they come from (image ids are only
unique within one) and, for nocaps, the image's domain. Training samples are either every caption of every
image (ClipCap's epoch) or one caption per image, drawn afresh each epoch. Batches are cut from
one seeded permutation per epoch, so N data-parallel ranks together see exactly the batches of
one process with an N-times larger batch, and a resumed run sees the batches it would have seen.
"""

import contextlib
import io
import json
import os
import random
from dataclasses import dataclass, field
from typing import Dict, List, Optional

import numpy as np
import torch
from PIL import Image

from .config import Config, setting
from .errors import UserError

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff")


@dataclass
class ImageRecord:
    image_id: int
    path: str
    captions: List[str] = field(default_factory=list)
    dataset: str = "coco"  # coco, nocaps, flickr8k, flickr30k: the space its image id belongs to
    domain: Optional[str] = None  # nocaps: in-domain, near-domain or out-domain


NOCAPS_DOMAINS = ("in-domain", "near-domain", "out-domain")


def read_json(path: str, flag: str):
    if not os.path.isfile(path):
        raise UserError(f"{path} not found: check {flag}")
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UserError(f"{path} is not valid JSON ({e}): re-download it or check {flag}") from None


def usable_caption(c) -> bool:
    return isinstance(c, str) and bool(c.strip())


def check_coco_invariants(data: dict, path: str, flag: str) -> None:
    """What COCO's own format promises and pycocotools' index assumes (it keeps the last of two
    entries with one id, silently): image ids and file names unique, annotation ids unique, every
    annotation naming a known image by a whole-number id. Broken, captions would reach images
    that are not theirs."""
    first = {}
    for im in data["images"]:
        for key in ("id", "file_name"):
            seen = first.setdefault(key, {})
            if im[key] in seen:
                raise UserError(f"{path}: two images have {key} {im[key]!r}: check {flag}")
            seen[im[key]] = True
    ids = set()
    for a in data["annotations"]:
        if not isinstance(a, dict):
            raise UserError(f"{path}: an annotation is not a JSON object: check {flag}")
        image_id = a.get("image_id")
        if not isinstance(image_id, int) or isinstance(image_id, bool) or image_id not in first.get("id", {}):
            raise UserError(f"{path}: an annotation names image_id {image_id!r}, which is not an image of the file: "
                            f"check {flag}")
        if "id" in a:
            if not isinstance(a["id"], (int, str)) or isinstance(a["id"], bool):
                raise UserError(f"{path}: annotation id {a['id']!r} is not a whole number: check {flag}")
            if a["id"] in ids:
                raise UserError(f"{path}: two annotations have id {a['id']!r}: check {flag}")
            ids.add(a["id"])


def check_domains(images: list, path: str, flag: str) -> bool:
    """nocaps: every image has a `domain` of NOCAPS_DOMAINS, or none has one (COCO). Returns
    whether the file is nocaps'."""
    marked = [im for im in images if "domain" in im]
    if not marked:
        return False
    odd = next((im for im in images if im.get("domain") not in NOCAPS_DOMAINS), None)
    if odd is not None:
        raise UserError(f"{path}: image {odd['id']} has domain {odd.get('domain')!r}; a nocaps file gives every image "
                        f"one of {', '.join(NOCAPS_DOMAINS)}: check {flag}")
    return True


def read_coco_captions(path: str, flag: str = "--annotations", log=None) -> Dict[int, tuple]:
    """A COCO captions file as {image_id: (file_name, [captions], domain)}, through pycocotools'
    index; domain is None but in nocaps' files (nocaps_val_4500_captions.json).

    Image ids must be whole numbers (a one-line error otherwise); captions that are empty or not
    text are skipped and counted (a warning through `log`).
    """
    from pycocotools.coco import COCO

    data = read_json(path, flag)
    if not isinstance(data, dict) or not isinstance(data.get("images"), list) \
            or not isinstance(data.get("annotations"), list):
        raise UserError(f"{path} is not a COCO captions file (needs 'images' and 'annotations' lists): check {flag}")
    for im in data["images"]:
        if not isinstance(im, dict) or "id" not in im:
            raise UserError(f"{path}: an image entry has no id: check {flag}")
        if not isinstance(im["id"], int) or isinstance(im["id"], bool):
            raise UserError(f"{path}: image id {im['id']!r} is not a whole number, as COCO's are: check {flag}")
        if not isinstance(im.get("file_name"), str):
            raise UserError(f"{path}: image {im['id']} has no file_name")
    check_coco_invariants(data, path, flag)
    check_domains(data["images"], path, flag)
    anns = [a for a in data["annotations"] if usable_caption(a.get("caption"))]
    skipped = len(data["annotations"]) - len(anns)
    coco = COCO()
    # Annotations without an id get ones of their own, after every stated id.
    free = max([a["id"] for a in anns if isinstance(a.get("id"), int)] + [0]) + 1
    coco.dataset = dict(data, annotations=[a if "id" in a else dict(a, id=free + k) for k, a in enumerate(anns)])
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            coco.createIndex()
    except (KeyError, TypeError) as e:
        raise UserError(f"{path}: malformed COCO annotations ({type(e).__name__}: {e})") from None
    if skipped and log:
        log(f"warning: {path}: {skipped} caption(s) skipped (empty or not text)")
    return {img_id: (coco.imgs[img_id]["file_name"], [a["caption"] for a in coco.imgToAnns.get(img_id, [])],
                     coco.imgs[img_id].get("domain")) for img_id in sorted(coco.imgs)}


def load_coco(images_dir: str, annotations: str, flag: str = "--annotations", log=None) -> List[ImageRecord]:
    """Every image of a COCO captions file with its captions (captions_train2014.json and the like;
    nocaps' file too, its images named by file_name under images_dir, each with its domain)."""
    return [ImageRecord(i, os.path.join(images_dir, name), caps, "nocaps" if domain else "coco", domain)
            for i, (name, caps, domain) in read_coco_captions(annotations, flag, log).items()]


KARPATHY_SPLITS = {"train": ("train", "restval"), "val": ("val",), "test": ("test",)}
KARPATHY_SHAPE = ("Karpathy's files (dataset_coco.json, dataset_flickr8k.json, dataset_flickr30k.json) hold "
                  "{'images': [{'filename', 'imgid' (COCO: 'cocoid'), 'split', 'sentences': [{'raw'}]}]}")


def karpathy_dataset(data: dict, path: str) -> str:
    """coco, flickr8k or flickr30k: the file's own `dataset` field, else its name."""
    name = data.get("dataset")
    if not isinstance(name, str):
        base = os.path.basename(path).lower()
        name = next((d for d in ("flickr30k", "flickr8k") if d in base), "coco")
    return name


def karpathy_entry(img, path: str, flag: str, id_key: str = "imgid") -> tuple:
    """(image id, filename, filepath, split, captions) of one image entry, or a one-line error.
    The id is `cocoid` where there is one (COCO: what COCO's own files and results use), else `imgid`."""
    def bad(what: str):
        return UserError(f"{path}: {what}: not one of Karpathy's files ({KARPATHY_SHAPE}): check {flag}")

    if not isinstance(img, dict):
        raise bad("an image entry is not a JSON object")
    key = id_key  # one id for the whole file: COCO's cocoid and imgid ranges overlap
    image_id = img.get(key)
    if not isinstance(image_id, int) or isinstance(image_id, bool):
        raise bad(f"an image has {key} {image_id!r}, not a whole number")
    if not isinstance(img.get("filename"), str) or not img["filename"]:
        raise bad(f"image {image_id} has no filename")
    for part in (img["filename"], img.get("filepath") or ""):
        if isinstance(part, str) and (os.path.isabs(part) or ".." in part.replace("\\", "/").split("/")):
            raise bad(f"image {image_id} names {part!r}, outside the images folder")
    if img.get("split") not in ("train", "restval", "val", "test"):
        raise bad(f"image {image_id} has split {img.get('split')!r}, not train, restval, val or test")
    sentences = img.get("sentences")
    if not isinstance(sentences, list) or not all(isinstance(x, dict) for x in sentences):
        raise bad(f"image {image_id}: sentences is missing or not a list of objects")
    if not all(isinstance(x.get("raw"), str) for x in sentences):
        raise bad(f"image {image_id}: a sentence has no raw text")
    filepath = img.get("filepath") or ""
    if not isinstance(filepath, str):
        raise bad(f"image {image_id}: filepath is not text")
    caps = [x["raw"] for x in sentences if usable_caption(x.get("raw"))]
    return image_id, img["filename"], filepath, img["split"], caps


def load_karpathy(split_file: str, images_root: str, split: str, flag: str = "--karpathy_split") -> List[ImageRecord]:
    """One split of Karpathy's dataset_coco.json, dataset_flickr8k.json or dataset_flickr30k.json
    ('train' is train+restval). An image is images_root/filepath/filename (COCO: images_root
    holds train2014/ and val2014/), else images_root/filename (Flickr: the folder of the images).
    Ids are `cocoid` (COCO) or `imgid` (Flickr), and must be unique in the file."""
    if split not in KARPATHY_SPLITS:
        raise UserError(f"--split {split!r} must be one of {list(KARPATHY_SPLITS)}")
    data = read_json(split_file, flag)
    if not isinstance(data, dict) or not isinstance(data.get("images"), list):
        raise UserError(f"{split_file} has no 'images' list: not one of Karpathy's files ({KARPATHY_SHAPE}): check {flag}")
    dataset, records, seen = karpathy_dataset(data, split_file), [], {}
    with_cocoid = [isinstance(img, dict) and "cocoid" in img for img in data["images"]]
    if any(with_cocoid) and not all(with_cocoid):
        first = with_cocoid.index(False)
        raise UserError(f"{split_file}: image #{first + 1} has no cocoid while others do (COCO's imgid and cocoid "
                        f"overlap, so ids could collide): not one of Karpathy's files ({KARPATHY_SHAPE}): check {flag}")
    id_key = "cocoid" if any(with_cocoid) else "imgid"
    for img in data["images"]:
        image_id, filename, filepath, where, caps = karpathy_entry(img, split_file, flag, id_key)
        for key in (("id", image_id), ("file", (filepath, filename))):
            if key in seen:
                raise UserError(f"{split_file}: two images have the {key[0]} {key[1]!r}: captions would reach an image that "
                                f"is not theirs: check {flag}")
            seen[key] = True
        if where not in KARPATHY_SPLITS[split]:
            continue
        nested = os.path.join(images_root, filepath, filename)
        flat = os.path.join(images_root, filename)
        path = nested if os.path.exists(nested) or not os.path.exists(flat) else flat
        records.append(ImageRecord(image_id, path, caps, dataset))
    if not records:
        found = sorted({img["split"] for img in data["images"]})
        raise UserError(f"{split_file} has no image in split {split!r} (its splits: {', '.join(found) or 'none'}): "
                        f"pick another --split")
    return records


@dataclass(kw_only=True)
class SplitSettings(Config):
    """Where a split's references are, COCO's captions JSON or a Karpathy split file and its split:
    the flags of `features`, `caption` and `evaluate` (a config inherits them; a command whose
    usual split differs sets USUAL_SPLIT)."""

    annotations: Optional[str] = setting(None, "COCO captions JSON of the split: its references (captions_val2014.json; nocaps_val_4500_captions.json, also scored per domain, its images found by file_name in --images).")
    karpathy_split: Optional[str] = setting(None, "instead of --annotations: Karpathy's dataset_coco.json (then --images holds train2014/ and val2014/), dataset_flickr8k.json or dataset_flickr30k.json (then --images holds the images); --split picks the split.")
    split: Optional[str] = setting(None, "with --karpathy_split: its split, test, val or train (train with restval); default: the command's usual split (test; train for features).")

    USUAL_SPLIT = "test"  # the Karpathy split taken when --split is not given

    def check(self) -> None:
        super().check()
        self.check_split()

    def check_split(self, required: bool = False) -> None:
        """At most one kind of references (with `required`: exactly one); --split only with a
        Karpathy file (a captions JSON is one split already: a --split beside it would be ignored)."""
        if (self.annotations and self.karpathy_split) or (required and not (self.annotations or self.karpathy_split)):
            raise UserError("give the references as --annotations FILE or as --karpathy_split FILE (with --split), "
                            "one of the two")
        if self.split is not None and not self.karpathy_split:
            raise UserError(f"--split {self.split} picks a split of a --karpathy_split file; give one, or leave --split "
                            f"out (an --annotations file is one split already)")

    @property
    def chosen_split(self) -> str:
        return self.split or self.USUAL_SPLIT


def load_split(images: str, annotations: Optional[str], karpathy_split: Optional[str], split: str,
               images_flag: str, annotations_flag: str, log=None) -> List[ImageRecord]:
    if not images or not os.path.isdir(images):
        raise UserError(f"{images_flag} {images} is not a folder")
    if karpathy_split:
        return load_karpathy(karpathy_split, images, split)
    if not annotations:
        raise UserError(f"{annotations_flag} is required (or --karpathy_split)")
    return load_coco(images, annotations, annotations_flag, log)


def drop_missing(records: List[ImageRecord], log=print, need_captions: bool = True) -> List[ImageRecord]:
    """Drop records whose image file does not exist (and, for training, that have no usable
    caption), and say so."""
    missing = [r.path for r in records if not os.path.isfile(r.path)]
    if missing:
        log(f"warning: {len(missing)} annotated image(s) not found, skipped (first: {missing[0]})")
    uncaptioned = sum(1 for r in records if not r.captions) if need_captions else 0
    if uncaptioned:
        log(f"warning: {uncaptioned} image(s) have no usable caption, skipped")
    return [r for r in records if os.path.isfile(r.path) and (r.captions or not need_captions)]


def open_rgb(path: str) -> Image.Image:
    """Open any image as 8-bit RGB: L, LA, P, RGBA (over white), CMYK, I;16 and I included.

    Raises OSError (or ValueError) for a missing, unreadable or truncated file.
    """
    with Image.open(path) as im:
        im.load()  # decode now: a truncated JPEG fails here, not later
        if im.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
            arr = np.asarray(im, dtype=np.float64)
            top = 65535.0 if im.mode.startswith("I;16") else max(float(arr.max()), 1.0)
            return Image.fromarray(np.clip(arr / top * 255.0, 0, 255).astype(np.uint8), "L").convert("RGB")
        if im.mode == "P" and "transparency" in im.info:
            im = im.convert("RGBA")
        if im.mode in ("RGBA", "LA", "PA"):
            rgba = im.convert("RGBA")
            canvas = Image.new("RGB", rgba.size, (255, 255, 255))
            canvas.paste(rgba, mask=rgba.getchannel("A"))
            return canvas
        return im.convert("RGB")


def list_image_files(paths) -> List[str]:
    """Files and folders given on the command line to a sorted list of image files."""
    if isinstance(paths, str):
        paths = [paths]
    files = []
    for p in paths:
        if os.path.isdir(p):
            files += sorted(os.path.join(p, f) for f in os.listdir(p) if f.lower().endswith(IMAGE_EXTENSIONS))
        elif os.path.exists(p):
            files.append(p)
        else:
            raise UserError(f"--images {p}: no such file or folder")
    return files


CAPTION_MODES = ("all", "one")


class CaptionDataset(torch.utils.data.Dataset):
    """Samples of (image, caption). `features` (a FeatureCache) replaces image decoding."""

    def __init__(self, records: List[ImageRecord], transform=None, features=None,
                 captions: str = "all", seed: int = 0):
        if captions not in CAPTION_MODES:
            raise ValueError(f"captions {captions!r} is not one of {CAPTION_MODES}")
        self.records, self.transform, self.features = records, transform, features
        self.mode, self.seed, self.epoch = captions, seed, 0
        if captions == "all":
            self.samples = [(i, j) for i, r in enumerate(records) for j in range(len(r.captions))]
        else:
            self.samples = [(i, -1) for i in range(len(records))]

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self):
        return len(self.samples)

    def caption(self, index: int) -> str:
        i, j = self.samples[index]
        caps = self.records[i].captions
        if j < 0:  # the same draw on every rank and every worker: seeded by (seed, epoch, image)
            j = random.Random(f"{self.seed}/{self.epoch}/{self.records[i].image_id}").randrange(len(caps))
        return caps[j]

    def first_samples(self) -> List[int]:
        """The index of each image's first sample, in the records' order: one sample per image."""
        firsts = {}
        for index, (i, _) in enumerate(self.samples):
            firsts.setdefault(i, index)
        return [firsts[i] for i in sorted(firsts)]

    def __getitem__(self, index: int) -> Dict:
        i, _ = self.samples[index]
        rec = self.records[i]
        item = {"image_id": rec.image_id, "caption": self.caption(index)}
        if self.features is not None:
            item["features"] = self.features.get(rec.image_id)
            return item
        try:
            item["pixels"] = self.transform(open_rgb(rec.path))
        except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
            return {"bad": rec.path, "reason": f"{type(e).__name__}: {e}"}
        return item


class ImageFiles(torch.utils.data.Dataset):
    """Images only (feature extraction, inference): one item per record."""

    def __init__(self, records: List[ImageRecord], transform):
        self.records, self.transform = records, transform

    def __len__(self):
        return len(self.records)

    def __getitem__(self, index):
        rec = self.records[index]
        try:
            return {"image_id": rec.image_id, "pixels": self.transform(open_rgb(rec.path)), "path": rec.path}
        except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
            return {"bad": rec.path, "reason": f"{type(e).__name__}: {e}"}


def report_bad_images(bad: List[tuple], log, shown: int = 20) -> None:
    """Warn about images that could not be read: (path, reason) pairs, the first `shown` of them."""
    for path, reason in bad[:shown]:
        log(f"warning: skipped unreadable image {path} ({reason})")
    if len(bad) > shown:
        log(f"warning: ... and {len(bad) - shown} more unreadable image(s)")


def collate(items: List[Dict]) -> Dict:
    """Stack the good items; bad images travel as a list of (path, reason) to be counted."""
    good = [x for x in items if "bad" not in x]
    batch = {"bad": [(x["bad"], x["reason"]) for x in items if "bad" in x],
             "image_id": [x["image_id"] for x in good]}
    if good and "caption" in good[0]:
        batch["caption"] = [x["caption"] for x in good]
    if good and "path" in good[0]:
        batch["path"] = [x["path"] for x in good]
    for key in ("pixels", "features"):
        if good and key in good[0]:
            batch[key] = torch.stack([x[key] for x in good])
    return batch


class StepBatches(torch.utils.data.Sampler):
    """Index lists for this rank: per optimizer step, `accum` micro-batches of `micro` samples.

    One permutation per epoch (seed + epoch); step s takes the window perm[s*G:(s+1)*G] with
    G = micro * accum * dp_size, micro-batch m of rank r being its slice starting at
    (m * dp_size + r) * micro. The last incomplete window is dropped. `start_step` skips
    finished steps when resuming.
    """

    def __init__(self, n: int, micro: int, accum: int, dp_size: int, dp_rank: int, seed: int,
                 epoch: int = 0, start_step: int = 0):
        self.n, self.micro, self.accum, self.dp, self.rank = n, micro, accum, dp_size, dp_rank
        self.seed, self.epoch, self.start_step = seed, epoch, start_step

    @property
    def global_batch(self) -> int:
        return self.micro * self.accum * self.dp

    @property
    def steps(self) -> int:
        return self.n // self.global_batch

    def __len__(self):
        return (self.steps - self.start_step) * self.accum

    def __iter__(self):
        g = torch.Generator().manual_seed(self.seed + self.epoch)
        perm = torch.randperm(self.n, generator=g).tolist()
        G = self.global_batch
        for s in range(self.start_step, self.steps):
            for m in range(self.accum):
                start = s * G + (m * self.dp + self.rank) * self.micro
                yield perm[start:start + self.micro]
