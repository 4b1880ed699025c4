"""The frozen image encoder: OpenAI's CLIP from the `clip` package (the default), or any
open_clip model (`--clip_model open_clip:ARCH --clip_pretrained FILE_OR_TAG`: SigLIP, EVA-CLIP,
DataComp, ... including the timm-based towers). `load_encoder` picks the backend from the name.

Two kinds of features:
  pooled  CLIP's image embedding, one vector per image (ClipCap);            (B, embed_dim)
  patch   the patch tokens after a chosen transformer block, the penultimate
          by default, without the CLS token (LLaVA);                          (B, grid*grid, width)

`EncoderSpec` is what identifies an encoder's features (the model, the SHA-256 of its weights
file, for open_clip the SHA-256 of its model config, the feature kind and layer); feature caches
and captioner checkpoints record it and are refused when it differs (`same_encoder` is the
comparison, which accepts the identities recorded before the config was part of them). Loading an
encoder checks that its files still give the identity its spec records. Every encoder
preprocesses with its model's own transform (resolution, mean/std, resize mode).
"""

import hashlib
import json
import os
import warnings
from dataclasses import dataclass
from functools import cached_property
from typing import Dict, Optional, Tuple

import torch
from torch import nn

from .config import Config, setting
from .errors import UserError
from .fileio import sha256_file

FEATURE_KINDS = ("pooled", "patch")
OPEN_CLIP = "open_clip:"
# open_clip identities end with the SHA-256 of the model config: open_clip:ARCH+WEIGHTS+config-sha256:HEX.
CONFIG_PART = "+config-sha256:"
OPEN_CLIP_CONFIG_KEYS = ("embed_dim", "vision_cfg", "text_cfg")  # what open_clip requires of a model config
LOCAL_DIR_CONFIG = "open_clip_config.json"  # a local-dir: folder's config (model_cfg and preprocess_cfg)


