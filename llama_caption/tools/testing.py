"""Scaffolding for the tests, the demo and the benchmark: models and files made from nothing.

None of it runs in a user's training or captioning job. It makes tiny models in the real
formats (a sentencepiece tokenizer, a random LLaMA as Meta's params.json + consolidated.XX.pth,
a `clip.model.CLIP` saved as a TorchScript file that clip.load reads) and holds the slow
reference decoders that the tests and the benchmark compare the real ones against.
"""

import io
import os
import warnings
from typing import Dict, Iterable, List, Optional

import torch
from torch import nn

from ..llama.meta import shard_tensor
from ..fileio import atomic_path, write_json, write_torch
from ..llama.model import ModelArgs, Transformer, param_shapes, skip_weight_init
from ..llama.tokenizer import SentencePieceTokenizer, Tokenizer
from ..vision import import_clip


def train_tokenizer(lines: Iterable[str], vocab_size: int, path: str) -> Tokenizer:
    """Train a BPE sentencepiece model with LLaMA's special ids (BOS 1, EOS 2, no pad) to `path`."""
    from sentencepiece import SentencePieceTrainer

    buf = io.BytesIO()
    SentencePieceTrainer.train(
        sentence_iterator=iter(lines), model_writer=buf, vocab_size=vocab_size, model_type="bpe",
        unk_id=0, bos_id=1, eos_id=2, pad_id=-1, minloglevel=2, hard_vocab_limit=False,
        num_threads=1,
    )
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:
            f.write(buf.getvalue())
    return SentencePieceTokenizer(path)


def random_state_dict(args: ModelArgs, seed: int = 0, std: float = 0.02, device="cpu") -> Dict[str, torch.Tensor]:
    """A full (MP=1) random LLaMA in Meta's layout: norms 1, every other weight N(0, std)."""
    g = torch.Generator(device=device).manual_seed(seed)
    sd = {}
    for k, shape in param_shapes(args).items():
        if k.endswith("norm.weight"):
            sd[k] = torch.ones(shape, device=device)
        else:
            sd[k] = torch.randn(shape, generator=g, device=device) * std
    return sd


def random_model(args: ModelArgs, device, dtype, seed: int = 0, std: Optional[float] = None) -> Transformer:
    """A random LLaMA made directly on `device` (model-parallel size 1). The default scale
    2/sqrt(dim) keeps the logits peaked, so greedy choices are not near-ties that rounding
    could flip between implementations."""
    with skip_weight_init(), torch.device("meta"):
        model = Transformer(args)
    sd = random_state_dict(args, seed, 2.0 / args.dim ** 0.5 if std is None else std, device)
    model.load_state_dict({k: v.to(dtype) for k, v in sd.items()}, strict=True, assign=True)
    return model.requires_grad_(False).eval()


def write_meta_checkpoint(ckpt_dir: str, params: dict, state_dict: Dict[str, torch.Tensor], mp: int = 1,
                          embedding_split: str = "width") -> None:
    """Write a full state dict as Meta's params.json + consolidated.XX.pth, split for `mp` ranks
    (the embedding on its width as Llama 1/2, or on the vocabulary as Llama 3)."""
    os.makedirs(ckpt_dir, exist_ok=True)
    for r in range(mp):
        write_torch(os.path.join(ckpt_dir, f"consolidated.{r:02d}.pth"),
                    {k: shard_tensor(k, v, mp, r, embedding_split) for k, v in state_dict.items()})
    write_json(os.path.join(ckpt_dir, "params.json"), params)


