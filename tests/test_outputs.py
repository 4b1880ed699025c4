"""Nothing lost, nothing stale: what each command does with outputs that already exist, and the
one-line errors for bad input (checked before any work starts)."""

import hashlib
import json
import os
import re
import shutil

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

import example
from conftest import run_cli, run_python, torchrun
from llama_caption import evaluation, features
from llama_caption.config import command
from llama_caption.errors import UserError
from llama_caption.evaluation import EvaluationConfig, evaluate
from llama_caption.features import FeaturesConfig, extract
from llama_caption.inference import InferenceConfig, run
from llama_caption.runs import find_checkpoint, save_checkpoint
from llama_caption.training import TrainConfig, train


def tree_digest(folder):
    """SHA-256 of every file under `folder` (names and contents)."""
    h = hashlib.sha256()
    for root, _, files in sorted(os.walk(folder)):
        for f in sorted(files):
            p = os.path.join(root, f)
            h.update(os.path.relpath(p, folder).encode())
            h.update(open(p, "rb").read())
    return h.hexdigest()


def infer(cap, trained, out, **kw):
    args = dict(ckpt_dir=cap["ckpt_dir"], tokenizer_path=cap["tokenizer"], checkpoint=trained,
                images=[cap["val_images"]], annotations=cap["val_ann"], out=str(out), num_workers=0, evaluate=False)
    args.update(kw)
    return run(InferenceConfig(**args))


def other_checkpoint(trained, tmp_path):
    """The trained projection with its weights nudged: another checkpoint of the same shape."""
    src = find_checkpoint(trained)
    dst = tmp_path / "other_ckpt"
    shutil.copytree(src, dst)
    path = dst / "projection.safetensors"
    with safe_open(str(path), "pt") as f:
        meta, weights = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}
    save_file({k: v + 0.05 for k, v in weights.items()}, str(path), metadata=meta)
    return str(dst)


def test_inference_rerun_matrix(cap, trained, process_group, tmp_path, capsys):
    out = tmp_path / "res.json"
    first = infer(cap, trained, out)["results"]
    run_json = json.load(open(tmp_path / "res.run.json"))
    assert run_json["decoding"]["num_beams"] == 1 and run_json["selection"]["annotations"] == cap["val_ann"]
    kept = out.read_bytes()
    # Same settings: resumes, nothing is captioned again.
    capsys.readouterr()
    again = infer(cap, trained, out)
    assert again["results"] == first and "3 already captioned" in capsys.readouterr().err
    # Other decoding, another checkpoint, another image selection: refused, the file untouched.
    other = other_checkpoint(trained, tmp_path)
    for kw, what in ((dict(num_beams=3), "decoding.num_beams"), (dict(checkpoint=other), "checkpoint"),
                     (dict(num_images=2), "selection.num_images"), (dict(max_gen_len=5), "decoding.max_gen_len")):
        with pytest.raises(UserError, match="other settings") as e:
            infer(cap, trained, out, **kw)
        assert what in str(e.value) and "--overwrite" in str(e.value)
        assert out.read_bytes() == kept
    # Own files into a results file of a COCO split: refused too.
    with pytest.raises(UserError, match="selection"):
        infer(cap, trained, out, annotations=None, images=[cap["images"]])
    assert out.read_bytes() == kept
    # An explicit overwrite recomputes, and records what made the new captions.
    shorter = infer(cap, trained, out, max_gen_len=2, overwrite=True)["results"]
    assert json.load(open(tmp_path / "res.run.json"))["decoding"]["max_gen_len"] == 2
    assert [len(r["caption"].split()) for r in shorter] != [len(r["caption"].split()) for r in first]
    assert json.load(open(out)) == shorter


