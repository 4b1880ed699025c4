"""OpenAI's Chat Completions API over the served captioners, for clients that speak it.

    POST /v1/chat/completions   one image as an `image_url` part holding a `data:` URL; `model`
                                names the captioner; max_tokens (or max_completion_tokens),
                                temperature, top_p, seed, n and stream are honoured
    GET  /v1/models             the captioners served, as OpenAI lists models
    GET  /v1/models/{name}      one of them

The captioner was trained on an image prefix and BOS, never on instructions: text parts and
system messages are read, checked and left out of its input. A remote image URL is refused (the
server fetches nothing). `n` copies of the image are decoded in one batch, as /v1/captions
decodes an image sent n times: greedy copies are equal, sampled ones draw in turn from the
request's seed. The request's images go through the same queue, batches and checks as
/v1/captions'; errors are OpenAI's shape (app.error).
"""

import json
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from typing import Callable, List, Tuple

from fastapi import FastAPI, Request
from fastapi.responses import StreamingResponse

from ..errors import UserError
from ..llama.decoding import Decoding, parse_number
from .app import ApiError, Limits, caption_files, decode_base64, pick_captioner, read_body
from .batching import Batcher

# What the route reads; fields that change nothing here (who asks, what to store); fields that
# would change an answer this captioner cannot give, accepted only at their neutral values.
TAKEN = ("model", "messages", "max_tokens", "max_completion_tokens", "temperature", "top_p", "seed", "n", "stream",
         "stream_options")
NEUTRAL = ("user", "metadata", "store", "service_tier", "parallel_tool_calls", "prompt_cache_key", "safety_identifier")
ROLES = ("system", "developer", "user", "assistant", "tool")
# The other fields of OpenAI's request: refused (with a reason) when set to what changes an answer.
OPENAI_FIELDS = ("frequency_penalty", "presence_penalty", "logprobs", "top_logprobs", "stop", "response_format",
                 "tools", "tool_choice", "functions", "function_call", "logit_bias", "modalities", "audio",
                 "prediction", "reasoning_effort", "web_search_options", "verbosity")


def openai_decoding(body: dict, limits: Limits) -> Decoding:
    """The decoding settings of a chat request, checked as /v1/captions checks its own; an
    omitted temperature is greedy (the captioner's default, not OpenAI's 1)."""
    if body.get("max_tokens") is not None and body.get("max_completion_tokens") is not None:
        raise ApiError(400, "give max_tokens or max_completion_tokens, not both", param="max_completion_tokens")
    length_field = "max_completion_tokens" if body.get("max_completion_tokens") is not None else "max_tokens"
    values = {"max_gen_len": body.get(length_field), "temperature": body.get("temperature"),
              "top_p": body.get("top_p"), "seed": body.get("seed")}
    try:
        # OpenAI's max_tokens is a bound clients set generously (a caption is short): above the
        # server's --max_gen_len it is lowered to it, not refused as /v1/captions refuses it.
        asked = parse_number(length_field, int, values["max_gen_len"])
        if asked is not None and asked > limits.max_gen_len:
            values["max_gen_len"] = limits.max_gen_len
        return Decoding.from_values(values, {"max_gen_len": limits.max_gen_len})
    except UserError as e:
        message = str(e).replace("max_gen_len", length_field)
        param = next((k for k in ("temperature", "top_p", "seed", length_field) if message.startswith(k)), None)
        raise ApiError(400, message, param=param) from None


def check_fields(body: dict) -> None:
    """Refuse a field this API does not know, or one set to what the captioner cannot do."""
    for key, value in body.items():
        if key in TAKEN or key in NEUTRAL:
            continue
        if value in (None, False, 0, "", [], {}) or (key == "response_format" and value == {"type": "text"}):
            continue
        if key not in OPENAI_FIELDS:
            raise ApiError(400, f"unknown field {key!r}: this route takes OpenAI's Chat Completions fields "
                                f"({', '.join(TAKEN)}; /v1/captions takes num_candidates, rerank, num_beams)", param=key)
        raise ApiError(400, f"{key} is not supported by this captioner (it writes one caption per image, from the "
                            f"image alone): leave it out", param=key)


def the_image(messages) -> Tuple[str, bytes]:
    """The one image of a conversation: an `image_url` part of a user message, as a data: URL."""
    if not isinstance(messages, list) or not messages:
        raise ApiError(400, "messages must be a non-empty list of messages", param="messages")
    images: List[str] = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or m.get("role") not in ROLES:
            raise ApiError(400, f"messages[{i}] must be an object with a role ({', '.join(ROLES)})", param="messages")
        content = m.get("content")
        if content is None or isinstance(content, str):
            continue
        if not isinstance(content, list):
            raise ApiError(400, f"messages[{i}].content must be a string or a list of parts", param="messages")
        for j, part in enumerate(content):
            kind = part.get("type") if isinstance(part, dict) else None
            if kind == "image_url":
                if m["role"] != "user":
                    raise ApiError(400, f"messages[{i}] holds an image but is a {m['role']} message: send it in a user "
                                        f"message", param="messages")
                url = part.get("image_url")
                url = url.get("url") if isinstance(url, dict) else url
                if not isinstance(url, str):
                    raise ApiError(400, f"messages[{i}].content[{j}].image_url needs a url", param="messages")
                images.append(url)
            elif kind not in ("text", "refusal"):
                raise ApiError(400, f"messages[{i}].content[{j}] is a {kind!r} part: this captioner reads image_url "
                                    f"(and leaves text out)", param="messages")
    if len(images) != 1:
        raise ApiError(400, f"the messages hold {len(images)} images: send exactly one image_url part (for several "
                            f"images, one request each, or POST /v1/captions)", param="messages")
    url = images[0]
    if not url.startswith("data:"):
        shown = url if len(url) <= 60 else url[:57] + "..."
        raise ApiError(400, f"image_url {shown!r} is not a data: URL: this server fetches nothing; send the image "
                            f"inline as data:image/jpeg;base64,...", param="messages")
    if ";base64," not in url.split(",", 1)[0] + ",":
        raise ApiError(400, "the image's data: URL is not base64 (write data:image/png;base64,...)", param="messages")
    return "image_url", decode_base64(url, "image_url")


