"""`python -m llama_caption loadtest`: load a running caption server from loopback and check it.

    python -m llama_caption loadtest --url http://127.0.0.1:8000 --images photos/ \\
        --concurrency 1 8 32 --requests 64 --expected results.json

For each concurrency C, C clients send one image per request, back to back, until --requests
requests are answered (or --timeout_s passes); prints latency percentiles, images/s and errors.
With --expected (the results file `python -m llama_caption caption --images photos/` wrote with the
same checkpoint and greedy settings), every returned caption is compared with the offline one for
the same image, so nothing was mixed up between concurrent requests: a mismatch fails the command.
"""

import asyncio
import json
import os
import time
from dataclasses import dataclass
from typing import Dict, List, Optional
from urllib.parse import urlparse

from ..config import Config, command, setting
from ..data import list_image_files
from ..errors import UserError

LOOPBACK = ("127.0.0.1", "localhost", "::1")


@dataclass
class LoadTestConfig(Config):
    url: str = setting(help="the server, on this machine: http://127.0.0.1:PORT (loopback only).")
    images: str = setting(help="a folder of images (or one image); requests go round them in order.")
    concurrency: List[int] = setting((1, 8, 32), "clients sending at once, one level after another: --concurrency 1 8 32.")
    requests: int = setting(64, "requests per concurrency level (one image each).")
    timeout_s: float = setting(300.0, "the most seconds per concurrency level; unanswered requests then count as errors.")
    expected: Optional[str] = setting(None, "a results file of `caption` over the same images (greedy): every caption is checked against it.")
    api_key: Optional[str] = setting(None, "the server's key, when it has one (default: $LLAMA_CAPTION_API_KEY).")
    max_gen_len: Optional[int] = setting(None, "sent with every request (default: the server's).")
    models: List[str] = setting((), "captioners (serve's names) the requests go to in turn, as `model`: --models a,b (default: the server's default one). --expected is one file, checked against every captioner's answers (serve one run under several names to compare).")
    out: Optional[str] = setting(None, "also write the table as JSON here.")

    def check(self) -> None:
        self.at_least(1, "requests", "max_gen_len")
        if not isinstance(self.concurrency, list) or not all(isinstance(c, int) for c in self.concurrency):
            raise UserError(f"--concurrency takes whole numbers (--images takes one folder), got {self.concurrency}")
        if not self.concurrency or min(self.concurrency) < 1 or max(self.concurrency) > 1024:
            raise UserError(f"--concurrency must be whole numbers from 1 to 1024, got {self.concurrency}")
        if not self.timeout_s > 0:
            raise UserError(f"--timeout_s must be above 0, got {self.timeout_s}")
        parsed = urlparse(self.url)
        if parsed.scheme != "http" or parsed.hostname not in LOOPBACK:
            raise UserError(f"--url {self.url} must be http:// on this machine (127.0.0.1, localhost or ::1): "
                            f"the load test only runs over loopback")
        self.api_key = self.api_key or os.environ.get("LLAMA_CAPTION_API_KEY") or None
        given = [m.strip() for item in self.models for m in item.split(",")]
        if self.models and (not given or "" in given):
            raise UserError(f"--models {','.join(self.models)} holds an empty name: give captioner names joined by commas")
        self.models = given


