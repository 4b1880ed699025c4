"""The one command line, the package boundaries, and one LLaMA open per command."""

import ast
import contextlib
import io
import json
import os
import shutil
import sys

import pytest
import torch

from conftest import REPO
import captioning_inference
import captioning_training
import example
from conftest import REPO, run_cli
from llama_caption import __main__ as cli
from llama_caption.llama import checkpoint, huggingface, sources
from llama_caption.llama.checkpoint import open_checkpoint
from llama_caption.llama.meta import load_shard
from llama_caption.tools.testing import write_hf_checkpoint

PACKAGE = os.path.join(REPO, "llama_caption")
# What the language model may use besides itself: the shared plumbing, nothing of images or captions.
PLUMBING = {"llama_caption.errors", "llama_caption.config", "llama_caption.distributed", "llama_caption.fileio",
            "llama_caption.runtime"}


def capture(fn, *args):
    out, err = io.StringIO(), io.StringIO()
    code = 0
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            fn(*args)
        except SystemExit as e:
            code = e.code if isinstance(e.code, int) else 1
    return code, out.getvalue(), err.getvalue()


def test_help_lists_every_command_and_each_one_runs(monkeypatch):
    code, out, _ = capture(cli.main, ["--help"])
    assert code == 0
    listed = [line.split()[0] for line in out.splitlines() if line.startswith("  ")]
    assert listed == list(cli.COMMANDS)
    for name in ("train", "caption", "complete", "features", "evaluate", "convert", "reshard", "bench", "bench-load", "demo"):
        assert name in listed
    for name in cli.COMMANDS:  # every entry point imports and shows its flags
        code, out, err = capture(cli.main, [name, "--help"])
        assert code == 0 and f"    {name} - " in out and "--help" not in out.split("NAME")[1], name
        assert err == "", name  # help goes to stdout, where | less and | grep read it
    code, _, err = capture(cli.main, ["trian"])
    assert code == 2 and err.startswith("error: unknown command 'trian'") and len(err.strip().splitlines()) == 1


def test_an_old_module_form_says_the_new_one_once_and_runs_it(assets, tmp_path, monkeypatch):
    monkeypatch.setattr(sys, "argv", ["reshard.py", "--ckpt_dir", assets["tiny"], "--mp", "3", "--out", str(tmp_path / "x")])
    code, _, err = capture(cli.alias, "reshard", "reshard")
    assert err.count("note: python -m llama_caption.reshard is now python -m llama_caption reshard") == 1
    assert code == 2 and "--mp 3 must divide n_heads 4" in err  # the command itself ran


def imports_of(path: str, module: str):
    """The llama_caption modules a file imports (relative imports resolved)."""
    tree = ast.parse(open(path).read())
    package = module.split(".") if path.endswith("__init__.py") else module.split(".")[:-1]
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            base = package[: len(package) - node.level + 1] if node.level else []
            target = ".".join(base + ([node.module] if node.module else []))
            if node.module is None or not node.level:
                yield from (f"{target}.{a.name}" if node.level else target for a in node.names)
            else:
                yield target
        elif isinstance(node, ast.Import):
            yield from (a.name for a in node.names)


def module_file(name: str):
    rel = name.split(".")[1:]
    for candidate in (os.path.join(PACKAGE, *rel) + ".py", os.path.join(PACKAGE, *rel, "__init__.py")):
        if os.path.isfile(candidate):
            return candidate
    return None


def test_the_llama_package_reaches_nothing_of_the_captioner():
    """Everything llama_caption/llama/ imports, directly or through what it imports, is the
    language model itself or the shared plumbing."""
    todo = [f"llama_caption.llama.{f[:-3]}" for f in os.listdir(os.path.join(PACKAGE, "llama")) if f.endswith(".py")]
    seen = set()
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        seen.add(name)
        path = module_file(name)
        if path is None:
            continue  # a name imported from a module, not a module
        for dep in imports_of(path, name):
            if dep.startswith("llama_caption"):
                todo.append(dep)
    ours = {m for m in seen if module_file(m)}
    assert "llama_caption.llama.model" in ours and "llama_caption.llama.checkpoint" in ours
    outside = sorted(m for m in ours if not m.startswith("llama_caption.llama") and m not in PLUMBING | {"llama_caption"})
    assert outside == []


