"""The caption server: dynamic batching, the API and its errors, metrics, the key, the page, and
the server as a process (SIGTERM, disconnects, model parallelism, the load test, a real browser).

The in-process tests drive the real app (FastAPI's TestClient) with the real decoding loop in a
thread; every caption is compared with what `caption` (captioning_inference.py) writes offline.
"""

import base64
import io
import json
import os
import shutil
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
import zlib
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch
from PIL import Image

import captioning_inference
from conftest import REPO, free_port, run_cli
from llama_caption.errors import UserError
from llama_caption.llama.decoding import Decoding
from llama_caption.serve.batching import Batcher, QueuedRequest, QueueFull

SERVE_FLAGS = dict(max_batch=8, max_images=4, max_wait_ms=300.0, max_queue=32, max_upload_mb=0.25,
                   max_pixels=64 * 64, max_gen_len=30)


def png_bytes(size=(32, 32), colour=(200, 30, 30)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, colour).save(buf, "PNG")
    return buf.getvalue()


def bomb_png(width=60000, height=60000) -> bytes:
    """A PNG whose header claims width x height pixels, with almost no data: Pillow's
    decompression-bomb check refuses it at open()."""
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)
    ihdr = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\x00" * 16)) + chunk(b"IEND", b"")


@pytest.fixture(scope="module")
def service(cap, trained, other, process_group):
    """Two captioners over one LLaMA: `trained` (named run, the default) and `other` (moved)."""
    yield from in_process_service(cap, [trained, f"moved={other}"], process_group)


@pytest.fixture(scope="module")
def continuous_service(cap, trained, other, process_group):
    """The same, decoding with continuous batching over --max_batch 8 slots."""
    yield from in_process_service(cap, [trained, f"moved={other}"], process_group, decoder="continuous")


@pytest.fixture(scope="module")
def moved_offline(cap, other, photos, process_group):
    """The `other` captioner's captions of the photos, opened alone (the Python API, which
    tests/test_api.py checks against `caption`)."""
    import llama_caption

    alone = llama_caption.load(cap["ckpt_dir"], other, tokenizer_path=cap["tokenizer"], device="cpu")
    names = sorted(os.listdir(photos))
    return dict(zip(names, alone.caption([os.path.join(photos, n) for n in names])))


def in_process_service(cap, trained, process_group, **flags):
    """The server's parts in this process: the app behind TestClient, the decoding loop in a thread."""
    from fastapi.testclient import TestClient

    from llama_caption.serve.server import ServeConfig, Service

    cfg = ServeConfig(ckpt_dir=cap["ckpt_dir"], tokenizer_path=cap["tokenizer"], checkpoint=trained, device="cpu",
                      **SERVE_FLAGS, **flags)
    svc = Service(cfg)
    client = TestClient(svc.app)
    assert client.get("/health").status_code == 503  # not loaded yet
    assert client.post("/v1/captions", files={"images": ("a.png", png_bytes())}).status_code == 503
    svc.load(process_group)
    stop = threading.Event()
    loop = threading.Thread(target=svc.serve, args=(stop.is_set, print), daemon=True)
    loop.start()
    yield svc, client
    stop.set()
    loop.join(timeout=30)


def post(client, files, **settings):
    """A multipart request: files is a list of (name, bytes)."""
    return client.post("/v1/captions", files=[("images", (n, b, "application/octet-stream")) for n, b in files],
                       data={k: str(v) for k, v in settings.items()})


def read(photos, name):
    return open(os.path.join(photos, name), "rb").read()


# ----------------------------------------------------------------------------------------------
# Dynamic batching, without HTTP.

def job(n=1, **decoding):
    return QueuedRequest(torch.zeros(n, 3, 2, 2), Decoding(**dict({"max_gen_len": 30}, **decoding)))


def test_batcher_joins_requests_that_share_settings_up_to_max_batch():
    b = Batcher(max_batch=4, max_wait_s=0.0, max_queue=100)
    a, other_len, c, d = job(2), job(1, max_gen_len=10), job(1), job(2)
    for j in (a, other_len, c, d):
        b.submit(j)
    first = b.next_batch(timeout=1)
    assert [j.id for j in first] == [a.id, c.id]  # d would make 5 images; the other length cannot share
    assert [j.id for j in b.next_batch(timeout=1)] == [other_len.id]
    assert [j.id for j in b.next_batch(timeout=1)] == [d.id]
    assert b.next_batch(timeout=0.05) is None


def test_batcher_decodes_sampled_requests_alone_and_beams_by_their_settings():
    b = Batcher(max_batch=8, max_wait_s=0.0, max_queue=100)
    s1, s2 = job(1, temperature=0.7, seed=3), job(1, temperature=0.7, seed=3)
    beam_a, beam_b, beam_c = job(1, num_beams=2), job(1, num_beams=2), job(1, num_beams=3)
    for j in (s1, s2, beam_a, beam_b, beam_c):
        b.submit(j)
    assert [j.id for j in b.next_batch(1)] == [s1.id]
    assert [j.id for j in b.next_batch(1)] == [s2.id]
    assert [j.id for j in b.next_batch(1)] == [beam_a.id, beam_b.id]
    assert [j.id for j in b.next_batch(1)] == [beam_c.id]


def test_batcher_waits_for_the_batch_to_fill_but_not_past_the_oldest_requests_deadline():
    b = Batcher(max_batch=4, max_wait_s=0.5, max_queue=100)
    first = job(1)
    b.arrive()
    b.submit(first)
    late = job(1)
    threading.Timer(0.1, b.submit, args=(late,), kwargs={"was_arriving": True}).start()
    got = b.next_batch(timeout=1)
    assert [j.id for j in got] == [first.id, late.id]  # the second arrived within the wait
    b2 = Batcher(max_batch=4, max_wait_s=0.05, max_queue=100)
    b2.arrive()  # one more is coming, but not within the wait
    b2.submit(job(1))
    assert len(b2.next_batch(timeout=1)) == 1  # not full, returned once the wait was over


def test_batcher_waits_only_while_other_requests_are_arriving():
    b = Batcher(max_batch=4, max_wait_s=5.0, max_queue=100)
    lone = job(1)
    b.submit(lone)
    t0 = time.monotonic()
    assert [j.id for j in b.next_batch(timeout=1)] == [lone.id]
    assert time.monotonic() - t0 < 2.5  # nobody else was coming: no 5 s wait
    first, second = job(1), job(1)
    b.arrive()  # a request being read
    b.submit(first)
    threading.Timer(0.2, b.submit, args=(second,), kwargs={"was_arriving": True}).start()
    assert [j.id for j in b.next_batch(timeout=1)] == [first.id, second.id]
    assert b.arriving == 0
    b.arrive()
    b.submit(job(1))
    threading.Timer(0.2, b.arrived).start()  # that request was refused: the batch goes without it
    t0 = time.monotonic()
    assert len(b.next_batch(timeout=1)) == 1 and time.monotonic() - t0 < 2.5


