"""llama_caption: image captioning with a frozen CLIP ViT and a frozen model-parallel LLaMA."""

__version__ = "0.1.0"
