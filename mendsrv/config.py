"""Configuration: mend.toml plus MEND_<SECTION>_<KEY> environment overrides.

Every key is optional with a safe default; an unknown section or key is an error
that names it.
"""

from __future__ import annotations

import os
import tomllib
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from .errors import ConfigError


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ServerConfig(_Section):
    host: str = Field("127.0.0.1", description="Address to listen on")
    port: int = Field(8080, ge=0, le=65535, description="TCP port (0 picks a free one)")
    max_body_bytes: int = Field(1048576, ge=1024, description="Largest accepted request body (413 past it)")
    shutdown_timeout_s: float = Field(
        30.0, ge=0, description="On SIGTERM, how long running jobs may finish before they are requeued"
    )
    log_level: str = Field("INFO", description="Log level: DEBUG, INFO, WARNING, ERROR")
    node_id: str = Field("", description="Name of this node in logs and the job store; empty = host name and pid")
    sse_keepalive_s: float = Field(15.0, gt=0, description="Seconds between keep-alive comments on an idle event stream")
    sse_queue_size: int = Field(
        256, ge=1, le=100_000, description="Events buffered per stream subscriber; one that falls further behind is dropped"
    )
    sse_write_timeout_s: float = Field(
        30.0, gt=0, description="An event stream whose client reads nothing for this long is closed"
    )


class AuthConfig(_Section):
    api_keys: list[str] = Field(
        default_factory=lambda: ["dev-key-change-me"],
        description="Accepted API keys; any number, for rotation",
    )


class StoreConfig(_Section):
    path: str = Field("./data/mend.db", description="SQLite database file (the embedded default)")
    url: str = Field("", description='"postgresql://…" selects a shared PostgreSQL store; empty = SQLite at path')
    heartbeat_s: float = Field(
        2.0, gt=0, description="PostgreSQL: how often each node records that it is alive (nodes table)"
    )
    node_timeout_s: float = Field(
        10.0, gt=0,
        description="PostgreSQL: a node silent this long is dead; its processing jobs are requeued by the others "
        "(at least twice heartbeat_s)",
    )
    pool_size: int = Field(10, ge=2, le=200, description="PostgreSQL: connections per node (plus one for LISTEN)")

    @model_validator(mode="after")
    def _check_shared_store(self) -> StoreConfig:
        if self.url and not self.url.startswith(("postgresql://", "postgres://", "sqlite:///")):
            raise ValueError('store.url must start with "postgresql://" (or "sqlite:///"), or be empty')
        if self.node_timeout_s < 2 * self.heartbeat_s:
            raise ValueError("store.node_timeout_s must be at least twice store.heartbeat_s")
        return self


class StorageConfig(_Section):
    backend: Literal["local", "s3"] = Field("local", description='"local" (directory per bucket) or "s3"')
    root: str = Field("./data/buckets", description="local: the directory holding one directory per bucket")
    endpoint_url: str = Field("", description="s3: endpoint; empty = AWS; else MinIO, SeaweedFS, R2, …")
    region: str = Field("us-east-1", description="s3: region")
    access_key_id: str = Field("", description="s3: access key; empty = the usual AWS credential chain")
    secret_access_key: str = Field("", description="s3: secret key")
    shared: bool = Field(False, description="local: the root is a mount shared by several nodes")
    temp_dir: str = Field("", description="Where sources and outputs are staged; empty = the system temp directory")
    max_retries: int = Field(5, ge=0, le=20, description="s3: retries on throttling, 5xx and connection errors")
    connect_timeout_s: float = Field(5.0, gt=0, description="s3: connection timeout")
    read_timeout_s: float = Field(60.0, gt=0, description="s3: read timeout")


class WorkersConfig(_Section):
    processes: int = Field(0, ge=0, le=256, description="CPU pool size; 0 = one per CPU")
    ffmpeg_jobs: int = Field(1, ge=1, le=64, description="Concurrent ffmpeg children")
    ffmpeg_path: str = Field("", description="ffmpeg binary; empty = the one bundled with imageio-ffmpeg")
    ffmpeg_threads: int = Field(0, ge=0, le=64, description="-threads for each ffmpeg; 0 = ffmpeg's choice")
    job_timeout_s: float = Field(900, gt=0, description="Wall-clock limit of one run of a job")
    max_attempts: int = Field(3, ge=1, le=100, description="Runs of one job, crash recoveries included")
    retry_base_s: float = Field(2.0, ge=0, description="Delay before re-running a job after a transient failure; doubles")
    poll_interval_s: float = Field(1.0, gt=0, description="How often idle workers look for due jobs")
    vips_concurrency: int = Field(
        1, ge=0, le=64,
        description="libvips threads in each worker process; 0 = libvips' default (one per CPU). The pool already "
        "runs one process per CPU, so more threads only oversubscribe the CPUs",
    )


