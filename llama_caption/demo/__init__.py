"""The old form of `python -m llama_caption demo` (kept for scripts that call it); the demo is in tools/demo."""
