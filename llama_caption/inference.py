"""Caption a COCO split or a user's own images; write COCO results; evaluate; draw a gallery.

A results file RESULTS.json belongs to the run that made it. Beside it:
    RESULTS.partial.jsonl   each batch's captions as they come (removed once RESULTS is complete)
    RESULTS.run.json        what made them: checkpoint, LLaMA, CLIP, decoding settings, images
    RESULTS.metrics.json    their scores, and which results file and images they score
    RESULTS.gallery.html    the first N images with their captions
A run started again with the same settings captions only the images that are not done; with
other settings it is refused (another --out, or --overwrite), so a results file never mixes two
runs and old captions or metrics are never reported as new ones. With data parallelism
(world_size > MP) the images are dealt out to the data-parallel groups and the captions
gathered on rank 0, which alone writes.
"""

import html
import json
import math
import os
import sys
import time
from dataclasses import dataclass
from typing import Dict, List, Optional

import fire
import torch
import torch.distributed as dist
from tqdm import tqdm

from . import distributed
from .checkpoint import open_checkpoint
from .static_decode import DEFAULT_SIZES, MODES, StaticDecoder
from .tokenizer import resolve_tokenizer_path
from .config import Config, command, setting
from .data import ImageFiles, ImageRecord, collate, list_image_files, load_split, report_bad_images
from .errors import UserError
from .evaluation import check_results, format_table, metrics_record, score
from .captioner import PROJECTION_FILE
from .fileio import check_output_file, sha256_file, write_json, write_text
from .runs import find_checkpoint, load_captioner
from .runtime import DTYPE_NAMES, resolve_dtype


