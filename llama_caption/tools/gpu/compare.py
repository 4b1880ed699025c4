"""Compare caption results files made by llama_caption/tools/gpu/check.sh: CIDEr of each against the
annotations (pycocoevalcap's Cider on lowercased words: no Java tokenizer on the GPU machine, so
not the official figure) and the share of captions equal to the first file's.

    python llama_caption/tools/gpu/compare.py ANNOTATIONS REFERENCE.json OTHER.json ...
"""

import json
import re
import sys

from pycocoevalcap.cider.cider import Cider


def words(text: str) -> str:
    return " ".join(re.findall(r"[a-z0-9]+", text.lower()))


def main(annotations: str, *results: str) -> None:
    with open(annotations) as f:
        gts = {}
        for a in json.load(f)["annotations"]:
            gts.setdefault(a["image_id"], []).append(words(a["caption"]))
    runs = []
    for path in results:
        with open(path) as f:
            runs.append((path, {r["image_id"]: r["caption"] for r in json.load(f)}))
    ref = runs[0][1]
    for path, res in runs:
        ids = sorted(res)
        cider, _ = Cider().compute_score({i: gts[i] for i in ids}, {i: [words(res[i])] for i in ids})
        same = sum(res[i] == ref.get(i) for i in ids)
        print(f"{path}: {len(ids)} captions, CIDEr (plain words) {100 * cider:.1f}, {same}/{len(ids)} as {results[0]}")


if __name__ == "__main__":
    main(*sys.argv[1:])
