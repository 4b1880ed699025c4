"""`python -m llama_caption serve`: a trained captioner behind HTTP, with dynamic batching.

    python -m llama_caption serve --ckpt_dir llama/7B --checkpoint runs/coco      # http://127.0.0.1:8000
    torchrun --nproc_per_node 2 -m llama_caption serve --ckpt_dir llama/13B --checkpoint runs/coco13

The LLaMA, checkpoint, encoder, precision and decoder flags are captioning's own
(opening.CaptionerSettings), and the model is opened as `caption` opens it (opening.open_captioners:
several trained runs over one LLaMA, `--checkpoint NAME=RUN,NAME=RUN`, load it once and share
its batches). Rank 0 binds the port and runs uvicorn in a thread; its main thread
loads the model (/health says 503 until then), then runs the decoding loop (batching.py), which
broadcasts every batch to the other ranks of the model-parallel group; they open no port.
SIGTERM or ^C: no new requests, those in flight are answered, then every rank exits 0.
"""

import os
import signal
import socket
import sys
import threading
from dataclasses import dataclass
from typing import List, Optional

from .. import distributed
from ..config import command, setting
from ..errors import UserError, report_user_error
from ..opening import CaptionerSettings, named_checkpoints

API_KEY_ENV = "LLAMA_CAPTION_API_KEY"


class StoppedWhileLoading(Exception):
    """SIGTERM or ^C before the model was ready (one process): nothing to answer, exit 0."""
LOOPBACK = ("127.0.0.1", "localhost", "::1")
MAX_UPLOAD_MB = 65536


def check_api_key(key: Optional[str], name: str) -> None:
    """A key a client can send: an Authorization header carries printable ASCII (a key with other
    characters could never match), at least 8 characters, no spaces."""
    if key is None:
        return
    odd = next((c for c in key if not ("!" <= c <= "~")), None)
    if odd is not None:
        raise UserError(f"{name} holds {odd!r}: a key must be printable ASCII without spaces (the Authorization "
                        f"header carries nothing else), so clients could never send it")
    if len(key) < 8:
        raise UserError(f"{name} must be at least 8 characters")


@dataclass
class ServeConfig(CaptionerSettings):
    checkpoint: List[str] = setting(help="the trained run to serve (a run folder or a checkpoint folder); several over one LLaMA as NAME=RUN,NAME=RUN (a request picks one by `model`; the first is the default; a bare RUN is named by its folder).")
    host: str = setting("127.0.0.1", "the address to listen on; anything but loopback needs --api_key.")
    port: int = setting(8000, "the port (0: any free one; the URL is printed).")
    api_key: Optional[str] = setting(None, f"a key every route but /health requires (Authorization: Bearer KEY); default: ${API_KEY_ENV}. Needed to bind beyond loopback.")
    max_batch: int = setting(32, "the most images decoded together (from any number of requests).")
    max_wait_ms: float = setting(10.0, "how long the oldest waiting request may wait for its batch to fill, in milliseconds.")
    max_queue: int = setting(256, "the most images waiting; beyond it requests get 503 with Retry-After.")
    max_images: Optional[int] = setting(None, "the most images in one request, at most --max_batch (default: 16, or --max_batch when smaller).")
    max_upload_mb: float = setting(20.0, "the largest request body, in MB.")
    max_pixels: int = setting(89_478_485, "the most pixels an image may have (Pillow's decompression-bomb limit by default).")
    max_gen_len: int = setting(30, "the most tokens per caption, and the default of a request (with the image prefix, at most the LLaMA's context).")
    max_beams: int = setting(4, "the most beams a request may ask for (num_beams).")
    url_file: Optional[str] = setting(None, "write the server's URL to this file once it listens (for scripts; with --port 0).")
    log_level: str = setting("warning", "uvicorn's log level: critical, error, warning, info, debug.")
    threads: int = setting(0, "on a CPU, the model's threads (0: every core but one, left to HTTP and reading images; $OMP_NUM_THREADS when set).")

    def check(self) -> None:
        super().check()
        self.checkpoints = named_checkpoints(self.checkpoint)
        from ..runs import find_checkpoint

        for path in self.checkpoints.values():  # a folder that is not a trained run: before the port is bound
            find_checkpoint(path)
        self.at_least(0, "port", "max_wait_ms", "threads")
        self.at_least(1, "max_batch", "max_queue", "max_images", "max_pixels", "max_gen_len", "max_beams")
        if self.max_images is None:
            self.max_images = min(16, self.max_batch, self.max_queue)
        if self.port > 65535:
            raise UserError(f"--port must be at most 65535, got {self.port}")
        if self.max_images > self.max_batch:
            raise UserError(f"--max_images {self.max_images} must be at most --max_batch {self.max_batch} (one request's images are decoded in one batch)")
        if self.max_images > self.max_queue:
            raise UserError(f"--max_images {self.max_images} must be at most --max_queue {self.max_queue}")
        if not 0 < self.max_upload_mb <= MAX_UPLOAD_MB:
            raise UserError(f"--max_upload_mb must be above 0 and at most {MAX_UPLOAD_MB} (64 GiB: a body is held in "
                            f"memory), got {self.max_upload_mb:g}")
        self.one_of("log_level", ("critical", "error", "warning", "info", "debug"))
        from_env = self.api_key is None
        if from_env:
            self.api_key = os.environ.get(API_KEY_ENV) or None
        check_api_key(self.api_key, "$" + API_KEY_ENV if from_env else "--api_key")
        if self.max_wait_ms > 60_000:
            raise UserError(f"--max_wait_ms must be at most 60000 (a minute), got {self.max_wait_ms:g}")
        if self.url_file:
            folder = os.path.dirname(os.path.abspath(self.url_file))
            if not os.path.isdir(folder) or not os.access(folder, os.W_OK):
                raise UserError(f"--url_file {self.url_file}: its folder {folder} does not exist or cannot be written")
        if self.host not in LOOPBACK and not self.api_key:
            raise UserError(f"--host {self.host} is reachable from other machines: give --api_key (or set ${API_KEY_ENV}), "
                            f"or keep the default --host 127.0.0.1")


