"""The old form of `python -m llama_caption convert` (kept for scripts that call it)."""

if __name__ == "__main__":
    from llama_caption.__main__ import alias

    alias("convert", "convert")
