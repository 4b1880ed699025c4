"""`make serve`: `python -m llama_caption serve` on the newest `make demo` run (its stand-in LLaMA,
final checkpoint); further flags go to serve (`make serve ARGS="--port 8080"`)."""

import sys

from ...errors import USER_ERROR_EXIT, UserError, report_user_error


def main(argv=None) -> None:
    from ...__main__ import run
    from .build import newest_demo_run

    argv = sys.argv[1:] if argv is None else list(argv)
    root = "demo_runs"
    if "--root" in argv:  # where the demo keeps its runs
        i = argv.index("--root")
        root = argv[i + 1] if i + 1 < len(argv) else root
        argv = argv[:i] + argv[i + 2:]
    try:
        demo = newest_demo_run(root)
    except UserError as e:
        report_user_error(str(e))
        sys.exit(USER_ERROR_EXIT)
    print(f"serving the demo run {demo['checkpoint']}", file=sys.stderr, flush=True)
    clip = ["--clip_model", demo["clip_model"]] if demo.get("clip_model") else []
    run("serve", ["--ckpt_dir", demo["ckpt_dir"], "--tokenizer_path", demo["tokenizer_path"],
                  "--checkpoint", demo["checkpoint"], *clip, *argv])


if __name__ == "__main__":
    main()
