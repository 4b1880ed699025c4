"""Caption a COCO split or a user's own images; write COCO results (results.py); evaluate.

`run` selects the images, opens the captioner (opening.open_captioner: the decoder is chosen
there), refuses or continues an existing results file by what made it, captions the images not
done yet in batches, dealt out over data-parallel groups (rank 0 gathers and alone writes), then
writes the results, the gallery and the metrics.

With `--shards` (webdataset tar shards) and `--out DIR`, caption_shards.py writes one results
file per input shard instead (docs/shards.md).
"""

import math
import os
import sys
import time
from dataclasses import dataclass, field
from typing import Dict, List, Optional

import torch
import torch.distributed as dist
from tqdm import tqdm

from . import distributed
from .caption_shards import caption_shards
from .clipscore import ClipScoreSettings
from .config import command, setting
from .data import ImageFiles, ImageRecord, SplitSettings, collate, list_image_files, load_split, report_bad_images
from .errors import UserError
from .evaluation import evaluate_records
from .fileio import write_json
from .llama.decoding import Decoding, flags
from .opening import CaptionerSettings, OpenedCaptioner, open_captioner
from .rerank import MAX_CANDIDATES, BestOf, choose, clip_ranker
from .results import GALLERY_ORDERS, ResultsFiles, ordered, result_key, write_gallery

# --max_gen_len, --temperature, --top_p, --seed, --num_beams, --length_penalty (llama/decoding.py)
CaptionFlags = flags("CaptionFlags")


@dataclass
class InferenceConfig(CaptionerSettings, ClipScoreSettings, CaptionFlags, SplitSettings):
    """The captioner (CaptionerSettings), CLIP-S, decoding, the split's references (SplitSettings:
    with them, the captions are scored), the images and the outputs."""

    images: Optional[List[str]] = setting(None, "--images DIR for a COCO split; or image files and folders of your own (no annotations): --images a.jpg b.png photos/")
    out: str = setting("results.json", "the COCO results file to write; RESULTS.run.json beside it records what made it, and a rerun with the same settings completes it. With --shards: the folder of per-shard results.")
    shards: Optional[List[str]] = setting(None, "webdataset tar shards to caption instead of --images ('cc3m/{00000..00331}.tar'; a list, or joined by '::'): one results file per shard in the folder --out (docs/shards.md).")
    out_format: str = setting("jsonl", "with --shards: each shard's results as jsonl (one {key, caption} per line) or parquet (columns key, caption).")
    overwrite: bool = setting(False, "replace the captions of an --out made with other settings (they are otherwise refused, never mixed).")
    retry_damaged: bool = setting(False, "with --shards: read again the shards a run recorded as damaged (cut short by a read error; their readable samples are captioned and they are otherwise not retried).")
    num_images: Optional[int] = setting(None, "caption only the first N images (by image id).")
    fraction: Optional[float] = setting(None, "caption only this fraction of the images (the first ones by image id).")
    batch_size: int = setting(32, "images decoded together.")
    evaluate: bool = setting(True, "score against the annotations (BLEU, METEOR, ROUGE-L, CIDEr; SPICE when installed).")
    gallery: int = setting(0, "write RESULTS.gallery.html with N images, their captions, scores and references.")
    gallery_order: str = setting("first", "which images the gallery shows: first (by image id), worst (the lowest CIDEr first) or worst_clip_s (the lowest CLIP-S first); the worst ones need scores (--evaluate, and --clipscore for CLIP-S).")
    num_workers: int = setting(2, "image-loading processes (0: load in the main process).")
    save_every_s: float = setting(30.0, "seconds between rewrites of the results file while working.")
    control_shuffle: bool = setting(False, "a control experiment: caption each image from the CLIP features of the next image of the selection (by image id; never its own).")
    num_candidates: int = setting(1, f"decode this many captions per image (1 to {MAX_CANDIDATES}; sampled with --temperature > 0, each image's from its own seed, or the best --num_beams) and keep the one --rerank picks.")
    rerank: str = setting("logprob", "with --num_candidates > 1, how the caption is picked: logprob (the highest mean token log-probability), clip (the highest CLIP-S, from the captioner's own CLIP) or mbr (the highest mean CIDEr-D against the image's other candidates; no references).")
    keep_candidates: bool = setting(False, "with --num_candidates > 1, keep every candidate in the results file beside the chosen caption: its caption, logprob, mbr and (when the captioner's CLIP reads text) clip_s.")

    def check(self) -> None:
        super().check()
        self.at_least(1, "batch_size", "num_images")
        self.check_shards()
        self.at_least(0, "num_workers", "gallery", "save_every_s")
        self.best_of()
        self.one_of("gallery_order", GALLERY_ORDERS)
        self.check_clipscore()
        self.check_split()
        if self.gallery_order != "first" and not (self.annotated and self.evaluate):
            raise UserError(f"--gallery_order {self.gallery_order} ranks the captions by their scores: it needs "
                            f"--annotations or --karpathy_split, and --evaluate True")
        if self.gallery_order == "worst_clip_s" and not self.clipscore:
            raise UserError("--gallery_order worst_clip_s ranks by CLIP-S: leave --clipscore True")
        if self.num_images is not None and self.fraction is not None:
            raise UserError("give --num_images or --fraction, not both")
        if self.fraction is not None and not 0 < self.fraction <= 1:
            raise UserError(f"--fraction must be in (0, 1], got {self.fraction}")
        if (self.annotations or self.karpathy_split) and len(self.images) != 1:
            raise UserError("--images must be one folder when --annotations or --karpathy_split is given")
        if self.decoder not in ("auto", "eager") and self.num_beams > 1:
            raise UserError(f"--decoder {self.decoder} is for greedy and sampled captions; beam search (--num_beams > 1) "
                            f"runs eagerly: use --decoder auto or eager")

    def check_shards(self) -> None:
        self.one_of("out_format", ("jsonl", "parquet"))
        if bool(self.images) == bool(self.shards):
            raise UserError("give the images to caption as --images or as --shards PATTERN, one of the two")
        if not self.shards:
            if self.retry_damaged:
                raise UserError("--retry_damaged is for --shards: it reads again the shards a run recorded as damaged")
            return
        if self.out.endswith(".json"):
            raise UserError(f"--out {self.out}: with --shards, --out names the folder for one results file per shard")
        used = [f for f in ("annotations", "karpathy_split", "num_images", "fraction") if getattr(self, f) is not None]
        used += [f for f in ("control_shuffle", "gallery") if getattr(self, f)]
        if used:
            raise UserError(f"--{used[0]} is not for --shards: shards are captioned whole, one results file each")

    @property
    def annotated(self) -> bool:
        return bool(self.annotations or self.karpathy_split)

    def decoding(self) -> Decoding:
        """The decoding flags, checked (llama/decoding.py)."""
        return Decoding.from_settings(self)

    def best_of(self) -> BestOf:
        """--num_candidates and --rerank, checked against the decoding flags (rerank.py)."""
        best_of = BestOf(self.num_candidates, self.rerank).check(self.decoding())
        if self.keep_candidates and not best_of.active:
            raise UserError("--keep_candidates keeps the candidates of --num_candidates > 1: give --num_candidates N")
        if best_of.active and self.shards:
            raise UserError("--num_candidates is not for --shards yet: caption shards one caption per image")
        return best_of

    def selection(self) -> dict:
        """Which images (recorded beside the results)."""
        absolute = lambda p: os.path.abspath(p) if p else None  # noqa: E731
        d = {"images": [absolute(p) for p in self.images], "num_images": self.num_images, "fraction": self.fraction}
        if self.annotated:
            d.update(annotations=absolute(self.annotations), karpathy_split=absolute(self.karpathy_split),
                     split=self.chosen_split if self.karpathy_split else None)
        return d


