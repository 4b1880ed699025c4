"""Results files: a COCO results file RESULTS.json and the files that belong to it.

    RESULTS.partial.jsonl   each batch's captions as they come (removed once RESULTS is complete)
    RESULTS.run.json        what made them: checkpoint, LLaMA, CLIP, decoding settings, images
    RESULTS.metrics.json    their scores, and which results file and images they score
    RESULTS.gallery.html    N images with their captions, scores and references (the first, or the worst)

A run started again with the same settings captions only the images that are not done; with
other settings it is refused (another --out, or --overwrite), so a results file never mixes two
runs and old captions or metrics are never reported as new ones.
"""

import html
import json
import os
from typing import Dict, List, Optional

from .captioner import PROJECTION_FILE
from .data import ImageRecord
from .errors import UserError
from .evaluation import check_results
from .fileio import check_output_file, sha256_file, write_json, write_text
from .llama.checkpoint import LlamaCheckpoint


def identity(projection_dir: str, llama: LlamaCheckpoint, tokenizer_file: str, encoder_identity: str,
             quantize: str = "none") -> dict:
    """What captions, as results files record it: the projection, LLaMA and CLIP. A quantized
    LLaMA (`quantize`) is recorded under "llama" (full precision adds no key: older files match)."""
    llama_made = dict(llama.provenance(), tokenizer="sha256:" + sha256_file(tokenizer_file))
    if quantize != "none":
        llama_made["quantize"] = quantize
    return {
        "checkpoint": "sha256:" + sha256_file(os.path.join(projection_dir, PROJECTION_FILE)),
        "llama": llama_made,
        "clip": encoder_identity,
    }


def provenance(made_by: dict, decoding: dict, selection: dict) -> dict:
    """What makes a results file (`identity`, how it decoded, which images): compared key by key
    when a run continues one."""
    return dict(made_by, decoding=decoding, selection=selection)


ABSENT = object()  # a key one record has and the other has not (a setting left at its default)


def first_difference(old, new, where: str = "") -> Optional[str]:
    if isinstance(old, dict) and isinstance(new, dict):
        for k in list(new) + [k for k in old if k not in new]:
            found = first_difference(old.get(k, ABSENT), new.get(k, ABSENT), f"{where}.{k}" if where else k)
            if found:
                return found
        return None
    return None if old == new else f"{where}: {as_recorded(old)} -> {as_recorded(new)}"


def as_recorded(value) -> str:
    return "(not recorded: the default)" if value is ABSENT else json.dumps(value)[:80]


def result_key(r: Dict, annotated: bool):
    return r["image_id"] if annotated else r["file_name"]


class ResultsFiles:
    """A results file and the files that belong to it (see the module docstring)."""

    def __init__(self, out: str):
        stem = out[:-5] if out.endswith(".json") else out
        self.results, self.partial = out, out + ".partial.jsonl"
        self.run, self.metrics, self.gallery = stem + ".run.json", stem + ".metrics.json", stem + ".gallery.html"
        self.sink = None

    def check_paths(self) -> None:
        for path in (self.results, self.partial, self.run, self.metrics, self.gallery):
            check_output_file(path, "--out")

    def existing(self) -> List[str]:
        return [p for p in (self.results, self.partial) if os.path.isfile(p)]

    def previous(self, made_by: dict, overwrite: bool) -> Optional[dict]:
        """Refuse to continue results made by something else; returns the recorded provenance."""
        recorded = None
        if os.path.isfile(self.run):
            try:
                with open(self.run, encoding="utf-8") as f:
                    recorded = json.load(f)
            except (json.JSONDecodeError, UnicodeDecodeError):
                recorded = {}
        if overwrite or not self.existing():
            return recorded
        if recorded is None:
            raise UserError(f"--out {self.results} exists but no {os.path.basename(self.run)} says what made it: "
                            f"pick another --out, or add --overwrite to replace it")
        diff = first_difference(recorded, made_by)
        if diff:
            raise UserError(f"--out {self.results} holds captions made with other settings ({diff}): pick another "
                            f"--out to keep both, or add --overwrite to replace them")
        return recorded

    def load_done(self, annotated: bool) -> Dict:
        """Captions already written by an earlier run of the same settings."""
        done = {}
        if os.path.isfile(self.results):
            try:
                with open(self.results, encoding="utf-8") as f:
                    previous = json.load(f)
            except (json.JSONDecodeError, UnicodeDecodeError) as e:
                raise UserError(f"--out {self.results} exists but is not valid JSON ({e}): move it away or pick another --out") from None
            check_results(previous, self.results)
            done.update({result_key(r, annotated): r for r in previous})
        if os.path.isfile(self.partial):
            with open(self.partial, encoding="utf-8") as f:
                for line in f:
                    try:
                        r = json.loads(line)
                    except json.JSONDecodeError:
                        continue  # the line a crash cut short
                    done[result_key(r, annotated)] = r
        return done

    def start(self, made_by: dict, fresh: bool) -> None:
        """Rank 0: record what makes these results, and open the partial log."""
        if fresh and os.path.isfile(self.partial):
            os.remove(self.partial)
        write_json(self.run, made_by, indent=1)
        self.sink = open(self.partial, "a", encoding="utf-8")

    def append(self, rows: List[Dict]) -> None:
        for row in rows:
            self.sink.write(json.dumps(row) + "\n")
        self.sink.flush()
        os.fsync(self.sink.fileno())

    def finish(self, results: List[Dict]) -> None:
        write_json(self.results, results)
        self.sink.close()
        os.remove(self.partial)