def test_batcher_refuses_beyond_max_queue_and_after_close():
    from llama_caption.serve.batching import Closed

    b = Batcher(max_batch=4, max_wait_s=0, max_queue=3)
    b.submit(job(2))
    with pytest.raises(QueueFull):
        b.submit(job(2))
    b.close()
    with pytest.raises(Closed):
        b.submit(job(1))
    assert len(b.next_batch(timeout=1)) == 1  # what was queued is still served


# ----------------------------------------------------------------------------------------------
# The API, in this process.

def test_concurrent_requests_are_batched_and_each_caption_is_what_caption_writes(service, photos, offline):
    svc, client = service
    names = sorted(os.listdir(photos))
    groups = [[n] for n in names[:5]] + [names[5:7], names[7:9]]  # 7 requests, 9 images
    with ThreadPoolExecutor(len(groups)) as pool:
        answers = list(pool.map(lambda g: post(client, [(n, read(photos, n)) for n in g]), groups))
    mixed = False
    for group, r in zip(groups, answers):
        assert r.status_code == 200, r.text
        body = r.json()
        got = [c["caption"] for c in body["captions"]]
        assert got == [offline["captions"][n] for n in group]
        assert all(c["decode_s"] > 0 for c in body["captions"])
        mixed |= body["captions"][0]["batch_images"] > len(group)
    assert mixed, "no batch held the images of more than one request"


def metric_samples(client) -> dict:
    from prometheus_client.parser import text_string_to_metric_families

    text = client.get("/metrics").text
    return {(s.name, tuple(sorted(s.labels.items()))): s.value for fam in text_string_to_metric_families(text)
            for s in fam.samples}


def test_continuous_batching_answers_each_request_with_what_caption_writes(continuous_service, photos, offline):
    """--decoder continuous: requests arriving together share the slots (a request's images
    take free slots at the next step), each caption is `caption`'s, a shorter max_gen_len is
    the same caption cut, and the slots and steps are in /metrics."""
    svc, client = continuous_service
    names = sorted(os.listdir(photos))
    before = metric_samples(client)
    groups = [[n] for n in names[:5]] + [names[5:7], names[7:9], names[:4]]  # 8 requests, 13 images, 8 slots
    short = names[2]
    with ThreadPoolExecutor(len(groups) + 1) as pool:
        answers = list(pool.map(lambda g: post(client, [(n, read(photos, n)) for n in g]), groups))
        cut = pool.submit(post, client, [(short, read(photos, short))], max_gen_len=2).result()
    mixed = False
    for group, r in zip(groups, answers):
        assert r.status_code == 200, r.text
        got = [c["caption"] for c in r.json()["captions"]]
        assert got == [offline["captions"][n] for n in group]
        mixed |= r.json()["captions"][0]["batch_images"] > len(group)
    assert mixed, "no request shared the slots with another"
    text = cut.json()["captions"][0]["caption"]
    assert 0 < len(text) < len(offline["captions"][short]) and offline["captions"][short].startswith(text)
    after = metric_samples(client)
    delta = lambda key: after.get(key, 0) - before.get(key, 0)  # noqa: E731
    assert delta(("llama_caption_images_total", ())) == 14
    steps = delta(("llama_caption_decode_steps_total", ()))
    assert 0 < steps and delta(("llama_caption_step_tokens_sum", ())) >= 14
    assert delta(("llama_caption_step_tokens_count", ())) == steps and ("llama_caption_slots_busy", ()) in after


def several_captioners_share_batches(service, photos, offline, moved_offline):
    """Requests for both captioners at once: each caption is its captioner's alone, and some
    decoding step or batch held both captioners' images."""
    svc, client = service
    names = sorted(os.listdir(photos))
    groups = [([n], "moved" if i % 2 else None) for i, n in enumerate(names[:6])] + [(names[6:9], "moved")]
    with ThreadPoolExecutor(len(groups)) as pool:
        answers = list(pool.map(lambda g: post(client, [(n, read(photos, n)) for n in g[0]],
                                               **({"model": g[1]} if g[1] else {})), groups))
    moved_images = sum(len(g) for g, m in groups if m)
    shared = False
    for (group, model), r in zip(groups, answers):
        assert r.status_code == 200, r.text
        body = r.json()
        assert body["captioner"] == (model or "run")
        expected = moved_offline if model else offline["captions"]
        assert [c["caption"] for c in body["captions"]] == [expected[n] for n in group]
        shared |= body["captions"][0]["batch_images"] > (moved_images if model else len(names) - moved_images)
    assert shared, "no batch held the images of both captioners"
    assert moved_offline != {n: offline["captions"][n] for n in moved_offline}  # two captioners indeed


def test_several_captioners_share_a_batch_and_each_caption_is_its_own(service, photos, offline, moved_offline):
    several_captioners_share_batches(service, photos, offline, moved_offline)


def test_several_captioners_share_the_continuous_slots(continuous_service, photos, offline, moved_offline):
    several_captioners_share_batches(continuous_service, photos, offline, moved_offline)


def test_the_captioners_are_named_in_model_models_and_metrics(service, photos, offline):
    svc, client = service
    info = client.get("/v1/model").json()
    assert info["default_captioner"] == "run" and list(info["captioners"]) == ["run", "moved"]
    assert info["captioners"]["run"]["checkpoint"] == offline["run"]["checkpoint"]
    assert info["captioners"]["moved"]["checkpoint"] != info["captioners"]["run"]["checkpoint"]
    assert info["captioners"]["moved"]["llama"] == info["llama"]  # one LLaMA
    models = client.get("/v1/models").json()
    assert models["object"] == "list" and [m["id"] for m in models["data"]] == ["run", "moved"]
    assert client.get("/v1/models/moved").json()["id"] == "moved"
    missing = client.get("/v1/models/nope")
    assert missing.status_code == 404 and missing.json()["error"]["code"] == "model_not_found"
    name = sorted(os.listdir(photos))[0]
    before = metric_samples(client)
    assert post(client, [(name, read(photos, name))] * 2, model="moved").status_code == 200
    after = metric_samples(client)
    key = ("llama_caption_captioner_images_total", (("captioner", "moved"),))
    assert after[key] - before.get(key, 0) == 2
    assert ("llama_caption_captioner_images_total", (("captioner", "run"),)) in after  # named from the start
    r = post(client, [(name, read(photos, name))], model="nope")
    assert r.status_code == 400 and r.json() == {"error": "unknown model 'nope': this server serves run, moved"}
    r = client.post("/v1/captions", json={"images": [base64.b64encode(read(photos, name)).decode()], "model": 3})
    assert r.status_code == 400 and r.json()["error"].startswith("unknown model 3")
    r = client.post("/v1/captions", files=[("images", (name, read(photos, name)))], data={"model": ["moved", "run"]})
    assert r.status_code == 400 and r.json() == {"error": "the field 'model' is given twice: give each setting once"}


