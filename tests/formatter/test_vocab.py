"""The o200k vocabulary made offline from quicktok, hash-checked (shared/vocab.py)."""

import hashlib
import os
import shutil

import pytest

from shared.vocab import VOCAB_FILE, VOCAB_SHA256, VocabError, ensure_vocab, tiktoken_text_from_quicktok


def test_built_vocabulary_has_tiktokens_hash(vocab_dir, encoding):
    with open(os.path.join(vocab_dir, VOCAB_FILE), "rb") as f:
        data = f.read()
    assert hashlib.sha256(data).hexdigest() == VOCAB_SHA256
    first = data.split(b"\n", 1)[0]
    assert first == b"IQ== 0"  # rank 0 is the byte "!"
    assert encoding.decode(encoding.encode("hello world")) == "hello world"


def test_operator_copy_is_used_as_is(vocab_dir, tmp_path):
    shutil.copy(os.path.join(vocab_dir, VOCAB_FILE), tmp_path / VOCAB_FILE)
    os.utime(tmp_path / VOCAB_FILE, (1_000_000, 1_000_000))
    assert ensure_vocab(str(tmp_path)) == str(tmp_path)
    assert os.stat(tmp_path / VOCAB_FILE).st_mtime == 1_000_000  # not rewritten


def test_a_wrong_copy_is_refused(tmp_path):
    (tmp_path / VOCAB_FILE).write_bytes(b"IQ== 0\n")
    with pytest.raises(VocabError, match="SHA-256"):
        ensure_vocab(str(tmp_path))


def test_corrupt_quicktok_data_is_a_clear_error():
    with pytest.raises(VocabError, match="truncated or corrupt"):
        tiktoken_text_from_quicktok(b"\x05\x00\x00\x00\x02\x00a")
    assert tiktoken_text_from_quicktok(b"\x01\x00\x00\x00\x01\x00a\x07\x00\x00\x00") == b"YQ== 7\n"
