"""COCO caption metrics with pycocoevalcap: BLEU-1..4, METEOR, ROUGE-L, CIDEr (and SPICE).

    python -m llama_caption evaluate --annotations coco/annotations/captions_val2014.json \\
        --results runs/b32-7b/results.json      # writes runs/b32-7b/results.metrics.json

The scorers are called one by one, on the images of the results only: COCOEvalCap.evaluate()
would fail offline, because SPICE downloads Stanford CoreNLP the first time. SPICE runs when
its CoreNLP jar is already installed, and is reported as skipped otherwise. The PTB tokenizer
and METEOR are Java programs.
"""

import contextlib
import io
import json
import os
import shutil
from dataclasses import dataclass
from typing import Dict, List, Optional


from .config import Config, command, setting
from .data import read_coco_captions
from .errors import UserError
from .fileio import check_output_file, sha256_file, write_json

METRIC_ORDER = ("Bleu_1", "Bleu_2", "Bleu_3", "Bleu_4", "METEOR", "ROUGE_L", "CIDEr", "SPICE")


def check_java() -> None:
    if shutil.which("java") is None:
        raise UserError("COCO evaluation needs Java (the PTB tokenizer and METEOR are Java programs): "
                        "install a JRE (e.g. apt-get install default-jre) or pass --evaluate False")


def spice_available() -> bool:
    import pycocoevalcap.spice.get_stanford_models as g

    return os.path.exists(os.path.join(g.SPICEDIR, g.SPICELIB, f"{g.JAR}.jar"))


def read_results(path: str, known_ids=None) -> List[Dict]:
    """A COCO results file: a JSON list of {"image_id": int, "caption": str}, one per image."""
    if not os.path.isfile(path):
        raise UserError(f"--results {path} not found")
    try:
        with open(path, encoding="utf-8") as f:
            results = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UserError(f"--results {path} is not valid JSON ({e})") from None
    check_results(results, path, known_ids)
    return results


def check_results(results, path: str, known_ids=None) -> None:
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
            raise UserError(f"{path} has {len(unknown)} image id(s) that the annotations do not know (first: {unknown[0]})")


def score(references: Dict[int, List[str]], results: List[Dict], spice: Optional[bool] = None, log=print) -> Dict[str, float]:
    """Metrics of `results` against the references of the same images (restricted to them)."""
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider
    from pycocoevalcap.meteor.meteor import Meteor
    from pycocoevalcap.rouge.rouge import Rouge
    from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

    if not results:
        raise UserError("there are no captions to evaluate")
    check_java()
    gts = {r["image_id"]: [{"caption": c} for c in references[r["image_id"]]] for r in results}
    res = {r["image_id"]: [{"caption": r["caption"]}] for r in results}
    with contextlib.redirect_stdout(io.StringIO()):  # the scorers print their progress
        tok = PTBTokenizer()
        gts, res = tok.tokenize(gts), tok.tokenize(res)
        # An empty generated caption is legal; METEOR's Java process needs some text to compare.
        res = {k: [v[0] if v[0].strip() else "."] for k, v in res.items()}
        scorers = [(Bleu(4), ["Bleu_1", "Bleu_2", "Bleu_3", "Bleu_4"]), (Meteor(), ["METEOR"]),
                   (Rouge(), ["ROUGE_L"]), (Cider(), ["CIDEr"])]
        use_spice = spice_available() if spice is None else spice
        if use_spice:
            from pycocoevalcap.spice.spice import Spice

            scorers.append((Spice(), ["SPICE"]))
        metrics = {}
        for scorer, names in scorers:
            value, _ = scorer.compute_score(gts, res)
            for name, v in zip(names, value if isinstance(value, list) else [value]):
                metrics[name] = float(v)
    if not use_spice:
        log("SPICE skipped: Stanford CoreNLP is not installed (python -c 'from pycocoevalcap.spice."
            "get_stanford_models import get_stanford_models as g; g()' fetches it, online)")
    return metrics


def references_from_annotations(path: str, log=print) -> Dict[int, List[str]]:
    return {i: caps for i, (_, caps) in read_coco_captions(path, "--annotations", log).items()}


def metrics_path(results: str) -> str:
    """RESULTS.json -> RESULTS.metrics.json: the scores are named after what they score."""
    return (results[:-5] if results.endswith(".json") else results) + ".metrics.json"


def metrics_record(metrics: Dict[str, float], results_path: str, scored: List[Dict], annotations: str) -> dict:
    """The metrics with what they score: the results file (and its SHA-256), the references, the images."""
    return {"results": os.path.abspath(results_path), "results_sha256": sha256_file(results_path),
            "annotations": os.path.abspath(annotations), "images": len(scored), "metrics": metrics}


def format_table(metrics: Dict[str, float], n: Optional[int] = None) -> str:
    names = [m for m in METRIC_ORDER if m in metrics]
    head = " | ".join(f"{m:>7}" for m in names)
    vals = " | ".join(f"{metrics[m] * 100:7.2f}" for m in names)
    rule = "-" * len(head)
    title = f"COCO caption metrics (x100){'' if n is None else f' on {n} images'}"
    return f"{title}\n{head}\n{rule}\n{vals}"


@dataclass
class EvaluationConfig(Config):
    annotations: str = setting(help="COCO captions JSON with the references (e.g. captions_val2014.json).")
    results: str = setting(help='COCO results JSON: [{"image_id": int, "caption": str}, ...].')
    out: Optional[str] = setting(None, "where to write the metrics as JSON (default: RESULTS.metrics.json beside the results).")
    spice: Optional[bool] = setting(None, "force SPICE on or off (default: on when Stanford CoreNLP is installed).")


def evaluate(cfg: EvaluationConfig) -> Dict[str, float]:
    out = cfg.out or metrics_path(cfg.results)
    check_output_file(out, "--out")
    refs = references_from_annotations(cfg.annotations)
    res = read_results(cfg.results, set(refs))
    scored = [r for r in res if refs[r["image_id"]]]
    if len(scored) < len(res):
        print(f"warning: {len(res) - len(scored)} result(s) are of images with no reference caption; not scored")
    metrics = score(refs, scored, cfg.spice)
    print(format_table(metrics, len(scored)))
    write_json(out, metrics_record(metrics, cfg.results, scored, cfg.annotations), indent=1)
    print(f"wrote {out}")
    return metrics


main = command(EvaluationConfig, evaluate, "Score a COCO results file against COCO caption annotations.")

if __name__ == "__main__":
    from .__main__ import alias

    alias("evaluation", "evaluate")
