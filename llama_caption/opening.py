"""Opening a trained captioner: the one way `caption` (files and shards), `serve` and the tools do it.

`CaptionerSettings` are the flags of every command that captions with a trained run. From them
and the distributed environment, `open_captioner` resolves the decoder, reads the checkpoint
(runs.find_checkpoint, captioner.load_projection), loads the CLIP it was trained with and checks
it, checks the LLaMA and the context window, then loads the LLaMA and the projection. It returns
an `OpenedCaptioner`: the captioner, its encoder (and image preprocessing), the decoder, the
dtype, and what results files and the server's /v1/model record of it.
"""

import functools
import os
import re
from dataclasses import dataclass
from typing import Any, Callable, Dict, Iterable, Iterator, List, Optional, Tuple

import torch

from .captioner import Captioner, CaptionerSpec, check_same_llama, check_window, load_projection
from .config import setting
from .errors import UserError
from .llama.checkpoint import LlamaSettings, load_llama
from .llama.continuous import ContinuousDecoder, Request
from .llama.decoding import Decoding
from .llama.quantize import UNCOMPILED as UNCOMPILED_QUANTIZE, describe
from .llama.static_decode import MODES, make_decoder
from .projection import Projection
from .results import identity, provenance
from .runs import find_checkpoint
from .runtime import DTYPE_NAMES, resolve_dtype
from .vision import OPEN_CLIP, EncoderSpec, ImageEncoder, import_clip, load_encoder, same_encoder


DECODERS = ("auto",) + MODES + ("continuous",)


@dataclass(kw_only=True)
class CaptionerSettings(LlamaSettings):
    """The flags of every command that captions with a trained run (`caption`, `serve`): the
    LLaMA (LlamaSettings), the checkpoint, where its CLIP moved to, precision and decoder."""

    checkpoint: str = setting(help="a training run folder (its latest checkpoint) or one checkpoint folder.")
    clip_model: Optional[str] = setting(None, "the CLIP file, when it moved since training (it must be the same model).")
    clip_pretrained: Optional[str] = setting(None, "the open_clip weights file, when it moved since training (the same weights).")
    dtype: str = setting("auto", "frozen LLaMA precision: auto (fp16 on CUDA, fp32 on CPU), fp32, fp16, bf16.")
    decoder: str = setting("auto", "greedy/top-p decoder: auto (on a CPU: static; on CUDA: cuda_graph for caption on one GPU, 2.5x eager at 7B on an H200, and eager with model parallelism, --quantize nf4, beam search or in serve); eager; static (fixed-shape KV cache, batches padded to 1, 2, 4 ... 64 or --batch_size); compile (static through torch.compile); cuda_graph (static captured as CUDA graphs, CUDA only); compile and cuda_graph take --quantize int8 and int4, not nf4; continuous (continuous batching over --batch_size slots, or --max_batch in serve: an image takes a slot as soon as a caption ends). Same greedy captions in fp32; beam search is always eager.")
    pack_weights: bool = setting(True, "on a CPU, decode with a copy of LLaMA's weights packed for oneDNN (faster; one extra copy in memory). No effect on CUDA.")

    def check(self) -> None:
        super().check()
        self.one_of("dtype", DTYPE_NAMES)
        self.one_of("decoder", DECODERS)
        if self.quantize in UNCOMPILED_QUANTIZE and self.decoder in ("compile", "cuda_graph"):
            raise UserError(f"--decoder {self.decoder} is not measured with --quantize {self.quantize} (bitsandbytes): "
                            f"use --decoder static, continuous or eager, or --quantize int4")

    def resolve_decoder(self, device: torch.device, beams: bool = False, mp_size: int = 1,
                        graphs: bool = True) -> None:
        """`auto`: the static decoder on a CPU and the CUDA-graph one on CUDA (the same captions,
        faster: docs/captioning.md); the eager one for beam search (`beams`), and on CUDA across
        model-parallel ranks (`mp_size`: collectives inside a graph, not measured), with --quantize
        nf4 (bitsandbytes' layers, not taken by the graph decoders) or where CUDA graphs were not
        tried on a GPU (`graphs` False: the server, whose web threads run beside the decoding loop).
        int8 and int4's fused kernels run under every decoder."""
        if self.decoder == "auto":
            if beams:
                self.decoder = "eager"
            elif device.type != "cuda":
                self.decoder = "static"
            else:
                ok = graphs and mp_size == 1 and self.quantize not in UNCOMPILED_QUANTIZE
                self.decoder = "cuda_graph" if ok else "eager"
        if self.decoder == "cuda_graph" and device.type != "cuda":
            raise UserError("--decoder cuda_graph needs a CUDA device: use static or compile on the CPU")


