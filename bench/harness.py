"""Shared parts of the benchmarks: a mendsrv process, RSS, results, machine facts."""

from __future__ import annotations

import asyncio
import json
import os
import platform
import signal
import socket
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import aiohttp

ROOT = Path(__file__).resolve().parent.parent
API_KEY = "bench-key"
HEADERS = {"X-API-Key": API_KEY, "Content-Type": "application/json"}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def child_env(**extra: str) -> dict[str, str]:
    """Environment for child processes: this checkout first on the import path."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("MEND_")}
    env["PYTHONPATH"] = str(ROOT) + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    env.update(extra)
    return env


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, list):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    return '"' + str(value).replace("\\", "\\\\").replace('"', '\\"') + '"'


class Server:
    """``python -m mendsrv --config FILE`` as a real process on a free port."""

    def __init__(self, workdir: Path, sections: dict[str, dict[str, Any]] | None = None):
        self.workdir = workdir
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        self.buckets = workdir / "buckets"
        data: dict[str, dict[str, Any]] = {
            "server": {"host": "127.0.0.1", "port": self.port, "shutdown_timeout_s": 5},
            "auth": {"api_keys": [API_KEY]},
            "store": {"path": str(workdir / "mend.db")},
            "storage": {"root": str(self.buckets), "temp_dir": str(workdir / "tmp")},
            "workers": {"processes": 2},
        }
        for name, values in (sections or {}).items():
            data.setdefault(name, {}).update(values)
        (workdir / "tmp").mkdir(exist_ok=True)
        lines = []
        for name, values in data.items():
            lines.append(f"[{name}]")
            lines.extend(f"{k} = {_toml_value(v)}" for k, v in values.items())
        self.config = workdir / "mend.toml"
        self.config.write_text("\n".join(lines) + "\n")
        self.log = workdir / "server.log"
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, timeout: float = 30.0) -> Server:
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "mendsrv", "--config", str(self.config)],
                cwd=self.workdir, stdout=log, stderr=subprocess.STDOUT, env=child_env(), start_new_session=True,
            )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"mendsrv exited with {self.proc.returncode}:\n{self.log.read_text()[-3000:]}")
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.2):
                    return self
            except OSError:
                time.sleep(0.05)
        raise RuntimeError(f"mendsrv did not listen within {timeout} s")

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def stop(self) -> None:
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                pass
        try:  # the server and its worker processes share a process group
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.proc.wait(10)

    def __enter__(self) -> Server:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def rss_mb(pid: int) -> float:
    """Resident set size of one process in MB (from /proc)."""
    with open(f"/proc/{pid}/status") as fh:
        for line in fh:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return 0.0


def cpu_seconds(pid: int) -> float:
    """User + system CPU time a process has used so far."""
    with open(f"/proc/{pid}/stat") as fh:
        fields = fh.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def children_rss_mb(pid: int) -> float:
    """Summed RSS of the direct children of ``pid`` (the worker processes)."""
    total = 0.0
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as fh:
                ppid = int(fh.read().rsplit(")", 1)[1].split()[1])
            if ppid == pid:
                total += rss_mb(int(entry))
        except (OSError, ValueError, IndexError):
            continue
    return total


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    k = (len(ordered) - 1) * q
    lo, hi = int(k), min(int(k) + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (k - lo)


# --- results -------------------------------------------------------------------------


@dataclass
class Row:
    """One line of the table. ``ratio`` is always mendsrv / raw."""

    name: str
    unit: str
    mendsrv: float | None = None
    raw: float | None = None
    target: str = ""  # e.g. ">= 2000", "ratio >= 0.9", "<= 20"
    note: str = ""
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def ratio(self) -> float | None:
        if self.mendsrv is None or not self.raw:
            return None
        return self.mendsrv / self.raw

    @property
    def met(self) -> bool | None:
        if not self.target:
            return None
        op_value = self.target.split()
        if op_value[0] == "ratio":
            value, op, limit = self.ratio, op_value[1], float(op_value[2])
        else:
            value, op, limit = self.mendsrv, op_value[0], float(op_value[1])
        if value is None:
            return None
        return value >= limit if op == ">=" else value <= limit

    def to_json(self) -> dict[str, Any]:
        return asdict(self) | {"ratio": self.ratio, "met": self.met}


def _fmt(value: float | None) -> str:
    if value is None:
        return "—"
    if abs(value) >= 100:
        return f"{value:,.0f}"
    if abs(value) >= 10:
        return f"{value:.1f}"
    return f"{value:.2f}"


def table(rows: list[Row]) -> str:
    header = ["measurement", "unit", "mendsrv", "raw baseline", "ratio", "target", "met?"]
    lines = [header]
    for r in rows:
        met = {True: "yes", False: "NO", None: "—"}[r.met]
        lines.append([r.name, r.unit, _fmt(r.mendsrv), _fmt(r.raw), _fmt(r.ratio), r.target or "—", met])
    widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
    out = []
    for n, line in enumerate(lines):
        out.append("  ".join(cell.ljust(widths[i]) for i, cell in enumerate(line)))
        if n == 0:
            out.append("  ".join("-" * w for w in widths))
    notes = [f"- {r.name}: {r.note}" for r in rows if r.note]
    return "\n".join(out + ([""] + notes if notes else []))


def markdown(rows: list[Row]) -> str:
    """The table as Markdown (bench/out/results.md), for bench/RESULTS.md."""
    out = ["| measurement | unit | mendsrv | raw baseline | ratio | target | met? |", "|---|---|---:|---:|---:|---|---|"]
    for r in rows:
        met = {True: "yes", False: "**no**", None: "—"}[r.met]
        out.append(f"| {r.name} | {r.unit} | {_fmt(r.mendsrv)} | {_fmt(r.raw)} | {_fmt(r.ratio)} | {r.target or '—'} | {met} |")
    return "\n".join(out) + "\n"


def machine_facts() -> dict[str, Any]:
    facts: dict[str, Any] = {
        "date_utc": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "nproc": os.cpu_count(),
        "python": platform.python_version(),
        "platform": platform.platform(),
    }
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                facts["cpu"] = line.split(":", 1)[1].strip()
                break
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal"):
                facts["ram_gb"] = round(int(line.split()[1]) / 1024 / 1024, 1)
        facts["loadavg_at_start"] = Path("/proc/loadavg").read_text().split()[:3]
    except OSError:
        pass
    try:
        import pyvips

        facts["libvips"] = f"{pyvips.version(0)}.{pyvips.version(1)}.{pyvips.version(2)}"
    except Exception:
        facts["libvips"] = None
    try:
        import imageio_ffmpeg

        out = subprocess.run([imageio_ffmpeg.get_ffmpeg_exe(), "-version"], capture_output=True, text=True, timeout=10)
        facts["ffmpeg"] = out.stdout.split("\n", 1)[0]
    except Exception:
        facts["ffmpeg"] = None
    return facts


def write_json(path: Path, facts: dict[str, Any], rows: list[Row], elapsed_s: float) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(
        json.dumps({"machine": facts, "elapsed_s": round(elapsed_s, 1), "results": [r.to_json() for r in rows]}, indent=2)
        + "\n"
    )


# --- small HTTP helpers --------------------------------------------------------------------


async def submit(session: aiohttp.ClientSession, base: str, op: str, body: dict[str, Any]) -> str:
    async with session.post(f"{base}/api/v1/jobs/{op}", json=body, headers={"X-API-Key": API_KEY}) as resp:
        data = await resp.json()
        if resp.status != 202:
            raise RuntimeError(f"submit {op} answered {resp.status}: {data}")
        return str(data["job_id"])


async def get_job(session: aiohttp.ClientSession, base: str, job_id: str) -> dict[str, Any]:
    async with session.get(f"{base}/api/v1/jobs/{job_id}", headers={"X-API-Key": API_KEY}) as resp:
        return dict(await resp.json())


async def wait_all(
    session: aiohttp.ClientSession, base: str, job_ids: list[str], timeout: float = 600, interval: float = 0.05
) -> list[dict[str, Any]]:
    """Wait until every job is terminal; returns the job resources.

    Jobs run in FIFO order, so this first follows the last job's event stream (SSE:
    no requests while the jobs run, so the client takes no CPU from the server being
    measured; polling did, visibly), then reads every job once, polling, oldest
    first, any that is still running.
    """
    done: list[dict[str, Any]] = []
    deadline = time.monotonic() + timeout
    stream = f"{base}/api/v1/jobs/{job_ids[-1]}/stream"
    async with session.get(stream, headers={"X-API-Key": API_KEY}, timeout=aiohttp.ClientTimeout(total=timeout)) as resp:
        async for _ in resp.content:  # the stream ends after the job's terminal event
            pass
    for job_id in job_ids:
        while True:
            job = await get_job(session, base, job_id)
            if job.get("status") in ("completed", "failed", "cancelled"):
                done.append(job)
                break
            if time.monotonic() > deadline:
                raise TimeoutError(f"{len(job_ids) - len(done)} jobs still not finished after {timeout} s")
            await asyncio.sleep(interval)
    return done


def iso_to_epoch(value: str) -> float:
    from datetime import datetime

    return datetime.fromisoformat(value.replace("Z", "+00:00")).timestamp()


class Proc:
    """A helper process that listens on ``port`` (raw baseline server, moto server)."""

    def __init__(self, argv: list[str], port: int, log: Path, cwd: Path | None = None):
        self.argv, self.port, self.log, self.cwd = argv, port, log, cwd
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, timeout: float = 30.0) -> Proc:
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(
                self.argv, stdout=log, stderr=subprocess.STDOUT, env=child_env(), cwd=self.cwd, start_new_session=True
            )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.argv[:3]} exited with {self.proc.returncode}:\n{self.log.read_text()[-3000:]}")
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.2):
                    return self
            except OSError:
                time.sleep(0.05)
        raise RuntimeError(f"{self.argv[:3]} did not listen within {timeout} s")

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)

    def __enter__(self) -> Proc:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def raw_server(workdir: Path) -> Proc:
    workdir.mkdir(parents=True, exist_ok=True)
    port = free_port()
    return Proc(
        [sys.executable, "-m", "bench.raw_server", "--port", str(port), "--db", str(workdir / "raw.db")],
        port, workdir / "raw.log",
    )


def moto_server(workdir: Path) -> Proc:
    """moto's S3 server in its own process (a real S3 HTTP endpoint)."""
    workdir.mkdir(parents=True, exist_ok=True)
    port = free_port()
    return Proc(
        [sys.executable, "-c", "from moto.server import main; main()", "-H", "127.0.0.1", "-p", str(port)],
        port, workdir / "moto.log",
    )


