"""LLaMA's tokenizers, told apart by their files.

- sentencepiece `tokenizer.model` (Llama 1 and 2): BOS 1, EOS 2, no pad (pad_id -1).
- Meta's Llama 3 `tokenizer.model`: a tiktoken BPE file (`base64-bytes rank` per line, which
  sentencepiece cannot read), Meta's split pattern, then 256 special tokens numbered after the
  base tokens: `<|begin_of_text|>`, `<|end_of_text|>`, ..., `<|eot_id|>`, the reserved ones.
- Hugging Face `tokenizer.json` (any LLaMA on the hub), read with the `tokenizers` library; BOS and
  EOS come from `config.json` / `tokenizer_config.json` beside it.

Every tokenizer has the same face: `n_words`, `bos_id`, `eos_id` (what a caption ends with),
`stop_ids` (every token that ends a completion: Llama 3's `<|eot_id|>` and `<|eom_id|>` too),
`encode(text, bos, eos)` and `decode(ids)`. `find_tokenizer(ckpt_dir)` picks the file that came
with a checkpoint, so `--tokenizer_path` is needed only for a tokenizer kept elsewhere.
"""

import base64
import json
import os
from typing import Dict, List, Optional, Sequence, Tuple

from ..errors import UserError

# Meta's Llama 3 pre-tokenisation pattern (llama-models, models/llama3/tokenizer.py).
LLAMA3_PATTERN = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                  r"|\s*[\r\n]+|\s+(?!\S)|\s+")
LLAMA3_NAMED_SPECIALS = (
    "<|begin_of_text|>", "<|end_of_text|>", "<|reserved_special_token_0|>", "<|reserved_special_token_1|>",
    "<|finetune_right_pad_id|>", "<|step_id|>", "<|start_header_id|>", "<|end_header_id|>", "<|eom_id|>",
    "<|eot_id|>", "<|python_tag|>", "<|image|>",
)
LLAMA3_SPECIAL_COUNT = 256


def llama3_special_tokens(n_base: int) -> Dict[str, int]:
    """Meta's Llama 3 special tokens and their ids, after `n_base` BPE tokens."""
    names = list(LLAMA3_NAMED_SPECIALS)
    names += [f"<|reserved_special_token_{2 + i}|>" for i in range(LLAMA3_SPECIAL_COUNT - len(names))]
    return {name: n_base + i for i, name in enumerate(names)}


class Tokenizer:
    """The common face; `load_tokenizer` returns one of the subclasses."""

    kind = ""
    path: str
    n_words: int
    bos_id: int
    eos_id: int
    pad_id: int = -1  # never an index or a label
    stop_ids: Tuple[int, ...] = ()

    def encode(self, text: str, bos: bool, eos: bool) -> List[int]:
        ids = self._encode(text)
        return ([self.bos_id] if bos else []) + ids + ([self.eos_id] if eos else [])

    def _encode(self, text: str) -> List[int]:
        raise NotImplementedError

    def decode(self, ids: Sequence[int]) -> str:
        raise NotImplementedError

    def describe(self) -> str:
        return f"{self.kind} tokenizer {self.path} ({self.n_words} tokens)"


class SentencePieceTokenizer(Tokenizer):
    kind = "sentencepiece"

    def __init__(self, path: str):
        from sentencepiece import SentencePieceProcessor

        self.sp = SentencePieceProcessor()
        try:
            self.sp.Load(path)
        except (RuntimeError, OSError) as e:
            raise UserError(f"tokenizer {path} is not a sentencepiece model ({e})") from None
        self.path = path
        self.n_words = self.sp.vocab_size()
        self.bos_id, self.eos_id, self.pad_id = self.sp.bos_id(), self.sp.eos_id(), self.sp.pad_id()
        self.stop_ids = (self.eos_id,)

    def _encode(self, text: str) -> List[int]:
        return self.sp.encode(text)

    def decode(self, ids: Sequence[int]) -> str:
        return self.sp.decode(list(ids))


# Bytes a tiktoken file may hold: printable ASCII and whitespace (base64, digits, spaces, newlines).
TEXT_BYTES = bytes(range(0x20, 0x7F)) + b"\t\n\r\x0b\x0c"
SNIFF_BYTES = 1 << 16
TIKTOKEN_LINE = "a Llama 3 tokenizer.model holds one `BASE64TOKEN RANK` pair per line"


def is_text(data: bytes) -> bool:
    return not data.translate(None, TEXT_BYTES)


def read_tiktoken_ranks(path: str) -> Optional[Dict[bytes, int]]:
    """The `base64 rank` lines of a tiktoken BPE file, or None when the file is not one.

    Which file is meant to be a tiktoken file: one that is plain ASCII text (its first 64 KiB, an
    empty file included). A sentencepiece model is a binary protobuf: its piece scores (floats),
    types and lengths (varints) put NUL, control and high bytes in its very first piece, so a real
    sentencepiece file is never taken for text, and a text file is never handed to sentencepiece,
    whose "not a sentencepiece model" would mislead. A text file is then read in full, and any line
    that is not `BASE64TOKEN RANK` is a one-line error naming the file and the line; the ranks must
    be 0..N-1, each token and each rank once, and every single byte a token (tiktoken panics on
    a byte it has no token for).

    Read here rather than with tiktoken's `load_tiktoken_bpe`, which caches by the path's name
    and would return stale ranks for a file rewritten in place.
    """
    data = read_if_text(path)
    if data is None:
        return None
    ranks, rank_line = parse_rank_lines(path, data)
    check_rank_set(path, ranks, rank_line)
    return ranks


