"""Write the bytecode of what the commands import, once, at installation (`make install`).

pip installs with --no-compile: compiling every module of torch and the other requirements
takes minutes, and most are never imported. Python compiles a module on each import that finds
no bytecode, and writes it for the next one unless PYTHONDONTWRITEBYTECODE is set (it is on
some machines, ours included): then every process of the demo and of the tests compiles torch
again, about 9 s of CPU each. This imports what the commands use, with bytecode writing on, and
then writes the bytecode of any imported module still without it (those imported before); imports
read it whatever that variable says.

    python -m llama_caption.tools.precompile
"""

import importlib
import importlib.util
import os
import py_compile
import sys
import time
import warnings

MODULES = (
    "torch", "torch.distributed.run", "torchvision", "clip", "fairscale", "sentencepiece", "fire", "PIL.Image",
    "pycocoevalcap.bleu.bleu", "pycocoevalcap.cider.cider", "pycocoevalcap.meteor.meteor",
    "pycocoevalcap.rouge.rouge", "pycocoevalcap.tokenizer.ptbtokenizer", "matplotlib.pyplot",
    "llama_caption.__main__", "llama_caption.training", "llama_caption.scst", "llama_caption.inference",
    "llama_caption.evaluation", "llama_caption.features", "llama_caption.tools.demo.build",
)


def write_bytecode(modules) -> int:
    """The bytecode of each module's source that has none yet; how many were written."""
    written = 0
    for module in modules:
        path = getattr(module, "__file__", None)
        if not path or not path.endswith(".py") or not os.path.isfile(path):
            continue
        cached = importlib.util.cache_from_source(path)
        if os.path.isfile(cached):
            continue
        try:
            py_compile.compile(path, cfile=cached, doraise=True)
            written += 1
        except (py_compile.PyCompileError, OSError):  # a read-only folder or a broken file: imported as before
            pass
    return written


def main() -> None:
    start = time.time()
    sys.dont_write_bytecode = False  # this process writes bytecode, whatever PYTHONDONTWRITEBYTECODE says
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for name in MODULES:
            importlib.import_module(name)
    write_bytecode(list(sys.modules.values()))
    print(f"bytecode of the commands' modules checked and written where missing in {time.time() - start:.0f} s")


if __name__ == "__main__":
    main()