def parse_chat(body: bytes, limits: Limits) -> dict:
    """The request as a dict, its fields checked (not yet the image)."""
    try:
        data = json.loads(body)
    except (ValueError, RecursionError) as e:
        raise ApiError(400, f"malformed JSON ({e if isinstance(e, ValueError) else 'nested too deeply'})") from None
    if not isinstance(data, dict):
        raise ApiError(400, "the body must be a JSON object in the Chat Completions schema")
    check_fields(data)
    try:
        n = parse_number("n", int, data.get("n"))
    except UserError:
        n = data.get("n")
    n = 1 if n is None else n
    if isinstance(n, bool) or not isinstance(n, int) or not 1 <= n <= limits.max_images:
        raise ApiError(400, f"n must be a whole number from 1 to {limits.max_images} (the server's --max_images), "
                            f"got {json.dumps(n)}", param="n")
    data["n"] = n
    if not isinstance(data.get("stream", False), (bool, type(None))):
        raise ApiError(400, "stream must be true or false", param="stream")
    return data


def completion(out: dict, name: str, prefix_len: int) -> dict:
    """The chat.completion object of a batch's answer (batching.run_batch's)."""
    choices = [{"index": i, "message": {"role": "assistant", "content": text, "refusal": None}, "logprobs": None,
                "finish_reason": "stop" if ended else "length"}
               for i, (text, ended) in enumerate(zip(out["captions"], out["ended"]))]
    written = sum(out["tokens"])
    # The prompt is the image's prefix positions and BOS, counted once as OpenAI counts it for n choices.
    usage = {"prompt_tokens": prefix_len + 1, "completion_tokens": written, "total_tokens": prefix_len + 1 + written}
    return {"id": f"chatcmpl-{uuid.uuid4().hex}", "object": "chat.completion", "created": int(time.time()),
            "model": name, "choices": choices, "usage": usage, "system_fingerprint": None}


def chunks(done: dict, include_usage: bool):
    """A completion as Server-Sent Events: each choice's caption in one delta, its end, [DONE]."""
    head = {k: done[k] for k in ("id", "created", "model", "system_fingerprint")}
    head["object"] = "chat.completion.chunk"

    def event(choices, **extra) -> str:
        return "data: " + json.dumps(dict(head, choices=choices, **extra)) + "\n\n"

    for c in done["choices"]:
        yield event([{"index": c["index"], "delta": {"role": "assistant", "content": c["message"]["content"]},
                      "logprobs": None, "finish_reason": None}])
        yield event([{"index": c["index"], "delta": {}, "logprobs": None, "finish_reason": c["finish_reason"]}])
    if include_usage:
        yield event([], usage=done["usage"])
    yield "data: [DONE]\n\n"


def add_openai_routes(app: FastAPI, batcher: Batcher, limits: Limits, captioners: Callable[[], dict],
                      ready: Callable[[], bool], readers: ThreadPoolExecutor) -> None:
    """POST /v1/chat/completions, GET /v1/models and /v1/models/{name}."""
    started = int(time.time())

    def listed(name: str) -> dict:
        return {"id": name, "object": "model", "created": started, "owned_by": "llama_caption"}

    def loaded() -> dict:
        if not ready():
            raise ApiError(503, "the model is still loading", {"Retry-After": "5"})
        return captioners()

    @app.get("/v1/models", summary="the captioners served, in OpenAI's list of models")
    async def models():
        return {"object": "list", "data": [listed(name) for name in loaded()]}

    @app.get("/v1/models/{name:path}", summary="one served captioner, as OpenAI describes a model")
    async def one_model(name: str):
        return listed(pick_captioner(loaded(), name, status=404)[0])

    @app.post("/v1/chat/completions", summary="OpenAI's Chat Completions: a caption of the one image_url part",
              responses={400: {"description": "OpenAI's error shape: {\"error\": {\"message\", \"type\", \"param\", \"code\"}}"},
                         404: {"description": "unknown model"}})
    async def chat(request: Request):
        batcher.arrive()
        submitted = False
        try:
            served = loaded()
            data = parse_chat(await read_body(request, limits.max_upload_bytes), limits)
            if "model" in data and (not isinstance(data["model"], str) or not data["model"]):
                raise ApiError(400, f"model must name a captioner ({', '.join(served)}), got {json.dumps(data['model'])}",
                               param="model")
            name, opened = pick_captioner(served, data.get("model"), status=404)
            files = [the_image(data.get("messages"))] * data["n"]
            decoding = openai_decoding(data, limits)
            submitted = True
            out = await caption_files(batcher, limits, readers, files, decoding, name, opened)
            done = completion(out, name, opened.captioner.prefix_len)
            if data.get("stream"):
                usage = isinstance(data.get("stream_options"), dict) and bool(data["stream_options"].get("include_usage"))
                return StreamingResponse(chunks(done, usage), media_type="text/event-stream")
            return done
        finally:
            if not submitted:
                batcher.arrived()