def select_records(cfg: InferenceConfig, log) -> List[ImageRecord]:
    """The images to caption, sorted by id."""
    if cfg.annotated:
        records = load_split(cfg.images[0], cfg.annotations, cfg.karpathy_split, cfg.chosen_split, "--images",
                             "--annotations", log)
        if not records or records[0].dataset != "nocaps":  # nocaps is scored on all its images, or on the ones asked for
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
    missing = [r for r in records if not os.path.isfile(r.path)]
    if missing:  # nocaps: its scores compare with others' only on all the images
        raise UserError(f"{len(missing)} of the {len(records)} nocaps image(s) of {cfg.annotations} are not in --images "
                        f"{cfg.images[0]} (first: {os.path.basename(missing[0].path)}): download them all (nocaps' "
                        f"image list gives their URLs), or caption fewer with --num_images")
    if not records:
        raise UserError(f"no images to caption in --images {' '.join(cfg.images)}")
    return records


def control_donors(records: List[ImageRecord]) -> Dict[int, str]:
    """--control_shuffle: image id -> the file it is captioned from, that of the next image of the
    selection (by id, the last from the first), so no image is captioned from its own features
    whatever the batching or data parallelism."""
    if len(records) < 2:
        raise UserError("--control_shuffle needs at least 2 images: each is captioned from another image's features")
    donor = {r.image_id: records[(i + 1) % len(records)].path for i, r in enumerate(records)}
    same = next((r for r in records if os.path.abspath(donor[r.image_id]) == os.path.abspath(r.path)), None)
    if same is not None:
        raise UserError(f"--control_shuffle: image {same.image_id} and the next one are both {same.path}; "
                        f"the control needs distinct image files")
    return donor