def bind(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    # proto IPPROTO_TCP, not 0: asyncio sets TCP_NODELAY only on sockets that say so, and without it
    # a keep-alive client waits out its delayed ACK (40 ms) for every response's body.
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    try:
        sock.bind((host, port))
    except OSError as e:
        sock.close()
        raise UserError(f"cannot listen on {host}:{port} ({e.strerror}): choose another --port or --host") from None
    sock.listen(128)
    sock.set_inheritable(True)
    return sock


class Service:
    """The server's parts, in one process: the app (routes), the batcher, and after `load` the
    model and the decoding loop (`serve`). `run` puts them behind uvicorn; tests use them directly."""

    def __init__(self, cfg: ServeConfig):
        from .app import Limits, Metrics, create_app
        from .batching import Batcher

        self.cfg = cfg
        self.ready, self.captioners, self.info, self.runner = False, {}, {}, None
        self.limits = Limits(max_images=cfg.max_images, max_upload_bytes=int(cfg.max_upload_mb * 2 ** 20),
                             max_pixels=cfg.max_pixels, max_gen_len=cfg.max_gen_len, max_beams=cfg.max_beams)
        self.metrics = Metrics()
        self.batcher = Batcher(cfg.max_batch, cfg.max_wait_ms / 1000, cfg.max_queue, on_depth=self.metrics.queue.set)
        self.app = create_app(self.batcher, self.limits, lambda: self.captioners, lambda: self.info,
                              lambda: self.ready, self.metrics, cfg.api_key)

    def load(self, env) -> None:
        """The captioners on every rank (the LLaMA once); on rank 0 also what /v1/model says,
        and a warm-up batch per captioner."""
        import torch

        from ..llama.decoding import Decoding
        from ..opening import open_captioners
        from .batching import BatchRunner

        cfg = self.cfg
        default = Decoding(max_gen_len=cfg.max_gen_len)
        if cfg.decoder == "continuous" and env.mp_size > 1:
            raise UserError(f"--decoder continuous serves from one process; this LLaMA runs at model-parallel size "
                            f"{env.mp_size}: use --decoder auto or static")
        opened = open_captioners(cfg, cfg.checkpoints, env, default, cfg.max_batch, graphs=False)
        self.runner = BatchRunner(opened, env.mp_size)
        if not env.is_main:
            return
        self.info = model_info(opened, default, cfg, env)
        for name in opened:  # /metrics names every captioner from the start
            self.metrics.by_captioner.labels(name)
        with torch.no_grad():  # the decoder's first shapes, before the first user waits for them
            for name, op in opened.items():
                self.runner.run([(name, torch.zeros(1, *op.input_shape))], default)
        self.captioners = opened
        self.ready = True

    def serve(self, finished, log=print) -> None:
        """Rank 0's decoding loop, until `finished()` and nothing is queued; then the other ranks stop."""
        from .batching import serve_batches, serve_continuous

        loop = serve_continuous if self.runner.opened.decoder == "continuous" else serve_batches
        try:
            loop(self.batcher, self.runner, finished, self.metrics, log)
        finally:
            self.runner.stop()


def model_info(opened: dict, default, cfg: ServeConfig, env) -> dict:
    """What /v1/model says: the default captioner's identity at the top, as results files record
    it (one captioner: as before), and each captioner's under `captioners`."""
    each = {}
    for name, op in opened.items():
        made_by = op.provenance(default, {})  # what a results file of the default decoding records
        made_by.pop("selection")
        each[name] = dict(made_by, checkpoint_dir=os.path.abspath(op.checkpoint_dir), prefix_len=op.spec.prefix_len,
                          clip_model=op.spec.encoder.clip_model)
    first = next(iter(each))
    top = {k: v for k, v in each[first].items() if k not in ("prefix_len", "clip_model")}
    return dict(top, llama_dir=os.path.abspath(cfg.open().folder), model_parallel=env.mp_size, device=str(env.device),
                max_batch=cfg.max_batch, max_wait_ms=cfg.max_wait_ms, default_captioner=first, captioners=each)


def model_threads(cfg: ServeConfig, env) -> None:
    """The model's CPU threads: --threads, else all cores but one (unless OMP_NUM_THREADS says)."""
    if env.device.type == "cpu" and (cfg.threads or "OMP_NUM_THREADS" not in os.environ):
        import torch

        # Measured on 2 cores with the load test beside it: one model thread gave 1.6x the
        # images/s of two at concurrency 32 (the HTTP side and image reading need a core).
        torch.set_num_threads(cfg.threads or max(1, (os.cpu_count() or 2) - 1))


def start_http(cfg: ServeConfig, service, env) -> tuple:
    """uvicorn on its socket in a thread of its own: (server, thread, the URL this machine reaches)."""
    import uvicorn

    sock = bind(cfg.host, cfg.port)
    host, port = sock.getsockname()[:2]
    if host in ("0.0.0.0", "::"):  # every interface: this machine reaches it on loopback
        env.log(f"listening on every interface ({host}), port {port}")
        host = "127.0.0.1" if host == "0.0.0.0" else "::1"
    url = f"http://{'[' + host + ']' if ':' in host else host}:{port}"
    server = uvicorn.Server(uvicorn.Config(service.app, log_level=cfg.log_level, timeout_graceful_shutdown=None,
                                           access_log=cfg.log_level in ("info", "debug")))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, name="uvicorn", daemon=True)
    thread.start()
    env.log(f"listening on {url} (loading the model; /health says 503 until it is ready)")
    return server, thread, url