def test_best_of_n_requests_answer_with_the_rule_s_pick_and_their_candidates(service, photos):
    """num_candidates/rerank/candidates: the candidates are those the Python API draws for the same
    images (keyed by their place in the request), and the caption is the rule's pick."""
    from llama_caption.rerank import BestOf, choose

    svc, client = service
    names = sorted(os.listdir(photos))[:3]
    files = [(n, read(photos, n)) for n in names]
    r = post(client, files, num_candidates=4, temperature=1.0, rerank="mbr", candidates="true", model="moved")
    assert r.status_code == 200, r.text
    got = r.json()["captions"]
    op = svc.captioners["moved"]
    pixels = torch.stack([op.preprocess(Image.open(io.BytesIO(b)).convert("RGB")) for _, b in files])
    expected = choose(op, pixels, [0, 1, 2], Decoding(temperature=1.0), BestOf(4, "mbr"))
    for row, choice in zip(got, expected):
        assert [c["caption"] for c in row["candidates"]] == [c.text for c in choice.candidates]
        assert row["caption"] == choice.best.text == max(row["candidates"], key=lambda c: c["mbr"])["caption"]
    again = post(client, files, num_candidates=4, temperature=1.0, rerank="mbr", model="moved").json()["captions"]
    assert [c["caption"] for c in again] == [c["caption"] for c in got] and "candidates" not in again[0]
    for settings, message in [({"num_candidates": 2}, "num_candidates 2 needs 2 different captions per image"),
                              ({"num_candidates": 33, "temperature": 1}, "num_candidates must be a whole number from 1 to 32"),
                              ({"num_candidates": 2, "temperature": 1, "rerank": "bleu"}, "rerank 'bleu' must be one of"),
                              ({"num_candidates": 2, "temperature": 1, "candidates": "maybe"}, "candidates must be true or false"),
                              ({"candidates": "true"}, "candidates lists the candidates of num_candidates > 1")]:
        r = post(client, files[:1], **settings)
        assert r.status_code == 400 and message in r.json()["error"], (settings, r.text)


def data_url(data: bytes) -> str:
    return "data:image/jpeg;base64," + base64.b64encode(data).decode()


def chat_client(client):
    import openai

    return openai.OpenAI(base_url="http://testserver/v1", api_key="none", http_client=client, max_retries=0)


def image_message(url: str, text: str = "Describe this image."):
    return [{"role": "system", "content": "You are a helpful assistant."},
            {"role": "user", "content": [{"type": "text", "text": text}, {"type": "image_url", "image_url": {"url": url}}]}]


def test_openai_chat_completions_through_the_openai_client(service, photos, offline, moved_offline):
    """The real `openai` package as the client (its HTTP client is the app's TestClient)."""
    svc, client = service
    chat = chat_client(client)
    name = sorted(os.listdir(photos))[1]
    url = data_url(read(photos, name))
    done = chat.chat.completions.create(model="run", messages=image_message(url))
    assert done.object == "chat.completion" and done.model == "run" and done.id.startswith("chatcmpl-")
    assert len(done.choices) == 1 and done.choices[0].message.role == "assistant"
    assert done.choices[0].message.content == offline["captions"][name]
    assert done.choices[0].finish_reason == "stop"
    tokens = len(svc.captioners["run"].captioner.tokenizer.encode(offline["captions"][name], bos=False, eos=False))
    prefix = svc.captioners["run"].captioner.prefix_len
    assert done.usage.completion_tokens == tokens and done.usage.prompt_tokens == prefix + 1
    assert done.usage.total_tokens == prefix + 1 + tokens
    # The text is not a prompt this captioner knows: another text gives the same caption.
    other_text = chat.chat.completions.create(model="run", messages=image_message(url, "What is in it, in French?"))
    assert other_text.choices[0].message.content == offline["captions"][name]
    moved = chat.chat.completions.create(model="moved", messages=image_message(url), n=3)
    assert [c.message.content for c in moved.choices] == [moved_offline[name]] * 3  # greedy copies are equal
    assert [c.index for c in moved.choices] == [0, 1, 2]
    roomy = chat.chat.completions.create(model="run", messages=image_message(url), max_tokens=4096)
    assert roomy.choices[0].message.content == offline["captions"][name]  # lowered to the server's --max_gen_len
    cut = chat.chat.completions.create(model="run", messages=image_message(url), max_tokens=2)
    assert cut.choices[0].finish_reason == "length" and cut.usage.completion_tokens == 2
    assert offline["captions"][name].startswith(cut.choices[0].message.content)
    # Sampled: n draws from the seed, the same again for the same seed, as /v1/captions draws an image sent n times.
    sampled = [chat.chat.completions.create(model="run", messages=image_message(url), n=2, temperature=1.0, seed=7,
                                            max_completion_tokens=12) for _ in range(2)]
    texts = [c.message.content for c in sampled[0].choices]
    assert texts == [c.message.content for c in sampled[1].choices]
    same = post(client, [(name, read(photos, name))] * 2, temperature=1.0, seed=7, max_gen_len=12).json()
    assert texts == [c["caption"] for c in same["captions"]]
    stream = chat.chat.completions.create(model="moved", messages=image_message(url), stream=True,
                                          stream_options={"include_usage": True})
    parts = list(stream)
    assert "".join(p.choices[0].delta.content or "" for p in parts if p.choices) == moved_offline[name]
    assert [p.choices[0].finish_reason for p in parts if p.choices][-1] == "stop"
    assert parts[-1].usage.completion_tokens > 0
    assert chat.chat.completions.create(model="run", messages=image_message(url), user="someone",
                                        frequency_penalty=0).choices[0].message.content == offline["captions"][name]


