"""Caption metrics with pycocoevalcap: BLEU-1..4, METEOR, ROUGE-L, CIDEr (and SPICE); CLIP-S
and RefCLIP-S (clipscore.py); nocaps per domain.

    python -m llama_caption evaluate --annotations coco/annotations/captions_val2014.json \\
        --results runs/b32-7b/results.json      # writes runs/b32-7b/results.metrics.json
    python -m llama_caption evaluate --karpathy_split dataset_flickr30k.json --split test \\
        --results flickr30k_test.json --images flickr30k-images/
    python -m llama_caption evaluate runs/a/captions.json runs/b/captions.json --annotations ...
                                                # several files, one METEOR process

The references come from a COCO captions file (nocaps' too, each image with its domain: the
metrics are then also given per domain, each domain scored as a corpus of its own) or from one
split of Karpathy's files.

The scorers are called one by one, on the images of the results only: COCOEvalCap.evaluate()
would fail offline, because SPICE downloads Stanford CoreNLP the first time. SPICE runs when
its CoreNLP jar is already installed, and is reported as skipped otherwise. The PTB tokenizer
and METEOR are Java programs. METEOR's process is started once per Python process and kept: its
start (loading the paraphrase tables) takes about 10 s of the 12 s that scoring 200 captions
takes, and a second set of captions then scores in under a second.
"""

import contextlib
import io
import json
import os
import shutil
from dataclasses import dataclass, field
from typing import Dict, List, Optional

from . import clipscore
from .clipscore import ClipScoreSettings
from .config import command, setting
from .data import NOCAPS_DOMAINS, ImageRecord, SplitSettings, load_coco, load_karpathy
from .distributed import pick_device
from .errors import UserError
from .fileio import check_output_file, sha256_file, write_json

METRIC_ORDER = ("Bleu_1", "Bleu_2", "Bleu_3", "Bleu_4", "METEOR", "ROUGE_L", "CIDEr", "SPICE", "CLIP-S", "RefCLIP-S")


def check_java() -> None:
    if shutil.which("java") is None:
        raise UserError("COCO evaluation needs Java (the PTB tokenizer and METEOR are Java programs): "
                        "install a JRE (e.g. apt-get install default-jre) or pass --evaluate False")


def spice_available() -> bool:
    import pycocoevalcap.spice.get_stanford_models as g

    return os.path.exists(os.path.join(g.SPICEDIR, g.SPICELIB, f"{g.JAR}.jar"))


def read_results(path: str, known_ids=None, references: str = "the annotations") -> List[Dict]:
    """A COCO results file: a JSON list of {"image_id": int, "caption": str}, one per image."""
    if os.path.isdir(path):
        raise UserError(f"--results {path} is a folder: give a results JSON file")
    if not os.path.isfile(path):
        raise UserError(f"--results {path} not found")
    try:
        with open(path, encoding="utf-8") as f:
            results = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UserError(f"--results {path} is not valid JSON ({e})") from None
    check_results(results, path, known_ids, references)
    return results


def check_results(results, path: str, known_ids=None, references: str = "the annotations") -> None:
    if not isinstance(results, list) or not all(
            isinstance(r, dict) and isinstance(r.get("image_id"), int) and isinstance(r.get("caption"), str)
            for r in results):
        raise UserError(f"{path} is not in the COCO results format: a list of {{\"image_id\": int, \"caption\": str}}")
    ids = [r["image_id"] for r in results]
    if len(set(ids)) != len(ids):
        dup = next(i for i in ids if ids.count(i) > 1)
        raise UserError(f"{path} has more than one caption for image {dup}")
    if known_ids is not None:
        unknown = [i for i in ids if i not in known_ids]
        if unknown:
            raise UserError(f"{path} has {len(unknown)} image id(s) that the references in {references} do not know "
                            f"(first: {unknown[0]}): "
                            f"score it against the file and split it was captioned from")


@dataclass
class Scores:
    """The metrics of a results file: over all its images (`metrics`), per nocaps domain
    (`domains`: name -> (metrics, images)), and per image (`per_image`: image id -> {metric: value};
    CIDEr, and CLIP-S and RefCLIP-S once computed)."""

    metrics: Dict[str, float]
    n: int
    domains: Dict[str, tuple] = field(default_factory=dict)
    per_image: Dict[int, Dict[str, float]] = field(default_factory=dict)


