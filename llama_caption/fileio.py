"""Atomic writes, and output paths checked before any work starts.

A write goes to a temporary file in the target's folder, is flushed, then renamed over the
target: a crash mid-write leaves the previous file intact (or no file), never a truncated one.
"""

import hashlib
import json
import os
import tempfile
from contextlib import contextmanager

from .errors import UserError


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


@contextmanager
def atomic_path(path: str):
    """Yield a temporary path next to `path`; on success it replaces `path`."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix="." + os.path.basename(path) + ".", suffix=".tmp", dir=folder)
    os.close(fd)
    try:
        yield tmp
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_umask())  # as open() would make it (mkstemp makes 0600)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def write_text(path: str, text: str) -> None:
    with atomic_path(path) as tmp:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)


def write_json(path: str, obj, indent=None) -> None:
    write_text(path, json.dumps(obj, indent=indent) + "\n")


def write_torch(path: str, state_dict) -> None:
    """Meta's checkpoint format (a torch.save'd dict of tensors, loadable with weights_only=True)."""
    import torch

    with atomic_path(path) as tmp:
        torch.save(state_dict, tmp)


def write_safetensors(path: str, tensors, metadata=None) -> None:
    from safetensors.torch import save_file

    with atomic_path(path) as tmp:
        save_file({k: v.contiguous() for k, v in tensors.items()}, tmp, metadata=metadata)


def sha256_file(path: str) -> str:
    """The SHA-256 of a file's bytes, read 1 MiB at a time."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _nearest_existing(path: str) -> str:
    path = os.path.abspath(path)
    while not os.path.exists(path):
        parent = os.path.dirname(path)
        if parent == path:
            break
        path = parent
    return path


def check_output_file(path: str, flag: str) -> None:
    """`path` can be written as a file: not a folder, and its folder exists or can be made."""
    if not str(path).strip():
        raise UserError(f"{flag} is empty: name the file to write")
    if os.path.isdir(path):
        raise UserError(f"{flag} {path} is a folder: name a file, e.g. {os.path.join(path, 'results.json')}")
    check_output_dir(os.path.dirname(os.path.abspath(path)), flag)


def check_output_dir(path: str, flag: str) -> None:
    """`path` is a folder we may write in, or one that can be made."""
    if not str(path).strip():
        raise UserError(f"{flag} is empty: name the folder to write")
    base = _nearest_existing(path)
    if not os.path.isdir(base):
        raise UserError(f"{flag} {path}: {base} is a file, not a folder: pick another path")
    if not os.access(base, os.W_OK | os.X_OK) or not _can_create_in(base):
        raise UserError(f"{flag} {path}: {base} is not writable: pick another path")


def _can_create_in(folder: str) -> bool:
    """Whether a file can be made in `folder` (os.access says yes to root for a read-only file
    system or /proc; making one is the only sure test). The file is gone at once."""
    try:
        with tempfile.TemporaryFile(dir=folder):
            return True
    except OSError:
        return False