def test_openai_errors_are_one_sentence_in_openai_s_shape(service, photos):
    import openai

    svc, client = service
    chat = chat_client(client)
    name = sorted(os.listdir(photos))[0]
    url = data_url(read(photos, name))
    with pytest.raises(openai.NotFoundError) as e:
        chat.chat.completions.create(model="gpt-4o", messages=image_message(url))
    assert e.value.code == "model_not_found" and e.value.body["message"] == "unknown model 'gpt-4o': this server serves run, moved"
    bad = [
        (dict(messages=image_message("https://example.com/cat.jpg")), "is not a data: URL: this server fetches nothing", "messages"),
        (dict(messages=[{"role": "user", "content": "a cat?"}]), "the messages hold 0 images", "messages"),
        (dict(messages=image_message(url) + image_message(url)[1:]), "the messages hold 2 images", "messages"),
        (dict(messages=[]), "messages must be a non-empty list", "messages"),
        (dict(messages=image_message("data:image/png,rawbytes")), "is not base64", "messages"),
        (dict(messages=image_message("data:image/png;base64,@@@@")), "not valid base64", None),
        (dict(messages=image_message(data_url(b"not an image"))), "is not an image Pillow can read", None),
        (dict(messages=image_message(url), temperature=-1), "temperature must be", "temperature"),
        (dict(messages=image_message(url), max_tokens=0), "max_tokens must be at least 1, got 0", "max_tokens"),
        (dict(messages=image_message(url), max_completion_tokens=-3), "max_completion_tokens must be",
         "max_completion_tokens"),
        (dict(messages=image_message(url), max_tokens=2.5), "max_tokens must be a whole number", "max_tokens"),
        (dict(messages=image_message(url), n=0), "n must be a whole number from 1 to 4", "n"),
        (dict(messages=image_message(url), n=5), "n must be a whole number from 1 to 4", "n"),
        (dict(messages=image_message(url), top_p=2), "top_p must be", "top_p"),
        (dict(messages=image_message(url), tools=[{"type": "function", "function": {"name": "f"}}]),
         "tools is not supported by this captioner", "tools"),
        (dict(messages=image_message(url), logprobs=True), "logprobs is not supported", "logprobs"),
        (dict(messages=image_message(url), model=""), "model must name a captioner (run, moved), got \"\"", "model"),
        (dict(messages=[{"role": "assistant", "content": [{"type": "image_url", "image_url": {"url": url}}]}]),
         "holds an image but is a assistant message", "messages"),
    ]
    for kwargs, message, param in bad:
        with pytest.raises(openai.BadRequestError) as e:
            chat.chat.completions.create(**dict({"model": "run"}, **kwargs))
        assert message in e.value.body["message"], (kwargs, e.value.body)
        assert e.value.param == param and e.value.type == "invalid_request_error", (kwargs, e.value.body)
        assert "\n" not in e.value.body["message"] and e.value.status_code == 400
    for extra, message in [({"frobnicate": 1}, "unknown field 'frobnicate'"), ({"num_candidates": 3}, "unknown field")]:
        r = client.post("/v1/chat/completions", json=dict({"model": "run", "messages": image_message(url)}, **extra))
        assert r.status_code == 400 and message in r.json()["error"]["message"], r.text
    r = client.post("/v1/chat/completions", json={"model": "run", "messages": image_message(url), "n": 2.0})
    assert r.status_code == 200 and len(r.json()["choices"]) == 2  # a whole number written 2.0, as elsewhere
    for body, message in [(b"{not json", "malformed JSON"), (b"[1]", "must be a JSON object"),
                          (json.dumps({"model": "run", "messages": image_message(url), "stream": "yes"}).encode(),
                           "stream must be true or false")]:
        r = client.post("/v1/chat/completions", content=body, headers={"content-type": "application/json"})
        assert r.status_code == 400 and message in r.json()["error"]["message"], r.text
    # Nothing else was disturbed: the next request is answered.
    assert chat.chat.completions.create(model="run", messages=image_message(url)).choices[0].message.content
    assert svc.batcher.arriving == 0  # every refused request ended its arrival


def test_continuous_batching_keeps_sampled_and_beam_requests_on_the_batch_path(continuous_service, photos, offline):
    svc, client = continuous_service
    names = sorted(os.listdir(photos))
    with ThreadPoolExecutor(4) as pool:
        greedy = [pool.submit(post, client, [(n, read(photos, n))]) for n in names[:3]]
        sampled = pool.submit(post, client, [(names[0], read(photos, names[0]))] * 3, temperature=1.5, top_p=1.0, seed=7)
        beam = pool.submit(post, client, [(names[0], read(photos, names[0]))], num_beams=2)
        for n, f in zip(names, greedy):
            assert f.result().json()["captions"][0]["caption"] == offline["captions"][n]
        assert all(c["batch_images"] == 3 for c in sampled.result().json()["captions"])  # decoded alone
        assert beam.result().status_code == 200 and beam.result().json()["captions"][0]["caption"]
    again = post(client, [(names[0], read(photos, names[0]))] * 3, temperature=1.5, top_p=1.0, seed=7)
    assert [c["caption"] for c in again.json()["captions"]] == [c["caption"] for c in sampled.result().json()["captions"]]


def test_json_base64_request_gives_the_same_captions(service, photos, offline):
    svc, client = service
    names = sorted(os.listdir(photos))[:2]
    images = [base64.b64encode(read(photos, names[0])).decode(),
              "data:image/png;base64," + base64.b64encode(read(photos, names[1])).decode()]
    r = client.post("/v1/captions", json={"images": images, "max_gen_len": 30})
    assert r.status_code == 200, r.text
    assert [c["caption"] for c in r.json()["captions"]] == [offline["captions"][n] for n in names]


def test_shorter_max_gen_len_and_sampling_and_beams(service, photos, offline):
    svc, client = service
    name = sorted(os.listdir(photos))[0]
    short = post(client, [(name, read(photos, name))], max_gen_len=2).json()["captions"][0]["caption"]
    assert 0 < len(short) < len(offline["captions"][name])
    assert offline["captions"][name].startswith(short)  # greedy: the first tokens of the same caption
    sampled = [post(client, [(name, read(photos, name))] * 3, temperature=1.5, top_p=1.0, seed=7).json()
               for _ in range(2)]
    assert [c["caption"] for c in sampled[0]["captions"]] == [c["caption"] for c in sampled[1]["captions"]]
    assert all(c["batch_images"] == 3 for c in sampled[0]["captions"])  # decoded alone
    beam = post(client, [(name, read(photos, name))], num_beams=2)
    assert beam.status_code == 200 and beam.json()["captions"][0]["caption"]


def test_a_sampled_request_draws_as_caption_does(service, cap, trained, photos, tmp_path):
    """One seed rule (Decoding.generator: seed + data-parallel rank): four images sampled in one
    request get the captions `caption` samples for them in one batch of four, with the same seed."""
    svc, client = service
    names = sorted(os.listdir(photos))[:4]
    (tmp_path / "four").mkdir()
    for name in names:
        shutil.copy(os.path.join(photos, name), tmp_path / "four" / name)
    proc = run_cli(captioning_inference.main, "--ckpt_dir", cap["ckpt_dir"], "--tokenizer_path", cap["tokenizer"],
                   "--checkpoint", trained, "--images", tmp_path / "four", "--out", tmp_path / "s.json",
                   "--num_workers", 0, "--batch_size", 4, "--temperature", 1.5, "--top_p", 1.0, "--seed", 7)
    assert proc.returncode == 0, proc.stderr[-2000:]
    offline = {os.path.basename(r["file_name"]): r["caption"] for r in json.load(open(tmp_path / "s.json"))}
    r = post(client, [(name, read(photos, name)) for name in names], temperature=1.5, top_p=1.0, seed=7)
    assert r.status_code == 200, r.text
    assert [c["caption"] for c in r.json()["captions"]] == [offline[name] for name in names]
    assert len(set(offline.values())) > 1