def tokenize(references: Dict[int, List[str]], results: List[Dict]) -> tuple:
    """(gts, res) as the scorers take them, through the PTB tokenizer (a Java program)."""
    from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

    gts = {r["image_id"]: [{"caption": c} for c in references[r["image_id"]]] for r in results}
    res = {r["image_id"]: [{"caption": r["caption"]}] for r in results}
    with contextlib.redirect_stdout(io.StringIO()):
        tok = PTBTokenizer()
        gts, res = tok.tokenize(gts), tok.tokenize(res)
    # An empty generated caption is legal; METEOR's Java process needs some text to compare.
    return gts, {k: [v[0] if v[0].strip() else "."] for k, v in res.items()}


_METEOR = []  # the one METEOR scorer of this process, once started


def meteor():
    """pycocoevalcap's METEOR scorer, started on first use and kept for the next results (a new
    one if its Java process has ended)."""
    from pycocoevalcap.meteor.meteor import Meteor

    if not _METEOR or _METEOR[0].meteor_p.poll() is not None:
        _METEOR[:] = [Meteor()]
    return _METEOR[0]


def run_scorers(gts: dict, res: dict, use_spice: bool) -> tuple:
    """pycocoevalcap's scorers on tokenized captions: (metrics, CIDEr of each image)."""
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider
    from pycocoevalcap.rouge.rouge import Rouge

    scorers = [(Bleu(4), ["Bleu_1", "Bleu_2", "Bleu_3", "Bleu_4"]), (meteor(), ["METEOR"]),
               (Rouge(), ["ROUGE_L"]), (Cider(), ["CIDEr"])]
    if use_spice:
        from pycocoevalcap.spice.spice import Spice

        scorers.append((Spice(), ["SPICE"]))
    metrics, cider = {}, {}
    with contextlib.redirect_stdout(io.StringIO()):  # the scorers print their progress
        for scorer, names in scorers:
            value, each = scorer.compute_score(gts, res)
            for name, v in zip(names, value if isinstance(value, list) else [value]):
                metrics[name] = float(v)
            if names == ["CIDEr"]:  # Cider scores the images in the order of gts
                cider = {i: float(v) for i, v in zip(gts, each)}
    return metrics, cider


def score_all(references: Dict[int, List[str]], results: List[Dict], spice: Optional[bool] = None, log=print,
              domains: Optional[Dict[int, str]] = None) -> Scores:
    """Metrics of `results` against the references of the same images (restricted to them), and,
    with `domains` (image id -> nocaps domain), of each domain's images alone, as nocaps reports
    them: each domain scored as a corpus of its own (CIDEr's document frequencies from its images)."""
    if not results:
        raise UserError("there are no captions to evaluate")
    check_java()
    use_spice = spice_available() if spice is None else spice
    gts, res = tokenize(references, results)
    metrics, cider = run_scorers(gts, res, use_spice)
    scores = Scores(metrics, len(results), per_image={i: {"CIDEr": v} for i, v in cider.items()})
    for name in NOCAPS_DOMAINS if domains else ():
        ids = [r["image_id"] for r in results if domains.get(r["image_id"]) == name]
        if ids:
            scores.domains[name] = (run_scorers({i: gts[i] for i in ids}, {i: res[i] for i in ids}, use_spice)[0],
                                    len(ids))
    if not use_spice:
        log("SPICE skipped: Stanford CoreNLP is not installed (python -c 'from pycocoevalcap.spice."
            "get_stanford_models import get_stanford_models as g; g()' fetches it, online)")
    return scores


def score(references: Dict[int, List[str]], results: List[Dict], spice: Optional[bool] = None, log=print) -> Dict[str, float]:
    """Metrics of `results` against the references of the same images (restricted to them)."""
    return score_all(references, results, spice, log).metrics


def metrics_path(results: str) -> str:
    """RESULTS.json -> RESULTS.metrics.json: the scores are named after what they score."""
    return (results[:-5] if results.endswith(".json") else results) + ".metrics.json"


