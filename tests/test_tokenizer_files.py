"""Llama 3's tiktoken tokenizer.model told apart from a sentencepiece one, and every malformed
tiktoken file refused with one line that names the file, the line and what is wrong."""

import base64

import pytest

from conftest import run_cli
from llama_caption.errors import UserError
from llama_caption.llama.tokenizer import load_tokenizer, read_tiktoken_ranks


def b64(token: bytes) -> str:
    return base64.b64encode(token).decode()


BYTES = [f"{b64(bytes([i]))} {i}" for i in range(256)]  # lines 1..256: the single bytes
MERGES = [f"{b64(t)} {256 + i}" for i, t in enumerate([b"ca", b"cat", b" c", b" cat"])]  # lines 257..260
GOOD = BYTES + MERGES
BYTE_2, BYTE_6 = b64(bytes([2])), b64(bytes([6]))


def write(tmp_path, lines, newline="\n"):
    path = tmp_path / "tokenizer.model"
    path.write_bytes("".join(line + newline for line in lines).encode())
    return str(path)


def replaced(index: int, line: str):
    return GOOD[:index] + [line] + GOOD[index + 1:]


def test_a_tiktoken_file_loads_with_its_ranks_and_encodes_with_its_merges(tmp_path):
    tok = load_tokenizer(write(tmp_path, GOOD))
    assert tok.kind.startswith("tiktoken") and tok.n_words == 260 + 256
    assert tok.encode(" cat", bos=False, eos=False) == [259]  # ca, then cat, then " cat"
    assert tok.encode("a cat", bos=True, eos=False) == [tok.bos_id, ord("a"), 259] and tok.bos_id == 260
    assert tok.decode([ord("a"), 259]) == "a cat"
    # Windows line ends and blank lines read the same.
    ranks = read_tiktoken_ranks(write(tmp_path, GOOD[:100] + ["", "  "] + GOOD[100:], newline="\r\n"))
    assert ranks == {base64.b64decode(line.split()[0]): int(line.split()[1]) for line in GOOD}


def test_a_sentencepiece_model_is_still_read_by_sentencepiece(assets):
    assert read_tiktoken_ranks(assets["tokenizer"]) is None
    tok = load_tokenizer(assets["tokenizer"])
    assert tok.kind == "sentencepiece" and tok.n_words == assets["vocab"]


def test_a_binary_file_that_is_no_tokenizer_is_reported_by_sentencepiece(tmp_path):
    path = tmp_path / "tokenizer.model"
    path.write_bytes(b"\x00\x01 not a model \xff" * 10)
    with pytest.raises(UserError, match="is not a sentencepiece model"):
        load_tokenizer(str(path))


@pytest.mark.parametrize("lines, line_no, what", [
    (replaced(4, "not+base64! 4"), 5, "'not+base64!' is not base64"),
    (replaced(4, "QQ=x 4"), 5, "'QQ=x' is not base64"),
    (replaced(2, BYTE_2), 3, "a token without its rank"),
    (replaced(6, f"{BYTE_6} 6 extra"), 7, "3 columns, not 2"),
    (replaced(6, f"{BYTE_6} -6"), 7, "rank '-6' is not a whole number"),
    (GOOD + [f"{b64(b'ca')} 260"], 261, "token 'Y2E=' (b'ca') already appears on line 257"),
    (GOOD + [f"{b64(b'dog')} 5"], 261, "rank 5 already appears on line 6"),
    (replaced(259, f"{b64(b' cat')} 300"), 260, "rank 300 is out of range: the 260 ranks must be 0..259 (rank 259 is missing)"),
    (GOOD[1:], 259, "rank 259 is out of range: the 259 ranks must be 0..258 (rank 0 is missing)"),
    (GOOD[:10] + ["", ""] + [f"{b64(b'x')} {'9' * 3}"], 13, "rank 999 is out of range"),  # blank lines counted
])
def test_a_malformed_tiktoken_file_is_one_line_naming_the_file_and_line(tmp_path, lines, line_no, what):
    path = write(tmp_path, lines)
    with pytest.raises(UserError) as e:
        load_tokenizer(path)
    message = str(e.value)
    assert message.startswith(f"tokenizer {path} line {line_no}: {what}"), message
    assert "\n" not in message and "sentencepiece" not in message


@pytest.mark.parametrize("lines", [[], ["", "   ", "\t"]])
def test_an_empty_tokenizer_file_says_so(tmp_path, lines):
    path = write(tmp_path, lines)
    with pytest.raises(UserError, match=f"^tokenizer {path} is empty: no `BASE64TOKEN RANK` line"):
        load_tokenizer(path)


def test_a_missing_single_byte_is_refused_before_tiktoken_panics_on_it(tmp_path):
    kept = [bytes([i]) for i in range(256) if i != 0x41] + [b"ca"]
    path = write(tmp_path, [f"{b64(t)} {rank}" for rank, t in enumerate(kept)])
    with pytest.raises(UserError, match=f"^tokenizer {path}: no token for the single byte 0x41:"):
        load_tokenizer(path)


def test_the_complete_command_stops_at_a_malformed_tokenizer_with_one_line(assets, process_group, tmp_path):
    from llama_caption.llama.complete import main

    path = write(tmp_path, replaced(2, BYTE_2))
    proc = run_cli(main, "--ckpt_dir", assets["tiny"], "--tokenizer_path", path, "--device", "cpu", "--max_gen_len", 2)
    assert proc.returncode == 2 and proc.stdout == "", proc.stderr
    assert proc.stderr.strip().splitlines() == [
        f"error: tokenizer {path} line 3: a token without its rank: 'Ag==' "
        f"(a Llama 3 tokenizer.model holds one `BASE64TOKEN RANK` pair per line)"]
