"""A synthetic captions dataset written exactly like COCO 2014: coloured shapes on a background.

    python -m llama_caption demo.shapes --out data/shapes --train 2000 --val 200

Writes OUT/train2014/*.png, OUT/val2014/*.png, OUT/annotations/captions_{train,val}2014.json
(pycocotools reads them) and OUT/annotations/attributes_{train,val}2014.json (the true shape,
colour, background and size of every image, for measuring caption accuracy). Deterministic
from --seed.
"""

import json
import os
import random
from typing import Dict, List

from PIL import Image, ImageDraw

from ...fileio import write_json

SHAPES = ("circle", "square", "triangle")
COLOURS = {"red": (220, 30, 30), "green": (30, 170, 40), "blue": (40, 70, 220), "yellow": (240, 220, 30),
           "purple": (140, 40, 180), "white": (245, 245, 245), "black": (15, 15, 15)}
SHAPE_COLOURS = ("red", "green", "blue", "yellow", "purple")
BACKGROUNDS = ("white", "black", "red", "green", "blue", "yellow")
SIZES = ("small", "large")
# Other words for each shape, so captions vary in wording as COCO's five captions do.
SYNONYMS = {"circle": ("circle", "round shape", "disc"), "square": ("square", "box shape", "square shape"),
            "triangle": ("triangle", "three-sided shape", "triangle shape")}
TEMPLATES = (
    "a {size} {colour} {shape} on a {bg} background",
    "a {colour} {syn} against {bg}",
    "{size} {colour} {shape} drawn on {bg}",
    "there is a {colour} {syn} on a {bg} backdrop",
    "a {bg} picture with a {size} {colour} {shape}",
    "one {colour} {syn} in front of a plain {bg} background",
    "a simple drawing of a {colour} {shape} over {bg}",
    "the {colour} {shape} is {size} and the background is {bg}",
)


def draw(attrs: Dict, size: int, rng: random.Random) -> Image.Image:
    img = Image.new("RGB", (size, size), COLOURS[attrs["background"]])
    d = ImageDraw.Draw(img)
    frac = rng.uniform(0.32, 0.42) if attrs["size"] == "small" else rng.uniform(0.62, 0.78)
    s = int(size * frac)
    x0, y0 = rng.randint(1, size - s - 1), rng.randint(1, size - s - 1)
    fill = tuple(max(0, min(255, c + rng.randint(-20, 20))) for c in COLOURS[attrs["colour"]])
    if attrs["shape"] == "circle":
        d.ellipse([x0, y0, x0 + s, y0 + s], fill=fill)
    elif attrs["shape"] == "square":
        d.rectangle([x0, y0, x0 + s, y0 + s], fill=fill)
    else:
        d.polygon([(x0 + s / 2, y0), (x0, y0 + s), (x0 + s, y0 + s)], fill=fill)
    return img


def captions_for(attrs: Dict, rng: random.Random, n: int = 5) -> List[str]:
    out = []
    for t in rng.sample(TEMPLATES, n):
        out.append(t.format(size=attrs["size"], colour=attrs["colour"], shape=attrs["shape"],
                            syn=rng.choice(SYNONYMS[attrs["shape"]]), bg=attrs["background"]))
    return out


def random_attributes(rng: random.Random) -> Dict:
    colour = rng.choice(SHAPE_COLOURS)
    return {"shape": rng.choice(SHAPES), "colour": colour, "size": rng.choice(SIZES),
            "background": rng.choice([b for b in BACKGROUNDS if b != colour])}


def make_split(out: str, split: str, n: int, seed: int, image_size: int, first_id: int) -> None:
    rng = random.Random(f"{seed}/{split}")
    folder = os.path.join(out, f"{split}2014")
    os.makedirs(folder, exist_ok=True)
    images, anns, attributes = [], [], {}
    for k in range(n):
        image_id = first_id + k
        attrs = random_attributes(rng)
        name = f"SHAPES_{split}2014_{image_id:012d}.png"
        draw(attrs, image_size, rng).save(os.path.join(folder, name))
        images.append({"id": image_id, "file_name": name, "width": image_size, "height": image_size})
        for c in captions_for(attrs, rng):
            anns.append({"id": len(anns) + first_id * 5, "image_id": image_id, "caption": c})
        attributes[str(image_id)] = attrs
    ann_dir = os.path.join(out, "annotations")
    write_json(os.path.join(ann_dir, f"attributes_{split}2014.json"), attributes)
    # The captions file last: its presence marks the split as complete.
    write_json(os.path.join(ann_dir, f"captions_{split}2014.json"),
               {"info": {"description": "llama_caption synthetic shapes"}, "licenses": [], "type": "captions",
                "images": images, "annotations": anns})


def make_dataset(out: str, train: int = 2000, val: int = 200, seed: int = 0, image_size: int = 64) -> Dict[str, str]:
    """Write both splits (skipping a split that is already complete with the same settings)."""
    stamp_path = os.path.join(out, "annotations", "settings.json")
    settings = {"train": train, "val": val, "seed": seed, "image_size": image_size}
    same = os.path.isfile(stamp_path) and json.load(open(stamp_path)) == settings
    for split, n, first in (("train", train, 1), ("val", val, 1_000_000)):
        if not (same and os.path.isfile(os.path.join(out, "annotations", f"captions_{split}2014.json"))):
            make_split(out, split, n, seed, image_size, first)
    write_json(stamp_path, settings)
    return {split: os.path.join(out, "annotations", f"captions_{split}2014.json") for split in ("train", "val")}

