"""sentencepiece wrapper with LLaMA's conventions (BOS 1, EOS 2, no pad: pad_id is -1)."""

import os
from typing import List

from sentencepiece import SentencePieceProcessor

from .errors import UserError


class Tokenizer:
    def __init__(self, model_path: str):
        if not os.path.isfile(model_path):
            raise UserError(f"tokenizer {model_path} not found: pass --tokenizer_path pointing at tokenizer.model")
        self.sp = SentencePieceProcessor()
        try:
            self.sp.Load(model_path)
        except (RuntimeError, OSError) as e:
            raise UserError(f"tokenizer {model_path} is not a sentencepiece model ({e})") from None
        self.path = model_path
        self.n_words: int = self.sp.vocab_size()
        self.bos_id: int = self.sp.bos_id()
        self.eos_id: int = self.sp.eos_id()
        self.pad_id: int = self.sp.pad_id()  # -1 for LLaMA: never an index or a label

    def encode(self, text: str, bos: bool, eos: bool) -> List[int]:
        ids = self.sp.encode(text)
        return ([self.bos_id] if bos else []) + ids + ([self.eos_id] if eos else [])

    def decode(self, ids: List[int]) -> str:
        return self.sp.decode(list(ids))
