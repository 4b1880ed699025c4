"""`make demo`: train and evaluate a captioner end to end on CPU, offline (see demo/build.py)."""

from typing import Optional

import fire

from ..errors import exit_on_user_error
from .build import run_demo


@exit_on_user_error
def main(scale: str = "full", root: str = "demo_runs", images: Optional[str] = None,
         annotations: Optional[str] = None):
    """Build the stand-ins (cached), train the projection with the real scripts, caption val.

    Args:
        scale: full (the README's figures) or small (the reduced demo the tests run).
        root: where data, stand-ins and runs are kept (reused by later runs).
        images: build the stand-in models from this COCO-format images folder instead of the synthetic one.
        annotations: the captions JSON that goes with --images.
    """
    run_demo(scale, root, images, annotations)


if __name__ == "__main__":
    fire.Fire(main)
