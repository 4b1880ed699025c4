"""download.sh against a local HTTP server on 127.0.0.1 serving small stand-in files."""

import hashlib
import http.server
import os
import subprocess
import threading
import zipfile

import pytest

from conftest import REPO


class Server:
    def __init__(self, root):
        self.requests = []
        served = self

        class Handler(http.server.SimpleHTTPRequestHandler):
            def __init__(self, *a, **k):
                super().__init__(*a, directory=str(root), **k)

            def do_GET(self):
                served.requests.append(self.path)
                super().do_GET()

            def log_message(self, *a):
                pass

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def close(self):
        self.httpd.shutdown()


def md5(path):
    return hashlib.md5(open(path, "rb").read()).hexdigest()


@pytest.fixture
def site(tmp_path):
    root = tmp_path / "site"
    (root / "7B").mkdir(parents=True)
    (root / "tokenizer.model").write_bytes(b"tokenizer bytes")
    (root / "tokenizer_checklist.chk").write_text(f"{md5(root / 'tokenizer.model')}  tokenizer.model\n")
    (root / "7B" / "consolidated.00.pth").write_bytes(os.urandom(4096))
    (root / "7B" / "params.json").write_text('{"dim": 64}')
    (root / "7B" / "checklist.chk").write_text(
        "".join(f"{md5(root / '7B' / n)}  {n}\n" for n in ("consolidated.00.pth", "params.json")))
    for name, members in (("train2014", {"train2014/a.jpg": b"A"}), ("val2014", {"val2014/b.jpg": b"B"}),
                          ("annotations_trainval2014", {"annotations/captions_val2014.json": b"{}"}),
                          ("caption_datasets", {"dataset_coco.json": b'{"images": []}'})):
        with zipfile.ZipFile(root / f"{name}.zip", "w") as z:
            for arc, data in members.items():
                z.writestr(arc, data)
    server = Server(root)
    yield root, server
    server.close()


def run(tmp_path, server, *parts):
    env = dict(os.environ, PRESIGNED_URL=f"{server.url}/*", MODEL_SIZE="7B", TARGET_FOLDER=str(tmp_path / "llama"),
               COCO_DIR=str(tmp_path / "coco"), COCO_TRAIN_URL=f"{server.url}/train2014.zip",
               COCO_VAL_URL=f"{server.url}/val2014.zip", COCO_ANN_URL=f"{server.url}/annotations_trainval2014.zip",
               KARPATHY_URL=f"{server.url}/caption_datasets.zip")
    return subprocess.run(["bash", os.path.join(REPO, "download.sh"), *parts], capture_output=True, text=True,
                          env=env, timeout=120)


@pytest.mark.slow
def test_download_verifies_and_skips_what_is_there(site, tmp_path):
    root, server = site
    proc = run(tmp_path, server)
    assert proc.returncode == 0, proc.stderr
    assert (tmp_path / "llama" / "7B" / "consolidated.00.pth").read_bytes() == (root / "7B" / "consolidated.00.pth").read_bytes()
    assert (tmp_path / "llama" / "tokenizer.model").exists()
    assert (tmp_path / "coco" / "train2014" / "a.jpg").read_bytes() == b"A"
    assert (tmp_path / "coco" / "annotations" / "captions_val2014.json").exists()
    assert (tmp_path / "coco" / "dataset_coco.json").exists()
    assert "/7B/consolidated.00.pth" in server.requests
    server.requests.clear()
    again = run(tmp_path, server)
    assert again.returncode == 0 and server.requests == []  # the second run downloads nothing
    assert "already there and verified" in again.stdout


@pytest.mark.slow
def test_corrupted_file_is_detected_and_removed(site, tmp_path):
    root, server = site
    (root / "7B" / "params.json").write_text('{"dim": 65}')  # no longer matches checklist.chk
    proc = run(tmp_path, server, "llama")
    assert proc.returncode != 0
    assert "checksum mismatch" in proc.stderr and "params.json" in proc.stdout + proc.stderr
    assert not (tmp_path / "llama" / "7B" / "params.json").exists()
    assert (tmp_path / "llama" / "7B" / "consolidated.00.pth").exists()  # the good file is kept


@pytest.mark.slow
def test_a_locally_damaged_file_is_fetched_again(site, tmp_path):
    root, server = site
    assert run(tmp_path, server, "llama").returncode == 0
    target = tmp_path / "llama" / "7B" / "consolidated.00.pth"
    target.write_bytes(b"damaged")
    server.requests.clear()
    assert run(tmp_path, server, "llama").returncode == 0
    assert server.requests == ["/7B/consolidated.00.pth"]
    assert target.read_bytes() == (root / "7B" / "consolidated.00.pth").read_bytes()


@pytest.mark.slow
def test_corrupt_archive_and_unknown_part(site, tmp_path):
    root, server = site
    (root / "val2014.zip").write_bytes(b"PK not really a zip")
    proc = run(tmp_path, server, "coco")
    assert proc.returncode != 0 and "val2014.zip is corrupt" in proc.stderr
    assert run(tmp_path, server, "weights").returncode != 0