@dataclass
class InferenceConfig(Config):
    ckpt_dir: str = setting(help="the LLaMA: Meta's folder (params.json + consolidated.XX.pth) or a Hugging Face folder (config.json + safetensors).")
    checkpoint: str = setting(help="a training run folder (its latest checkpoint) or one checkpoint folder.")
    images: List[str] = setting(help="--images DIR for a COCO split; or image files and folders of your own (no annotations): --images a.jpg b.png photos/")
    tokenizer_path: Optional[str] = setting(None, "tokenizer.model (sentencepiece or Llama 3's tiktoken) or tokenizer.json; default: the one in --ckpt_dir (or beside it).")
    model_parallel: int = setting(0, "model-parallel size; 0: the checkpoint's (Meta's: its shard count; Hugging Face's: 1). A Hugging Face folder loads at any size dividing the heads.")
    out: str = setting("results.json", "the COCO results file to write; RESULTS.run.json beside it records what made it, and a rerun with the same settings completes it.")
    overwrite: bool = setting(False, "replace the captions of an --out made with other settings (they are otherwise refused, never mixed).")
    annotations: Optional[str] = setting(None, "COCO captions JSON of the split (captions_val2014.json): enables evaluation.")
    karpathy_split: Optional[str] = setting(None, "dataset_coco.json; then --images is the folder holding train2014/ and val2014/.")
    split: str = setting("test", "the Karpathy split to caption: test, val or train.")
    num_images: Optional[int] = setting(None, "caption only the first N images (by image id).")
    fraction: Optional[float] = setting(None, "caption only this fraction of the images (the first ones by image id).")
    batch_size: int = setting(32, "images decoded together.")
    max_gen_len: int = setting(30, "the most tokens per caption (with the image prefix, at most the LLaMA's context).")
    temperature: float = setting(0.0, "0 is greedy decoding; above 0, top-p sampling at this temperature.")
    top_p: float = setting(0.95, "nucleus-sampling threshold, in (0, 1].")
    num_beams: int = setting(1, "beam search with this many beams (1: greedy).")
    length_penalty: float = setting(1.0, "beam scores are log-probability / length**length_penalty.")
    clip_model: Optional[str] = setting(None, "the CLIP file, when it moved since training (it must be the same model).")
    clip_pretrained: Optional[str] = setting(None, "the open_clip weights file, when it moved since training (the same weights).")
    evaluate: bool = setting(True, "score against the annotations (BLEU, METEOR, ROUGE-L, CIDEr; SPICE when installed).")
    gallery: int = setting(0, "write RESULTS.gallery.html with the first N images.")
    num_workers: int = setting(2, "image-loading processes (0: load in the main process).")
    device: str = setting("auto", "auto, cpu or cuda.")
    dtype: str = setting("auto", "frozen LLaMA precision: auto (fp16 on CUDA, fp32 on CPU), fp32, fp16, bf16.")
    seed: int = setting(1, "random seed for sampling, the same on every rank.")
    save_every_s: float = setting(30.0, "seconds between rewrites of the results file while working.")
    control_shuffle: bool = setting(False, "a control experiment: caption each image from the CLIP features of the next image in its batch.")
    decoder: str = setting("auto", "greedy/top-p decoder: auto (static on a CPU, where it is faster; eager on CUDA); eager; static (fixed-shape KV cache, batches padded to 1, 2, 4 ... 64 or --batch_size); compile (static through torch.compile); cuda_graph (static captured as CUDA graphs, CUDA only: not yet measured on a GPU by this project). Same captions in fp32; beam search is always eager.")
    pack_weights: bool = setting(True, "on a CPU, decode with a copy of LLaMA's weights packed for oneDNN (faster; one extra copy in memory). No effect on CUDA.")

    def check(self) -> None:
        self.at_least(1, "batch_size", "max_gen_len", "num_beams", "num_images")
        self.at_least(0, "num_workers", "gallery", "save_every_s")
        if self.temperature < 0:
            raise UserError(f"--temperature must be 0 (greedy) or positive, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise UserError(f"--top_p must be in (0, 1], got {self.top_p}")
        if self.num_beams > 1 and self.temperature > 0:
            raise UserError("--num_beams > 1 is beam search, which does not sample: leave --temperature at 0")
        if self.num_images is not None and self.fraction is not None:
            raise UserError("give --num_images or --fraction, not both")
        if self.fraction is not None and not 0 < self.fraction <= 1:
            raise UserError(f"--fraction must be in (0, 1], got {self.fraction}")
        if (self.annotations or self.karpathy_split) and len(self.images) != 1:
            raise UserError("--images must be one folder when --annotations or --karpathy_split is given")
        self.one_of("dtype", DTYPE_NAMES)
        self.one_of("decoder", ("auto",) + MODES)
        if self.decoder not in ("auto", "eager") and self.num_beams > 1:
            raise UserError(f"--decoder {self.decoder} is for greedy and sampled captions; beam search (--num_beams > 1) "
                            f"runs eagerly: leave --decoder eager")

    def resolve_decoder(self, device: torch.device) -> None:
        """`auto`: the static decoder on a CPU (the same captions, faster there: README), the
        eager one on CUDA and for beam search."""
        if self.decoder == "auto":
            self.decoder = "static" if device.type == "cpu" and self.num_beams == 1 else "eager"

    @property
    def annotated(self) -> bool:
        return bool(self.annotations or self.karpathy_split)

    def decoding(self, dtype: torch.dtype) -> dict:
        """The settings that decide the captions (recorded beside the results)."""
        d = {"max_gen_len": self.max_gen_len, "num_beams": self.num_beams, "temperature": self.temperature,
             "control_shuffle": self.control_shuffle, "dtype": str(dtype).replace("torch.", "")}
        if self.decoder != "eager":  # fp16 kernels of other shapes may round otherwise
            d["decoder"] = self.decoder
        if self.num_beams > 1:
            d["length_penalty"] = self.length_penalty
        if self.temperature > 0:
            d.update(top_p=self.top_p, seed=self.seed)
        return d

    def selection(self) -> dict:
        """Which images (recorded beside the results)."""
        absolute = lambda p: os.path.abspath(p) if p else None  # noqa: E731
        d = {"images": [absolute(p) for p in self.images], "num_images": self.num_images, "fraction": self.fraction}
        if self.annotated:
            d.update(annotations=absolute(self.annotations), karpathy_split=absolute(self.karpathy_split),
                     split=self.split if self.karpathy_split else None)
        return d


def provenance(cfg: InferenceConfig, encoder_identity: str, dtype: torch.dtype) -> dict:
    """What makes a results file: compared key by key when a run continues one."""
    ckpt = find_checkpoint(cfg.checkpoint)
    tokenizer = resolve_tokenizer_path(cfg.tokenizer_path, cfg.ckpt_dir)
    return {
        "checkpoint": "sha256:" + sha256_file(os.path.join(ckpt, PROJECTION_FILE)),
        "llama": dict(open_checkpoint(cfg.ckpt_dir).provenance(), tokenizer="sha256:" + sha256_file(tokenizer)),
        "clip": encoder_identity,
        "decoding": cfg.decoding(dtype),
        "selection": cfg.selection(),
    }


def first_difference(old, new, where: str = "") -> Optional[str]:
    if isinstance(old, dict) and isinstance(new, dict):
        for k in list(new) + [k for k in old if k not in new]:
            found = first_difference(old.get(k), new.get(k), f"{where}.{k}" if where else k)
            if found:
                return found
        return None
    return None if old == new else f"{where}: {json.dumps(old)[:80]} -> {json.dumps(new)[:80]}"


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


def select_records(cfg: InferenceConfig, log) -> List[ImageRecord]:
    """The images to caption, sorted by id."""
    if cfg.annotated:
        records = load_split(cfg.images[0], cfg.annotations, cfg.karpathy_split, cfg.split, "--images",
                             "--annotations", log)
        missing = [r for r in records if not os.path.isfile(r.path)]
        if missing:
            log(f"warning: {len(missing)} annotated image(s) not found, skipped (first: {missing[0].path})")
        records = [r for r in records if os.path.isfile(r.path)]
    else:
        records = [ImageRecord(i, p, []) for i, p in enumerate(list_image_files(cfg.images))]
    records.sort(key=lambda r: r.image_id)
    if cfg.num_images is not None:
        records = records[: cfg.num_images]
    if cfg.fraction is not None:
        records = records[: max(1, math.ceil(cfg.fraction * len(records)))]
    if not records:
        raise UserError(f"no images to caption in --images {' '.join(cfg.images)}")
    return records


def write_gallery(path: str, results: List[Dict], records: Dict, n: int) -> None:
    """An HTML page with the first n images (linked relatively), their caption and references."""
    folder = os.path.dirname(os.path.abspath(path))
    rows = []
    for r in results[:n]:
        rec = records[r["image_id"]]
        src = os.path.relpath(os.path.abspath(rec.path), folder)
        refs = "".join(f"<li>{html.escape(c)}</li>" for c in rec.captions)
        rows.append(
            f'<figure><img src="{html.escape(src)}" alt="image {r["image_id"]}">'
            f'<figcaption><b>{html.escape(r["caption"])}</b>'
            f'{"<ul>" + refs + "</ul>" if refs else ""}<small>{html.escape(os.path.basename(rec.path))}</small>'
            f"</figcaption></figure>"
        )
    page = (
        "<!doctype html><html><head><meta charset='utf-8'><title>llama_caption gallery</title><style>"
        "body{font-family:sans-serif;margin:20px}figure{display:inline-block;width:260px;vertical-align:top;"
        "margin:8px}img{width:256px;height:auto;image-rendering:pixelated;border:1px solid #ccc}"
        "ul{padding-left:18px;color:#555;font-size:13px}small{color:#999}</style></head><body>"
        f"<h1>Generated captions ({min(n, len(results))} images)</h1>"
        "<p>Bold: the generated caption. Below it: the reference captions.</p>" + "\n".join(rows) + "</body></html>\n"
    )
    write_text(path, page)


def ordered(done: Dict, records: List[ImageRecord], annotated: bool) -> List[Dict]:
    """The results of the requested images, in image-id order (own files: the ids of this run)."""
    out = []
    for r in records:
        row = done.get(r.image_id if annotated else r.path)
        if row is not None:
            out.append(dict(row, image_id=r.image_id))
    return out


def caption_batches(cfg: InferenceConfig, env, captioner, encoder, todo: List[ImageRecord], done: Dict,
                    files: Optional[ResultsFiles], records: List[ImageRecord]) -> list:
    """Caption `todo`, dealt out over data-parallel groups; rank 0 collects into `done` and the
    partial log. Returns the unreadable images (rank 0)."""
    mine = todo[env.dp_rank::env.dp_size]
    n_batches = math.ceil(math.ceil(len(todo) / env.dp_size) / cfg.batch_size) if todo else 0
    loader = torch.utils.data.DataLoader(ImageFiles(mine, encoder.preprocess), batch_size=cfg.batch_size,
                                         num_workers=cfg.num_workers, collate_fn=collate)
    it = iter(loader)
    gen = torch.Generator(device=env.device).manual_seed(cfg.seed) if cfg.temperature > 0 else None
    bad_all, last_save = [], time.time()
    with tqdm(total=len(todo), desc="captioning", unit="img", disable=not env.is_main, dynamic_ncols=True,
              file=sys.stderr) as bar:
        for _ in range(n_batches):
            batch = next(it, None) or {"image_id": [], "bad": []}
            local = []
            if batch["image_id"]:
                feats = encoder(batch["pixels"])
                if cfg.control_shuffle:  # each image gets the features of the next one in its batch
                    feats = feats.roll(1, dims=0)
                caps = captioner.generate(feats, cfg.max_gen_len, cfg.temperature, cfg.top_p, generator=gen,
                                          num_beams=cfg.num_beams, length_penalty=cfg.length_penalty)
                for image_id, path, cap in zip(batch["image_id"], batch["path"], caps):
                    local.append({"image_id": int(image_id), "caption": cap} if cfg.annotated
                                 else {"image_id": int(image_id), "caption": cap, "file_name": path})
            gathered = [None] * env.dp_size
            dist.all_gather_object(gathered, (local, batch["bad"]), group=env.dp_group)
            if not env.is_main:
                continue
            for rows, bad in gathered:
                bad_all += bad
                files.append(rows)
                for row in rows:
                    done[result_key(row, cfg.annotated)] = row
                    if not cfg.annotated:
                        print(f"{row['file_name']}\t{row['caption']}", flush=True)
                bar.update(len(rows) + len(bad))
            if time.time() - last_save > cfg.save_every_s:
                write_json(files.results, ordered(done, records, cfg.annotated))
                last_save = time.time()
    return bad_all


def evaluate_results(cfg: InferenceConfig, env, files: ResultsFiles, results: List[Dict],
                     records: List[ImageRecord]) -> dict:
    refs = {r.image_id: r.captions for r in records}
    scored = [r for r in results if refs.get(r["image_id"])]
    if len(scored) < len(results):
        env.log(f"warning: {len(results) - len(scored)} captioned image(s) have no reference caption; not scored")
    metrics = score(refs, scored, log=env.log)
    print(format_table(metrics, len(scored)))
    write_json(files.metrics, metrics_record(metrics, files.results, scored, cfg.annotations or cfg.karpathy_split),
               indent=1)
    env.log(f"metrics written to {files.metrics}")
    return metrics


def run(cfg: InferenceConfig) -> Optional[Dict]:
    files = ResultsFiles(cfg.out)
    files.check_paths()  # before anything is loaded or captioned
    mp = open_checkpoint(cfg.ckpt_dir).model_parallel_size(cfg.model_parallel)
    with distributed.session(mp, cfg.device, cfg.seed) as env:
        records = select_records(cfg, env.log)
        dtype = resolve_dtype(cfg.dtype, env.device)
        cfg.resolve_decoder(env.device)
        captioner, encoder, _ = load_captioner(cfg.checkpoint, cfg.ckpt_dir, cfg.tokenizer_path, env.device, dtype,
                                               cfg.max_gen_len, cfg.clip_model, cfg.clip_pretrained)
        made_by = provenance(cfg, encoder.spec.identity, dtype)
        files.previous(made_by, cfg.overwrite)
        done = {} if cfg.overwrite else files.load_done(cfg.annotated)
        dist.barrier()  # every rank has read the old files before rank 0 changes them
        if cfg.pack_weights and captioner.llama.pack_weights():
            env.log("CPU decoding: LLaMA's weights packed for oneDNN (--pack_weights False to save the extra copy)")
        if cfg.decoder != "eager":
            if cfg.decoder == "cuda_graph" and env.device.type != "cuda":
                raise UserError("--decoder cuda_graph needs a CUDA device: use static or compile on the CPU")
            sizes = sorted({s for s in DEFAULT_SIZES if s < cfg.batch_size} | {cfg.batch_size})
            captioner.decoder = StaticDecoder(captioner.llama, cfg.decoder, sizes)
        todo = [r for r in records if (r.image_id if cfg.annotated else r.path) not in done]
        mode = (f"beam search, {cfg.num_beams} beams" if cfg.num_beams > 1 else
                "sampling" if cfg.temperature > 0 else "greedy")
        env.log(f"{len(records)} image(s): {len(records) - len(todo)} already captioned in {cfg.out}, "
                f"{len(todo)} to go; {mode}, MP {env.mp_size} x DP {env.dp_size}")
        if env.is_main:
            files.start(made_by, fresh=cfg.overwrite)
        bad = caption_batches(cfg, env, captioner, encoder, todo, done, files if env.is_main else None, records)
        if not env.is_main:
            return None
        results = ordered(done, records, cfg.annotated)
        report_bad_images(bad, env.log)
        if not results:
            raise UserError(f"none of the {len(records)} image(s) could be read (see the warnings above): nothing was captioned")
        files.finish(results)
        env.log(f"wrote {len(results)} caption(s) to {cfg.out}; {len(bad)} unreadable image(s) skipped")
        out = {"results": results, "bad": bad}
        if cfg.gallery > 0:
            write_gallery(files.gallery, results, {r.image_id: r for r in records}, cfg.gallery)
            env.log(f"gallery of {min(cfg.gallery, len(results))} image(s): {files.gallery}")
        if cfg.annotated and cfg.evaluate:
            out["metrics"] = evaluate_results(cfg, env, files, results, records)
        return out


main = command(InferenceConfig, run, "Caption a COCO split (and score it) or your own image files.", varargs="images")

if __name__ == "__main__":
    fire.Fire(main)
