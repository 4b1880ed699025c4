"""LLaMA-7B's shape (random fp16 weights) on a GPU: the eager decoder against cuda_graph and
static at batch 1 and 32, 20 tokens after a 10-token prefix and BOS (bench's 7b setting)."""

import time

import torch

from llama_caption import distributed
from llama_caption.llama.generation import generate
from llama_caption.llama.model import ModelArgs
from llama_caption.llama.static_decode import StaticDecoder
from llama_caption.tools.testing import random_model


def timed(fn, n=2):
    fn()
    torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(n):
        out = fn()
    torch.cuda.synchronize()
    return out, (time.perf_counter() - t) / n


distributed.setup(mp_size=1, device="cuda", quiet=False)
args = ModelArgs(dim=4096, n_layers=32, n_heads=32, n_kv_heads=32, vocab_size=32000, max_seq_len=64)
model = random_model(args, torch.device("cuda"), torch.float16, std=0.02)
gen = torch.Generator().manual_seed(0)
for batch in (1, 32):
    prompts = [[1]] * batch
    prefix = (torch.randn(batch, 10, 4096, generator=gen) * 0.5).cuda().half()
    ref, t_ref = timed(lambda: generate(model, prompts, eos_id=-1, max_gen_len=20, prefix=prefix))
    print(f"7b fp16 batch {batch:2d}: eager {batch / t_ref:7.2f} captions/s ({t_ref * 1e3:.0f} ms)", flush=True)
    for mode in ("static", "cuda_graph"):
        dec = StaticDecoder(model, mode, sizes=(batch,))
        got, t = timed(lambda: dec.generate(prompts, eos_id=-1, max_gen_len=20, prefix=prefix))
        same = sum(a == b for a, b in zip(got, ref))
        print(f"    {mode:10s} {batch / t:7.2f} captions/s ({t_ref / t:4.2f}x eager), {same}/{batch} as eager", flush=True)
