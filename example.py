"""LLaMA text completion, as Meta's v1 example.

    torchrun --nproc_per_node MP example.py --ckpt_dir llama/7B --tokenizer_path llama/tokenizer.model

MP is the number of consolidated.XX.pth shards (7B: 1, 13B: 2, 33B: 4, 65B: 8), or reshard with
`python -m llama_caption.reshard`. Each completion is printed, then a line of 34 '='.
"""

import time
from typing import List, Optional

import fire

from llama_caption import distributed
from llama_caption.checkpoint import list_shards, load_llama
from llama_caption.errors import UserError, exit_on_user_error
from llama_caption.generation import generate
from llama_caption.runtime import resolve_dtype

DEFAULT_PROMPTS = [
    "The three things every good photograph has in common are",
    "Here is a short recipe for a warm winter soup:\n",
]


@exit_on_user_error
def main(
    ckpt_dir: str,
    tokenizer_path: str,
    temperature: float = 0.8,
    top_p: float = 0.95,
    max_seq_len: int = 512,
    max_batch_size: int = 32,
    max_gen_len: int = 64,
    prompts: Optional[List[str]] = None,
    device: str = "auto",
    dtype: str = "auto",
    seed: int = 1,
    pack_weights: bool = True,
):
    """Print a completion for each prompt, each followed by a line of 34 '='.

    Args:
        ckpt_dir: folder with Meta's params.json and consolidated.XX.pth shards.
        tokenizer_path: LLaMA's tokenizer.model (sentencepiece).
        temperature: sampling temperature; 0 means greedy decoding.
        top_p: nucleus-sampling threshold (used when temperature > 0).
        max_seq_len: the longest prompt plus completion, in tokens (KV-cache size).
        max_batch_size: the most prompts decoded together; more are done in several batches.
        max_gen_len: the most tokens generated per prompt.
        prompts: a list of prompts that replaces the two built-in ones, e.g. '["Hello", "Hi"]'.
        device: auto (CUDA when available, else CPU), cpu or cuda.
        dtype: auto (fp16 on CUDA, fp32 on CPU), fp32, fp16 or bf16.
        seed: the random seed, the same on every rank.
        pack_weights: on a CPU, decode with a copy of the weights packed for oneDNN (1.5-2.2x faster at batch 32 in make bench; one extra copy in memory). No effect on CUDA.
    """
    if isinstance(prompts, str):
        prompts = [prompts]
    prompts = list(prompts) if prompts else DEFAULT_PROMPTS
    if not all(isinstance(p, str) for p in prompts):
        raise UserError("--prompts must be a list of strings, e.g. --prompts '[\"Hello\", \"Hi\"]'")
    if max_batch_size < 1 or max_gen_len < 1:
        raise UserError("--max_batch_size and --max_gen_len must be at least 1")
    list_shards(ckpt_dir)  # a missing folder gets its message before processes are grouped
    env = distributed.setup(seed=seed, device=device)
    try:
        t0 = time.time()
        model, tokenizer = load_llama(ckpt_dir, tokenizer_path, max_seq_len, max_batch_size,
                                      device=env.device, dtype=resolve_dtype(dtype, env.device))
        if pack_weights:
            model.pack_weights()
        print(f"Loaded in {time.time() - t0:.2f} seconds")
        for start in range(0, len(prompts), max_batch_size):
            batch = prompts[start:start + max_batch_size]
            ids = [tokenizer.encode(p, bos=True, eos=False) for p in batch]
            longest = max(len(t) for t in ids)
            if longest >= max_seq_len:
                raise UserError(f"a prompt has {longest} tokens, not less than --max_seq_len {max_seq_len}")
            gen_len = min(max_gen_len, max_seq_len - longest)
            outs = generate(model, ids, eos_id=tokenizer.eos_id, max_gen_len=gen_len,
                            temperature=temperature, top_p=top_p)
            for prompt_ids, out in zip(ids, outs):
                print(tokenizer.decode(prompt_ids + out))
                print("\n" + "=" * 34 + "\n")
    finally:
        distributed.teardown()


if __name__ == "__main__":
    fire.Fire(main)
