from llama_caption.__main__ import alias

alias("demo", "demo")