def read_if_text(path: str) -> Optional[bytes]:
    """The file's bytes when its first 64 KiB are ASCII text, else None."""
    try:
        with open(path, "rb") as f:
            if not is_text(f.read(SNIFF_BYTES)):
                return None
            f.seek(0)
            return f.read()
    except OSError as e:
        raise UserError(f"tokenizer {path} cannot be read ({e.strerror or e})") from None


def parse_rank_lines(path: str, data: bytes) -> Tuple[Dict[bytes, int], Dict[int, int]]:
    """token -> rank, and rank -> the line it is on; a line that is not `BASE64TOKEN RANK`, or a
    token or rank seen before, is a one-line error naming the line."""

    def bad(lineno: int, what: str) -> UserError:
        return UserError(f"tokenizer {path} line {lineno}: {what} ({TIKTOKEN_LINE})")

    ranks: Dict[bytes, int] = {}
    token_line: Dict[bytes, int] = {}
    rank_line: Dict[int, int] = {}
    for lineno, line in enumerate(data.split(b"\n"), 1):
        fields = line.split()
        if not fields:
            continue
        if not is_text(line):  # past the first 64 KiB
            raise bad(lineno, "bytes that are not ASCII text")
        if len(fields) != 2:
            what = "a token without its rank" if len(fields) == 1 else f"{len(fields)} columns, not 2"
            raise bad(lineno, f"{what}: {line.strip().decode('ascii')[:60]!r}")
        token, rank_text = fields
        try:
            token_bytes = base64.b64decode(token, validate=True)
        except ValueError:  # binascii.Error
            raise bad(lineno, f"{token.decode('ascii')[:60]!r} is not base64") from None
        if not token_bytes:
            raise bad(lineno, f"{token.decode('ascii')!r} is an empty token")
        if not rank_text.isdigit():  # int() would take "+1", "1_000", ...
            raise bad(lineno, f"rank {rank_text.decode('ascii')[:30]!r} is not a whole number >= 0")
        rank = int(rank_text)
        if token_bytes in token_line:
            raise bad(lineno, f"token {token.decode('ascii')[:60]!r} ({token_bytes!r:.40}) already appears on line "
                              f"{token_line[token_bytes]}")
        if rank in rank_line:
            raise bad(lineno, f"rank {rank} already appears on line {rank_line[rank]}")
        ranks[token_bytes], token_line[token_bytes], rank_line[rank] = rank, lineno, lineno
    return ranks, rank_line


def check_rank_set(path: str, ranks: Dict[bytes, int], rank_line: Dict[int, int]) -> None:
    """Some ranks, exactly 0..N-1, and a token for every single byte (tiktoken panics without one)."""
    if not ranks:
        raise UserError(f"tokenizer {path} is empty: no `BASE64TOKEN RANK` line (a Llama 3 tokenizer.model "
                        f"is a tiktoken file; Llama 1/2's a binary sentencepiece model)")
    n = len(ranks)
    # n distinct ranks are 0..n-1 unless one is n or more: name the first such line.
    out_of_range = next(((rank, line) for rank, line in rank_line.items() if rank >= n), None)
    if out_of_range:
        missing = next(r for r in range(n) if r not in rank_line)
        raise UserError(f"tokenizer {path} line {out_of_range[1]}: rank {out_of_range[0]} is out of range: the {n} "
                        f"ranks must be 0..{n - 1} (rank {missing} is missing) ({TIKTOKEN_LINE})")
    missing_bytes = [b for b in range(256) if bytes([b]) not in ranks]
    if missing_bytes:
        raise UserError(f"tokenizer {path}: no token for the single byte {missing_bytes[0]:#04x}"
                        f"{f' (nor {len(missing_bytes) - 1} other bytes)' if len(missing_bytes) > 1 else ''}: "
                        f"a tiktoken BPE file ranks all 256 bytes")


class TiktokenTokenizer(Tokenizer):
    """Meta's Llama 3 tokenizer: the BPE ranks of `tokenizer.model` and Meta's special tokens."""

    kind = "tiktoken (Llama 3)"

    def __init__(self, path: str, ranks: Dict[bytes, int]):
        import tiktoken

        self.path = path
        self.special = llama3_special_tokens(len(ranks))
        self.enc = tiktoken.Encoding(name=os.path.basename(path), pat_str=LLAMA3_PATTERN,
                                     mergeable_ranks=ranks, special_tokens=self.special)
        self.n_words = len(ranks) + len(self.special)
        self.bos_id = self.special["<|begin_of_text|>"]
        self.eos_id = self.special["<|end_of_text|>"]
        self.pad_id = self.special["<|finetune_right_pad_id|>"]
        self.stop_ids = (self.eos_id, self.special["<|eom_id|>"], self.special["<|eot_id|>"])

    def _encode(self, text: str) -> List[int]:
        # Text that spells a special token is encoded as plain text, as Meta's encode does by default.
        return self.enc.encode(text, allowed_special=set(), disallowed_special=())

    def decode(self, ids: Sequence[int]) -> str:
        return self.enc.decode(list(ids))


