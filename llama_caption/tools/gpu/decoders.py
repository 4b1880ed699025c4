"""GPU check of the fixed-shape decoders (run by tools/gpu/check.sh on a machine with a GPU).

On CUDA, in fp32 with TF32 off, every decoder (static, compile, cuda_graph) must give
generation.generate's tokens, greedy and sampled, as the CPU tests assert; in fp16 it prints how
many captions agree (GEMMs of other shapes round differently) and the time per caption of each.
Exits non-zero when an fp32 check fails.
"""

import sys
import time

import torch

from llama_caption import distributed
from llama_caption.llama.generation import generate
from llama_caption.llama.model import ModelArgs
from llama_caption.llama.static_decode import StaticDecoder
from llama_caption.tools.testing import random_model

PROMPTS = [[1, 5, 9, 4], [1, 7], [1, 3, 3, 8, 2, 6, 11]]


def sync():
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def timed(fn):
    sync()
    t = time.perf_counter()
    out = fn()
    sync()
    return out, time.perf_counter() - t


def main() -> int:
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    dry = sys.argv[1:] == ["--cpu"]  # a dry run of this script on a machine without a GPU
    dev = torch.device("cpu" if dry else "cuda")
    modes = ("static", "compile") if dry else ("static", "compile", "cuda_graph")
    distributed.setup(mp_size=1, device=dev.type, quiet=False)
    args = ModelArgs(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=96, max_seq_len=40, rope_theta=500000.0,
                     use_scaled_rope=True)
    failed = []
    model = random_model(args, dev, torch.float32, std=0.3)
    prefix = torch.randn(3, 3, args.dim, generator=torch.Generator().manual_seed(0)).to(dev) * 0.5
    want = generate(model, PROMPTS, eos_id=2, max_gen_len=16, prefix=prefix)
    sampled = generate(model, PROMPTS, eos_id=2, max_gen_len=12, prefix=prefix, temperature=1.0, top_p=0.9,
                       generator=torch.Generator(device=dev).manual_seed(3))
    for mode in modes:
        decoder = StaticDecoder(model, mode, sizes=(1, 4))
        for _ in range(2):  # the second call replays what the first captured or compiled
            got = decoder.generate(PROMPTS, eos_id=2, max_gen_len=16, prefix=prefix)
            one = decoder.generate(PROMPTS[1:2], eos_id=2, max_gen_len=16)
        ok = got == want and one == generate(model, PROMPTS[1:2], eos_id=2, max_gen_len=16)
        s = decoder.generate(PROMPTS, eos_id=2, max_gen_len=12, prefix=prefix, temperature=1.0, top_p=0.9,
                             generator=torch.Generator(device=dev).manual_seed(3))
        print(f"fp32 {dev.type} {mode:10s} greedy {'same' if ok else 'DIFFERENT'}, sampled "
              f"{'same' if s == sampled else 'DIFFERENT'} as generate")
        if not ok or s != sampled:
            failed.append(mode)

    # A bigger fp16 model: agreement and time per batch (after a warm-up) per decoder.
    big = ModelArgs(dim=128 if dry else 2048, n_layers=8, n_heads=16, n_kv_heads=16, vocab_size=32000, max_seq_len=128)
    model16 = random_model(big, dev, torch.float32 if dry else torch.float16, std=0.02)
    g = torch.Generator().manual_seed(1)
    prompts = [[1] + torch.randint(3, 32000, (int(n),), generator=g).tolist() for n in torch.randint(2, 9, (32,), generator=g)]
    for batch in (1, 32):
        ps = prompts[:batch]
        ref, t_ref = timed(lambda: generate(model16, ps, eos_id=-1, max_gen_len=30))
        ref, t_ref = timed(lambda: generate(model16, ps, eos_id=-1, max_gen_len=30))
        print(f"fp16 dim {big.dim} x 8 layers, batch {batch:2d}: eager {t_ref * 1e3:7.1f} ms for 30 tokens")
        for mode in modes:
            decoder = StaticDecoder(model16, mode, sizes=(batch,))
            decoder.generate(ps, eos_id=-1, max_gen_len=30)
            got, t = timed(lambda: decoder.generate(ps, eos_id=-1, max_gen_len=30))
            same = sum(a == b for a, b in zip(got, ref))
            print(f"    {mode:10s} {t * 1e3:7.1f} ms ({t_ref / t:4.2f}x eager), {same}/{batch} captions as eager")
    distributed.teardown()
    if failed:
        print(f"FAILED in fp32 on {dev.type}: {failed}")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