BAD = [
    ("not an image", dict(files=[("a.txt", b"hello, not a picture")]), 400, "a.txt"),
    ("truncated", dict(files=[("cut.png", png_bytes()[:60])]), 400, "cut.png"),
    ("bomb", dict(files=[("b.png", bomb_png())]), 413, "decompression bomb"),
    ("over --max_pixels", dict(files=[("big.png", png_bytes((100, 100)))]), 413, "max_pixels"),
    ("over --max_upload_mb", dict(files=[("huge.png", os.urandom(300_000))]), 413, "max_upload_mb"),
    ("empty file", dict(files=[("empty.png", b"")]), 400, "empty"),
    ("no files", dict(files=[], max_gen_len=5), 400, "no images"),
    ("too many", dict(files=[(f"{i}.png", png_bytes()) for i in range(5)]), 400, "max_images"),
    ("far too many", dict(files=[(f"{i}.png", png_bytes((8, 8))) for i in range(60)]), 400, "max_images"),
    ("max_gen_len 0", dict(files=[("a.png", png_bytes())], max_gen_len=0), 400, "max_gen_len"),
    ("max_gen_len too long", dict(files=[("a.png", png_bytes())], max_gen_len=31), 400, "max_gen_len"),
    ("max_gen_len not whole", dict(files=[("a.png", png_bytes())], max_gen_len=2.5), 400, "max_gen_len"),
    ("temperature text", dict(files=[("a.png", png_bytes())], temperature="warm"), 400, "temperature"),
    ("temperature negative", dict(files=[("a.png", png_bytes())], temperature=-1), 400, "temperature"),
    ("top_p 0", dict(files=[("a.png", png_bytes())], temperature=1, top_p=0), 400, "top_p"),
    ("num_beams 9", dict(files=[("a.png", png_bytes())], num_beams=9), 400, "num_beams"),
    ("beams and sampling", dict(files=[("a.png", png_bytes())], num_beams=2, temperature=1), 400, "beam"),
    ("seed negative", dict(files=[("a.png", png_bytes())], seed=-1), 400, "seed"),
    ("seed huge", dict(files=[("a.png", png_bytes())], seed=1e300), 400, "seed"),
    ("temperature huge", dict(files=[("a.png", png_bytes())], temperature=1e300), 400, "temperature"),
    ("unknown setting", dict(files=[("a.png", png_bytes())], temprature=1), 400, "temprature"),
    # Numbers no float holds: once a 500 with a traceback.
    ("temperature of 400 digits", dict(files=[("a.png", png_bytes())], temperature=10 ** 400), 400, "too large"),
    ("length_penalty of 400 digits", dict(files=[("a.png", png_bytes())], length_penalty=-10 ** 400), 400, "too large"),
    ("seed of 400 digits", dict(files=[("a.png", png_bytes())], seed=10 ** 400), 400, "seed"),
    ("temperature 1e999", dict(files=[("a.png", png_bytes())], temperature="1e999"), 400, "finite"),
]


def test_bad_requests_get_one_sentence_errors_and_the_batch_goes_on(service, photos, offline):
    svc, client = service
    name = sorted(os.listdir(photos))[3]

    def send(case):
        kwargs = dict(case[1])
        files = kwargs.pop("files")
        return post(client, files, **kwargs)

    with ThreadPoolExecutor(8) as pool:
        good = pool.submit(post, client, [(name, read(photos, name))])
        bad = list(pool.map(send, BAD))
    assert good.result().status_code == 200
    assert good.result().json()["captions"][0]["caption"] == offline["captions"][name]
    for case, r in zip(BAD, bad):
        what, _, status, mentions = case
        assert r.status_code == status, (what, r.status_code, r.text)
        message = r.json()["error"]
        assert mentions in message, (what, message)
        assert "\n" not in message and len(message) < 300, (what, message)


def test_malformed_bodies(service):
    svc, client = service
    cases = [
        (dict(content=b"{not json", headers={"content-type": "application/json"}), 400, "malformed JSON"),
        (dict(json=["a", "list"]), 400, "object"),
        (dict(json={"images": "abc"}), 400, "list of base64"),
        (dict(json={"images": ["@@not base64@@"]}), 400, "base64"),
        (dict(json={"images": []}), 400, "no images"),
        (dict(content=b'{"images": ["AAAA"], "temperature": NaN}', headers={"content-type": "application/json"}),
         400, "temperature"),
        (dict(json={"images": ["AAAA"], "max_gen_len": True}), 400, "max_gen_len"),
        (dict(content=b"[" * 100_000 + b"]" * 100_000, headers={"content-type": "application/json"}), 400, "nested"),
        (dict(content=b'--xyz\r\nContent-Disposition: form-data; name="images"; filename="a.png"\r\n\r\n' + png_bytes(),
              headers={"content-type": "multipart/form-data; boundary=xyz"}), 400, "closing boundary"),
        (dict(content=b"x", headers={"content-type": "text/plain"}), 415, "multipart"),
        (dict(content=b"--xyz\r\ngarbage", headers={"content-type": "multipart/form-data; boundary=xyz"}), 400, None),
        (dict(files={"photo": ("a.png", png_bytes())}), 400, "'images'"),
    ]
    for kwargs, status, mentions in cases:
        r = client.post("/v1/captions", **kwargs)
        assert r.status_code == status, (kwargs, r.text)
        assert "error" in r.json() and (mentions is None or mentions in r.json()["error"]), r.text
    r = client.get("/no/such/route")
    assert r.status_code == 404 and "error" in r.json()


def test_base64_as_tools_write_it(service, photos, offline):
    svc, client = service
    name = sorted(os.listdir(photos))[2]
    raw = base64.b64encode(read(photos, name)).decode()
    wrapped = "\n".join(raw[i:i + 76] for i in range(0, len(raw), 76)) + "\n"  # `base64 FILE`
    for text in (wrapped, raw.rstrip("="), base64.urlsafe_b64encode(read(photos, name)).decode()):
        r = client.post("/v1/captions", json={"images": [text]})
        assert r.status_code == 200, r.text
        assert r.json()["captions"][0]["caption"] == offline["captions"][name]


def test_full_queue_answers_503_with_retry_after(service):
    svc, client = service
    keep = svc.batcher.max_queue
    svc.batcher.max_queue = 0
    try:
        r = post(client, [("a.png", png_bytes())])
    finally:
        svc.batcher.max_queue = keep
    assert r.status_code == 503 and r.headers["retry-after"] == "1"
    assert "--max_queue" in r.json()["error"]


def test_model_identity_is_what_results_record(service, offline):
    svc, client = service
    info = client.get("/v1/model").json()
    for key in ("checkpoint", "llama", "clip", "decoding"):
        assert info[key] == offline["run"][key], key
    assert info["limits"]["max_images"] == SERVE_FLAGS["max_images"]


