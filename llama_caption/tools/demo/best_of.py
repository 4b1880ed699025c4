"""The demo's best-of-n block: greedy captions of the validation images against the best of n
candidates picked by each rule (rerank.py), with each one's time per image.

    python -m llama_caption.tools.demo.best_of --ckpt_dir ... --tokenizer_path ... --checkpoint RUN \\
        --annotations val.json --images val2014/ --out_dir RUN/best_of --n 5 --temperature 0.5

Runs in one process through the Python API (llama_caption.load): the model is opened once, then
the images are captioned greedily and by each rule in turn, each timed (preprocessed images in
memory: the times are decoding and reranking, not reading files). Writes one COCO results file
per way (greedy.json, logprob.json, clip.json, mbr.json) for `evaluate` to score, and times.json.
"""

import json
import os
import time
from dataclasses import dataclass
from typing import Optional

import torch

from ...config import Config, command, setting
from ...errors import UserError
from ...fileio import write_json
from ...rerank import RULES


@dataclass
class BestOfConfig(Config):
    ckpt_dir: str = setting(help="the LLaMA.")
    checkpoint: str = setting(help="the trained run.")
    annotations: str = setting(help="the validation annotations (their images are captioned).")
    images: str = setting(help="the folder of those images.")
    out_dir: str = setting(help="where the results files and times go.")
    tokenizer_path: Optional[str] = setting(None, "the tokenizer (default: the LLaMA's).")
    n: int = setting(5, "candidates per image.")
    temperature: float = setting(0.5, "the candidates' sampling temperature.")
    batch_size: int = setting(50, "images decoded together.")


def run(cfg: BestOfConfig) -> None:
    import llama_caption

    from ...data import open_rgb

    cap = llama_caption.load(cfg.ckpt_dir, cfg.checkpoint, tokenizer_path=cfg.tokenizer_path, device="cpu",
                             batch_size=cfg.batch_size)
    opened = next(iter(cap.opened.values()))
    with open(cfg.annotations, encoding="utf-8") as f:
        images = sorted(json.load(f)["images"], key=lambda im: im["id"])
    ids = [im["id"] for im in images]
    pixels = torch.stack([opened.preprocess(open_rgb(os.path.join(cfg.images, im["file_name"]))) for im in images])
    os.makedirs(cfg.out_dir, exist_ok=True)
    ways = {"greedy": {}} | {rule: dict(num_candidates=cfg.n, temperature=cfg.temperature, rerank=rule)
                             for rule in RULES}
    times = {}
    try:
        cap.ranker(cap.names[0], opened)  # its CLIP loaded before the clock starts, as a server holds it
    except UserError as e:
        print(f"best of {cfg.n}: no CLIP-S rule ({e})", flush=True)
        del ways["clip"]
    for name, settings in ways.items():
        start = time.perf_counter()
        captions = cap.caption(pixels, **settings)
        times[name] = (time.perf_counter() - start) / len(ids)
        write_json(os.path.join(cfg.out_dir, f"{name}.json"),
                   [{"image_id": i, "caption": c} for i, c in zip(ids, captions)])
    write_json(os.path.join(cfg.out_dir, "times.json"), {"seconds_per_image": times, "n": cfg.n,
                                                         "temperature": cfg.temperature, "images": len(ids)})


main = command(BestOfConfig, run, "The demo's best-of-n block: greedy against each rerank rule, timed.")

if __name__ == "__main__":
    import fire

    fire.Fire(main)
