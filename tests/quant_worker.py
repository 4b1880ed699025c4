"""Run under torchrun by tests/test_quantize.py: for each --quantize mode, the logits of a
checkpoint with an image-like prefix, and the gradient of a loss on them with respect to that
prefix, written by rank 0.

    python -m torch.distributed.run --nproc_per_node N tests/quant_worker.py OUT_FILE TOKENIZER CKPT MODE [MODE ...]
"""

import sys

import torch
from safetensors.torch import save_file

from llama_caption import distributed
from llama_caption.llama.checkpoint import load_llama


def compute(tokenizer_path, ckpt, modes) -> dict:
    """Each mode's logits and prefix gradient at the current model-parallel size (the tests call
    it in-process for size 1)."""
    result = {}
    for mode in modes:
        model, tok = load_llama(ckpt, tokenizer_path, max_seq_len=64, quantize=mode)
        # Caption-like text after a prefix of the LLaMA's own scale (the embeddings of three words).
        texts = ("a red cat on the green house", "two dogs near a blue boat")
        ids = [tok.encode(t, bos=True, eos=False)[:8] for t in texts]
        tokens = torch.tensor([x + [tok.eos_id] * (8 - len(x)) for x in ids])
        words = torch.tensor([tok.encode(w, bos=False, eos=False)[:3] for w in ("a big tree", "the black car")])
        prefix = model.embed(words).detach().float().requires_grad_()
        emb = torch.cat([prefix, model.embed(tokens)], dim=1)
        logits = model(embeddings=emb)
        loss = torch.nn.functional.cross_entropy(logits[:, 2:-1].reshape(-1, logits.shape[-1]), tokens.reshape(-1))
        loss.backward()
        result[f"{mode}.logits"] = logits.detach()
        result[f"{mode}.grad"] = prefix.grad
    return result


def main(out_file, tokenizer_path, ckpt, *modes):
    env = distributed.setup(mp_size=None, device="cpu", quiet=True)
    result = compute(tokenizer_path, ckpt, modes)
    if env.is_main:
        save_file(result, out_file)
    distributed.teardown()


if __name__ == "__main__":
    main(*sys.argv[1:])
