"""Run under torchrun by the tests: logits and greedy completions of a checkpoint (plain and with
packed weights), written by rank 0.

    python -m torch.distributed.run --nproc_per_node N tests/mp_worker.py OUT_DIR TOKENIZER CKPT [CKPT ...]

TOKENIZER "auto": each checkpoint's own.
"""

import json
import sys

import torch
from safetensors.torch import save_file

from llama_caption import distributed
from llama_caption.llama.checkpoint import load_llama
from llama_caption.llama.generation import generate


def run(ckpt, tokenizer_path):
    model, tok = load_llama(ckpt, None if tokenizer_path == "auto" else tokenizer_path, max_seq_len=64)
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(3, tok.n_words, (2, 10), generator=g)
    prefix = torch.randn(3, 2, model.args.dim, generator=g)
    prompts = [tok.encode(s, True, False) for s in ("a red cat", "the", "a blue dog under the tree")]
    with torch.no_grad():
        logits = model(tokens)
    out = {
        "prompts": prompts,
        "greedy": generate(model, prompts, eos_id=tok.eos_id, max_gen_len=10),
        "greedy_prefix": generate(model, prompts, eos_id=tok.eos_id, max_gen_len=10, prefix=prefix),
    }
    # The same through the oneDNN-packed weights (each rank packs its own shard).
    assert model.pack_weights()
    with torch.no_grad():
        packed_logits = model(tokens)
    out["greedy_prefix_packed"] = generate(model, prompts, eos_id=tok.eos_id, max_gen_len=10, prefix=prefix)
    return {"logits": logits, "packed_logits": packed_logits, "tokens": tokens}, out


def main(out_dir, tokenizer_path, *ckpts):
    env = distributed.setup(device="cpu")
    for i, ckpt in enumerate(ckpts):
        logits, completions = run(ckpt, tokenizer_path)
        if env.is_main:
            save_file(logits, f"{out_dir}/logits{i}.safetensors")
            json.dump(completions, open(f"{out_dir}/completions{i}.json", "w"))
    distributed.teardown()


if __name__ == "__main__":
    main(*sys.argv[1:])