@dataclass
class Collector:
    """What the ranks caption, gathered on rank 0 after each loader batch (the same number of
    times on every rank): into `done`, the partial log and, for own files, stdout."""

    cfg: InferenceConfig
    env: object
    done: Dict
    files: Optional[ResultsFiles]
    records: List[ImageRecord]
    own_path: Dict[int, str]
    bar: object = None
    pending: list = field(default_factory=list)  # this rank's rows since the last exchange
    pending_bad: list = field(default_factory=list)
    bad_all: list = field(default_factory=list)  # rank 0: every unreadable image
    last_save: float = field(default_factory=time.time)

    def add(self, image_id: int, caption: str, candidates: Optional[list] = None) -> None:
        row = {"image_id": image_id, "caption": caption}
        if not self.cfg.annotated:
            row["file_name"] = self.own_path[image_id]
        if candidates is not None:
            row["candidates"] = candidates
        self.pending.append(row)

    def exchange(self) -> None:
        """Every rank's captions and unreadable images since the last exchange, to rank 0."""
        env, cfg = self.env, self.cfg
        gathered = [None] * env.dp_size
        dist.all_gather_object(gathered, (self.pending[:], self.pending_bad[:]), group=env.dp_group)
        self.pending.clear()
        self.pending_bad.clear()
        if not env.is_main:
            return
        for rows, bad in gathered:
            self.bad_all.extend(bad)
            self.files.append(rows)
            for r in rows:
                self.done[result_key(r, cfg.annotated)] = r
                if not cfg.annotated:
                    print(f"{r['file_name']}\t{r['caption']}", flush=True)
            self.bar.update(len(rows) + len(bad))
        if time.time() - self.last_save > cfg.save_every_s:
            write_json(self.files.results, ordered(self.done, self.records, cfg.annotated))
            self.last_save = time.time()


def caption_batches(cfg: InferenceConfig, env, opened: OpenedCaptioner, decoding: Decoding, todo: List[ImageRecord],
                    done: Dict, files: Optional[ResultsFiles], records: List[ImageRecord],
                    donor: Optional[Dict[int, str]], best_of: BestOf = BestOf(), ranker=None) -> list:
    """Caption `todo`, dealt out over data-parallel groups; rank 0 collects into `done` and the
    partial log. `donor`: the control's image id -> file. Returns the unreadable images (rank 0).

    Batch decoders caption a loader batch at a time. The continuous one (--decoder continuous)
    streams: images take free slots as captions end, and each caption is kept as soon as it ends.
    Either way the ranks exchange what they have after each loader batch, and rank 0 writes it."""
    mine = todo[env.dp_rank::env.dp_size]
    got = Collector(cfg, env, done, files, records, {r.image_id: r.path for r in mine})
    if donor:  # the control: each image is read from another image's file
        mine = [ImageRecord(r.image_id, donor[r.image_id], r.captions) for r in mine]
    n_batches = math.ceil(math.ceil(len(todo) / env.dp_size) / cfg.batch_size) if todo else 0
    loader = torch.utils.data.DataLoader(ImageFiles(mine, opened.preprocess), batch_size=cfg.batch_size,
                                         num_workers=cfg.num_workers, collate_fn=collate)
    it = iter(loader)

    def batches():
        for _ in range(n_batches):
            batch = next(it, None) or {"image_id": [], "bad": []}
            got.pending_bad.extend(batch["bad"])
            yield batch
            got.exchange()

    with tqdm(total=len(todo), desc="captioning", unit="img", disable=not env.is_main, dynamic_ncols=True,
              file=sys.stderr) as got.bar:
        if best_of.active:  # n candidates per image, sampled by key or from the beams, and the rule's pick
            for batch in batches():
                if batch["image_id"]:
                    ids = [int(i) for i in batch["image_id"]]
                    for i, c in zip(ids, choose(opened, batch["pixels"], ids, decoding, best_of, ranker)):
                        got.add(i, c.best.text, [x.record() for x in c.candidates] if cfg.keep_candidates else None)
        elif opened.decoder == "continuous":
            fed = ((b["pixels"], [int(i) for i in b["image_id"]]) for b in batches() if b["image_id"])
            for image_id, caption in opened.stream(fed, decoding, env.device):
                got.add(image_id, caption)
            got.exchange()  # what ended after the last batch was fed
        else:
            gen = decoding.generator(env.dp_rank, env.device)
            for batch in batches():
                if batch["image_id"]:
                    for i, c in zip(batch["image_id"], opened.caption(batch["pixels"], decoding, gen)):
                        got.add(int(i), c)
    return got.bad_all