def write_hf_checkpoint(folder: str, args: ModelArgs, state_dict: Dict[str, torch.Tensor], dtype=torch.bfloat16,
                        tied: bool = False, max_shard_bytes: Optional[int] = None, bos_id: int = 1,
                        eos_id: int = 2) -> None:
    """Write a full Meta-layout state dict as a Hugging Face `LlamaForCausalLM` folder (config.json
    in the hub's form, safetensors; sharded with an index when `max_shard_bytes` is given), q and
    k rows permuted as Hugging Face's conversion does. Without transformers: for the benchmark and
    the stand-ins (the tests check our loader against transformers' own files)."""
    from safetensors.torch import save_file

    from ..llama.huggingface import to_hf_layout

    os.makedirs(folder, exist_ok=True)
    kept = {k: v for k, v in state_dict.items() if not (tied and k == "output.weight")}
    tensors = {k: v.to(dtype).contiguous() for k, v in to_hf_layout(kept, args).items()}
    groups, size = [[]], 0
    for name, t in tensors.items():
        nbytes = t.numel() * t.element_size()
        if max_shard_bytes and groups[-1] and size + nbytes > max_shard_bytes:
            groups.append([])
            size = 0
        groups[-1].append(name)
        size += nbytes
    if len(groups) == 1:
        save_file(tensors, os.path.join(folder, "model.safetensors"), metadata={"format": "pt"})
    else:
        weight_map = {}
        for i, names in enumerate(groups):
            file = f"model-{i + 1:05d}-of-{len(groups):05d}.safetensors"
            save_file({n: tensors[n] for n in names}, os.path.join(folder, file), metadata={"format": "pt"})
            weight_map.update({n: file for n in names})
        write_json(os.path.join(folder, "model.safetensors.index.json"), {"metadata": {}, "weight_map": weight_map})
    write_json(os.path.join(folder, "config.json"), hf_config(args, tied, bos_id, eos_id, dtype))


def hf_config(args: ModelArgs, tied: bool, bos_id: int, eos_id: int, dtype) -> dict:
    """config.json of a Hugging Face `LlamaForCausalLM` folder of this architecture."""
    return {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": args.dim,
            "num_hidden_layers": args.n_layers, "num_attention_heads": args.n_heads,
            "num_key_value_heads": args.kv_heads, "intermediate_size": args.hidden_dim,
            "vocab_size": args.vocab_size, "rms_norm_eps": args.norm_eps, "rope_theta": args.rope_theta,
            "rope_scaling": dict(args.scaling, rope_type="llama3") if args.scaling else None,
            "max_position_embeddings": args.max_seq_len, "tie_word_embeddings": tied, "hidden_act": "silu",
            "attention_bias": False, "mlp_bias": False, "bos_token_id": bos_id, "eos_token_id": eos_id,
            "torch_dtype": str(dtype).replace("torch.", "")}


def build_tiny_clip(path: str, embed_dim: int = 64, width: int = 64, layers: int = 2, patch: int = 8,
                    resolution: int = 32, seed: int = 0, model: Optional[nn.Module] = None) -> str:
    """Save a small `clip.model.CLIP` as a TorchScript file that `clip.load(path)` reads.

    Widths must be multiples of 64: clip.model.build_model infers head counts as width // 64.
    `model` may be an already trained CLIP (the demo's stand-in); else a random one is made.
    """
    clip = import_clip()
    if model is None:
        torch.manual_seed(seed)
        model = clip.model.CLIP(embed_dim=embed_dim, image_resolution=resolution, vision_layers=layers,
                                vision_width=width, vision_patch_size=patch, context_length=16, vocab_size=49408,
                                transformer_width=64, transformer_heads=1, transformer_layers=1)
    model = model.float().eval()
    res = model.visual.input_resolution
    image = torch.zeros(1, 3, res, res)
    text = torch.zeros(1, model.context_length, dtype=torch.long)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        traced = torch.jit.trace(model, (image, text), check_trace=False)
    with atomic_path(path) as tmp:
        traced.save(tmp)
    return path


@torch.no_grad()
def greedy_no_cache(model: Transformer, prompts: List[List[int]], *, eos_id: int, max_gen_len: int,
                    prefix: Optional[torch.Tensor] = None) -> List[List[int]]:
    """Reference decoder: one sequence at a time, the whole sequence re-run at every step (the
    approach the KV cache replaces, and the first version's decoder)."""
    results = []
    for i, prompt in enumerate(prompts):
        generated: List[int] = []
        for _ in range(max_gen_len):
            ids = torch.tensor([prompt + generated], dtype=torch.long, device=model.device)
            emb = model.embed(ids)
            if prefix is not None:
                emb = torch.cat([prefix[i:i + 1].to(emb.dtype), emb], dim=1)
            tok = int(model(embeddings=emb, last_only=True)[0, -1].argmax())
            if tok == eos_id:
                break
            generated.append(tok)
        results.append(generated)
    return results


