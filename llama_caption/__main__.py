"""One command line for everything: `python -m llama_caption COMMAND [FLAGS]`.

    python -m llama_caption --help                 every command, one line each
    python -m llama_caption train --help           a command's flags
    torchrun --nproc_per_node 8 -m llama_caption train --ckpt_dir llama/13B ...

A command is imported only when it runs, so `--help` is instant and a command pays only for its
own dependencies. The root scripts (captioning_training.py, captioning_inference.py, example.py)
and the old `python -m llama_caption.X` forms run the same entry points.
"""

import importlib
import os
import sys
from typing import List, Optional

# name: (module, entry point, what it does)
COMMANDS = {
    "train": ("llama_caption.training", "main",
              "train the projection from frozen CLIP features to frozen-LLaMA prefix tokens (cross-entropy or SCST)"),
    "caption": ("llama_caption.inference", "main",
                "caption a COCO split (and score it) or your own images; COCO results files"),
    "serve": ("llama_caption.serve.server", "main",
              "serve a trained captioner over HTTP: dynamic batching, a web page, Prometheus metrics"),
    "complete": ("llama_caption.llama.complete", "main", "LLaMA text completion, as Meta's example.py"),
    "features": ("llama_caption.features", "main", "extract a split's CLIP features once, into a cache that training reads"),
    "evaluate": ("llama_caption.evaluation", "main", "score COCO results files (BLEU, METEOR, ROUGE-L, CIDEr; CLIP-S)"),
    "convert": ("llama_caption.llama.convert", "convert_main", "a Hugging Face LLaMA folder to Meta's layout, at any model-parallel size"),
    "reshard": ("llama_caption.llama.convert", "reshard_main", "a Meta LLaMA checkpoint rewritten at another model-parallel size"),
    "bench": ("llama_caption.tools.bench", "main", "decoding and training throughput and memory"),
    "bench-serve": ("llama_caption.tools.bench_serve", "main", "the caption server's load test against offline captioning"),
    "loadtest": ("llama_caption.tools.loadtest", "main", "load a caption server on this machine; check its captions against offline ones"),
    "bench-load": ("llama_caption.tools.bench_load", "main", "LLaMA checkpoint load time and memory per format, model-parallel size and --quantize mode"),
    "bench-shards": ("llama_caption.tools.loader_speed", "main", "images/s of the webdataset shard loader against the folder loader"),
    "bench-captioners": ("llama_caption.tools.bench_captioners", "main", "memory of serving 1, 2, 4 ... captioners over one frozen LLaMA"),
    "bench-quantize": ("llama_caption.tools.bench_quantize", "main", "decoding speed, weight memory and demo metrics per --quantize mode"),
    "demo": ("llama_caption.tools.demo.build", "main", "the offline demo: stand-in models, real scripts, a table of results"),
    "demo-check": ("llama_caption.tools.demo.check", "main", "the demo under other CPU kernel paths and seeds: its conclusions against their floors"),
}


def usage() -> str:
    width = max(map(len, COMMANDS))
    lines = ["usage: python -m llama_caption COMMAND [FLAGS]   (under torchrun: torchrun ... -m llama_caption COMMAND ...)",
             "", "commands:"]
    lines += [f"  {name:<{width}}  {summary}" for name, (_, _, summary) in COMMANDS.items()]
    lines += ["", "python -m llama_caption COMMAND --help lists a command's flags."]
    return "\n".join(lines)


def run(name: str, argv: List[str]) -> None:
    """Run command `name` with the flags in `argv` (fire parses them)."""
    import fire
    from torch.distributed.elastic.multiprocessing.errors import record

    module, attr, _ = COMMANDS[name]
    entry = getattr(importlib.import_module(module), attr)
    if any(a in ("-h", "--help") for a in argv):  # fire's own help (the entry takes unknown flags to refuse them)
        show(command_help(fire, entry, [a for a in argv if a not in ("-h", "--help")], name))
        return
    # Under torchrun, any exception a rank raises goes into the launcher's error file, so its
    # report ends in the real cause (bad input is already one line there: errors.py).
    record(lambda: fire.Fire(entry, command=list(argv), name=name))()


def command_help(fire, entry, argv: List[str], name: str) -> str:
    """A command's flags as fire shows them (it writes them to stderr and exits): captured, so that
    they go to stdout like any help, where `| less` and `| grep` read them."""
    import contextlib
    import io

    text = io.StringIO()
    with contextlib.redirect_stdout(text), contextlib.redirect_stderr(text):
        try:
            fire.Fire(entry, command=argv + ["--", "--help"], name=name)
        except SystemExit:
            pass
    return text.getvalue()


def show(text: str) -> None:
    """Print help; a reader that stops early (`| head -1`) is not an error."""
    try:
        sys.stdout.write(text if text.endswith("\n") else text + "\n")
        sys.stdout.flush()
    except BrokenPipeError:
        # Python would report the pipe again when it flushes stdout at exit: point stdout at nothing.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())


def main(argv: Optional[List[str]] = None) -> None:
    argv = sys.argv[1:] if argv is None else list(argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        show(usage())
        return
    if argv[0] not in COMMANDS:
        from .errors import USER_ERROR_EXIT, report_user_error

        report_user_error(f"unknown command {argv[0]!r}: one of {', '.join(COMMANDS)} (python -m llama_caption --help)")
        sys.exit(USER_ERROR_EXIT)
    run(argv[0], argv[1:])


def alias(old: str, name: str) -> None:
    """An old `python -m llama_caption.OLD` form: says the new one, then runs it."""
    print(f"note: python -m llama_caption.{old} is now python -m llama_caption {name}", file=sys.stderr)
    run(name, sys.argv[1:])


if __name__ == "__main__":
    main()
