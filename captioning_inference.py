"""Caption images with a trained projection and evaluate on COCO.
The design card's script for `python -m llama_caption caption` (the same flags).

val2014 (or any COCO-format split), with metrics:
    torchrun --nproc_per_node 1 captioning_inference.py --ckpt_dir llama/7B \\
        --tokenizer_path llama/tokenizer.model --checkpoint runs/b32-7b \\
        --images coco/val2014 --annotations coco/annotations/captions_val2014.json \\
        --out runs/b32-7b/val2014_results.json

Karpathy test split (5,000 images):
    torchrun --nproc_per_node 1 captioning_inference.py ... --images coco \\
        --karpathy_split coco/dataset_coco.json --split test --out runs/b32-7b/karpathy_test.json

Your own images (files or folders; prints file<TAB>caption):
    torchrun --nproc_per_node 1 captioning_inference.py ... --images photo.jpg holiday/ --out mine.json

With 8 GPUs and 7B, `--nproc_per_node 8` runs 8 data-parallel copies (MP 1 x DP 8).
Every flag: python -m llama_caption caption --help (the flags are the fields of InferenceConfig).
"""

import sys

from llama_caption.inference import main  # noqa: F401  (the entry point, for scripts that import it)

if __name__ == "__main__":
    from llama_caption.__main__ import run

    run("caption", sys.argv[1:])
