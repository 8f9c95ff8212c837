"""The `mesh` fixture: real rose meshes (redis-server, scheduler, workers, formatters,
gateway as separate processes) started with services/launcher.py.

    def test_x(mesh):
        m = mesh(formatters=2, workers=2, env={"ROSE_MAX_QUEUE": "4"})
        client = openai.OpenAI(base_url=m.base_url, api_key="x")

`mesh(...)` is module-scoped: calls with the same arguments in one module share one
started mesh (starting one costs seconds on two cores). Every mesh gets a private
redis-server and free ports; children log to <tmp>/<mesh>/<name>.log. At the end
of the module every mesh is stopped and the fixture fails if any child exited
without being told to (`Mesh.kill` marks a child as killed on purpose).
"""

from __future__ import annotations

import dataclasses
import json

import pytest

from services.launcher import Mesh, with_free_ports
from shared.config import Settings

# Fast failure detection and KV-counter reads in tests; a test may override any of these.
# The timeout leaves room for a busy 2-core CI machine, where a live worker's heartbeat
# was once late past 1.5 s and the worker was taken out of routing.
TEST_ENV = {
    "ROSE_HEARTBEAT_INTERVAL": "0.1",
    "ROSE_HEARTBEAT_TIMEOUT": "3.0",
    "ROSE_LOG_LEVEL": "warning",
}


def mesh_settings(home: str, model: str, vocab: str, env: dict[str, str]) -> Settings:
    """Settings for a test mesh: the tiny checkpoint, free ports, env overrides applied."""
    base = Settings.from_env({**TEST_ENV, **{k: v for k, v in env.items() if k.startswith("ROSE_")}})
    base = dataclasses.replace(base, home=home, model=model, tiktoken_encodings_base=vocab)
    return with_free_ports(base)


@pytest.fixture(scope="module")
def mesh(request, tmp_path_factory, rose_home, vocab_dir, tiny_checkpoint):
    started: dict[str, Mesh] = {}

    def start(formatters: int = 1, workers: int = 1, env: dict[str, str] | None = None, ready_timeout: float = 180.0) -> Mesh:
        env = dict(env or {})
        key = json.dumps([formatters, workers, sorted(env.items())])
        if key in started:
            return started[key]
        log_dir = tmp_path_factory.mktemp(f"mesh-{request.module.__name__.rsplit('.', 1)[-1]}")
        settings = mesh_settings(rose_home, tiny_checkpoint, vocab_dir, env)
        m = Mesh(
            settings,
            formatters=formatters,
            workers=workers,
            env={k: v for k, v in env.items() if not k.startswith("ROSE_")},
            log_dir=str(log_dir),
        )
        m.start(ready_timeout)
        started[key] = m
        return m

    yield start
    crashes = []
    for m in started.values():
        crashes += [m.describe_crash(c) for c in m.crashed()]
        m.stop()
    assert not crashes, "mesh children crashed:\n" + "\n".join(crashes)
