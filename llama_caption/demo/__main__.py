"""`make demo`: train and evaluate a captioner end to end on CPU, offline (see demo/build.py)."""

import fire

from ..config import command
from .build import DemoConfig, run_demo

main = command(DemoConfig, run_demo, "Build the stand-ins (cached), train the projection with the real scripts, caption val.")

if __name__ == "__main__":
    fire.Fire(main)