def s3_section(endpoint: str) -> dict[str, Any]:
    return {
        "backend": "s3", "endpoint_url": endpoint, "region": "us-east-1",
        "access_key_id": "testing", "secret_access_key": "testing",
    }


def boto_client(endpoint: str) -> Any:
    import boto3

    return boto3.client(
        "s3", endpoint_url=endpoint, region_name="us-east-1",
        aws_access_key_id="testing", aws_secret_access_key="testing",
    )


class StalledEndpoint:
    """A socket that listens but never accepts: an S3 endpoint whose every request hangs.

    A mendsrv pointed at it claims a job per lane slot and then waits on the download,
    so its workers are idle and every other submission stays pending.
    """

    def __init__(self) -> None:
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(64)
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}"

    def close(self) -> None:
        self.sock.close()


@dataclass
class Context:
    quick: bool
    work: Path
    media: Path
    facts: dict[str, Any]


async def loadgen(port: int, path: str, body: dict[str, Any], connections: int, duration: float, warmup: float,
                  headers: dict[str, str] | None = None) -> dict[str, Any]:
    """Run bench.loadgen in its own process; returns its JSON result."""
    argv = [sys.executable, "-m", "bench.loadgen", "--port", str(port), "--path", path, "--body", json.dumps(body),
            "--connections", str(connections), "--duration", str(duration), "--warmup", str(warmup)]
    for k, v in (headers or {}).items():
        argv += ["--header", f"{k}: {v}"]
    proc = await asyncio.create_subprocess_exec(*argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=child_env())
    out, err = await proc.communicate()
    if proc.returncode != 0:
        raise RuntimeError(f"load generator failed: {err.decode()[-2000:]}")
    return dict(json.loads(out))
