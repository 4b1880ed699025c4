"""Train the CLIP-to-LLaMA projection on COCO 2014 captions; CLIP and LLaMA stay frozen.

One GPU (LLaMA 7B):
    torchrun --nproc_per_node 1 captioning_training.py --ckpt_dir llama/7B \\
        --tokenizer_path llama/tokenizer.model --clip_model ViT-B/32 \\
        --train_images coco/train2014 --train_annotations coco/annotations/captions_train2014.json \\
        --val_images coco/val2014 --val_annotations coco/annotations/captions_val2014.json \\
        --out_dir runs/b32-7b

One node, 8 GPUs, 13B (MP 2 x DP 4; MP comes from the number of checkpoint shards):
    torchrun --nproc_per_node 8 captioning_training.py --ckpt_dir llama/13B ... --out_dir runs/b32-13b

Several nodes (run on each node; NODE0 is the first node's address):
    torchrun --nnodes 2 --nproc_per_node 8 --rdzv_id cap1 --rdzv_backend c10d \\
        --rdzv_endpoint NODE0:29500 captioning_training.py --ckpt_dir llama/65B ... --out_dir runs/b32-65b

Karpathy split: --train_images coco (holding train2014/ and val2014/) --karpathy_split
coco/dataset_coco.json, and --val_images coco for its val split. Precomputed CLIP features:
--features DIR from `python -m llama_caption.features`. Continue an interrupted run with --resume.
"""

from typing import Optional

import fire

from llama_caption.errors import exit_on_user_error
from llama_caption.training import TrainConfig, train


@exit_on_user_error
def main(
    ckpt_dir: str,
    tokenizer_path: str,
    clip_model: str,
    train_images: str,
    out_dir: str,
    train_annotations: Optional[str] = None,
    val_images: Optional[str] = None,
    val_annotations: Optional[str] = None,
    karpathy_split: Optional[str] = None,
    features: Optional[str] = None,
    val_features: Optional[str] = None,
    feature: str = "pooled",
    clip_layer: int = -2,
    projection: str = "mlp",
    prefix_len: int = 10,
    proj_hidden: Optional[int] = None,
    captions: str = "all",
    lowercase: bool = True,
    drop_period: bool = True,
    max_caption_len: int = 48,
    epochs: int = 5,
    batch_size: int = 32,
    grad_accum: int = 1,
    lr: float = 1e-4,
    weight_decay: float = 0.01,
    warmup_steps: int = 200,
    min_lr_ratio: float = 0.1,
    grad_clip: float = 1.0,
    dtype: str = "auto",
    device: str = "auto",
    num_workers: int = 2,
    save_every: int = 1000,
    keep_last: int = 3,
    log_every: int = 10,
    max_bad_steps: int = 10,
    seed: int = 0,
    resume: bool = False,
    stop_after_steps: Optional[int] = None,
):
    """Train the projection from frozen CLIP features to frozen LLaMA prefix embeddings.

    Args:
        ckpt_dir: LLaMA folder (params.json + consolidated.XX.pth); its shard count is the model-parallel size.
        tokenizer_path: LLaMA's tokenizer.model.
        clip_model: CLIP name (ViT-B/32, ViT-B/16, ViT-L/14, ViT-L/14@336px) or a local CLIP file.
        train_images: train2014/ (with --karpathy_split: the folder holding train2014/ and val2014/).
        out_dir: run folder: checkpoints/, metrics.jsonl, loss_curve.png, config.json.
        train_annotations: captions_train2014.json (not needed with --karpathy_split).
        val_images: val2014/ for the validation loss after each epoch (optional).
        val_annotations: captions_val2014.json.
        karpathy_split: dataset_coco.json: train = train+restval, validation = its val split.
        features: a training feature cache from python -m llama_caption.features (else CLIP runs on the fly).
        val_features: a validation feature cache.
        feature: pooled (CLIP image embedding, ClipCap) or patch (patch tokens, LLaVA).
        clip_layer: with --feature patch, the block whose output is taken (-2: penultimate).
        projection: linear or mlp (Linear-GELU-Linear).
        prefix_len: prefix tokens made from a pooled feature (patch features: one per patch).
        proj_hidden: hidden width of the mlp projection (default: LLaMA's width).
        captions: all (every caption each epoch, ClipCap) or one (one random caption per image per epoch).
        lowercase: lowercase captions before training.
        drop_period: drop a trailing period from captions.
        max_caption_len: caption tokens kept; longer captions are truncated and counted.
        epochs: passes over the training samples.
        batch_size: samples per optimizer step, over all data-parallel ranks and accumulation steps.
        grad_accum: micro-batches accumulated per optimizer step.
        lr: peak AdamW learning rate.
        weight_decay: AdamW weight decay.
        warmup_steps: linear warm-up steps (at most a tenth of training), then cosine decay.
        min_lr_ratio: the final learning rate as a fraction of --lr.
        grad_clip: gradient-norm clipping threshold (0: off).
        dtype: frozen LLaMA precision: auto (fp32 on CPU; bf16, else fp16, with autocast on CUDA), fp32, fp16, bf16
            (bf16 on a CPU is faster where it has AVX-512 bf16; attention then runs in fp32).
        device: auto, cpu or cuda.
        num_workers: image-loading processes per rank.
        save_every: optimizer steps between checkpoints (one is also written after every epoch).
        keep_last: checkpoints kept in out_dir/checkpoints.
        log_every: optimizer steps between metrics.jsonl lines and progress-bar updates.
        max_bad_steps: consecutive NaN/inf losses (skipped steps) before training stops with an error.
        seed: random seed (data order, initialisation), the same on every rank.
        resume: continue from out_dir/checkpoints/latest with the same configuration.
        stop_after_steps: stop (with a checkpoint) after this many steps, e.g. to split a job across allocations.
    """
    cfg = TrainConfig(**{k: v for k, v in locals().items()})
    train(cfg)


if __name__ == "__main__":
    fire.Fire(main)