def test_two_results_files_in_one_folder_keep_their_own_metrics(cap, trained, process_group, tmp_path, monkeypatch):
    # What is checked is where the scores go, not the scorers (tested against pycocoevalcap elsewhere):
    # a stand-in score, the mean caption length, spares two Java start-ups.
    monkeypatch.setattr(evaluation, "score_all", lambda refs, res, spice, log, domains: evaluation.Scores(
        {"length": sum(len(r["caption"]) for r in res) / len(res)}, len(res)))
    a = infer(cap, trained, tmp_path / "greedy.json", evaluate=True)
    b = infer(cap, trained, tmp_path / "short.json", evaluate=True, max_gen_len=2)
    ma, mb = json.load(open(tmp_path / "greedy.metrics.json")), json.load(open(tmp_path / "short.metrics.json"))
    assert ma["results"] == str(tmp_path / "greedy.json") and mb["results"] == str(tmp_path / "short.json")
    assert ma["metrics"] == a["metrics"] and mb["metrics"] == b["metrics"] and ma["metrics"] != mb["metrics"]
    assert ma["images"] == 3 and ma["results_sha256"] == hashlib.sha256(open(tmp_path / "greedy.json", "rb").read()).hexdigest()


def test_output_paths_and_generation_length_are_checked_before_any_work(cap, trained, process_group, tmp_path):
    (tmp_path / "folder.json").mkdir()
    with pytest.raises(UserError, match="is a folder"):
        infer(cap, trained, tmp_path / "folder.json")
    (tmp_path / "afile").write_text("x")
    with pytest.raises(UserError, match="is a file, not a folder"):
        infer(cap, trained, tmp_path / "afile" / "res.json")
    # The KV cache would need 100,000 positions: refused against the LLaMA's 2048, before loading.
    with pytest.raises(UserError, match="--max_gen_len 100000.*more than the 2048"):
        infer(cap, trained, tmp_path / "long.json", max_gen_len=100000)
    assert sorted(os.listdir(tmp_path)) == ["afile", "folder.json"]  # nothing written anywhere


def test_nothing_captioned_is_an_error(cap, trained, process_group, tmp_path):
    folder = tmp_path / "broken"
    folder.mkdir()
    (folder / "a.jpg").write_bytes(b"\xff\xd8\xff not a jpeg")
    (folder / "b.png").write_text("not a png")
    with pytest.raises(UserError, match="none of the 2 image"):
        infer(cap, trained, tmp_path / "r.json", images=[str(folder)], annotations=None)
    assert not (tmp_path / "r.json").exists()


def test_a_fresh_training_run_never_replaces_a_run(cap, trained, process_group, tmp_path):
    run_dir = tmp_path / "run"
    shutil.copytree(trained, run_dir)
    before = tree_digest(run_dir)
    flags = dict(ckpt_dir=cap["ckpt_dir"], tokenizer_path=cap["tokenizer"], clip_model=cap["clip"],
                 train_images=cap["images"], train_annotations=cap["ann"], out_dir=str(run_dir), num_workers=0,
                 epochs=20, batch_size=4, warmup_steps=5, lr=3e-3)
    with pytest.raises(UserError, match="already holds a run at step-.*--resume"):
        train(TrainConfig(**flags))
    assert tree_digest(run_dir) == before
    # Still resumable: the finished run resumes at its last step and trains nothing more.
    done = train(TrainConfig(**flags, resume=True))
    assert done["step"] == int(open(run_dir / "checkpoints" / "latest").read().strip().split("-")[1])
    # A caption window beyond the LLaMA's context is refused before loading.
    with pytest.raises(UserError, match="--max_caption_len 5000"):
        train(TrainConfig(**dict(flags, out_dir=str(tmp_path / "new"), max_caption_len=5000)))