def test_metrics_count_requests_images_and_batches(service, photos):
    from prometheus_client.parser import text_string_to_metric_families

    svc, client = service

    def samples():
        text = client.get("/metrics").text
        return {(s.name, tuple(sorted(s.labels.items()))): s.value
                for fam in text_string_to_metric_families(text) for s in fam.samples}

    before = samples()
    name = sorted(os.listdir(photos))[0]
    assert post(client, [(name, read(photos, name))] * 3).status_code == 200
    assert post(client, [("x.txt", b"nope")]).status_code == 400
    after = samples()
    delta = lambda key: after.get(key, 0) - before.get(key, 0)  # noqa: E731
    assert delta(("llama_caption_images_total", ())) == 3
    assert delta(("llama_caption_requests_total", (("status", "200"),))) == 1
    assert delta(("llama_caption_requests_total", (("status", "400"),))) == 1
    assert delta(("llama_caption_batch_images_count", ())) == 1
    assert delta(("llama_caption_batch_images_sum", ())) == 3
    assert delta(("llama_caption_request_seconds_count", ())) == 2
    assert ("llama_caption_queue_images", ()) in after


def test_api_key_guards_every_route_but_health(service, photos):
    from fastapi.testclient import TestClient

    from llama_caption.serve.app import create_app

    svc, _ = service
    key = "k3y-for-the-test"
    app = create_app(svc.batcher, svc.limits, lambda: svc.captioners, lambda: svc.info, lambda: svc.ready,
                     svc.metrics, api_key=key)
    client = TestClient(app)
    assert client.get("/health").status_code == 200
    assert client.head("/health").status_code == 200
    refused = client.get("/v1/model")
    assert refused.headers["www-authenticate"] == "Bearer"
    for path in ("/v1/model", "/metrics", "/", "/openapi.json"):
        assert client.get(path).status_code == 401, path
        assert client.get(path, headers={"Authorization": "Bearer wrong-key-000"}).status_code == 401, path
        assert client.get(path, headers={"Authorization": f"Bearer {key}"}).status_code == 200, path
    assert client.get("/?api_key=" + key).status_code == 200
    assert client.get("/v1/model?api_key=" + key).status_code == 401  # only the page takes it in the address
    name = sorted(os.listdir(photos))[0]
    files = [("images", (name, read(photos, name)))]
    count = lambda status: svc.metrics.requests.labels(status)._value.get()  # noqa: E731
    before = count("401")
    assert client.post("/v1/captions", files=files).status_code == 401
    assert count("401") == before + 1  # refused requests are counted too
    assert client.post("/v1/captions", files=files, headers={"X-API-Key": key}).status_code == 200
    # The OpenAI routes say it in OpenAI's shape, which its client reads.
    import openai

    chat = openai.OpenAI(base_url="http://testserver/v1", api_key="wrong-key-000", http_client=client, max_retries=0)
    with pytest.raises(openai.AuthenticationError) as refused:
        chat.models.list()
    assert refused.value.code == "invalid_api_key" and "a valid API key is needed" in refused.value.body["message"]
    chat = openai.OpenAI(base_url="http://testserver/v1", api_key=key, http_client=client, max_retries=0)
    assert [m.id for m in chat.models.list()] == ["run", "moved"]


def test_page_and_openapi_are_served_locally(service):
    svc, client = service
    page = client.get("/")
    assert page.status_code == 200 and "text/html" in page.headers["content-type"]
    assert "http://" not in page.text and "https://" not in page.text  # nothing fetched from elsewhere
    schema = client.get("/openapi.json").json()
    body = schema["paths"]["/v1/captions"]["post"]["requestBody"]["content"]
    assert {"multipart/form-data", "application/json"} <= set(body)
    assert "CaptionResponse" in json.dumps(schema["components"])


def test_serve_flags_are_checked_before_anything_loads(cap, trained, monkeypatch):
    from llama_caption.serve import server

    base = ["--ckpt_dir", cap["ckpt_dir"], "--checkpoint", trained]
    monkeypatch.delenv("LLAMA_CAPTION_API_KEY", raising=False)
    for extra, mentions in ((["--host", "0.0.0.0"], "--api_key"), (["--max_images", 64], "--max_batch"),
                            (["--port", 70000], "--port"), (["--api_key", "short"], "--api_key"),
                            (["--max_upload_mb", 0], "--max_upload_mb"), (["--max_batch", 0], "--max_batch"),
                            (["--max_wait_ms", -1], "--max_wait_ms"), (["--max_wait_ms", 1e300], "--max_wait_ms"),
                            (["--url_file", "/no/such/folder/url"], "--url_file"),
                            (["--log_level", "loud"], "--log_level"),
                            # No Authorization header can carry it: it would never match.
                            (["--api_key", "clé-secrète-longue"], "printable ASCII"),
                            (["--api_key", "two words key"], "printable ASCII"),
                            (["--max_upload_mb", "1e999"], "finite"), (["--max_upload_mb", 1e9], "at most 65536"),
                            (["--max_upload_mb", "1" + "0" * 400], "too large"),
                            # a folder that is not a trained run: refused before the port is bound
                            (["--checkpoint", f"x={cap['root']}"], "--checkpoint")):
        proc = run_cli(server.main, *base, *extra)
        assert proc.returncode == 2, (extra, proc.stderr)
        assert mentions in proc.stderr and proc.stderr.count("\n") == 1, (extra, proc.stderr)
    monkeypatch.setenv("LLAMA_CAPTION_API_KEY", "short")
    proc = run_cli(server.main, *base)
    assert proc.returncode == 2 and "$LLAMA_CAPTION_API_KEY must be at least 8" in proc.stderr, proc.stderr
    monkeypatch.setenv("LLAMA_CAPTION_API_KEY", "from-the-environment")
    cfg = server.ServeConfig(ckpt_dir=cap["ckpt_dir"], checkpoint=trained, host="0.0.0.0")
    assert cfg.api_key == "from-the-environment"


def test_loadtest_refuses_other_hosts_and_checks_its_inputs(tmp_path):
    from llama_caption.tools import loadtest

    for url in ("http://example.com:8000", "https://127.0.0.1:8000", "http://10.0.0.1:80"):
        proc = run_cli(loadtest.main, "--url", url, "--images", tmp_path, "--concurrency", 1)
        assert proc.returncode == 2 and "loopback" in proc.stderr, proc.stderr
    proc = run_cli(loadtest.main, "--url", "http://127.0.0.1:1", "--images", tmp_path, "--concurrency", 0)
    assert proc.returncode == 2 and "--concurrency" in proc.stderr
    bad = tmp_path / "bad.json"
    for text in ('{"not": "results"}', '[{"file_name": 1, "caption": "x"}]', '[{"file_name": "a.png"}]'):
        bad.write_text(text)
        with pytest.raises(UserError, match="results file"):
            loadtest.load_expected(str(bad))
    for models in ("a,,b", ","):
        proc = run_cli(loadtest.main, "--url", "http://127.0.0.1:1", "--images", tmp_path, "--models", models)
        assert proc.returncode == 2 and "--models" in proc.stderr and "empty name" in proc.stderr, proc.stderr
    assert loadtest.percentile([1.0, 2.0, 3.0, 4.0], 50) == 2.5
    assert loadtest.percentile([5.0], 99) == 5.0