GALLERY_ORDERS = ("first", "worst", "worst_clip_s")
GALLERY_TITLES = {"first": "the first {n} images by image id", "worst": "the {n} captions with the lowest CIDEr, worst first",
                  "worst_clip_s": "the {n} captions with the lowest CLIP-S, worst first"}


def gallery_rows(results: List[Dict], per_image: Dict[int, Dict[str, float]], order: str, n: int) -> List[Dict]:
    """The n results a gallery shows: the first ones, or those with the lowest CIDEr (worst) or
    CLIP-S (worst_clip_s) first, ties by image id."""
    if order == "first":
        return results[:n]
    key = "CIDEr" if order == "worst" else "CLIP-S"
    ranked = [r for r in results if key in per_image.get(r["image_id"], {})]
    return sorted(ranked, key=lambda r: (per_image[r["image_id"]][key], r["image_id"]))[:n]


def write_gallery(path: str, results: List[Dict], records: Dict, n: int,
                  per_image: Optional[Dict[int, Dict[str, float]]] = None, order: str = "first") -> int:
    """An HTML page with n images (linked relatively), their caption, its scores (x100) and the
    references, in `order` (GALLERY_ORDERS). Returns how many images it shows."""
    folder = os.path.dirname(os.path.abspath(path))
    per_image = per_image or {}
    shown = gallery_rows(results, per_image, order, n)
    rows = []
    for r in shown:
        rec = records[r["image_id"]]
        src = os.path.relpath(os.path.abspath(rec.path), folder)
        refs = "".join(f"<li>{html.escape(c)}</li>" for c in rec.captions)
        values = per_image.get(r["image_id"], {})
        scores = " &middot; ".join(f"{k} {values[k] * 100:.1f}" for k in ("CIDEr", "CLIP-S", "RefCLIP-S") if k in values)
        rows.append(
            f'<figure><img src="{html.escape(src)}" alt="image {r["image_id"]}">'
            f'<figcaption><b>{html.escape(r["caption"])}</b>'
            f'{f"<div class=scores>{scores}</div>" if scores else ""}'
            f'{"<ul>" + refs + "</ul>" if refs else ""}<small>{html.escape(os.path.basename(rec.path))}</small>'
            f"</figcaption></figure>"
        )
    page = (
        "<!doctype html><html><head><meta charset='utf-8'><title>llama_caption gallery</title><style>"
        "body{font-family:sans-serif;margin:20px}figure{display:inline-block;width:260px;vertical-align:top;"
        "margin:8px}img{width:256px;height:auto;image-rendering:pixelated;border:1px solid #ccc}"
        "ul{padding-left:18px;color:#555;font-size:13px}small{color:#999}.scores{color:#a33;font-size:13px}"
        "</style></head><body>"
        f"<h1>Generated captions: {GALLERY_TITLES[order].format(n=len(shown))}</h1>"
        "<p>Bold: the generated caption, then its scores (x100). Below it: the reference captions.</p>"
        + "\n".join(rows) + "</body></html>\n"
    )
    write_text(path, page)
    return len(shown)


def ordered(done: Dict, records: List[ImageRecord], annotated: bool) -> List[Dict]:
    """The results of the requested images, in image-id order (own files: the ids of this run)."""
    out = []
    for r in records:
        row = done.get(r.image_id if annotated else r.path)
        if row is not None:
            out.append(dict(row, image_id=r.image_id))
    return out
