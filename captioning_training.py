"""Train the CLIP-to-LLaMA projection on COCO 2014 captions; CLIP and LLaMA stay frozen.
The design card's script for `python -m llama_caption train` (the same flags).

One GPU (LLaMA 7B):
    torchrun --nproc_per_node 1 captioning_training.py --ckpt_dir llama/7B \\
        --tokenizer_path llama/tokenizer.model --clip_model ViT-B/32 \\
        --train_images coco/train2014 --train_annotations coco/annotations/captions_train2014.json \\
        --val_images coco/val2014 --val_annotations coco/annotations/captions_val2014.json \\
        --out_dir runs/b32-7b

One node, 8 GPUs, 13B (MP 2 x DP 4; MP defaults to the number of checkpoint shards, --model_parallel sets it):
    torchrun --nproc_per_node 8 captioning_training.py --ckpt_dir llama/13B ... --out_dir runs/b32-13b

Several nodes (run on each node; NODE0 is the first node's address):
    torchrun --nnodes 2 --nproc_per_node 8 --rdzv_id cap1 --rdzv_backend c10d \\
        --rdzv_endpoint NODE0:29500 captioning_training.py --ckpt_dir llama/65B ... --out_dir runs/b32-65b

Karpathy split: --train_images coco (holding train2014/ and val2014/) --karpathy_split
coco/dataset_coco.json, and --val_images coco for its val split. Precomputed CLIP features:
--features DIR from `python -m llama_caption features`. Continue an interrupted run with --resume.
Every flag: python -m llama_caption train --help (the flags are the fields of TrainConfig).
"""

import sys

from llama_caption.training import main  # noqa: F401  (the entry point, for scripts that import it)

if __name__ == "__main__":
    from llama_caption.__main__ import run

    run("train", sys.argv[1:])