def test_keep_last_never_deletes_the_latest_checkpoint(tmp_path):
    root = tmp_path / "checkpoints"
    for step in (100, 200):
        (root / f"step-{step:07d}").mkdir(parents=True)
    w = {"net.0.weight": torch.zeros(2, 2)}
    from llama_caption.captioner import CaptionerSpec, CaptionStyle
    from llama_caption.vision import EncoderSpec

    spec = CaptionerSpec.build(EncoderSpec("m", "m"), (2,), "linear", 1, None, 2, CaptionStyle())
    opt = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))])
    save_checkpoint(str(tmp_path), 5, w, spec, {}, opt.state_dict(), {"epoch": 0}, keep_last=2)
    assert sorted(os.listdir(root)) == ["latest", "step-0000005", "step-0000200"]
    assert find_checkpoint(str(tmp_path)) == str(root / "step-0000005")


@pytest.mark.slow
def test_annotations_with_empty_or_odd_captions(cap, process_group, tmp_path):
    data = json.load(open(cap["val_ann"]))
    ids = [im["id"] for im in data["images"]]
    anns = [a for a in data["annotations"] if a["image_id"] != ids[2]]  # the third image: no references
    anns[0] = dict(anns[0], caption="")
    anns[1] = dict(anns[1], caption=7)
    bad = tmp_path / "ann.json"
    json.dump(dict(data, annotations=anns), open(bad, "w"))
    res = tmp_path / "res.json"
    json.dump([{"image_id": i, "caption": "a red circle on a blue background"} for i in ids], open(res, "w"))
    metrics = evaluate(EvaluationConfig(annotations=str(bad), results=str(res)))
    assert 0 < metrics["CIDEr"]
    record = json.load(open(tmp_path / "res.metrics.json"))
    assert record["images"] == 2 and record["metrics"] == metrics
    json.dump(dict(data, images=[dict(data["images"][0], id="abc")] + data["images"][1:]), open(bad, "w"))
    with pytest.raises(UserError, match="image id 'abc' is not a whole number"):
        evaluate(EvaluationConfig(annotations=str(bad), results=str(res)))
    # Files that break COCO's invariants would give images captions that are not theirs: refused.
    broken = {
        "two images have id": dict(data, images=data["images"] + [dict(data["images"][0], file_name="x.png")]),
        "two images have file_name": dict(data, images=data["images"] + [dict(data["images"][0], id=999)]),
        "two annotations have id": dict(data, annotations=data["annotations"] + [dict(data["annotations"][0])]),
        "names image_id 999, which is not an image": dict(data, annotations=data["annotations"] + [
            {"id": 10 ** 6, "image_id": 999, "caption": "a caption of no image"}]),
        "names image_id '1', which is not an image": dict(data, annotations=data["annotations"] + [
            {"id": 10 ** 6, "image_id": "1", "caption": "an id as text"}]),
    }
    for message, content in broken.items():
        json.dump(content, open(bad, "w"))
        with pytest.raises(UserError, match=message):
            evaluate(EvaluationConfig(annotations=str(bad), results=str(res)))
    # Training on captions that are all empty stops with a message.
    train_data = json.load(open(cap["ann"]))
    json.dump(dict(train_data, annotations=[dict(a, caption=" ") for a in train_data["annotations"]]), open(bad, "w"))
    with pytest.raises(UserError, match="no image with a usable caption"):
        train(TrainConfig(ckpt_dir=cap["ckpt_dir"], tokenizer_path=cap["tokenizer"], clip_model=cap["clip"],
                          train_images=cap["images"], train_annotations=str(bad), out_dir=str(tmp_path / "run"),
                          num_workers=0))


def test_unfinished_feature_cache_of_other_settings_is_refused(cap, process_group, tmp_path):
    out = tmp_path / "feats"
    flags = dict(clip_model=cap["clip"], images=cap["images"], annotations=cap["ann"], out=str(out), num_workers=0,
                 batch_size=2, chunk=1)
    extract(FeaturesConfig(**flags))
    os.remove(out / "meta.json")  # as if it had crashed before finishing
    before = tree_digest(out)
    with pytest.raises(UserError, match="other settings .*feature"):
        extract(FeaturesConfig(**dict(flags, feature_kind="patch")))
    with pytest.raises(UserError, match="other settings .*images"):
        extract(FeaturesConfig(**dict(flags, images=cap["val_images"], annotations=cap["val_ann"])))
    assert tree_digest(out) == before
    extract(FeaturesConfig(**flags))  # the same settings finish it
    assert (out / "meta.json").exists()


