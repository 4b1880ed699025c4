"""Decoding settings defined once (llama/decoding.py): `caption`, `complete` and `serve` refuse a bad
value with one message, results files record what they always recorded, and sampling draws by
one seed rule."""

import dataclasses
import re

import pytest
import torch

import captioning_inference
from conftest import run_cli
from llama_caption.errors import UserError
from llama_caption.inference import InferenceConfig
from llama_caption.llama.complete import ExampleConfig
from llama_caption.llama.decoding import Decoding
from llama_caption.opening import OpenedCaptioner
from llama_caption.serve.app import ApiError, CaptionRequest, Limits, check_decoding
from llama_caption.serve.batching import share_key

LIMITS = Limits(max_images=4, max_upload_bytes=2 ** 20, max_pixels=4096, max_gen_len=30, max_beams=4)
CAPTION = {"ckpt_dir": "c", "checkpoint": "k", "images": ["i"], "out": "o.json"}

# Out of range, not finite, or not allowed together; the same for every command.
REFUSED = [
    dict(temperature=float("inf")), dict(temperature=float("nan")), dict(temperature=-0.5), dict(temperature=101.0),
    dict(temperature=1e300), dict(top_p=0.0), dict(top_p=1.5), dict(top_p=float("nan")),
    dict(length_penalty=0.0), dict(length_penalty=-1.0), dict(length_penalty=11.0), dict(length_penalty=float("inf")),
    dict(seed=-1), dict(num_beams=2, temperature=1.0),
    # Numbers no float holds, or no setting takes (a 400-digit whole number, 2 ** 63).
    dict(temperature=10 ** 400), dict(seed=10 ** 400), dict(max_gen_len=2 ** 63), dict(num_beams=-10 ** 400),
    dict(length_penalty=10 ** 400), dict(max_gen_len=1e300 + 0.5),
]


def caption_error(**flags) -> str:
    with pytest.raises(UserError) as e:
        InferenceConfig(**CAPTION, **flags)
    return str(e.value)


def serve_error(**values) -> str:
    with pytest.raises(ApiError) as e:
        check_decoding(values, LIMITS)
    assert e.value.status == 400
    return e.value.message


@pytest.mark.parametrize("flags", REFUSED, ids=lambda d: ",".join(f"{k}={v}" for k, v in d.items()))
def test_caption_and_serve_refuse_a_setting_with_one_message(flags):
    message = caption_error(**flags)
    assert message.startswith("--") and message.replace("--", "") == serve_error(**flags)
    # A form sends text: the same value spelt out is refused alike.
    assert serve_error(**{k: repr(v).replace("inf", "Infinity").replace("nan", "NaN") for k, v in flags.items()}) \
        == message.replace("--", "")


def test_complete_refuses_sampling_settings_as_caption_does():
    for flags in ({"temperature": float("inf")}, {"top_p": 0.0}, {"seed": -1}):
        with pytest.raises(UserError) as e:
            ExampleConfig(ckpt_dir="c", **flags)
        assert str(e.value) == caption_error(**flags)


def test_a_temperature_too_small_to_sample_is_refused_alike():
    """Below 0.001 sampling is greedy in all but name, and near 1e-38 logits / temperature overflow
    inside torch.multinomial: caption, complete and serve refuse it with one message."""
    says = "temperature must be 0 (greedy) or in [0.001, 100], got 1e-40"
    assert caption_error(temperature=1e-40) == "--" + says
    assert serve_error(temperature=1e-40) == says
    assert serve_error(temperature="1e-320") == says.replace("1e-40", "1e-320")
    with pytest.raises(UserError, match=re.escape("--" + says)):
        ExampleConfig(ckpt_dir="c", temperature=1e-40)
    for fine in (0.0, 0.001):
        InferenceConfig(**CAPTION, temperature=fine)


def test_the_messages_name_the_limits():
    assert caption_error(temperature=float("inf")) == "--temperature must be a finite number, got inf"
    assert caption_error(temperature=10 ** 400) == "--temperature 1000000000000000000000000000000000000... is too large for a number"
    assert caption_error(seed=2 ** 63) == "--seed 9223372036854775808 is too large: at most 9223372036854775807"
    # A whole number written as a float is that number, for flags as for request fields.
    assert InferenceConfig(**CAPTION, max_gen_len=12.0).max_gen_len == 12 == check_decoding({"max_gen_len": "12.0"}, LIMITS).max_gen_len
    assert caption_error(length_penalty=0.0) == "--length_penalty must be in (0, 10], got 0.0"
    assert caption_error(max_gen_len=0) == "--max_gen_len must be at least 1, got 0"
    # The server's flags lower two limits, and say so.
    assert serve_error(max_gen_len=31) == "max_gen_len must be between 1 and 30 (the server's --max_gen_len), got 31"
    assert serve_error(num_beams=5) == "num_beams must be between 1 and 4 (the server's --max_beams), got 5"
    assert serve_error(max_gen_len=2.5) == "max_gen_len must be a whole number, got 2.5"
    assert serve_error(temperature="warm") == 'temperature must be a number, got "warm"'