class Opens:
    """Counts how often a LLaMA folder is read: the checkpoint opened, its config parsed, its
    files listed, its shards mapped."""

    def __init__(self, monkeypatch):
        self.counts = {}
        for module, name in ((checkpoint, "open_checkpoint"), (checkpoint, "read_params"), (checkpoint, "list_shards"),
                             (huggingface, "read_config"), (huggingface, "weight_files"),
                             (sources, "weight_files"), (sources, "load_shard")):
            monkeypatch.setattr(module, name, self.counting(name, getattr(module, name)))

    def counting(self, name, fn):
        def wrapped(*args, **kwargs):
            self.counts[name] = self.counts.get(name, 0) + 1
            return fn(*args, **kwargs)

        return wrapped

    def take(self):
        counts, self.counts = self.counts, {}
        return counts


@pytest.fixture(scope="module")
def hf_standin(cap, tmp_path_factory):
    """The stand-in LLaMA as a Hugging Face folder in two safetensors shards."""
    meta = cap["ckpt_dir"]
    sd = load_shard(os.path.join(meta, "consolidated.00.pth"))
    args = open_checkpoint(meta).args
    args = type(args)(**dict(vars(args), vocab_size=sd["tok_embeddings.weight"].shape[0], max_seq_len=2048))
    hf = str(tmp_path_factory.mktemp("hf") / "hf")
    write_hf_checkpoint(hf, args, dict(sd), dtype=torch.float32, max_shard_bytes=60_000)
    shutil.copy(cap["tokenizer"], os.path.join(hf, "tokenizer.model"))
    return hf


@pytest.mark.parametrize("fmt", ["meta", "hugging face"])
def test_each_command_opens_its_llama_once(cap, hf_standin, tmp_path, monkeypatch, process_group, fmt):
    ckpt_dir = cap["ckpt_dir"] if fmt == "meta" else hf_standin
    opens = Opens(monkeypatch)
    once = ({"open_checkpoint": 1, "read_params": 1, "list_shards": 1, "load_shard": 1} if fmt == "meta" else
            {"open_checkpoint": 1, "read_config": 1, "weight_files": 1})
    run = tmp_path / "run"
    common = ["--ckpt_dir", ckpt_dir, "--tokenizer_path", cap["tokenizer"]]
    proc = run_cli(captioning_training.main, *common, "--clip_model", cap["clip"], "--train_images", cap["images"],
                   "--train_annotations", cap["few"], "--out_dir", run, "--num_workers", 0, "--epochs", 1,
                   "--batch_size", 4)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert opens.take() == once
    proc = run_cli(captioning_inference.main, *common, "--checkpoint", run, "--images", cap["val_images"],
                   "--annotations", cap["val_ann"], "--evaluate", False, "--out", tmp_path / "r.json",
                   "--num_workers", 0, "--max_gen_len", 6)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert len(json.load(open(tmp_path / "r.json"))) == 3
    assert opens.take() == once
    proc = run_cli(example.main, *common, "--max_seq_len", 32, "--max_gen_len", 4, "--prompts", '["a red"]')
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert opens.take() == once


def test_any_exception_of_a_rank_reaches_torchruns_error_file(tmp_path, monkeypatch):
    """torchrun names a rank's error file in TORCHELASTIC_ERROR_FILE; a crash that is not bad
    input is written there too, so the launcher's report ends in its cause, not <N/A>."""
    from llama_caption import evaluation

    def crash(cfg):
        raise RuntimeError("the scorer fell over")

    error_file = tmp_path / "error.json"
    monkeypatch.setenv("TORCHELASTIC_ERROR_FILE", str(error_file))
    monkeypatch.setattr(evaluation, "main", evaluation.command(evaluation.EvaluationConfig, crash, "Crash."))
    with pytest.raises(RuntimeError, match="the scorer fell over"):
        cli.run("evaluate", ["--annotations", "a.json", "--results", "r.json"])
    assert "RuntimeError: the scorer fell over" in json.load(open(error_file))["message"]["message"]