class LimitsConfig(_Section):
    max_source_bytes: int = Field(2147483648, ge=1, description="Largest source object")
    max_input_pixels: int = Field(100_000_000, ge=1, description="Largest input image (checked from its header)")
    max_output_pixels: int = Field(100_000_000, ge=1, description="Largest output image")
    max_frames: int = Field(1000, ge=1, description="Most frames of an animated image")
    max_duration_s: float = Field(14400, gt=0, description="Longest audio or video source")
    max_queue: int = Field(100_000, ge=1, description="Most pending jobs; past it, submissions get 429")


class WebhooksConfig(_Section):
    secret: str = Field("", description="Set: sign deliveries the Standard Webhooks way (whsec_… or plain)")
    max_attempts: int = Field(10, ge=1, le=50, description="Delivery attempts before giving up")
    retry_base_s: float = Field(5.0, ge=0, description="Seconds before the first retry; doubles, capped")
    retry_cap_s: float = Field(21600.0, gt=0, description="Longest wait between two attempts")
    timeout_s: float = Field(10, gt=0, description="Timeout of one delivery request")
    allow_private_networks: bool = Field(False, description="Allow loopback/private/link-local targets")
    concurrency: int = Field(16, ge=1, le=256, description="Deliveries in flight at once")


class Config(_Section):
    server: ServerConfig = Field(default_factory=ServerConfig)
    auth: AuthConfig = Field(default_factory=AuthConfig)
    store: StoreConfig = Field(default_factory=StoreConfig)
    storage: StorageConfig = Field(default_factory=StorageConfig)
    workers: WorkersConfig = Field(default_factory=WorkersConfig)
    limits: LimitsConfig = Field(default_factory=LimitsConfig)
    webhooks: WebhooksConfig = Field(default_factory=WebhooksConfig)

    @property
    def worker_processes(self) -> int:
        return self.workers.processes or (os.cpu_count() or 1)


SECTIONS: dict[str, type[_Section]] = {
    name: field.annotation  # type: ignore[misc]
    for name, field in Config.model_fields.items()
}


def _env_overrides(env: dict[str, str]) -> dict[str, dict[str, Any]]:
    out: dict[str, dict[str, Any]] = {}
    for var, raw in env.items():
        if not var.startswith("MEND_"):
            continue
        rest = var[len("MEND_") :].lower()
        section = next((s for s in SECTIONS if rest.startswith(s + "_")), None)
        if section is None:
            raise ConfigError(f"unknown configuration section in environment variable {var}")
        key = rest[len(section) + 1 :]
        model = SECTIONS[section]
        if key not in model.model_fields:
            raise ConfigError(f"unknown configuration key {section}.{key} (environment variable {var})")
        annotation = str(model.model_fields[key].annotation)
        value: Any = raw
        if annotation.startswith("list"):
            value = [item.strip() for item in raw.split(",") if item.strip()]
        out.setdefault(section, {})[key] = value
    return out


def load_config(path: str | Path | None = None, env: dict[str, str] | None = None) -> Config:
    """Read a TOML file (optional) and apply environment overrides."""
    data: dict[str, Any] = {}
    if path is not None:
        try:
            with open(path, "rb") as fh:
                data = tomllib.load(fh)
        except FileNotFoundError:
            raise ConfigError(f"configuration file {path} not found") from None
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"configuration file {path} is not valid TOML: {exc}") from None
    for section, values in _env_overrides(dict(os.environ if env is None else env)).items():
        data.setdefault(section, {}).update(values)
    return config_from_dict(data)


def config_from_dict(data: dict[str, Any]) -> Config:
    for section, values in data.items():
        if section not in SECTIONS:
            raise ConfigError(f"unknown configuration section [{section}]")
        if not isinstance(values, dict):
            raise ConfigError(f"[{section}] must be a table")
        for key in values:
            if key not in SECTIONS[section].model_fields:
                raise ConfigError(f"unknown configuration key {section}.{key}")
    try:
        return Config.model_validate(data)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first["loc"])
        raise ConfigError(f"invalid configuration value {where}: {first['msg']}") from None