def import_clip():
    """The `clip` package, without the pkg_resources deprecation warning it triggers on import."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        import clip
        import clip.model  # noqa: F401  (the CLIP class, for the demo's and tests' stand-ins)
    return clip


_file_hashes: Dict[tuple, str] = {}


def file_sha256(path: str) -> str:
    """sha256_file, remembered for this process while the file is unchanged (same inode, size and
    modification time): a command that names its encoder and then loads it reads the weights once."""
    st = os.stat(path)
    key = (os.path.realpath(path), st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)
    if key not in _file_hashes:
        _file_hashes[key] = sha256_file(path)
    return _file_hashes[key]


def clip_identity(name_or_path: str) -> str:
    """The name of a released model, or the SHA-256 of a local file (so a rebuilt file with the
    same name is told apart)."""
    if os.path.isfile(name_or_path):
        return "sha256:" + file_sha256(name_or_path)
    return name_or_path


def same_encoder(recorded: str, current: str) -> bool:
    """Whether an identity recorded in a feature cache or checkpoint names the encoder whose
    identity is `current`. open_clip identities recorded before the model config was part of
    them (`open_clip:ARCH+WEIGHTS`, no config part) are accepted when all the rest is the same."""
    if recorded == current:
        return True
    base, sep, _ = current.partition(CONFIG_PART)
    return bool(sep) and current.startswith(OPEN_CLIP) and CONFIG_PART not in recorded and recorded == base


def read_config_json(path: str, flag: str) -> dict:
    """A JSON object from a model config file, or a one-line error naming the file."""
    try:
        with open(path, "rb") as f:
            value = json.loads(f.read().decode("utf-8"))
    except OSError as e:
        raise UserError(f"{flag}: cannot read {path} ({e.strerror or e})") from None
    except UnicodeDecodeError:
        raise UserError(f"{flag}: {path} is not UTF-8 text: name an open_clip model config JSON file") from None
    except json.JSONDecodeError as e:
        raise UserError(f"{flag}: {path} is not valid JSON (line {e.lineno} column {e.colno}: {e.msg}): "
                        f"fix the model config") from None
    if not isinstance(value, dict):
        raise UserError(f"{flag}: {path} holds a JSON {type(value).__name__}, not an object: "
                        f"an open_clip model config is an object with {', '.join(OPEN_CLIP_CONFIG_KEYS)}")
    return value


def check_model_config(cfg: dict, path: str, flag: str) -> None:
    """What open_clip needs of a model config (it skips a config without them, then reports the
    model as not found in its built-ins)."""
    missing = [k for k in OPEN_CLIP_CONFIG_KEYS if k not in cfg]
    if missing:
        raise UserError(f"{flag}: {path} is not an open_clip model config: it has no {' and no '.join(missing)} "
                        f"(a model config has {', '.join(OPEN_CLIP_CONFIG_KEYS)})")
    embed_dim = cfg["embed_dim"]
    if isinstance(embed_dim, bool) or not isinstance(embed_dim, int) or embed_dim < 1:
        raise UserError(f"{flag}: {path}: embed_dim must be a positive whole number, got {embed_dim!r}")
    for key in ("vision_cfg", "text_cfg"):
        if not isinstance(cfg[key], dict):
            raise UserError(f"{flag}: {path}: {key} must be a JSON object, got {json.dumps(cfg[key])[:60]}")


def open_clip_model_config(arch: str) -> Tuple[str, Optional[dict]]:
    """ARCH as open_clip registers it, and the configuration open_clip builds it from: a config
    JSON file's content (read and checked here), a local-dir: folder's whole open_clip_config.json
    (its preprocess_cfg changes the features too), or a built-in model's registered config.
    hf-hub: names: (name, None), their config being on the hub."""
    flag = f"--clip_model {OPEN_CLIP}{arch}"
    if arch.endswith(".json"):
        if not os.path.isfile(arch):
            raise UserError(f"{flag}: no such model config file")
        cfg = read_config_json(arch, flag)
        check_model_config(cfg, arch, flag)
        # Known by its file name, as open_clip.add_model_config registers it.
        return os.path.splitext(os.path.basename(arch))[0], cfg
    if arch.startswith("local-dir:"):
        path = os.path.join(arch[len("local-dir:"):], LOCAL_DIR_CONFIG)
        if not os.path.isfile(path):
            raise UserError(f"{flag}: {path} not found: a local-dir: folder holds {LOCAL_DIR_CONFIG} and the weights")
        cfg = read_config_json(path, flag)
        if not isinstance(cfg.get("model_cfg"), dict):
            raise UserError(f"{flag}: {path} has no model_cfg object (open_clip reads the model config from it)")
        check_model_config(cfg["model_cfg"], path, flag)
        return arch, cfg
    if arch.startswith("hf-hub:"):
        return arch, None
    import open_clip

    if arch not in open_clip.list_models():
        raise UserError(f"{flag}: open_clip has no model {arch!r} (see open_clip.list_models(), "
                        f"or name a model config JSON file)")
    return arch, open_clip.get_model_config(arch)


def canonical_sha256(value) -> str:
    """The SHA-256 of a JSON value written canonically (sorted keys, no spaces, ASCII): the same
    config gives the same hash however its file is laid out."""
    text = json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=True)
    return hashlib.sha256(text.encode("ascii")).hexdigest()


def open_clip_identity(name: str, cfg: Optional[dict], pretrained: Optional[str]) -> str:
    """open_clip:NAME+WEIGHTS+config-sha256:HEX (no config part for hf-hub: names)."""
    identity = f"{OPEN_CLIP}{name}+{clip_identity(pretrained) if pretrained else 'none'}"
    if cfg is not None:
        identity += CONFIG_PART + canonical_sha256(cfg)
    return identity


@dataclass(frozen=True)
class EncoderSpec:
    """Which features: the model (a `clip` name or file, or open_clip:ARCH), its weights
    (open_clip: a file or a pretrained tag), their identity, the feature kind and block (patch)."""

    clip_model: str
    identity: str
    feature_kind: str = "pooled"
    clip_layer: Optional[int] = None  # only for patch features
    pretrained: Optional[str] = None  # only for open_clip

    @classmethod
    def of(cls, clip_model: str, feature_kind: str = "pooled", clip_layer: int = -2,
           pretrained: Optional[str] = None) -> "EncoderSpec":
        # Files by their absolute paths: a checkpoint that records them opens from any folder.
        if pretrained and os.path.isfile(pretrained):
            pretrained = os.path.abspath(pretrained)
        if clip_model.startswith(OPEN_CLIP):
            arch = clip_model[len(OPEN_CLIP):]
            if os.path.isfile(arch):
                clip_model = OPEN_CLIP + os.path.abspath(arch)
            name, cfg = open_clip_model_config(clip_model[len(OPEN_CLIP):])
            identity = open_clip_identity(name, cfg, pretrained)
        else:
            if os.path.isfile(clip_model):
                clip_model = os.path.abspath(clip_model)
            identity = clip_identity(clip_model)
        return cls(clip_model, identity, feature_kind, clip_layer if feature_kind == "patch" else None, pretrained)

    def cache_meta(self) -> dict:
        """The keys a feature cache's meta.json records (names kept from the first version)."""
        return {"clip_model": self.clip_model, "clip_identity": self.identity, "feature": self.feature_kind,
                "clip_layer": str(self.clip_layer)}