def test_precompile_writes_the_bytecode_that_imports_skipped(tmp_path, monkeypatch):
    """Where PYTHONDONTWRITEBYTECODE is set, an import leaves no bytecode behind; the install step
    (tools/precompile) writes it for the imported modules, once."""
    import importlib
    import importlib.util

    from llama_caption.tools.precompile import write_bytecode

    (tmp_path / "freshmod.py").write_text("VALUE = 41 + 1\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setattr(sys, "dont_write_bytecode", True)
    module = importlib.import_module("freshmod")
    cached = importlib.util.cache_from_source(module.__file__)
    assert module.VALUE == 42 and not os.path.exists(cached)
    assert write_bytecode([module, sys]) == 1 and os.path.isfile(cached)  # sys: no source, skipped
    assert write_bytecode([module]) == 0
    sys.modules.pop("freshmod")


@pytest.mark.slow
@pytest.mark.parametrize("args", [["--help"], ["caption", "--help"]])
def test_help_read_by_a_reader_that_stops_early_is_not_an_error(args):
    """`python -m llama_caption ... --help | head -1`: no BrokenPipeError, exit 0."""
    import subprocess

    proc = subprocess.Popen([sys.executable, "-m", "llama_caption", *args], cwd=REPO, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, env=dict(os.environ, PYTHONPATH=REPO))
    proc.stdout.close()  # before the command writes: as `head` does once it has its lines
    err = proc.stderr.read().decode()
    assert proc.wait(timeout=120) == 0 and err == "", err


def test_every_numeric_flag_of_every_command_refuses_numbers_no_setting_takes():
    """Infinite, NaN and 400-digit values, for every int and float flag of every command: one
    UserError naming the flag, from the one check they all pass through (config.number)."""
    import dataclasses
    import importlib
    import typing

    from llama_caption.__main__ import COMMANDS
    from llama_caption.config import _plain_type
    from llama_caption.errors import UserError

    checked = 0
    for name, (module, attr, _) in COMMANDS.items():
        cls = getattr(importlib.import_module(module), attr).config
        hints = typing.get_type_hints(cls)
        required = {f.name: "x" for f in dataclasses.fields(cls) if f.default is dataclasses.MISSING and f.init}
        for f in dataclasses.fields(cls):
            kind, _ = _plain_type(hints[f.name])
            listed = typing.get_args(kind) == (int,)  # a list of whole numbers: each item is checked alike
            if not (kind in (int, float) or listed) or not f.init:
                continue
            values = (float("inf"), float("nan"), -10 ** 400) + ((2 ** 63, 2.5) if kind is not float else ())
            for value in ([[v] for v in values] if listed else values):
                with pytest.raises(UserError) as e:
                    cls(**dict(required, **{f.name: value}))
                assert str(e.value).startswith(f"--{f.name} ") and "\n" not in str(e.value), (name, f.name, e.value)
                checked += 1
    assert checked > 200  # every command's numbers were reached


def test_finite_numbers_beyond_a_settings_range_are_refused_where_it_is_read():
    from llama_caption.errors import UserError
    from llama_caption.training import TrainConfig

    base = dict(ckpt_dir="c", tokenizer_path="t", clip_model="m", train_images="i", train_annotations="a", out_dir="o")
    for flags, says in ((dict(lr=5.0), "--lr must be above 0 and at most 1"), (dict(lr=0.0), "--lr must be above 0"),
                        (dict(weight_decay=1e300), "--weight_decay must be at most 10")):
        with pytest.raises(UserError, match=says):
            TrainConfig(**base, **flags)


def test_a_clip_layer_with_pooled_features_is_refused_not_ignored():
    from llama_caption.errors import UserError
    from llama_caption.features import FeaturesConfig

    with pytest.raises(UserError, match=r"--clip_layer 5 is for --feature_kind patch"):
        FeaturesConfig(clip_model="m", images="i", out="o", clip_layer=5)
    assert FeaturesConfig(clip_model="m", images="i", out="o", clip_layer=5, feature_kind="patch").clip_layer == 5


def test_ctrl_c_ends_a_command_with_one_line_and_status_130(capsys):
    from dataclasses import dataclass

    from llama_caption.config import Config, command, setting

    @dataclass
    class Tiny(Config):
        n: int = setting(1, "a number")

    def run(cfg):
        raise KeyboardInterrupt

    main = command(Tiny, run, "A command.", interrupted="the rows written so far are kept")
    with pytest.raises(SystemExit) as e:
        main(n=2)
    err = capsys.readouterr().err
    assert e.value.code == 130 and err.strip() == "interrupted (Ctrl-C): the rows written so far are kept"
    assert "Traceback" not in err


def test_list_flags_of_whole_numbers_pass_the_one_number_check():
    from llama_caption.errors import UserError
    from llama_caption.tools.loadtest import LoadTestConfig

    base = dict(url="http://127.0.0.1:9", images="i")
    assert LoadTestConfig(**base, concurrency=[8.0, 2]).concurrency == [8, 2]
    for bad, says in (([10 ** 400], "is too large"), ([float("nan")], "must be a whole number"), ([2.5], "whole number")):
        with pytest.raises(UserError, match=says) as e:
            LoadTestConfig(**base, concurrency=bad)
        assert len(str(e.value)) < 120  # a 400-digit number is cut


def test_an_encoder_file_is_recorded_by_its_absolute_path(tmp_path, monkeypatch):
    """A checkpoint records the CLIP file it was trained with; a relative path would be read from
    whatever folder `caption` runs in. One that is not there is one line naming --clip_model."""
    from types import SimpleNamespace

    from llama_caption.errors import UserError
    from llama_caption.opening import moved_encoder
    from llama_caption.vision import EncoderSpec

    (tmp_path / "clip.pt").write_bytes(b"weights")
    monkeypatch.chdir(tmp_path)
    spec = EncoderSpec.of("clip.pt")
    assert spec.clip_model == str(tmp_path / "clip.pt") and spec.identity.startswith("sha256:")
    settings = SimpleNamespace(clip_model=None, clip_pretrained=None, checkpoint="run")
    assert moved_encoder(spec, settings, "run") is spec
    monkeypatch.chdir("/")
    old = EncoderSpec("clip.pt", spec.identity, "pooled", None, None)  # as checkpoints recorded it before
    with pytest.raises(UserError, match=r"trained with the CLIP file clip.pt, which is not there .* --clip_model"):
        moved_encoder(old, settings, "run")


def test_a_feature_cache_recorded_with_a_relative_clip_path_is_still_the_same_cache(tmp_path, monkeypatch):
    """Caches written before encoder files were recorded by absolute path hold the path as given:
    the same file, now absolute, continues them; another file is still refused."""
    import json

    from llama_caption.errors import UserError
    from llama_caption.features import SETTINGS, claim

    monkeypatch.chdir(tmp_path)
    (tmp_path / "cache").mkdir()
    settings = {"clip_model": str(tmp_path / "clip.pt"), "split": "train"}
    (tmp_path / "cache" / SETTINGS).write_text(json.dumps(dict(settings, clip_model="clip.pt")))
    claim(str(tmp_path / "cache"), settings, False)
    with pytest.raises(UserError, match=r"clip_model: 'clip.pt' -> '/.*other.pt'"):
        claim(str(tmp_path / "cache"), dict(settings, clip_model=str(tmp_path / "other.pt")), False)


def test_the_short_flags_help_offers_are_taken():
    """fire's --help lists -o for --out where no other flag starts with o: the command takes it."""
    from dataclasses import dataclass

    from llama_caption.config import Config, command, setting

    @dataclass
    class Tiny(Config):
        out: str = setting("a", "where")
        num: int = setting(1, "how many")
        name: str = setting("x", "what")

    got = []
    main = command(Tiny, got.append, "A command.")
    main(o="b")
    assert got[-1].out == "b"
    import fire

    fire.Fire(main, command=["-o", "c", "--num", "2"])  # fire fills the other flags in by place
    assert (got[-1].out, got[-1].num) == ("c", 2)
    with pytest.raises(SystemExit):  # n is the first letter of two flags: not a short flag
        main(n=3)