def percentile(values: List[float], q: float) -> float:
    """The q-th percentile (0-100) by linear interpolation; nan for no values."""
    if not values:
        return float("nan")
    s = sorted(values)
    pos = (len(s) - 1) * q / 100
    lo = int(pos)
    hi = min(lo + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (pos - lo)


def load_expected(path: str) -> Dict[str, str]:
    """file name (basename) -> caption, from a results file of our own images."""
    try:
        rows = json.load(open(path, encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise UserError(f"--expected {path}: cannot read it ({e})") from None
    if not isinstance(rows, list) or not all(isinstance(r, dict) and isinstance(r.get("file_name"), str) and isinstance(r.get("caption"), str)
                                              for r in rows):
        raise UserError(f"--expected {path}: not a results file of `caption --images FILES` (rows with file_name and caption)")
    return {os.path.basename(r["file_name"]): r["caption"] for r in rows}


async def level(client, url: str, files: List[tuple], concurrency: int, n: int, timeout_s: float, extra: dict,
                expected: Optional[Dict[str, str]], models: List[str] = ()) -> dict:
    """One concurrency level: C clients until n requests are answered (request i to models[i % len],
    when given)."""
    latencies, errors, mismatches, examples = [], 0, 0, []
    next_index = 0
    start = time.perf_counter()
    deadline = start + timeout_s

    async def client_loop():
        nonlocal next_index, errors, mismatches
        while next_index < n and time.perf_counter() < deadline:
            i = next_index
            next_index += 1
            name, data = files[i % len(files)]
            t0 = time.perf_counter()
            try:
                fields = dict(extra, model=models[i % len(models)]) if models else extra
                r = await client.post(url, files={"images": (name, data)}, data=fields,
                                      timeout=max(0.1, deadline - t0))
                body = r.json()
            except Exception as e:  # a timeout, a refused connection, a body that is not JSON
                errors += 1
                examples.append(f"{name}: {type(e).__name__}: {e}"[:200])
                continue
            if r.status_code != 200:
                errors += 1
                examples.append(f"{name}: HTTP {r.status_code}: {body.get('error')}"[:200])
                continue
            latencies.append(time.perf_counter() - t0)
            got = body["captions"][0]["caption"]
            if expected is not None and expected.get(name) != got:
                mismatches += 1
                examples.append(f"{name}: got {got!r}, offline {expected.get(name)!r}"[:200])

    await asyncio.gather(*(client_loop() for _ in range(concurrency)))
    seconds = time.perf_counter() - start
    unanswered = max(0, n - len(latencies) - errors)
    return {"concurrency": concurrency, "requests": len(latencies), "errors": errors + unanswered,
            "mismatches": mismatches, "p50_s": percentile(latencies, 50), "p95_s": percentile(latencies, 95),
            "p99_s": percentile(latencies, 99), "images_per_s": len(latencies) / seconds if seconds else 0.0,
            "seconds": seconds, "examples": examples[:5]}


def format_table(rows: List[dict]) -> str:
    lines = [f"{'concurrency':>11} {'requests':>8} {'errors':>6} {'mismatch':>8} {'p50 s':>7} {'p95 s':>7} "
             f"{'p99 s':>7} {'images/s':>9}"]
    for r in rows:
        lines.append(f"{r['concurrency']:>11} {r['requests']:>8} {r['errors']:>6} {r['mismatches']:>8} "
                     f"{r['p50_s']:>7.3f} {r['p95_s']:>7.3f} {r['p99_s']:>7.3f} {r['images_per_s']:>9.2f}")
    return "\n".join(lines)


def load_test(cfg: LoadTestConfig, log=print) -> List[dict]:
    import httpx

    paths = list_image_files([cfg.images])
    if not paths:
        raise UserError(f"--images {cfg.images}: no image files there")
    files = [(os.path.basename(p), open(p, "rb").read()) for p in paths]
    expected = load_expected(cfg.expected) if cfg.expected else None
    if expected is not None:
        missing = [n for n, _ in files if n not in expected]
        if missing:
            raise UserError(f"--expected {cfg.expected} has no caption for {missing[0]} ({len(missing)} image(s)): "
                            f"caption the same --images first")
    headers = {"Authorization": f"Bearer {cfg.api_key}"} if cfg.api_key else {}
    extra = {"max_gen_len": str(cfg.max_gen_len)} if cfg.max_gen_len else {}
    base = cfg.url.rstrip("/")

    async def all_levels():
        limits = httpx.Limits(max_connections=max(cfg.concurrency), max_keepalive_connections=max(cfg.concurrency))
        async with httpx.AsyncClient(headers=headers, limits=limits, trust_env=False) as client:
            try:
                health = await client.get(base + "/health", timeout=10)
            except httpx.HTTPError as e:
                raise UserError(f"--url {cfg.url}: no server answers ({type(e).__name__}); start it with "
                                f"python -m llama_caption serve") from None
            if health.status_code != 200:
                raise UserError(f"--url {cfg.url}: /health answered {health.status_code}: {health.text[:120]}")
            model = await client.get(base + "/v1/model", timeout=10)
            if model.status_code == 401:
                raise UserError(f"--url {cfg.url} needs an API key: give --api_key (or set $LLAMA_CAPTION_API_KEY)")
            served = list(model.json().get("captioners") or {})
            unknown = [m for m in cfg.models if m not in served]
            if unknown:
                raise UserError(f"--models {unknown[0]} is not served at {cfg.url}: it serves {', '.join(served)}")
            rows = []
            for c in cfg.concurrency:
                row = await level(client, base + "/v1/captions", files, c, cfg.requests, cfg.timeout_s, extra, expected,
                                  cfg.models)
                log(f"concurrency {c}: {row['requests']} answered, {row['errors']} error(s), "
                    f"{row['images_per_s']:.2f} images/s")
                rows.append(row)
            return rows

    return asyncio.run(all_levels())


def run(cfg: LoadTestConfig) -> None:
    import sys

    rows = load_test(cfg, log=lambda m: print(m, file=sys.stderr, flush=True))
    print(format_table(rows))
    for r in rows:
        for example in r["examples"]:
            print(f"  concurrency {r['concurrency']}: {example}")
    if cfg.out:
        from ..fileio import write_json

        # Percentiles of no answers are NaN, which JSON cannot hold: null.
        clean = [{k: (None if isinstance(v, float) and v != v else v) for k, v in r.items()} for r in rows]
        write_json(cfg.out, clean, indent=1)
    errors, mismatches = sum(r["errors"] for r in rows), sum(r["mismatches"] for r in rows)
    if errors or mismatches:
        raise UserError(f"{errors} request(s) failed" + (f", {mismatches} caption(s) differ from --expected" if cfg.expected else "")
                        + " (see above)")


main = command(LoadTestConfig, run, "Load a caption server on this machine: latency percentiles, images/s, errors; "
               "captions checked against offline inference.", varargs="concurrency")
