"""Shared fixtures: configurations, a real S3 endpoint (moto server), generated media,
the app under test, and mendsrv started as a real process."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import pytest_asyncio
from aiohttp import ClientSession
from aiohttp.test_utils import TestClient

from mendsrv.app import create_app
from mendsrv.config import Config, config_from_dict

API_KEY = "test-key"
AUTH = {"X-API-Key": API_KEY}
REPO = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def make_config(tmp_path: Path, **sections: dict[str, Any]) -> Config:
    """A config for tests: local storage and SQLite under tmp_path, one worker process."""
    data: dict[str, dict[str, Any]] = {
        "server": {"port": 0, "shutdown_timeout_s": 10},
        "auth": {"api_keys": [API_KEY]},
        "store": {"path": str(tmp_path / "mend.db")},
        "storage": {"backend": "local", "root": str(tmp_path / "buckets"), "temp_dir": str(tmp_path / "tmp")},
        "workers": {"processes": 1, "poll_interval_s": 0.2, "retry_base_s": 0.1},
        "webhooks": {"allow_private_networks": True, "retry_base_s": 0.2},
    }
    for name, values in sections.items():
        data.setdefault(name, {}).update(values)
    (tmp_path / "tmp").mkdir(exist_ok=True)
    return config_from_dict(data)


@pytest.fixture
def config_factory(tmp_path: Path) -> Callable[..., Config]:
    def factory(**sections: dict[str, Any]) -> Config:
        return make_config(tmp_path, **sections)

    return factory


@pytest.fixture
def config(config_factory: Callable[..., Config]) -> Config:
    return config_factory()


@pytest.fixture
def buckets(tmp_path: Path) -> Path:
    root = tmp_path / "buckets"
    (root / "media").mkdir(parents=True, exist_ok=True)
    return root


@pytest_asyncio.fixture
async def client_factory(aiohttp_client: Any) -> Callable[..., Any]:
    """Start create_app(config) under a real HTTP test server; returns its client."""

    async def factory(cfg: Config) -> TestClient:
        return await aiohttp_client(create_app(cfg))

    return factory


@pytest_asyncio.fixture
async def client(client_factory: Callable[..., Any], config: Config, buckets: Path) -> TestClient:
    return await client_factory(config)


def write_jpeg(path: Path, width: int = 1600, height: int = 1200, **save: Any) -> Path:
    import pyvips

    path.parent.mkdir(parents=True, exist_ok=True)
    image = pyvips.Image.xyz(width, height).extract_band(0).cast("uchar").bandjoin([60, 160])
    image.write_to_file(str(path), **save)
    return path


def job_body(source_key: str = "in.jpg", dest_key: str = "out.jpg", bucket: str = "media", **params: Any) -> dict[str, Any]:
    return {"source_bucket": bucket, "source_key": source_key, "dest_bucket": bucket, "dest_key": dest_key, **params}


async def wait_for_job(client: Any, job_id: str, timeout: float = 30.0, statuses: tuple[str, ...] = ("completed", "failed", "cancelled")) -> dict[str, Any]:
    """Poll GET /api/v1/jobs/{id} until it reaches one of ``statuses``."""
    deadline = time.monotonic() + timeout
    while True:
        resp = await client.get(f"/api/v1/jobs/{job_id}", headers=AUTH)
        assert resp.status == 200, await resp.text()
        job = await resp.json()
        if job["status"] in statuses:
            return job
        if time.monotonic() > deadline:
            raise AssertionError(f"job {job_id} still {job['status']} after {timeout} s")
        await asyncio.sleep(0.05)


# --- a real S3 endpoint -------------------------------------------------------------------


@pytest.fixture(scope="session")
def moto_server() -> Iterator[str]:
    from moto.server import ThreadedMotoServer

    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    yield f"http://127.0.0.1:{port}"
    server.stop()


@pytest.fixture
def s3_config(moto_server: str) -> dict[str, Any]:
    """The [storage] section for the moto endpoint."""
    return {
        "backend": "s3",
        "endpoint_url": moto_server,
        "access_key_id": "testing",
        "secret_access_key": "testing",
        "region": "us-east-1",
        "max_retries": 1,
    }


@pytest.fixture
def s3_client(moto_server: str) -> Any:
    import boto3

    return boto3.client(
        "s3", endpoint_url=moto_server, aws_access_key_id="testing", aws_secret_access_key="testing",
        region_name="us-east-1",
    )


# --- mendsrv as a real process ----------------------------------------------------------


class ServerProcess:
    """``mendsrv --config FILE`` in a child process, on a free port."""

    def __init__(self, workdir: Path, toml: str, port: int):
        self.workdir = workdir
        self.port = port
        self.config_path = workdir / "mend.toml"
        self.config_path.write_text(toml)
        self.log_path = workdir / "server.log"
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, timeout: float = 20.0, env: dict[str, str] | None = None) -> ServerProcess:
        log = open(self.log_path, "ab")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "mendsrv", "--config", str(self.config_path)],
            cwd=self.workdir, stdout=log, stderr=subprocess.STDOUT, env={**os.environ, **(env or {})},
            start_new_session=True,
        )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"mendsrv exited with {self.proc.returncode}:\n{self.log_path.read_text()}")
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.2):
                    return self
            except OSError:
                time.sleep(0.05)
        raise RuntimeError(f"mendsrv did not listen within {timeout} s:\n{self.log_path.read_text()}")

    def kill(self) -> None:
        """SIGKILL the whole process group (server and its worker processes)."""
        if self.proc and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(10)

    def terminate(self, timeout: float = 30.0) -> int:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout)

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.kill()
        if self.proc:
            # reap any orphaned worker processes of the group
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass


def toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, list):
        return "[" + ", ".join(toml_value(v) for v in value) + "]"
    return '"' + str(value).replace("\\", "\\\\").replace('"', '\\"') + '"'


def server_toml(workdir: Path, port: int, sections: dict[str, dict[str, Any]] | None = None) -> str:
    """A mend.toml for a test server under ``workdir``; ``sections`` override keys."""
    data: dict[str, dict[str, Any]] = {
        "server": {"host": "127.0.0.1", "port": port, "shutdown_timeout_s": 20},
        "auth": {"api_keys": [API_KEY]},
        "store": {"path": str(workdir / "data" / "mend.db")},
        "storage": {"root": str(workdir / "data" / "buckets")},
        "workers": {"processes": 1, "poll_interval_s": 0.2},
        "webhooks": {"allow_private_networks": True, "retry_base_s": 0.2},
    }
    for name, values in (sections or {}).items():
        data.setdefault(name, {}).update(values)
    lines = []
    for name, values in data.items():
        lines.append(f"[{name}]")
        lines.extend(f"{k} = {toml_value(v)}" for k, v in values.items())
    return "\n".join(lines) + "\n"


@pytest.fixture
def server_process(tmp_path: Path) -> Iterator[Callable[..., ServerProcess]]:
    started: list[ServerProcess] = []

    def factory(
        sections: dict[str, dict[str, Any]] | None = None, port: int | None = None, workdir: Path | None = None
    ) -> ServerProcess:
        wd = workdir or tmp_path
        p = port or free_port()
        server = ServerProcess(wd, server_toml(wd, p, sections), p)
        started.append(server)
        return server

    yield factory
    for server in started:
        server.stop()


@pytest_asyncio.fixture
async def http() -> AsyncIterator[ClientSession]:
    async with ClientSession() as session:
        yield session


# --- a real PostgreSQL server (tests/pg_fixtures.py) ----------------------------------------

from .pg_fixtures import PgCluster, pg_cluster, pg_url  # noqa: E402,F401