@pytest.mark.parametrize("cls, flags, message", [
    (TrainConfig, dict(num_workers=-1), "--num_workers must be at least 0"),
    (TrainConfig, dict(epochs="three"), "--epochs must be a whole number, got \"three\""),
    (TrainConfig, dict(lr="fast"), "--lr must be a number"),
    (InferenceConfig, dict(temperature=-0.5), "--temperature must be 0"),
    (InferenceConfig, dict(top_p=1.5), "--top_p must be in (0, 1]"),
    (InferenceConfig, dict(top_p=0), "--top_p must be in (0, 1]"),
    (FeaturesConfig, dict(batch_size=0), "--batch_size must be at least 1"),
    (TrainConfig, dict(projection="transformer", mapper_width=100), "--mapper_width 100 must be a multiple of 64"),
    (TrainConfig, dict(scst_samples=-1), "--scst_samples must be at least 1"),
    (TrainConfig, dict(model_parallel=-2), "--model_parallel must be at least 0"),
])
def test_bad_flags_are_refused_by_the_config(cls, flags, message):
    base = {"ckpt_dir": "c", "tokenizer_path": "t", "clip_model": "m", "train_images": "i", "out_dir": "o",
            "checkpoint": "k", "images": "i", "out": "o"}
    names = set(cls.__dataclass_fields__)
    with pytest.raises(UserError) as e:
        cls(**{k: v for k, v in base.items() if k in names}, **flags)
    assert message in str(e.value)


@pytest.mark.parametrize("cls, flags", [(FeaturesConfig, dict(clip_model="m", images="i", out="o")),
                                        (InferenceConfig, dict(ckpt_dir="c", checkpoint="k", images="i")),
                                        (EvaluationConfig, dict(results="r.json"))])
def test_references_are_one_kind_in_every_command_that_takes_them(cls, flags):
    """--annotations and --karpathy_split are one definition (data.SplitSettings), refused together alike."""
    with pytest.raises(UserError, match=re.escape("give the references as --annotations FILE or as --karpathy_split "
                                                  "FILE (with --split), one of the two")):
        cls(**flags, annotations="a.json", karpathy_split="k.json")


@pytest.mark.slow
def test_command_line_errors_are_one_line_and_last(cap, trained, tmp_path):
    # One line, exit status 2, no traceback: a value fire cannot type, a config check, an output path
    # (the last as a real `python script.py`, the others through the same fire command in-process).
    (tmp_path / "afile").write_text("a file, not a folder")
    procs = [run_cli(features.main, "--clip_model", cap["clip"], "--images", cap["images"], "--out", tmp_path / "f",
                     "--batch_size", "abc"),
             run_cli(example.main, "--ckpt_dir", cap["ckpt_dir"], "--tokenizer_path", cap["tokenizer"], "--prompts", "[]"),
             run_python("captioning_training.py", "--ckpt_dir", cap["ckpt_dir"], "--tokenizer_path", cap["tokenizer"],
                        "--clip_model", cap["clip"], "--train_images", cap["images"], "--out_dir", tmp_path / "afile")]
    for proc, what in zip(procs, ("--batch_size must be a whole number", "--prompts is an empty list", "is a file")):
        assert proc.returncode == 2, proc.stderr
        lines = proc.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: ") and what in lines[0], proc.stderr
    # Under torchrun the launcher's report ends with the same line, as the root cause.
    proc = torchrun(1, "captioning_inference.py", "--ckpt_dir", cap["ckpt_dir"], "--tokenizer_path", cap["tokenizer"],
                    "--checkpoint", trained, "--images", cap["val_images"], "--out", tmp_path, check=False)
    assert proc.returncode != 0
    last = [l for l in proc.stderr.strip().splitlines() if l.strip("=")][-1]
    assert last.strip().endswith(f"error: --out {tmp_path} is a folder: name a file, e.g. {tmp_path}/results.json")