@dataclass
class OpenedCaptioner:
    """A trained captioner as `open_captioner` gives it, with what its callers need."""

    captioner: Captioner
    encoder: ImageEncoder
    spec: CaptionerSpec
    dtype: torch.dtype
    decoder: str  # the --decoder it decodes greedy and sampled captions with (auto resolved)
    checkpoint_dir: str
    made_by: dict  # the projection, LLaMA and CLIP, as results files record them (results.identity)

    @property
    def preprocess(self):
        """An image (PIL) to the tensor the encoder takes."""
        return self.encoder.preprocess

    @functools.cached_property
    def input_shape(self) -> tuple:
        """(3, H, W) of the encoder's preprocessed images."""
        from PIL import Image

        return tuple(self.preprocess(Image.new("RGB", (32, 32))).shape)

    def caption(self, pixels: torch.Tensor, decoding: Decoding, generator=None) -> List[str]:
        """Captions of preprocessed images."""
        return self.captioner.caption(self.encoder(pixels), decoding, generator)

    def stream(self, batches: Iterable[Tuple[torch.Tensor, list]], decoding: Decoding, device,
               seed_key: Callable[[Any], int] = int) -> Iterator[Tuple[Any, str]]:
        """(tag, caption) of each image of `batches` ((preprocessed images, their tags), read
        only when the continuous decoder has a slot for them), as soon as its caption ends.
        Sampling draws from each image's own generator (`Decoding.image_generator` of
        `seed_key(tag)`: by default the tag, an image id), so an image's caption does not depend
        on what shares its steps."""
        cap = self.captioner
        tokenizer = cap.tokenizer
        max_gen_len = cap.longest(decoding)

        def requests():
            for pixels, tags in batches:
                with torch.no_grad():
                    prefix = cap.projection(self.encoder(pixels).to(cap.llama.device))
                for i, tag in enumerate(tags):
                    gen = decoding.image_generator(seed_key(tag), device) if decoding.sampling else None
                    yield Request(prefix[i], [tokenizer.bos_id], max_gen_len, decoding.temperature, decoding.top_p,
                                  gen, tag)

        for tag, tokens in cap.decoder.run(requests()):
            yield tag, tokenizer.decode(tokens).strip()

    def decoding_record(self, decoding: Decoding, control_shuffle: bool = False, best_of=None, ranker=None,
                        keep_candidates: bool = False) -> dict:
        """How captions were made, as results files record it: the settings, the control, the
        precision, the decoder unless eager (fp16 kernels of other shapes may round otherwise),
        and the best of several candidates when asked (rerank.BestOf; with CLIP-S, its CLIP)."""
        d = dict(decoding.provenance(), control_shuffle=control_shuffle, dtype=str(self.dtype).replace("torch.", ""))
        if self.decoder != "eager":
            d["decoder"] = self.decoder
        if best_of is not None and best_of.active:
            d.update(best_of.provenance())
            if ranker is not None:
                d["rerank_clip"] = ranker.model.identity
            if keep_candidates:  # the rows hold candidates: a rerun without them is another file
                d["keep_candidates"] = True
        return d

    def provenance(self, decoding: Decoding, selection: dict, control_shuffle: bool = False, best_of=None,
                   ranker=None, keep_candidates: bool = False) -> dict:
        """What makes a results file of these captions (results.provenance)."""
        record = self.decoding_record(decoding, control_shuffle, best_of, ranker, keep_candidates)
        return provenance(self.made_by, record, selection)