def candidate_ranker(cfg: InferenceConfig, best_of: BestOf, env):
    """The CLIP that scores candidates, the checkpoint's own: for --rerank clip (else one line,
    before the LLaMA loads), and for --keep_candidates' clip_s when it reads text (else the
    candidates go without)."""
    if not best_of.active or (best_of.rule != "clip" and not cfg.keep_candidates):
        return None
    from .captioner import load_projection
    from .opening import moved_encoder
    from .runs import find_checkpoint

    ckpt = find_checkpoint(cfg.checkpoint)
    try:
        return clip_ranker(moved_encoder(load_projection(ckpt)[1].encoder, cfg, ckpt), env.device)
    except UserError as e:
        if best_of.rule == "clip":
            raise
        env.log(f"--keep_candidates: the candidates are kept without CLIP-S ({e})")
        return None


def evaluate_results(cfg: InferenceConfig, env, files: ResultsFiles, results: List[Dict],
                     records: List[ImageRecord]):
    """The metrics of the results (Scores), written beside them; CLIP-S too with --clipscore."""
    return evaluate_records({r.image_id: r for r in records}, results, files.results,
                            cfg.annotations or cfg.karpathy_split, files.metrics, None,
                            cfg if cfg.clipscore else None, env.device, cfg.num_workers, env.log)


def gallery(cfg: InferenceConfig, env, files: ResultsFiles, results: List[Dict], records: List[ImageRecord],
            scores=None) -> None:
    """RESULTS.gallery.html, with each image's scores once they are known; the worst first when asked."""
    order, per_image = cfg.gallery_order, scores.per_image if scores else {}
    if order == "worst_clip_s" and scores and "CLIP-S" not in scores.metrics:
        env.log("the gallery is in image-id order: CLIP-S was skipped")
        order = "first"
    shown = write_gallery(files.gallery, results, {r.image_id: r for r in records}, cfg.gallery, per_image, order)
    env.log(f"gallery of {shown} image(s): {files.gallery}")


def run(cfg: InferenceConfig) -> Optional[Dict]:
    if cfg.shards:
        return caption_shards(cfg)
    files = ResultsFiles(cfg.out)
    files.check_paths()  # before anything is loaded or captioned
    with distributed.session(cfg.mp_size(), cfg.device, cfg.seed) as env:
        records = select_records(cfg, env.log)
        donor = control_donors(records) if cfg.control_shuffle else None
        decoding, best_of = cfg.decoding(), cfg.best_of()
        ranker = candidate_ranker(cfg, best_of, env)  # before the LLaMA loads: --rerank clip may have no CLIP
        opened = open_captioner(cfg, env, decoding, cfg.batch_size)
        made_by = opened.provenance(decoding, cfg.selection(), cfg.control_shuffle, best_of, ranker, cfg.keep_candidates)
        files.previous(made_by, cfg.overwrite)
        done = {} if cfg.overwrite else files.load_done(cfg.annotated)
        dist.barrier()  # every rank has read the old files before rank 0 changes them
        todo = [r for r in records if (r.image_id if cfg.annotated else r.path) not in done]
        mode = (f"beam search, {cfg.num_beams} beams" if cfg.num_beams > 1 else
                "sampling" if cfg.temperature > 0 else "greedy")
        env.log(f"{len(records)} image(s): {len(records) - len(todo)} already captioned in {cfg.out}, "
                f"{len(todo)} to go; {mode}, MP {env.mp_size} x DP {env.dp_size}")
        if env.is_main:
            files.start(made_by, fresh=cfg.overwrite)
        bad = caption_batches(cfg, env, opened, decoding, todo, done, files if env.is_main else None, records, donor,
                              best_of, ranker)
        if not env.is_main:
            return None
        results = ordered(done, records, cfg.annotated)
        report_bad_images(bad, env.log)
        if not results:
            raise UserError(f"none of the {len(records)} image(s) could be read (see the warnings above): nothing was captioned")
        files.finish(results)
        env.log(f"wrote {len(results)} caption(s) to {cfg.out}; {len(bad)} unreadable image(s) skipped")
        out = {"results": results, "bad": bad}
        scoring = cfg.annotated and cfg.evaluate
        if cfg.gallery > 0 and cfg.gallery_order == "first":  # there before scoring starts (it needs Java)
            gallery(cfg, env, files, results, records)
        if scoring:
            scores = evaluate_results(cfg, env, files, results, records)
            out.update(metrics=scores.metrics, scores=scores)
            if cfg.gallery > 0:  # again, with each image's scores
                gallery(cfg, env, files, results, records, scores)
        return out


main = command(InferenceConfig, run, "Caption a COCO split (and score it) or your own image files.", varargs="images",
               interrupted="the captions written so far are kept; the same command goes on with the rest")

if __name__ == "__main__":
    from .__main__ import alias

    alias("inference", "caption")