def read_json(path: str) -> Optional[dict]:
    if not os.path.isfile(path):
        return None
    try:
        with open(path) as f:
            value = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UserError(f"{path} is not valid JSON ({e})") from None
    return value if isinstance(value, dict) else None


def token_text(value) -> Optional[str]:
    """tokenizer_config.json writes special tokens as a string or as {"content": ...}."""
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) else None


class HFTokenizer(Tokenizer):
    """A Hugging Face `tokenizer.json`. BOS/EOS ids: `config.json`'s `bos_token_id`/`eos_token_id`
    beside it, else `tokenizer_config.json`'s `bos_token`/`eos_token`, else LLaMA's names."""

    kind = "tokenizer.json"

    def __init__(self, path: str):
        from tokenizers import Tokenizer as RustTokenizer

        try:
            self.tok = RustTokenizer.from_file(path)
        except Exception as e:  # the library raises its own exception type for a malformed file
            raise UserError(f"tokenizer {path} is not a Hugging Face tokenizer.json ({str(e).splitlines()[0][:200]})") from None
        self.path = path
        self.n_words = self.tok.get_vocab_size(with_added_tokens=True)
        folder = os.path.dirname(os.path.abspath(path))
        config = read_json(os.path.join(folder, "config.json")) or {}
        tok_config = read_json(os.path.join(folder, "tokenizer_config.json")) or {}
        self.bos_id = self.special_id(config.get("bos_token_id"), tok_config.get("bos_token"),
                                      ("<|begin_of_text|>", "<s>"), "bos")
        eos = config.get("eos_token_id")
        eos_list = eos if isinstance(eos, list) else [eos]
        self.eos_id = self.special_id(eos_list[0], tok_config.get("eos_token"), ("<|end_of_text|>", "</s>"), "eos")
        stops = [self.eos_id] + [e for e in eos_list[1:] if isinstance(e, int)]
        for name in ("<|eom_id|>", "<|eot_id|>"):
            i = self.tok.token_to_id(name)
            if i is not None and i not in stops:
                stops.append(i)
        self.stop_ids = tuple(stops)

    def special_id(self, from_config, from_tok_config, names, what: str) -> int:
        if isinstance(from_config, int):
            return from_config
        for name in [token_text(from_tok_config)] + list(names):
            i = self.tok.token_to_id(name) if name else None
            if i is not None:
                return i
        raise UserError(f"tokenizer {self.path}: cannot tell its {what} token (no {what}_token_id in config.json, "
                        f"no {what}_token in tokenizer_config.json, none of {', '.join(names)} in the vocabulary)")

    def _encode(self, text: str) -> List[int]:
        return self.tok.encode(text, add_special_tokens=False).ids

    def decode(self, ids: Sequence[int]) -> str:
        return self.tok.decode(list(ids), skip_special_tokens=False)


def load_tokenizer(path: str) -> Tokenizer:
    """The tokenizer in `path`, whichever of the three kinds it is."""
    if not os.path.isfile(path):
        raise UserError(f"tokenizer {path} not found: pass --tokenizer_path pointing at tokenizer.model or tokenizer.json")
    if path.endswith(".json"):
        return HFTokenizer(path)
    ranks = read_tiktoken_ranks(path)
    if ranks is not None:
        return TiktokenTokenizer(path, ranks)
    return SentencePieceTokenizer(path)


TOKENIZER_FILES = ("tokenizer.model", "tokenizer.json")


def find_tokenizer(ckpt_dir: str) -> Optional[str]:
    """The tokenizer that came with a checkpoint: `tokenizer.model` or `tokenizer.json` in the
    folder, else `tokenizer.model` one level up (Meta's Llama 1/2 downloads keep it beside the
    7B/, 13B/ ... folders)."""
    for name in TOKENIZER_FILES:
        path = os.path.join(ckpt_dir, name)
        if os.path.isfile(path):
            return path
    parent = os.path.join(os.path.dirname(os.path.abspath(ckpt_dir)), "tokenizer.model")
    return parent if os.path.isfile(parent) else None


def resolve_tokenizer_path(tokenizer_path: Optional[str], ckpt_dir: str) -> str:
    """`--tokenizer_path` when given, else the tokenizer found with the checkpoint."""
    if tokenizer_path:
        return tokenizer_path
    found = find_tokenizer(ckpt_dir)
    if found is None:
        raise UserError(f"no tokenizer.model or tokenizer.json in {ckpt_dir} (or tokenizer.model beside it): "
                        f"pass --tokenizer_path")
    return found
