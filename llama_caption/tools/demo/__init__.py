"""The offline default: a synthetic COCO-format dataset and small stand-in CLIP and LLaMA models."""