def test_caption_refuses_a_temperature_no_float_holds_on_its_command_line(tmp_path):
    """fire reads 1e999 as inf: refused before anything is read or written, as the server refuses it."""
    for flag, value, says in (("--temperature", "1e999", "--temperature must be a finite number, got inf"),
                              ("--length_penalty", 0, "--length_penalty must be in (0, 10], got 0.0")):
        proc = run_cli(captioning_inference.main, "--ckpt_dir", tmp_path / "none", "--checkpoint", tmp_path / "none",
                       "--images", tmp_path, "--out", tmp_path / "r.json", flag, value)
        assert proc.returncode == 2 and proc.stderr.strip().splitlines()[-1] == f"error: {says}", proc.stderr
    assert list(tmp_path.iterdir()) == []


def test_every_setting_is_a_caption_flag_a_request_field_and_a_complete_flag():
    names = set(Decoding.names())
    assert names <= {f.name for f in dataclasses.fields(InferenceConfig)}
    assert names <= set(CaptionRequest.model_json_schema()["properties"])
    assert names - {f.name for f in dataclasses.fields(ExampleConfig)} == {"num_beams", "length_penalty"}
    defaults = InferenceConfig(**CAPTION).decoding()
    assert defaults == Decoding() and ExampleConfig(ckpt_dir="c").temperature == 0.8
    assert check_decoding({}, LIMITS) == Decoding(max_gen_len=30)


def opened(decoder="static") -> OpenedCaptioner:
    return OpenedCaptioner(None, None, None, torch.float32, decoder, "ckpt", {"checkpoint": "sha256:x"})


def test_results_files_record_what_they_always_recorded():
    """The `decoding` of RESULTS.run.json as inference.py wrote it before Decoding: a rerun of the
    same settings must find the same dict, or it would refuse to continue old results."""
    old = [
        (Decoding(), "static", False,
         {"max_gen_len": 30, "num_beams": 1, "temperature": 0.0, "control_shuffle": False, "dtype": "float32",
          "decoder": "static"}),
        (Decoding(max_gen_len=12, num_beams=3, length_penalty=0.5), "eager", False,
         {"max_gen_len": 12, "num_beams": 3, "temperature": 0.0, "control_shuffle": False, "dtype": "float32",
          "length_penalty": 0.5}),
        (Decoding(temperature=0.7, top_p=0.9, seed=3), "eager", True,
         {"max_gen_len": 30, "num_beams": 1, "temperature": 0.7, "control_shuffle": True, "dtype": "float32",
          "top_p": 0.9, "seed": 3}),
    ]
    for decoding, decoder, control, recorded in old:
        assert opened(decoder).decoding_record(decoding, control) == recorded
    made = opened().provenance(Decoding(), {"images": ["x"]})
    assert list(made) == ["checkpoint", "decoding", "selection"] and made["selection"] == {"images": ["x"]}


def test_one_seed_rule_for_every_rank():
    d = Decoding(temperature=1.0, seed=5)
    probs = torch.softmax(torch.randn(4, 50, generator=torch.Generator().manual_seed(0)), -1)
    for rank in (0, 2):
        want = torch.multinomial(probs, 1, generator=torch.Generator().manual_seed(5 + rank))
        assert torch.equal(torch.multinomial(probs, 1, generator=d.generator(rank, "cpu")), want)
    assert Decoding(seed=5).generator(0, "cpu") is None  # greedy draws nothing


def test_requests_share_a_batch_when_their_captions_depend_on_the_same_settings():
    greedy = share_key(Decoding(max_gen_len=20, seed=4, top_p=0.5), 1)
    assert greedy == share_key(Decoding(max_gen_len=20), 2) != share_key(Decoding(max_gen_len=21), 3)
    beams = share_key(Decoding(num_beams=2, length_penalty=0.5), 1)
    assert beams == share_key(Decoding(num_beams=2, length_penalty=0.5, seed=9), 2) != share_key(Decoding(num_beams=2), 3)
    assert share_key(Decoding(temperature=1.0), 1) != share_key(Decoding(temperature=1.0), 2)


def test_the_old_name_of_the_captioner_spec_still_imports():
    from llama_caption.captioner import CaptionerConfig, CaptionerSpec

    assert CaptionerConfig is CaptionerSpec
