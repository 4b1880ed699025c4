"""LLaMA text completion, as Meta's example.py (`python -m llama_caption complete`).

    torchrun --nproc_per_node 1 -m llama_caption complete --ckpt_dir llama/7B --tokenizer_path llama/tokenizer.model
    torchrun --nproc_per_node 2 -m llama_caption complete --ckpt_dir Llama-3.2-1B --model_parallel 2

Completions stop at the tokenizer's end tokens (Llama 3: <|end_of_text|>, <|eom_id|>, <|eot_id|>).
Each completion is printed, then a line of 34 '='.
"""


import time
from dataclasses import dataclass, replace
from typing import List, Optional

from .. import distributed
from ..config import command, setting
from ..errors import UserError
from ..runtime import DTYPE_NAMES, resolve_dtype
from .checkpoint import LlamaSettings, load_llama
from .decoding import Decoding, decode, flags

DEFAULT_PROMPTS = [
    "The three things every good photograph has in common are",
    "Here is a short recipe for a warm winter soup:\n",
]


# --max_gen_len, --temperature, --top_p, --seed (decoding.py); no beam search here.
CompleteFlags = flags("CompleteFlags", skip=("num_beams", "length_penalty"), max_gen_len=64, temperature=0.8)


@dataclass
class ExampleConfig(LlamaSettings, CompleteFlags):
    max_seq_len: int = setting(512, "the longest prompt plus completion, in tokens (KV-cache size).")
    max_batch_size: int = setting(32, "the most prompts decoded together; more are done in several batches.")
    prompts: Optional[List[str]] = setting(None, "a list of prompts that replaces the two built-in ones, e.g. '[\"Hello\", \"Hi\"]'.")
    dtype: str = setting("auto", "auto (fp16 on CUDA, fp32 on CPU), fp32, fp16 or bf16.")
    pack_weights: bool = setting(True, "on a CPU, decode with a copy of the weights packed for oneDNN (faster; one extra copy in memory). No effect on CUDA.")

    def check(self) -> None:
        super().check()
        self.at_least(1, "max_batch_size", "max_seq_len")
        if self.prompts is not None and not self.prompts:
            raise UserError("--prompts is an empty list: give at least one prompt, or leave the flag out for the built-in ones")
        Decoding.from_settings(self)
        self.one_of("dtype", DTYPE_NAMES)


def complete(cfg: ExampleConfig) -> None:
    prompts, decoding = cfg.prompts or DEFAULT_PROMPTS, Decoding.from_settings(cfg)
    ckpt = cfg.open()  # a missing folder gets its message before processes are grouped
    if cfg.max_seq_len > ckpt.context:
        raise UserError(f"--max_seq_len {cfg.max_seq_len} is more than the {ckpt.context} positions "
                        f"of the LLaMA in {cfg.ckpt_dir}")
    with distributed.session(cfg.mp_size(), cfg.device, cfg.seed) as env:
        t0 = time.time()
        model, tokenizer = load_llama(ckpt, cfg.tokenizer_path, cfg.max_seq_len, device=env.device,
                                      dtype=resolve_dtype(cfg.dtype, env.device), quantize=cfg.quantize)
        if cfg.pack_weights:
            model.pack_weights()
        print(f"Loaded in {time.time() - t0:.2f} seconds")
        gen = decoding.generator(env.dp_rank, env.device)
        for start in range(0, len(prompts), cfg.max_batch_size):
            ids = [tokenizer.encode(p, bos=True, eos=False) for p in prompts[start:start + cfg.max_batch_size]]
            longest = max(len(t) for t in ids)
            if longest >= cfg.max_seq_len:
                raise UserError(f"a prompt has {longest} tokens, not less than --max_seq_len {cfg.max_seq_len}")
            fits = replace(decoding, max_gen_len=min(decoding.max_gen_len, cfg.max_seq_len - longest))
            outs = decode(model, ids, fits, eos_id=tokenizer.stop_ids, generator=gen)
            for prompt_ids, out in zip(ids, outs):
                print(tokenizer.decode(prompt_ids[1:] + out))  # without BOS, which Llama 3's decoders spell out
                print("\n" + "=" * 34 + "\n")


main = command(ExampleConfig, complete, "Print a completion for each prompt, each followed by a line of 34 '='.")