def run(cfg: ServeConfig) -> None:
    with distributed.session(cfg.mp_size(), cfg.device, quiet=True) as env:
        model_threads(cfg, env)
        if env.dp_size > 1:
            raise UserError(f"serve runs one copy of the LLaMA: launch torchrun with --nproc_per_node {env.mp_size} "
                            f"(the model-parallel size), not {env.world_size}; run one server per copy for more")
        service = Service(cfg)
        server = thread = url = None
        if env.is_main:  # the port first: /health answers while the model loads
            server, thread, url = start_http(cfg, service, env)

        stopping = threading.Event()

        def stop(signum, frame):
            # uvicorn stops accepting connections and waits for the requests it holds, which the
            # decoding loop goes on answering; the loop ends when uvicorn has and the queue is empty.
            if stopping.is_set() and signum == signal.SIGINT:
                raise KeyboardInterrupt  # a second ^C
            stopping.set()
            server.should_exit = True
            if not service.ready and env.world_size == 1:
                raise StoppedWhileLoading()  # nothing to answer yet (other ranks would wait for a collective)

        # Rank 0 ends the others (a broadcast stop) once the requests in flight are answered, so
        # they let torchrun's SIGTERM and ^C pass.
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, stop if env.is_main else signal.SIG_IGN)
        try:
            service.load(env)
        except StoppedWhileLoading:
            env.log("stopped before the model was ready")
            return
        if not env.is_main:
            service.runner.follow()
            return
        if stopping.is_set():  # during the load, with other ranks: they are told to stop
            service.runner.stop()
            thread.join(timeout=30)
            env.log("stopped before the model was ready")
            return
        if cfg.url_file:
            with open(cfg.url_file + ".tmp", "w") as f:
                f.write(url + "\n")
            os.replace(cfg.url_file + ".tmp", cfg.url_file)
        env.log(f"ready: {url} (the page), {url}/v1/captions (the API), {url}/v1/chat/completions (OpenAI's), "
                f"{url}/docs (needs the internet); captioners: {', '.join(service.captioners)}")
        try:
            service.serve(lambda: stopping.is_set() and not thread.is_alive(), env.log)
        except KeyboardInterrupt:
            left = service.batcher.depth()
            report_user_error(f"stopped by a second ^C: {left} queued image(s) and the batch being decoded were not answered")
            sys.exit(130)
        finally:
            server.should_exit = True
            thread.join(timeout=30)
        env.log("stopped: every request in flight was answered")


main = command(ServeConfig, run, "Serve a trained captioner over HTTP (FastAPI): dynamic batching, a web page, Prometheus metrics.")