def check_encoder_flags(clip_model: str, clip_pretrained: Optional[str]) -> None:
    """--clip_pretrained goes with open_clip models, which need it (but for hf-hub:/local-dir: names)."""
    if not clip_model.startswith(OPEN_CLIP):
        if clip_pretrained:
            raise UserError("--clip_pretrained is for --clip_model open_clip:ARCH; a `clip` model is one file: "
                            "pass it as --clip_model")
        return
    arch = clip_model[len(OPEN_CLIP):]
    if not arch:
        raise UserError("--clip_model open_clip: needs an architecture, e.g. open_clip:ViT-B-32")
    if not clip_pretrained and not arch.startswith(("hf-hub:", "local-dir:")):
        raise UserError(f"--clip_model {clip_model} needs --clip_pretrained: a weights file "
                        f"(open_clip_pytorch_model.bin or .safetensors) or a pretrained tag")
    if arch.endswith(".json") or arch.startswith("local-dir:"):
        open_clip_model_config(arch)  # a config file is checked with the flags, before any work starts


@dataclass(kw_only=True)
class EncoderSettings(Config):
    """The flags of the commands that run an encoder by its name (`train`, `features`): a config
    inherits them, as it does LlamaSettings. (`caption` reads its encoder from the checkpoint.)"""

    clip_model: str = setting(help="CLIP name (ViT-B/32, ViT-B/16, ViT-L/14, ViT-L/14@336px), a local CLIP file, or open_clip:ARCH (an open_clip model name or model config JSON; weights from --clip_pretrained).")
    clip_pretrained: Optional[str] = setting(None, "with --clip_model open_clip:ARCH: the weights file (open_clip_pytorch_model.bin, .safetensors) or a pretrained tag (downloaded only if not cached).")
    feature_kind: str = setting("pooled", "pooled (the CLIP image embedding, one vector per image: ClipCap) or patch (the patch tokens of --clip_layer: LLaVA).")
    clip_layer: int = setting(-2, "with --feature_kind patch, the transformer block whose patch tokens are taken (-2: the penultimate); refused with pooled features, which come after the last block.")

    def check(self) -> None:
        super().check()
        self.one_of("feature_kind", FEATURE_KINDS)
        if self.feature_kind == "pooled" and self.clip_layer != -2:
            raise UserError(f"--clip_layer {self.clip_layer} is for --feature_kind patch: pooled features are CLIP's "
                            f"image embedding, taken after the last block (add --feature_kind patch, or leave out "
                            f"--clip_layer)")
        check_encoder_flags(self.clip_model, self.clip_pretrained)

    def encoder_spec(self) -> EncoderSpec:
        return EncoderSpec.of(self.clip_model, self.feature_kind, self.clip_layer, self.clip_pretrained)


def check_identity(spec: EncoderSpec, current: str) -> None:
    """The encoder's files, as they are now, must give the identity its spec records (a checkpoint
    names its encoder's files by path: a file rewritten since would give other features). A
    checkpoint of the first format recorded no identity (its identity is the model's name): nothing
    to check."""
    if spec.identity != spec.clip_model and not same_encoder(spec.identity, current):
        files = spec.clip_model + (f" with weights {spec.pretrained}" if spec.pretrained else "")
        raise UserError(f"image encoder {files} has changed: its files now give identity {current}, not the "
                        f"recorded {spec.identity}: restore the config and weights it was made with")