def metrics_record(scores: Scores, results_path: str, annotations: str, clipscore: Optional[dict] = None) -> dict:
    """The metrics with what they score: the results file (and its SHA-256), the references, the
    images; per nocaps domain; the CLIP-S model; and each image's scores."""
    record = {"results": os.path.abspath(results_path), "results_sha256": sha256_file(results_path),
              "annotations": os.path.abspath(annotations), "images": scores.n, "metrics": scores.metrics}
    if scores.domains:
        record["domains"] = {name: {"images": n, "metrics": m} for name, (m, n) in scores.domains.items()}
    if clipscore:
        record["clipscore"] = clipscore
    record["per_image"] = [dict(image_id=i, **v) for i, v in sorted(scores.per_image.items())]
    return record


def format_table(metrics: Dict[str, float], n: Optional[int] = None, domains: Optional[Dict[str, tuple]] = None) -> str:
    """The metrics x100 in one table; with nocaps `domains` (name -> (metrics, images)), a row
    overall and one per domain, as the nocaps paper reports them."""
    names = [m for m in METRIC_ORDER if m in metrics]
    widths = [max(7, len(m)) for m in names]
    cells = lambda ms: " | ".join(f"{ms[m] * 100:{w}.2f}" if m in ms else f"{'-':>{w}}"  # noqa: E731
                                  for m, w in zip(names, widths))
    head = " | ".join(f"{m:>{w}}" for m, w in zip(names, widths))
    title = f"Caption metrics (x100){'' if n is None else f' on {n} images'}"
    if not domains:
        return f"{title}\n{head}\n{'-' * len(head)}\n{cells(metrics)}"
    rows = [("overall", metrics, n)] + [(name, m, k) for name, (m, k) in domains.items()]
    label = lambda name, k: f"{name}{'' if k is None else f' ({k})'}"  # noqa: E731
    width = max(len(label(name, k)) for name, _, k in rows)
    head = f"{'':{width}} | {head}"
    lines = [f"{label(name, k):{width}} | {cells(m)}" for name, m, k in rows]
    return "\n".join([title.replace("Caption metrics", "nocaps caption metrics"), head, "-" * len(head)] + lines)


def add_clipscore(scores: Scores, per_image: Dict[int, Dict[str, float]], domains: Optional[Dict[int, str]]) -> None:
    """CLIP-S and RefCLIP-S into the scores: corpus means overall and per domain, and per image."""
    scores.metrics.update(clipscore.means(per_image, per_image))
    for name, (m, _) in scores.domains.items():
        m.update(clipscore.means(per_image, [i for i in per_image if domains.get(i) == name]))
    for i, v in per_image.items():
        scores.per_image.setdefault(i, {}).update(v)


def evaluate_records(records: Dict[int, ImageRecord], results: List[Dict], results_path: str, references: str,
                     out: str, spice: Optional[bool], clip: Optional[ClipScoreSettings], device, num_workers: int = 0,
                     log=print) -> Scores:
    """Score `results` against the captions of `records` (image id -> record: references, file, nocaps
    domain); write the metrics to `out`; then CLIP-S (with `clip`), and write them again. The
    metrics are on disk before CLIP-S starts: nothing is lost if it cannot run."""
    scored = [r for r in results if records.get(r["image_id"]) and records[r["image_id"]].captions]
    if len(scored) < len(results):
        log(f"warning: {len(results) - len(scored)} result(s) are of images with no reference caption; not scored")
    referenced = sum(1 for r in records.values() if r.captions)
    if len(scored) < referenced:  # published figures are on every image of the split
        log(f"warning: {len(scored)} of the {referenced} images of {references} are scored: a partial result does "
            f"not compare with figures on the whole set")
    domains = {i: rec.domain for i, rec in records.items() if rec.domain}
    scores = score_all({r["image_id"]: records[r["image_id"]].captions for r in scored}, scored, spice, log, domains)
    write_json(out, metrics_record(scores, results_path, references), indent=1)
    log(f"metrics written to {out}")
    if clip is not None and clip.clipscore:
        missing = next((records[r["image_id"]].path for r in scored if not os.path.isfile(records[r["image_id"]].path)), None)
        if missing is not None:
            log(f"CLIP-S skipped: image {missing} not found: give --images, the folder of the captioned images")
        else:
            found = clipscore.compute(clip, scored, records, device, num_workers, log)
            if found:
                add_clipscore(scores, found[0], domains)
                write_json(out, metrics_record(scores, results_path, references, found[1]), indent=1)
                log(f"CLIP-S and RefCLIP-S ({clip.clipscore_model}) added to {out}")
    print(format_table(scores.metrics, scores.n, scores.domains))
    return scores