def test_newest_demo_run_is_what_make_serve_uses(tmp_path):
    from llama_caption.tools.demo.build import newest_demo_run

    with pytest.raises(UserError, match="make demo"):
        newest_demo_run(str(tmp_path / "demo_runs"))
    for i, run in enumerate(("001", "002")):
        folder = tmp_path / "demo_runs" / "full" / "runs" / run
        (folder / "scst").mkdir(parents=True)
        # as the demo writes them: relative to the report's folder
        serve = {"ckpt_dir": "../../standins/llama", "tokenizer_path": "../../standins/tokenizer.model",
                 "checkpoint": "scst", "images": "../../data/val2014", "clip_model": "../../standins/clip.pt"}
        (folder / "demo_report.json").write_text(json.dumps({"serve": serve}))
        os.utime(folder / "demo_report.json", (1000 + i, 1000 + i))
    (tmp_path / "demo_runs" / "full" / "standins" / "llama").mkdir(parents=True)
    (tmp_path / "demo_runs" / "full" / "data" / "val2014").mkdir(parents=True)
    moved = tmp_path / "elsewhere"
    shutil.move(str(tmp_path / "demo_runs"), str(moved))  # a moved demo folder still serves
    got = newest_demo_run(str(moved))
    full = moved / "full"
    assert got == {"ckpt_dir": str(full / "standins" / "llama"), "tokenizer_path": str(full / "standins" / "tokenizer.model"),
                   "checkpoint": str(full / "runs" / "002" / "scst"), "images": str(full / "data" / "val2014"),
                   "clip_model": str(full / "standins" / "clip.pt")}
    # A scale's folder, its runs/ folder and a run's own folder name the same run.
    for inner in (full, full / "runs", full / "runs" / "002"):
        assert newest_demo_run(str(inner))["checkpoint"] == str(full / "runs" / "002" / "scst")
    shutil.rmtree(full / "runs" / "002" / "scst")  # its models were deleted: the older one
    assert newest_demo_run(str(moved))["checkpoint"] == str(full / "runs" / "001" / "scst")


# ----------------------------------------------------------------------------------------------
# The server as a process.

def start_server(cap, trained, tmp_path, *extra, nproc=1):
    url_file = tmp_path / f"url-{time.monotonic_ns()}"
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=REPO)
    launch = [sys.executable, "-m", "llama_caption"] if nproc == 1 else \
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc), "--master_addr", "127.0.0.1",
         "--master_port", str(free_port()), "-m", "llama_caption"]
    proc = subprocess.Popen([*launch, "serve", "--ckpt_dir", cap["ckpt_dir"], "--tokenizer_path", cap["tokenizer"],
                             "--checkpoint", trained, "--port", "0", "--url_file", str(url_file), *map(str, extra)],
                            cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 240
    while not url_file.exists():
        if proc.poll() is not None or time.time() > deadline:
            proc.kill()
            raise AssertionError(f"the server did not start ({proc.returncode}):\n{proc.stderr.read()[-3000:]}")
        time.sleep(0.2)
    return proc, url_file.read_text().strip()


@pytest.fixture(scope="module")
def server(cap, trained, other, tmp_path_factory):
    """The server process, serving `trained` (run, the default) and `other` (moved) over one LLaMA."""
    proc, url = start_server(cap, f"{trained},moved={other}", tmp_path_factory.mktemp("server"), "--max_wait_ms", 300,
                             "--max_batch", 8, "--max_images", 4)
    yield proc, url
    if proc.poll() is None:
        proc.kill()
    proc.wait()


def http_post(url, photos, names, timeout=60, **settings):
    import httpx

    return httpx.post(url + "/v1/captions", files=[("images", (n, read(photos, n))) for n in names],
                      data={k: str(v) for k, v in settings.items()}, timeout=timeout, trust_env=False)


@pytest.mark.slow
def test_loadtest_command_checks_every_caption_against_offline(server, photos, offline, tmp_path):
    proc, url = server
    out = tmp_path / "load.json"
    run = subprocess.run([sys.executable, "-m", "llama_caption", "loadtest", "--url", url, "--images", photos,
                          "--concurrency", "1", "4", "--requests", "12", "--expected", offline["results"], "--out", out],
                         capture_output=True, text=True, cwd=REPO, timeout=300,
                         env=dict(os.environ, PYTHONPATH=REPO))
    assert run.returncode == 0, run.stdout + run.stderr
    rows = json.load(open(out))
    assert [r["concurrency"] for r in rows] == [1, 4]
    assert all(r["requests"] == 12 and r["errors"] == 0 and r["mismatches"] == 0 for r in rows)
    assert "p50 s" in run.stdout and "images/s" in run.stdout
    wrong = tmp_path / "wrong.json"
    rows = json.load(open(offline["results"]))
    rows[0]["caption"] = "a caption the server will not give"
    wrong.write_text(json.dumps(rows))
    run = subprocess.run([sys.executable, "-m", "llama_caption", "loadtest", "--url", url, "--images", photos,
                          "--concurrency", "2", "--requests", "9", "--expected", wrong],
                         capture_output=True, text=True, cwd=REPO, timeout=300, env=dict(os.environ, PYTHONPATH=REPO))
    assert run.returncode == 2 and "differ" in run.stderr, run.stdout + run.stderr


@pytest.mark.slow
def test_the_openai_client_over_loopback_gets_what_caption_writes(server, photos, offline):
    """The `openai` package with its own HTTP client, against the server process on loopback."""
    import openai

    proc, url = server
    chat = openai.OpenAI(base_url=url + "/v1", api_key="none", max_retries=0)
    assert [m.id for m in chat.models.list()] == ["run", "moved"]  # a bare run is named by its folder
    name = sorted(os.listdir(photos))[3]
    done = chat.chat.completions.create(model="run",
                                        messages=image_message(data_url(read(photos, name))), n=2)
    assert [c.message.content for c in done.choices] == [offline["captions"][name]] * 2
    with pytest.raises(openai.BadRequestError, match="this server fetches nothing"):
        chat.chat.completions.create(model="run", messages=image_message("http://127.0.0.1:9/cat.jpg"))


@pytest.mark.slow
def test_a_client_that_disconnects_does_not_break_its_batch(server, photos, offline):
    proc, url = server
    host, port = url.split("//")[1].split(":")
    names = sorted(os.listdir(photos))
    boundary = "b0undary"
    body = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"images\"; filename=\"{names[0]}\"\r\n"
            f"Content-Type: image/png\r\n\r\n").encode() + read(photos, names[0]) + f"\r\n--{boundary}--\r\n".encode()
    head = (f"POST /v1/captions HTTP/1.1\r\nHost: {host}\r\nContent-Type: multipart/form-data; boundary={boundary}\r\n"
            f"Content-Length: {len(body)}\r\n\r\n").encode()

    def leave():
        s = socket.create_connection((host, int(port)))
        s.sendall(head + body)
        s.close()  # gone before the answer

    def leave_mid_upload():
        s = socket.create_connection((host, int(port)))
        s.sendall(head + body[:200])
        time.sleep(0.2)
        s.close()  # gone before the upload ended

    import httpx

    def status_count(code):
        text = httpx.get(url + "/metrics", trust_env=False).text
        line = next((l for l in text.splitlines() if l.startswith(f'llama_caption_requests_total{{status="{code}"}}')), None)
        return float(line.split()[-1]) if line else 0.0

    errors_before = status_count(500)
    leave_mid_upload()

    with ThreadPoolExecutor(4) as pool:
        gone = [pool.submit(leave) for _ in range(2)]
        stay = [pool.submit(http_post, url, photos, [n]) for n in names[1:3]]
        for f in gone:
            f.result()
        answers = [f.result() for f in stay]
    for n, r in zip(names[1:3], answers):
        assert r.status_code == 200 and r.json()["captions"][0]["caption"] == offline["captions"][n]
    time.sleep(0.5)
    again = http_post(url, photos, names[:1])
    assert again.status_code == 200 and again.json()["captions"][0]["caption"] == offline["captions"][names[0]]
    assert proc.poll() is None
    assert status_count(499) >= 1 and status_count(500) == errors_before  # a client gone, not a server error

    # One keep-alive connection: a setting no float holds is a 400, and the next request on the
    # same socket is answered (it was once a 500 that reset the connection).
    with httpx.Client(base_url=url, trust_env=False, timeout=60) as client:
        files = [("images", (names[0], read(photos, names[0])))]
        bad = client.post("/v1/captions", files=files, data={"temperature": "1" + "0" * 400})
        good = client.post("/v1/captions", files=files)
        assert bad.status_code == 400 and "too large" in bad.json()["error"], bad.text
        assert good.status_code == 200 and good.json()["captions"][0]["caption"] == offline["captions"][names[0]]
    assert status_count(500) == errors_before


CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.mark.slow
@pytest.mark.skipif(CHROMIUM is None, reason="the browser test needs Debian's chromium: apt-get install chromium "
                                               "(.ci/run installs it on CI)")
def test_the_page_captions_chosen_photos_in_a_real_browser(server, photos, offline, moved_offline, tmp_path):
    from playwright.sync_api import sync_playwright

    proc, url = server
    names = sorted(os.listdir(photos))[:3]
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=[
            "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
            "--disable-sync", "--no-first-run", "--disable-quic"])
        try:
            page = browser.new_page()
            page.goto(url + "/")
            page.wait_for_function("document.getElementById('model').textContent.includes('2 captioners: run, moved')")
            page.fill("#max_gen_len", "30")
            page.set_input_files("#files", [os.path.join(photos, n) for n in names])
            page.wait_for_function("document.querySelectorAll('.card .caption').length === 3 && "
                                   "[...document.querySelectorAll('.card .caption')].every(c => c.textContent !== '\u2026')",
                                   timeout=60000)
            cards = page.query_selector_all(".card")
            shown = {c.query_selector("img").get_attribute("alt"): c.query_selector(".caption").text_content()
                     for c in cards}
            times = [c.query_selector(".time").text_content() for c in cards]
            assert "captioned 3 photo(s)" in page.text_content("#status")
            page.screenshot(path=str(tmp_path / "page.png"))
            # A file that is not an image: its card says why.
            bad = tmp_path / "notes.png"
            bad.write_bytes(b"not really a png")
            page.set_input_files("#files", [str(bad)])
            page.wait_for_function("document.querySelector('.card.error') !== null", timeout=30000)
            error_text = page.text_content(".card.error .caption")
            # The other captioner, chosen in the page's list.
            page.select_option("#model_name", "moved")
            page.set_input_files("#files", [os.path.join(photos, names[0])])
            page.wait_for_function("document.querySelectorAll('.card .caption').length === 5 && "
                                   "document.querySelector('.card .caption').textContent !== '…'", timeout=60000)
            moved_text = page.text_content(".card .caption")
            moved_time = page.text_content(".card .time")
        finally:
            browser.close()
    assert moved_text == moved_offline[names[0]] and moved_time.endswith("· moved")
    assert shown == {n: offline["captions"][n] for n in names}
    assert all(" s (decode " in t for t in times)
    assert "notes.png" in error_text and "not an image" in error_text


@pytest.mark.slow
def test_model_parallel_server_answers_like_offline(cap, trained, photos, offline, tmp_path):
    proc, url = start_server(cap, trained, tmp_path, "--model_parallel", 2, nproc=2)
    try:
        names = sorted(os.listdir(photos))
        with ThreadPoolExecutor(3) as pool:
            answers = list(pool.map(lambda g: http_post(url, photos, g), [names[:3], names[3:6], names[6:]]))
        got = [c["caption"] for r in answers for c in r.json()["captions"]]
        assert got == [offline["captions"][n] for n in names]
        assert http_post(url, photos, names[:1], temperature=1.0, seed=3).status_code == 200
    finally:
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=120)
    assert "stopped: every request in flight was answered" in err, err[-2000:]


@pytest.mark.slow
def test_sigterm_answers_the_requests_in_flight_then_exits_0(cap, trained, photos, offline, tmp_path):
    import httpx

    proc, url = start_server(cap, trained, tmp_path, "--max_batch", 8)
    names = sorted(os.listdir(photos))
    groups = [names[i % 9:i % 9 + 4] or names[:4] for i in range(10)]
    try:
        with ThreadPoolExecutor(len(groups)) as pool:
            flying = [pool.submit(http_post, url, photos, g) for g in groups]
            deadline = time.time() + 30
            while True:  # some requests are in the server, not yet answered
                held = httpx.get(url + "/health", trust_env=False).json()["requests_in_flight"]
                if held >= 2:
                    break
                assert time.time() < deadline and not all(f.done() for f in flying)
            proc.send_signal(signal.SIGTERM)
            outcomes = []
            for group, f in zip(groups, flying):
                try:
                    r = f.result()
                except (httpx.ConnectError, httpx.RemoteProtocolError, httpx.ReadError):
                    outcomes.append("not taken")  # came after the server stopped listening
                    continue
                assert r.status_code == 200, r.text  # a request the server took is answered, never dropped
                assert [c["caption"] for c in r.json()["captions"]] == [offline["captions"][n] for n in group]
                outcomes.append("answered")
        assert outcomes.count("answered") >= held
        assert proc.wait(timeout=60) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
    assert "stopped: every request in flight was answered" in proc.stderr.read()
    with pytest.raises(httpx.ConnectError):
        httpx.get(url + "/health", timeout=5, trust_env=False)