class ImageEncoder(nn.Module):
    """A frozen vision tower: `preprocess` (PIL image to tensor), `feature_shape`, and forward
    (preprocessed images to float32 features of `spec.feature_kind`)."""

    spec: EncoderSpec
    preprocess = None

    def train(self, mode: bool = True):  # frozen: always in eval mode
        return super().train(False)

    def check_layer(self, n_blocks: int) -> int:
        """The block index of a patch-feature spec, checked against the loaded model's blocks."""
        layer = self.spec.clip_layer
        if not -n_blocks <= layer < n_blocks:
            raise UserError(f"--clip_layer {layer} is outside the {n_blocks} blocks of {self.spec.clip_model}")
        return layer % n_blocks


def load_encoder(spec: EncoderSpec, device="cpu") -> ImageEncoder:
    """The encoder a spec names: open_clip for `open_clip:ARCH`, else the `clip` package."""
    if spec.clip_model.startswith(OPEN_CLIP):
        return OpenClipEncoder(spec, device)
    return ClipEncoder(spec, device)


def load_clip(name_or_path: str, device="cpu"):
    """clip.load with one-line errors. Returns (model, preprocess)."""
    clip = import_clip()
    if not os.path.isfile(name_or_path) and name_or_path not in clip.available_models():
        raise UserError(
            f"--clip_model {name_or_path!r} is neither a file nor one of {clip.available_models()}"
        )
    try:
        # A TorchScript archive (the format of OpenAI's files) runs code when loaded: only use
        # CLIP files from sources you trust, as with any TorchScript model.
        with warnings.catch_warnings():  # torch.jit's deprecation notices, on every load
            warnings.simplefilter("ignore", FutureWarning)
            model, preprocess = clip.load(name_or_path, device=device, jit=False)
    except Exception as e:
        where = "a local file" if os.path.isfile(name_or_path) else "the name (download failed; offline?)"
        raise UserError(
            f"cannot load CLIP model {name_or_path} from {where}: {type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''} "
            f"- pass a TorchScript CLIP file such as OpenAI's ViT-B-32.pt"
        ) from None
    return model, preprocess


