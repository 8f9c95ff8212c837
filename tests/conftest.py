"""Session-wide fixtures: the o200k vocabulary and the tiny gpt-oss checkpoint.

Both are made once per test session under a temporary folder, by the same code
`rose setup` uses, so the tests exercise the real files.
"""

from __future__ import annotations

import os

import pytest

# CI and dev machines here have 2 cores shared by the test process and the mesh's
# processes; torch's default of one thread per core makes the tiny model 20x slower
# under that contention. Child processes (the mesh) inherit the variable.
os.environ.setdefault("OMP_NUM_THREADS", "1")


def pytest_collection_modifyitems(config, items):
    """GPU tests run only where CUDA is present (`pytest -m gpu` on a GPU host)."""
    try:
        import torch

        has_cuda = torch.cuda.is_available()
    except ImportError:
        has_cuda = False
    if has_cuda:
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU; run `pytest -m gpu` on a GPU host")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def rose_home(tmp_path_factory) -> str:
    return str(tmp_path_factory.mktemp("rose-home"))


@pytest.fixture(scope="session")
def vocab_dir(rose_home) -> str:
    """Folder with o200k_base.tiktoken; also exported as TIKTOKEN_ENCODINGS_BASE."""
    from shared.vocab import ensure_vocab

    folder = ensure_vocab(os.path.join(rose_home, "vocab"))
    os.environ["TIKTOKEN_ENCODINGS_BASE"] = folder
    return folder


@pytest.fixture(scope="session")
def tiny_checkpoint(rose_home) -> str:
    """The embedded default model: a seeded random gpt-oss checkpoint in HF layout."""
    from services.worker.model.make_checkpoint import make_checkpoint

    path = os.path.join(rose_home, "models", "gpt-oss-tiny")
    make_checkpoint(path, seed=0)
    return path


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def redis_url(tmp_path_factory):
    """A private redis-server on a free port for this test session (nothing on disk)."""
    import shutil
    import subprocess
    import time

    import redis

    binary = shutil.which("redis-server")
    if binary is None:
        pytest.fail("redis-server is not installed (.ci/run installs it with apt-get)")
    port = free_port()
    proc = subprocess.Popen(
        [binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
         "--dir", str(tmp_path_factory.mktemp("redis"))],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    url = f"redis://127.0.0.1:{port}/0"
    client = redis.Redis.from_url(url)
    for _ in range(100):
        try:
            client.ping()
            break
        except redis.ConnectionError:
            time.sleep(0.05)
    else:
        proc.kill()
        pytest.fail("redis-server did not start")
    yield url
    proc.terminate()
    proc.wait(timeout=10)
