"""Caption images with a trained projection and evaluate on COCO.

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
"""

from typing import Optional

import fire

from llama_caption.errors import exit_on_user_error
from llama_caption.inference import InferenceConfig, run


@exit_on_user_error
def main(
    ckpt_dir: str,
    tokenizer_path: str,
    checkpoint: str,
    images,
    *more_images,
    out: str = "results.json",
    annotations: Optional[str] = None,
    karpathy_split: Optional[str] = None,
    split: str = "test",
    num_images: Optional[int] = None,
    fraction: Optional[float] = None,
    batch_size: int = 32,
    max_gen_len: int = 30,
    temperature: float = 0.0,
    top_p: float = 0.95,
    num_beams: int = 1,
    length_penalty: float = 1.0,
    clip_model: Optional[str] = None,
    evaluate: bool = True,
    gallery: int = 0,
    num_workers: int = 2,
    device: str = "auto",
    dtype: str = "auto",
    seed: int = 1,
    save_every_s: float = 30.0,
    control_shuffle: bool = False,
    pack_weights: bool = True,
):
    """Caption a COCO split (and score it) or your own image files.

    Args:
        ckpt_dir: LLaMA folder (params.json + consolidated.XX.pth); its shard count is the model-parallel size.
        tokenizer_path: LLaMA's tokenizer.model.
        checkpoint: a training run folder (its latest checkpoint) or one checkpoint folder.
        images: --images DIR for a COCO split; or image files and folders of your own (no annotations): --images a.jpg b.png photos/
        more_images: the further files after --images FILE (they need no flag of their own).
        out: the COCO results file to write (and to complete, when it exists from an interrupted run).
        annotations: COCO captions JSON of the split (captions_val2014.json): enables evaluation.
        karpathy_split: dataset_coco.json; then --images is the folder holding train2014/ and val2014/.
        split: the Karpathy split to caption: test, val or train.
        num_images: caption only the first N images (by image id).
        fraction: caption only this fraction of the images (the first ones by image id).
        batch_size: images decoded together.
        max_gen_len: the most tokens per caption.
        temperature: 0 is greedy decoding; above 0, top-p sampling at this temperature.
        top_p: nucleus-sampling threshold.
        num_beams: beam search with this many beams (1: greedy).
        length_penalty: beam scores are log-probability / length**length_penalty.
        clip_model: the CLIP file, when it moved since training (it must be the same model).
        evaluate: score against the annotations (BLEU, METEOR, ROUGE-L, CIDEr; SPICE when installed).
        gallery: write gallery.html beside the results with the first N images.
        num_workers: image-loading processes.
        device: auto, cpu or cuda.
        dtype: frozen LLaMA precision: auto (fp16 on CUDA, fp32 on CPU), fp32, fp16, bf16.
        seed: random seed for sampling, the same on every rank.
        save_every_s: seconds between rewrites of the results file while working.
        control_shuffle: a control experiment: caption each image from the CLIP features of the next image in its batch.
        pack_weights: on a CPU, decode with a copy of LLaMA's weights packed for oneDNN (1.5-2.2x faster at batch 32 in make bench; one extra copy in memory). No effect on CUDA.
    """
    if more_images:
        images = (list(images) if isinstance(images, (list, tuple)) else [images]) + list(more_images)
    cfg = InferenceConfig(**{k: v for k, v in locals().items() if k in InferenceConfig.__dataclass_fields__})
    run(cfg)


if __name__ == "__main__":
    fire.Fire(main)