@dataclass
class Captioned:
    """One caption as decoded: its text, its tokens (without the end token), whether it ended
    with the end token (else it was cut at max_gen_len), and its mean token log-probability
    when it was asked for (Captioner.mean_logprob)."""

    text: str
    tokens: List[int]
    ended: bool
    logprob: Optional[float] = None


def caption_parts(parts: List[Tuple[OpenedCaptioner, torch.Tensor]], decoding: Decoding, generator=None,
                  scores: bool = False) -> List[Captioned]:
    """Captions of several captioners' images decoded as one batch (`parts`: each captioner with
    its preprocessed images, in the order the captions come back). They must share one LLaMA and
    one prefix length: then only their prefixes differ, and each caption is the one its
    captioner gives alone (greedy; a sampled batch draws from `generator` in this order)."""
    first = parts[0][0].captioner
    if any(op.captioner.llama is not first.llama or op.captioner.prefix_len != first.prefix_len for op, _ in parts):
        raise ValueError("a mixed batch needs captioners over one LLaMA with one prefix length")
    prefix = torch.cat([op.captioner.prefix(op.encoder(pixels)) for op, pixels in parts])
    tokens = first.caption_tokens(prefix, decoding, generator)
    limit = first.longest(decoding)
    out = [Captioned(first.tokenizer.decode(t).strip(), list(t), len(t) < limit) for t in tokens]
    if scores:
        for c, score in zip(out, first.mean_logprob(prefix, tokens, [c.ended for c in out])):
            c.logprob = score
    return out


def open_captioner(settings: CaptionerSettings, env, decoding: Decoding, batch_size: int,
                   graphs: bool = True) -> OpenedCaptioner:
    """The trained captioner of `settings` on this rank (`env`: distributed.DistEnv), for
    `decoding` (its max_gen_len sizes the window; beam search keeps the eager decoder) in batches
    of up to `batch_size`; `graphs` False keeps `--decoder auto` off CUDA graphs (the server).
    The LLaMA is opened once (`settings.open()`); every check comes before its weights load."""
    return next(iter(open_captioners(settings, {"": settings.checkpoint}, env, decoding, batch_size, graphs).values()))


def open_captioners(settings: CaptionerSettings, checkpoints: Dict[str, str], env, decoding: Decoding,
                    batch_size: int, graphs: bool = True) -> Dict[str, OpenedCaptioner]:
    """Several trained captioners over one frozen LLaMA (`checkpoints`: name -> run or checkpoint
    folder), as `open_captioner` opens one: every checkpoint read and checked (its CLIP, its
    LLaMA, the window) before anything large loads; then the LLaMA and its decoder once, each
    distinct image encoder once, and one projection per name."""
    settings.resolve_decoder(env.device, decoding.num_beams > 1, env.mp_size, graphs)
    dtype = resolve_dtype(settings.dtype, env.device)
    llama = settings.open()
    encoders: Dict[tuple, ImageEncoder] = {}
    read = {}
    for name, path in checkpoints.items():
        ckpt = find_checkpoint(path)
        weights, spec, flags = load_projection(ckpt)
        wanted = moved_encoder(spec.encoder, settings, ckpt)
        key = (wanted.clip_model, wanted.identity, wanted.feature_kind, wanted.clip_layer, wanted.pretrained)
        if key not in encoders:
            encoders[key] = load_encoder(wanted, env.device)
        spec = check_encoder(spec, encoders[key], f"--checkpoint {ckpt}")
        check_llama(settings, spec, flags, ckpt, env.log)
        read[name] = (ckpt, weights, spec, encoders[key])
    window = max(check_window(spec.prefix_len, decoding.max_gen_len, llama, "--max_gen_len")
                 for _, _, spec, _ in read.values())
    model, tokenizer, decoder = build_llama(settings, window, dtype, env.device, batch_size, env.log)
    tokenizer_file = llama.tokenizer_file(settings.tokenizer_path)
    opened = {}
    for name, (ckpt, weights, spec, encoder) in read.items():
        projection = trained_projection(spec, weights, ckpt).to(env.device).eval()
        captioner = Captioner(model, tokenizer, projection, spec.style, decoder)
        made_by = identity(ckpt, llama, tokenizer_file, encoder.spec.identity, settings.quantize)
        opened[name] = OpenedCaptioner(captioner, encoder, spec, dtype, settings.decoder, ckpt, made_by)
    return opened


