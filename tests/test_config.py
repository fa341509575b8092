"""Configuration: TOML, environment overrides, unknown keys."""

from __future__ import annotations

from pathlib import Path

import pytest

from mendsrv.config import load_config
from mendsrv.errors import ConfigError

from .conftest import REPO


def test_config_defaults_without_a_file() -> None:
    cfg = load_config(None, env={})
    assert (cfg.server.host, cfg.server.port) == ("127.0.0.1", 8080)
    assert cfg.auth.api_keys == ["dev-key-change-me"]
    assert cfg.storage.backend == "local" and cfg.store.path == "./data/mend.db"


def test_config_shipped_file_matches_defaults() -> None:
    assert load_config(REPO / "mend.toml", env={}) == load_config(None, env={})


def test_config_environment_overrides(tmp_path: Path) -> None:
    env = {"MEND_SERVER_PORT": "9000", "MEND_AUTH_API_KEYS": "a, b", "MEND_WEBHOOKS_ALLOW_PRIVATE_NETWORKS": "true",
           "PATH": "/bin"}
    cfg = load_config(REPO / "mend.toml", env=env)
    assert cfg.server.port == 9000
    assert cfg.auth.api_keys == ["a", "b"]
    assert cfg.webhooks.allow_private_networks is True


@pytest.mark.parametrize(
    ("toml", "env", "named"),
    [
        ("[server]\nprot = 1\n", {}, "server.prot"),
        ("[nope]\nx = 1\n", {}, "[nope]"),
        ("", {"MEND_STORAGE_BUCKET": "x"}, "storage.bucket"),
        ("", {"MEND_WHATEVER_X": "1"}, "MEND_WHATEVER_X"),
        ("[workers]\nprocesses = -1\n", {}, "workers.processes"),
        ("[storage]\nbackend = 'ftp'\n", {}, "storage.backend"),
        ("[server\n", {}, "not valid TOML"),
    ],
)
def test_config_errors_name_the_key(tmp_path: Path, toml: str, env: dict[str, str], named: str) -> None:
    path = tmp_path / "m.toml"
    path.write_text(toml)
    with pytest.raises(ConfigError) as info:
        load_config(path, env=env)
    assert named in info.value.message
