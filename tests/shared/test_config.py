import argparse

import pytest

from shared.config import Settings


def test_env_then_flags_override_defaults():
    s = Settings.from_env({"ROSE_PORT": "9000", "ROSE_OPEN_HEALTH": "false", "ROSE_HEARTBEAT_TIMEOUT": "1.5"})
    assert (s.port, s.open_health, s.heartbeat_timeout) == (9000, False, 1.5)
    parser = argparse.ArgumentParser()
    Settings.add_arguments(parser, "gateway")
    args = parser.parse_args(["--port", "9100"])
    assert Settings.from_args(args).port == 9100


def test_bad_env_value_names_the_variable():
    with pytest.raises(ValueError, match="ROSE_PORT"):
        Settings.from_env({"ROSE_PORT": "eighty"})


def test_to_env_round_trips():
    s = Settings(port=1234, open_health=False, model="/m")
    assert Settings.from_env(s.to_env()) == s


def test_role_flags_are_scoped():
    parser = argparse.ArgumentParser()
    Settings.add_arguments(parser, "worker")
    flags = {a.dest for a in parser._actions}
    assert "backend" in flags and "port" not in flags and "log_level" in flags