NAME_CHARS = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:-]{0,63}")


def run_name(path: str) -> str:
    """The name a run folder gives its captioner: the run's folder name (for a checkpoint folder
    inside RUN/checkpoints/, RUN's)."""
    parts = os.path.normpath(os.path.abspath(path)).split(os.sep)
    if len(parts) > 2 and parts[-2] == "checkpoints":
        return parts[-3]
    return parts[-1]


def named_checkpoints(entries, flag: str = "--checkpoint") -> Dict[str, str]:
    """name -> run folder of several captioners: `NAME=RUN` entries, or `RUN` (named by its folder:
    run_name), given as a list, comma-separated, or as a dict; the first is the default one. Two
    runs under one name, or a name that is not a plain identifier, are refused in one line."""
    if isinstance(entries, dict):
        pairs = [(str(k), v) for k, v in entries.items()]
    else:
        items = [entries] if isinstance(entries, (str, os.PathLike)) else list(entries or [])
        pairs = []
        for item in items:
            for part in str(item).split(","):
                part = part.strip()
                name, eq, path = part.partition("=")
                if eq and (NAME_CHARS.fullmatch(name.strip()) or not os.path.exists(part)):
                    pairs.append((name.strip(), path.strip()))
                elif part:  # a run folder (whose path may hold '=')
                    pairs.append((run_name(part), part))
    if not pairs:
        raise UserError(f"{flag} names no trained run: give a run folder, or NAME=RUN,NAME=RUN for several")
    out: Dict[str, str] = {}
    for name, path in pairs:
        path = os.fspath(path)
        if not NAME_CHARS.fullmatch(name):
            raise UserError(f"{flag}: {name!r} is not a captioner name (letters, digits and . _ : -, at most 64, "
                            f"starting with a letter or digit): write NAME={path}")
        if not path:
            raise UserError(f"{flag} {name}= names no run folder: write {name}=RUN_FOLDER")
        if name in out:
            raise UserError(f"{flag} names the captioner {name!r} twice ({out[name]} and {path}): give each run a name "
                            f"of its own (NAME=RUN)")
        out[name] = path
    return out


def moved_encoder(spec: EncoderSpec, settings: CaptionerSettings, ckpt: str) -> EncoderSpec:
    """The encoder a checkpoint was trained with, from the files --clip_model and --clip_pretrained
    name when it moved (its identity must still match)."""
    if not (settings.clip_model or settings.clip_pretrained):
        if spec.clip_model.startswith(OPEN_CLIP):
            name = spec.clip_model[len(OPEN_CLIP):]
            missing = name.endswith(".json") and not os.path.isfile(name)  # else an open_clip model name
        else:
            name = spec.clip_model
            missing = not os.path.isfile(name) and name not in import_clip().available_models()
        if missing:
            raise UserError(f"--checkpoint {ckpt} was trained with the CLIP file {name}, which is not there "
                            f"(a relative path is read from the folder you run in): give its path as --clip_model")
        return spec
    return EncoderSpec.of(settings.clip_model or spec.clip_model, spec.feature_kind,
                          -2 if spec.clip_layer is None else spec.clip_layer, settings.clip_pretrained or spec.pretrained)


def check_encoder(spec: CaptionerSpec, encoder: ImageEncoder, where: str) -> CaptionerSpec:
    """The encoder must be the one the captioner was trained with; fills in a legacy patch count
    (checkpoints of the first format did not record it)."""
    got = encoder.spec
    if not same_encoder(spec.encoder.identity, got.identity):
        raise UserError(f"{where} was trained with CLIP {spec.encoder.clip_model} ({spec.encoder.identity}) "
                        f"but {got.clip_model} is another model ({got.identity}): use the CLIP model it was trained with")
    shape = tuple(encoder.feature_shape)
    if shape[-1] != spec.feature_shape[-1] or (spec.feature_shape[0] not in (0, shape[0])):
        raise UserError(f"{where} was trained on CLIP features of shape {spec.feature_shape} ({spec.encoder.clip_model}) "
                        f"but {got.clip_model} gives {shape}: use the CLIP model it was trained with")
    if spec.feature_shape[0] == 0:
        spec = CaptionerSpec.build(spec.encoder, shape, spec.projection, spec.prefix_len, spec.proj_hidden,
                                   spec.llama_dim, spec.style)
    return spec