@dataclass
class EvaluationConfig(ClipScoreSettings, SplitSettings):
    """The results files, their references (SplitSettings), CLIP-S and where the metrics go."""

    results: List[str] = setting(help='COCO results JSON: [{"image_id": int, "caption": str}, ...]; several files (RESULTS RESULTS ...) are scored one after another, sharing one METEOR process.')
    images: Optional[str] = setting(None, "the folder of the captioned images, for CLIP-S (as --images of caption).")
    out: Optional[str] = setting(None, "where to write the metrics as JSON (default: RESULTS.metrics.json beside each results file); one results file only.")
    spice: Optional[bool] = setting(None, "force SPICE on or off (default: on when Stanford CoreNLP is installed).")
    device: str = setting("auto", "where CLIP-S runs: auto (CUDA when available), cpu or cuda.")

    def __post_init__(self):
        if isinstance(self.results, str):
            self.results = [self.results]
        super().__post_init__()

    def check(self) -> None:
        self.check_split(required=True)
        if not self.results:
            raise UserError("give a results file to score: evaluate RESULTS --annotations FILE")
        if self.out and len(self.results) > 1:
            raise UserError(f"--out names one metrics file, and {len(self.results)} results files were given: leave --out "
                            f"out (each file's metrics go beside it) or score one file")
        real = [os.path.realpath(r) for r in self.results]
        twice = next((r for r, p in zip(self.results, real) if real.count(p) > 1), None)
        if twice is not None:
            raise UserError(f"--results {twice} is given twice")
        self.check_clipscore()


def evaluate(cfg: EvaluationConfig) -> Dict[str, float]:
    """Every results file and metrics path is checked before anything is scored; the metrics of
    the last file are returned."""
    outs = [cfg.out or metrics_path(r) for r in cfg.results]
    real = [os.path.realpath(o) for o in outs]
    if len(set(real)) < len(real):
        raise UserError(f"two results files would write their metrics to {next(o for o, p in zip(outs, real) if real.count(p) > 1)}")
    inputs = {os.path.realpath(r) for r in cfg.results}
    for out, path in zip(outs, real):
        if path in inputs:
            raise UserError(f"the metrics would overwrite the results file {out}: rename it (metrics go to RESULTS.metrics.json)")
        check_output_file(out, "--out" if cfg.out else "the metrics file")
    images = cfg.images or ""
    if cfg.images and not os.path.isdir(cfg.images):
        raise UserError(f"--images {cfg.images} is not a folder")
    if cfg.karpathy_split:
        records = load_karpathy(cfg.karpathy_split, images, cfg.chosen_split)
    else:
        records = load_coco(images, cfg.annotations, "--annotations")
    by_id = {r.image_id: r for r in records}
    references = cfg.annotations or cfg.karpathy_split
    results = [read_results(r, set(by_id), references) for r in cfg.results]
    empty = next((r for r, res in zip(cfg.results, results) if not res), None)
    if empty is not None:
        raise UserError(f"--results {empty} holds no captions: there is nothing to evaluate")
    check_java()
    meteor()  # its Java process loads its tables (about 10 s) while the captions are tokenized and scored
    clip = cfg if cfg.images else None
    if cfg.clipscore and not cfg.images:
        print("CLIP-S skipped: give --images, the folder of the captioned images, to compute it")
    device = pick_device(cfg.device, 0)
    metrics = {}
    for path, res, out in zip(cfg.results, results, outs):
        if len(cfg.results) > 1:
            print(f"{path}:")
        metrics = evaluate_records(by_id, res, path, references, out, cfg.spice, clip, device).metrics
    return metrics


main = command(EvaluationConfig, evaluate, "Score COCO results files against COCO captions, nocaps (per domain) or a Karpathy split; CLIP-S.", varargs="results")

if __name__ == "__main__":
    from .__main__ import alias

    alias("evaluation", "evaluate")
