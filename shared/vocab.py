"""The o200k vocabulary file that openai-harmony needs, made offline.

openai-harmony downloads `o200k_base.tiktoken` at first use. rose instead builds it
from the `quicktok-v1` package's binary copy of the same ranks, so a machine without
internet can serve. A copy the operator puts in the folder is used as is; either way
the file must carry the SHA-256 tiktoken itself checks.
"""

from __future__ import annotations

import base64
import hashlib
import os
import struct
import tempfile
from importlib import resources

VOCAB_FILE = "o200k_base.tiktoken"
VOCAB_SHA256 = "446a9538cb6c348e3516120d7c08b09f57c36495e2acfffe59a5bf8b0cfb1a2d"


class VocabError(RuntimeError):
    """The vocabulary cannot be made or does not match the expected hash."""


def _quicktok_vocab_bytes() -> bytes:
    try:
        return resources.files("quicktok").joinpath("data", "o200k.vocab").read_bytes()
    except (ModuleNotFoundError, FileNotFoundError) as exc:
        raise VocabError(
            f"cannot build {VOCAB_FILE}: the quicktok-v1 package (quicktok/data/o200k.vocab) is missing ({exc}); "
            f"install it or put {VOCAB_FILE} in the vocabulary folder"
        ) from None


def tiktoken_text_from_quicktok(raw: bytes) -> bytes:
    """quicktok's binary vocab -> tiktoken's text format (base64 token, space, rank; by rank)."""
    try:
        (count,) = struct.unpack_from("<I", raw, 0)
        offset = 4
        entries = []
        for _ in range(count):
            (length,) = struct.unpack_from("<H", raw, offset)
            offset += 2
            token = raw[offset : offset + length]
            if len(token) != length:
                raise struct.error("token bytes run past the end")
            offset += length
            (rank,) = struct.unpack_from("<I", raw, offset)
            offset += 4
            entries.append((rank, token))
    except struct.error as exc:
        raise VocabError(f"quicktok o200k.vocab is truncated or corrupt: {exc}") from None
    entries.sort()
    return b"".join(base64.b64encode(token) + b" " + str(rank).encode() + b"\n" for rank, token in entries)


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def ensure_vocab(folder: str) -> str:
    """Make sure `folder/o200k_base.tiktoken` exists and has the right hash; return the folder."""
    folder = os.path.abspath(folder)
    path = os.path.join(folder, VOCAB_FILE)
    if os.path.exists(path):
        with open(path, "rb") as f:
            digest = _sha256(f.read())
        if digest != VOCAB_SHA256:
            raise VocabError(f"{path} has SHA-256 {digest}, expected {VOCAB_SHA256}; remove it to rebuild")
        return folder
    text = tiktoken_text_from_quicktok(_quicktok_vocab_bytes())
    digest = _sha256(text)
    if digest != VOCAB_SHA256:
        raise VocabError(f"vocabulary built from quicktok has SHA-256 {digest}, expected {VOCAB_SHA256}")
    os.makedirs(folder, exist_ok=True)
    # Write then rename: several processes may start at once and must never read half a file.
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=".o200k-")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return folder


_encodings: dict[str, object] = {}


def load_harmony_encoding(folder: str):
    """The gpt-oss Harmony encoding, loaded offline from the vocabulary in `folder`."""
    folder = ensure_vocab(folder)
    cached = _encodings.get(folder)
    if cached is not None:
        return cached
    from openai_harmony import HarmonyEncodingName, load_harmony_encoding as _load

    # openai-harmony reads this variable when it looks for the file; set it first.
    os.environ["TIKTOKEN_ENCODINGS_BASE"] = folder
    encoding = _load(HarmonyEncodingName.HARMONY_GPT_OSS)
    _encodings[folder] = encoding
    return encoding