def test_command_flags_and_help_come_from_the_config_fields():
    got = []
    main = command(TrainConfig, got.append, "Train.")
    assert "    epochs: passes over the training samples.\n" in main.__doc__
    main("a", "b", "c", "d", epochs=3)
    assert isinstance(got[0], TrainConfig) and got[0].epochs == 3 and got[0].lr == 1e-4
    assert got[0].tokenizer_path is None  # optional: the checkpoint's own tokenizer
    many = command(InferenceConfig, got.append, "Caption.", varargs="images")
    many("a", "b", "x.jpg", "y.jpg", "z/")
    assert got[1].images == ["x.jpg", "y.jpg", "z/"] and got[1].chosen_split == "test"


def test_flags_are_refused_before_any_work(cap, trained, tmp_path):
    """A misspelt flag, an empty output path or a number no seed takes: one line, exit 2, and
    nothing written (fire alone would run the command and complain about the flag after)."""
    import captioning_inference
    import captioning_training

    train_flags = ["--ckpt_dir", cap["ckpt_dir"], "--tokenizer_path", cap["tokenizer"], "--clip_model", cap["clip"],
                   "--train_images", cap["images"], "--train_annotations", cap["few"], "--num_workers", 0,
                   "--epochs", 1, "--batch_size", 2]
    cases = [
        (captioning_training.main, train_flags + ["--out_dir", tmp_path / "a", "--learning_rate", 1],
         "unknown flag --learning_rate (see --help)"),
        (captioning_training.main, train_flags + ["--out_dir", tmp_path / "b", "--epoch", 2],
         "unknown flag --epoch: did you mean --epochs?"),
        (captioning_training.main, train_flags + ["--out_dir", ""], "--out_dir is empty"),
        (captioning_training.main, train_flags + ["--out_dir", tmp_path / "c", "--seed", 10 ** 23], "--seed 1"),
        (captioning_inference.main, ["--ckpt_dir", cap["ckpt_dir"], "--checkpoint", trained, "--images",
                                     cap["val_images"], "--out", tmp_path / "d.json", "--beams", 3],
         "unknown flag --beams"),
        (captioning_inference.main, ["--ckpt_dir", cap["ckpt_dir"], "--checkpoint", trained, "--images",
                                     cap["val_images"], "--out", ""], "--out is empty"),
    ]
    before = sorted(os.listdir(os.getcwd()))
    for main, args, message in cases:
        proc = run_cli(main, *args)
        assert proc.returncode == 2 and message in proc.stderr, (message, proc.stderr[-500:])
        assert proc.stderr.strip().splitlines()[-1].startswith("error: ")
    assert os.listdir(tmp_path) == [] and sorted(os.listdir(os.getcwd())) == before


def test_captioning_refuses_a_llama_of_another_architecture(cap, trained, tmp_path):
    """The run's LLaMA architecture is recorded: a LLaMA of the same width but other layers is refused."""
    import captioning_inference
    from llama_caption.llama.model import ModelArgs
    from llama_caption.tools.testing import random_state_dict, write_meta_checkpoint

    deeper = {"dim": 64, "n_layers": 3, "n_heads": 4, "multiple_of": 32, "norm_eps": 1e-5}
    write_meta_checkpoint(str(tmp_path / "deeper"), deeper, random_state_dict(ModelArgs.from_params(deeper, vocab_size=96)))
    proc = run_cli(captioning_inference.main, "--ckpt_dir", tmp_path / "deeper", "--tokenizer_path", cap["tokenizer"],
                   "--checkpoint", trained, "--images", cap["val_images"], "--out", tmp_path / "r.json")
    assert proc.returncode == 2 and f"was trained with another LLaMA than the one in --ckpt_dir {tmp_path / 'deeper'} " \
        f"(layers 2 against 3)" in proc.stderr
    assert not list(tmp_path.glob("r.*"))