def check_llama(settings: CaptionerSettings, spec: CaptionerSpec, flags: dict, ckpt: str, log) -> None:
    """The LLaMA of --ckpt_dir against the one the checkpoint was trained with: its width, its
    architecture when the recorded folder still exists; another quantization is only said."""
    llama = settings.open()
    if spec.llama_dim != llama.args.dim:
        raise UserError(f"--checkpoint {ckpt} projects to LLaMA width {spec.llama_dim} but {llama.folder} has width "
                        f"{llama.args.dim}: use the LLaMA it was trained with")
    check_same_llama(f"--checkpoint {ckpt}", flags.get("ckpt_dir"), llama, spec.llama_architecture)
    trained = flags.get("quantize", "none")
    if trained != settings.quantize:  # allowed: the projection only saw the LLaMA's activations
        log(f"--checkpoint {ckpt} was trained with the LLaMA at {describe(trained)}; captioning with it at "
            f"{describe(settings.quantize)}")


def build_llama(settings: CaptionerSettings, window: int, dtype: torch.dtype, device, batch_size: int, log) -> tuple:
    """The frozen LLaMA (a KV cache of `window` positions), its tokenizer and the decoder."""
    model, tokenizer = load_llama(settings.open(), settings.tokenizer_path, window, device=device, dtype=dtype,
                                  quantize=settings.quantize)
    if settings.pack_weights and settings.decoder == "compile":  # torch.compile cannot trace the oneDNN-packed layers
        log("--decoder compile: LLaMA's weights are not packed for oneDNN (the compiled step uses the plain ones)")
    elif settings.pack_weights and model.pack_weights():
        log("CPU decoding: LLaMA's weights packed for oneDNN (--pack_weights False to save the extra copy)")
    if settings.decoder == "continuous":
        check_slots(model, batch_size, device)
        decoder = ContinuousDecoder(model, batch_size, eos_id=tokenizer.eos_id, mode="static")
    else:
        decoder = make_decoder(model, settings.decoder, batch_size)
    return model, tokenizer, decoder


def check_slots(model, slots: int, device) -> None:
    """The continuous decoder's KV cache (one row per slot, the whole window) must fit in the
    memory free now: else one line naming the flag, before it is made."""
    args = model.args
    kv_heads = model.layers[0].attention.n_local_kv_heads
    per_slot = 2 * args.n_layers * args.max_seq_len * kv_heads * args.head_dim * model.dtype.itemsize
    free = free_memory(device)
    if free is not None and (slots + 1) * per_slot > 0.8 * free:
        raise UserError(f"--batch_size {slots} slots need a {(slots + 1) * per_slot / 2 ** 30:.1f} GiB KV cache, more "
                        f"than the {free / 2 ** 30:.1f} GiB free: lower --batch_size (--max_batch in serve) or --max_gen_len")


def free_memory(device) -> Optional[int]:
    """Bytes free on `device` now (the CPU: available RAM), or None when it cannot be told."""
    if torch.device(device).type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    try:  # Linux's estimate of what can be had without swapping (free pages alone leave out the page cache)
        with open("/proc/meminfo") as f:
            return next(int(line.split()[1]) * 1024 for line in f if line.startswith("MemAvailable:"))
    except (OSError, StopIteration, ValueError, IndexError):
        return None


def trained_projection(spec: CaptionerSpec, weights: Dict[str, torch.Tensor], ckpt: str) -> Projection:
    projection = spec.new_projection()
    try:
        projection.load_state_dict(weights, strict=True)
    except RuntimeError as e:
        raise UserError(f"{ckpt}: projection weights do not fit the stored config ({str(e).splitlines()[0]})") from None
    return projection