class ClipEncoder(ImageEncoder):
    """OpenAI's CLIP vision tower from the `clip` package, with CLIP's own preprocessing."""

    def __init__(self, spec: EncoderSpec, device="cpu"):
        super().__init__()
        if os.path.isfile(spec.clip_model):  # else load_clip's error, or a released model's name
            check_identity(spec, clip_identity(spec.clip_model))
        model, self.preprocess = load_clip(spec.clip_model, device)
        self.visual = model.visual  # the text tower is not needed
        del model
        self.visual.requires_grad_(False).eval()
        self.spec = spec
        # The block count is only known once the model is loaded: this check cannot live in a config.
        self.block = self.check_layer(len(self.visual.transformer.resblocks)) if spec.feature_kind == "patch" else None

    @property
    def feature_shape(self) -> Tuple[int, ...]:
        v = self.visual
        if self.spec.feature_kind == "pooled":
            return (v.output_dim,)
        grid = v.input_resolution // v.conv1.kernel_size[0]
        return (grid * grid, v.conv1.out_channels)

    @property
    def dtype(self):
        return self.visual.conv1.weight.dtype

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Preprocessed images (B, 3, R, R) to float32 features."""
        images = images.to(self.visual.conv1.weight.device, self.dtype)
        if self.spec.feature_kind == "pooled":
            return self.visual(images).float()
        v = self.visual
        x = v.conv1(images).flatten(2).transpose(1, 2)
        cls = v.class_embedding.to(x.dtype).expand(x.shape[0], 1, -1)
        x = v.ln_pre(torch.cat([cls, x], 1) + v.positional_embedding.to(x.dtype))
        x = x.permute(1, 0, 2)  # CLIP's blocks take (L, N, D)
        for block in v.transformer.resblocks[: self.block + 1]:
            x = block(x)
        return x.permute(1, 0, 2)[:, 1:].float()


def register_open_clip_config(arch: str) -> Tuple[str, Optional[dict]]:
    """ARCH as open_clip knows it (a registered name, or a model config JSON file, registered here
    under its file name) and the config open_clip will build it from (`open_clip_model_config`)."""
    import open_clip

    name, cfg = open_clip_model_config(arch)
    if arch.endswith(".json"):
        try:
            open_clip.add_model_config(arch)  # which reads every config file registered so far again
        except (OSError, ValueError) as e:  # json.JSONDecodeError is a ValueError
            raise UserError(f"--clip_model {OPEN_CLIP}{arch}: open_clip could not register it "
                            f"({type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''})") from None
        if open_clip.get_model_config(name) != cfg:  # rewritten since it was read above
            raise UserError(f"--clip_model {OPEN_CLIP}{arch}: the file changed while it was being read: run again")
    return name, cfg


def open_clip_weights(arch: str, pretrained: Optional[str]) -> Optional[str]:
    """What to pass open_clip as `pretrained`: a file, or a tag it knows for ARCH (which it may
    download). Anything else is a one-line error naming --clip_pretrained."""
    import open_clip

    if arch.startswith(("hf-hub:", "local-dir:")):
        return None  # the weights come with the model name
    if not pretrained:
        raise UserError(f"--clip_model {OPEN_CLIP}{arch} needs --clip_pretrained: a weights file "
                        f"(open_clip_pytorch_model.bin or .safetensors) or a pretrained tag")
    if os.path.isfile(pretrained):
        return pretrained
    tags = open_clip.list_pretrained_tags_by_model(arch)
    if pretrained not in tags:
        raise UserError(f"--clip_pretrained {pretrained} is neither a file nor a pretrained tag of {arch} "
                        f"(tags: {', '.join(tags) or 'none'})")
    return pretrained


class OpenClipEncoder(ImageEncoder):
    """An open_clip vision tower (its own ViT, or a timm trunk such as SigLIP's), with the model's
    own validation preprocessing. Nothing is downloaded unless --clip_pretrained is a tag that is
    not in the local cache."""

    def __init__(self, spec: EncoderSpec, device="cpu", model=None, preprocess=None):
        """`model` and `preprocess`: an open_clip model already built (the benchmark's random ones)."""
        super().__init__()
        if model is None:
            model, preprocess = self.load(spec, device)
        self.preprocess = preprocess
        self.visual = model.visual
        del model
        self.visual.requires_grad_(False).eval()
        self.spec = spec
        self.trunk = getattr(self.visual, "trunk", None)  # timm-based towers
        self.block = self.check_layer(self.n_blocks()) if spec.feature_kind == "patch" else None

    @staticmethod
    def load(spec: EncoderSpec, device):
        import open_clip

        arch, cfg = register_open_clip_config(spec.clip_model[len(OPEN_CLIP):])
        weights = open_clip_weights(arch, spec.pretrained)
        check_identity(spec, open_clip_identity(arch, cfg, spec.pretrained))
        try:
            model, _, preprocess = open_clip.create_model_and_transforms(arch, pretrained=weights, device=device)
        except Exception as e:  # a download that failed offline, a file of another architecture
            raise UserError(f"cannot load open_clip {arch} with --clip_pretrained {spec.pretrained}: "
                            f"{type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}") from None
        return model, preprocess

    def n_blocks(self) -> int:
        blocks = self.trunk.blocks if self.trunk is not None else getattr(self.visual, "transformer", None)
        blocks = getattr(blocks, "resblocks", blocks)
        if blocks is None or not hasattr(self.visual, "forward_intermediates"):
            raise UserError(f"--feature_kind patch needs a ViT tower; {self.spec.clip_model} has none: use pooled")
        return len(blocks)

    @cached_property
    def feature_shape(self) -> Tuple[int, ...]:
        if self.spec.feature_kind == "pooled":
            size = self.visual.image_size
            size = tuple(size) if isinstance(size, (tuple, list)) else (size, size)
            return tuple(self(torch.zeros(1, 3, *size)).shape[1:])  # one blank image: towers differ in how they say it
        if self.trunk is not None:
            grid, width = self.trunk.patch_embed.grid_size, self.trunk.embed_dim
        else:
            grid, width = self.visual.grid_size, self.visual.transformer.width
        return (grid[0] * grid[1], width)

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Preprocessed images (B, 3, R, R) to float32 features."""
        images = images.to(next(self.visual.parameters()).device)
        if self.spec.feature_kind == "pooled":
            return self.visual(images).float()
        out = self.visual.forward_intermediates(images, indices=[self.block], stop_early=True,
                                                intermediates_only=True, output_fmt="NLC")
        return out["image_intermediates"][0].float()  # patch tokens only: class/prefix tokens are split off
