"""llama_caption: image captioning with a frozen CLIP ViT and a frozen model-parallel LLaMA.

    import llama_caption
    cap = llama_caption.load("llama/7B", "runs/coco")
    cap.caption("dog.jpg")

(api.py; the command line is `python -m llama_caption --help`.)
"""

__version__ = "0.1.0"


def load(ckpt_dir, checkpoint, **settings):
    """Trained captioners over one frozen LLaMA, ready to caption images (llama_caption.api.load)."""
    from .api import load as _load

    return _load(ckpt_dir, checkpoint, **settings)