def test_a_refused_rerun_names_a_setting_left_at_its_default_as_such():
    """A results file records the decoder only when it is not eager: a rerun that differs there
    says so instead of printing null."""
    from llama_caption.results import first_difference

    old, new = {"decoding": {"decoder": "static", "dtype": "float32"}}, {"decoding": {"dtype": "float32"}}
    assert first_difference(old, new) == 'decoding.decoder: "static" -> (not recorded: the default)'
    assert first_difference(new, old) == 'decoding.decoder: (not recorded: the default) -> "static"'
    assert first_difference({"a": None}, {"a": 1}) == "a: null -> 1"
    assert first_difference(old, old) is None


def test_checkpoint_paths_are_found_or_named_plainly(tmp_path):
    """--checkpoint takes a run folder, a checkpoint folder or its projection file; a path that
    does not exist says so."""
    from llama_caption.errors import UserError
    from llama_caption.runs import find_checkpoint

    step = tmp_path / "run" / "checkpoints" / "step-0000003"
    step.mkdir(parents=True)
    (step / "projection.safetensors").write_bytes(b"")
    (tmp_path / "run" / "checkpoints" / "latest").write_text("step-0000003\n")
    assert find_checkpoint(str(tmp_path / "run")) == str(step)
    assert find_checkpoint(str(step)) == str(step)
    assert find_checkpoint(str(step / "projection.safetensors")) == str(step)
    with pytest.raises(UserError, match="does not exist"):
        find_checkpoint(str(tmp_path / "nowhere"))
    with pytest.raises(UserError, match="no checkpoint there"):
        find_checkpoint(str(tmp_path))


def test_split_goes_only_with_a_karpathy_file():
    """--split picks a split of a Karpathy file; beside a captions JSON it would be ignored, so it
    is refused, by every command that takes the split flags alike."""
    from llama_caption.errors import UserError
    from llama_caption.evaluation import EvaluationConfig
    from llama_caption.features import FeaturesConfig

    says = "--split val picks a split of a --karpathy_split file"
    for make in (lambda **k: InferenceConfig(ckpt_dir="c", checkpoint="k", images=["i"], **k),
                 lambda **k: EvaluationConfig(results=["r.json"], **k),
                 lambda **k: FeaturesConfig(clip_model="ViT-B/32", out="o", images="i", **k)):
        with pytest.raises(UserError, match=says):
            make(annotations="a.json", split="val")
        assert make(karpathy_split="k.json", split="val").chosen_split == "val"
    assert InferenceConfig(ckpt_dir="c", checkpoint="k", images=["i"], karpathy_split="k.json").chosen_split == "test"
    assert FeaturesConfig(clip_model="ViT-B/32", out="o", images="i", karpathy_split="k.json").chosen_split == "train"


def test_an_output_where_no_file_can_be_made_is_refused_though_access_says_yes(tmp_path, monkeypatch):
    """Root is told yes by os.access for a read-only file system or /proc; the check makes a file."""
    from llama_caption.fileio import check_output_dir, check_output_file

    check_output_file(str(tmp_path / "new" / "results.json"), "--out")  # a folder that can be made: fine
    assert not (tmp_path / "new").exists() and os.listdir(tmp_path) == []  # nothing left behind
    with pytest.raises(UserError, match=r"^--out /proc/nope: /proc is not writable: pick another path$"):
        check_output_file("/proc/nope/x.json", "--out")
    monkeypatch.setattr(os, "access", lambda *a, **k: True)
    read_only = tmp_path / "ro"
    read_only.mkdir()
    monkeypatch.setattr("tempfile.TemporaryFile", lambda **k: (_ for _ in ()).throw(OSError(30, "Read-only file system")))
    with pytest.raises(UserError, match="is not writable"):
        check_output_dir(str(read_only / "run"), "--out_dir")
