"""LLaMA text completion, as Meta's v1 example: `python -m llama_caption complete`, kept as the
design card's script.

    torchrun --nproc_per_node MP example.py --ckpt_dir llama/7B --tokenizer_path llama/tokenizer.model
    torchrun --nproc_per_node 1 example.py --ckpt_dir Llama-3.2-1B      # a Hugging Face folder

MP defaults to the number of consolidated.XX.pth shards (7B: 1, 13B: 2, 33B: 4, 65B: 8);
--model_parallel N loads either format at any size that divides the heads. Every flag:
python example.py --help.
"""

import sys

from llama_caption.llama.complete import main  # noqa: F401  (the entry point, for scripts that import it)

if __name__ == "__main__":
    from llama_caption.__main__ import run

    run("complete", sys.argv[1:])