@torch.no_grad()
def score_continuations(model: Transformer, prompts: List[List[int]], continuations: List[List[int]], *,
                        eos_id: int, prefix: Optional[torch.Tensor] = None) -> List[float]:
    """Log-probability of each continuation followed by EOS, one sequence at a time."""
    out = []
    for i, (p, c) in enumerate(zip(prompts, continuations)):
        emb = model.embed(torch.tensor([p + c], device=model.device))
        if prefix is not None:
            emb = torch.cat([prefix[i:i + 1].to(emb.dtype), emb], 1)
        logp = torch.log_softmax(model(embeddings=emb).double(), -1)[0]
        start = emb.shape[1] - len(c) - 1
        out.append(sum(float(logp[start + j, t]) for j, t in enumerate(c + [eos_id])))
    return out


def demo_layout(root: str = "demo_runs", scale: str = "full") -> Dict[str, str]:
    """Where the demo keeps its dataset, stand-in models and feature caches (the benchmark reuses
    them)."""
    base = os.path.join(root, scale)
    data = os.path.join(base, "data")
    st = os.path.join(base, "standins")
    return {
        "root": base, "data": data, "standins": st,
        "train_images": os.path.join(data, "train2014"), "val_images": os.path.join(data, "val2014"),
        "train_ann": os.path.join(data, "annotations", "captions_train2014.json"),
        "val_ann": os.path.join(data, "annotations", "captions_val2014.json"),
        "val_attrs": os.path.join(data, "annotations", "attributes_val2014.json"),
        "clip": os.path.join(st, "clip.pt"), "ckpt_dir": os.path.join(st, "llama"),
        "tokenizer": os.path.join(st, "tokenizer.model"), "features": os.path.join(base, "features"),
        "runs": os.path.join(base, "runs"),
    }


TINY_OPEN_CLIP_TEXT = {"context_length": 16, "vocab_size": 1000, "width": 64, "heads": 1, "layers": 1}


def build_tiny_open_clip(folder: str, name: str, vision_cfg: dict, seed: int = 0, embed_dim: int = 32,
                         text_cfg: Optional[dict] = None) -> tuple:
    """A small open_clip model: its config as FOLDER/NAME.json (what `--clip_model
    open_clip:FOLDER/NAME.json` reads) and random weights as FOLDER/NAME-SEED.bin, a
    torch.save'd state dict like open_clip's released files. Returns (config path, weights path).
    `text_cfg`: the text tower (default TINY_OPEN_CLIP_TEXT, whose small vocabulary suits image
    features only; CLIP-S tokenizes with CLIP's own vocabulary of 49408)."""
    import json

    import open_clip

    os.makedirs(folder, exist_ok=True)
    cfg_path = os.path.join(folder, f"{name}.json")
    with atomic_path(cfg_path) as tmp:
        with open(tmp, "w") as f:
            json.dump({"embed_dim": embed_dim, "vision_cfg": vision_cfg, "text_cfg": text_cfg or TINY_OPEN_CLIP_TEXT}, f)
    open_clip.add_model_config(cfg_path)
    torch.manual_seed(seed)
    model = open_clip.create_model(name, pretrained=None)
    weights = os.path.join(folder, f"{name}-{seed}.bin")
    write_torch(weights, model.state_dict())
    return cfg_path, weights


def open_trained(ckpt_dir: str, tokenizer_path: Optional[str], checkpoint: str, env, max_gen_len: int = 30, **flags):
    """A trained captioner opened as `caption` opens it (opening.open_captioner), on the eager
    decoder with unpacked weights unless `flags` say otherwise: the plain reference of the tests."""
    from ..llama.decoding import Decoding
    from ..opening import CaptionerSettings, open_captioner

    settings = CaptionerSettings(**dict(dict(ckpt_dir=ckpt_dir, tokenizer_path=tokenizer_path, checkpoint=checkpoint,
                                             device=env.device.type, decoder="eager", pack_weights=False), **flags))
    return open_captioner(settings, env, Decoding(max_gen_len=max_gen_len), batch_size=32)
