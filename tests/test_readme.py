"""The README's promise: the shipped mend.toml runs, and its examples work as written."""

from __future__ import annotations

import asyncio
import json
import re
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import pyvips

from .conftest import REPO, ServerProcess, free_port


def _readme_blocks(lang: str) -> list[str]:
    text = (REPO / "README.md").read_text()
    return re.findall(rf"```{lang}\n(.*?)```", text, flags=re.S)


def test_readme_names_the_two_commands_and_the_dev_key() -> None:
    text = (REPO / "README.md").read_text()
    assert "make run" in text and "make test" in text
    assert "dev-key-change-me" in text
    ci = (REPO / ".ci" / "run").read_text()
    assert "make test" in ci
    makefile = (REPO / "Makefile").read_text()
    assert "mendsrv --config mend.toml" in makefile


@pytest.mark.skipif(shutil.which("curl") is None, reason="the README example uses curl")
async def test_readme_curl_example_on_shipped_config(tmp_path: Path) -> None:
    # the shipped mend.toml, unchanged, started the way `make run` starts it (port moved by env)
    shutil.copy(REPO / "mend.toml", tmp_path / "mend.toml")
    port = free_port()
    server = ServerProcess(tmp_path, (REPO / "mend.toml").read_text(), port)
    server.start(env={"MEND_SERVER_PORT": str(port), "PYTHONPATH": str(REPO)})
    try:
        # the README's image-making step, then its curl submission, verbatim but for the port
        blocks = _readme_blocks("sh")
        make_image = next(b for b in blocks if "mkdir -p data/buckets/my-bucket" in b)
        for line in make_image.strip().splitlines():
            line = line.replace(".venv/bin/python", shlex.quote(sys.executable))
            subprocess.run(line, shell=True, cwd=tmp_path, check=True)
        curl_block = next(b for b in blocks if "curl -H" in b and "/jobs/image/resize" in b)
        first = curl_block.strip().split("\n\n")[0].replace("\\\n", " ").replace("localhost:8080", f"localhost:{port}")
        out = subprocess.run(
            shlex.split(first) + ["-s", "-i"], cwd=tmp_path, capture_output=True, text=True, timeout=30
        ).stdout
        head, body = out.split("\n\n", 1)
        assert head.startswith("HTTP/1.1 202")
        assert re.search(r"^Location: /api/v1/jobs/[0-9a-f-]{36}\r?$", head, flags=re.M | re.I)
        data = json.loads(body)
        assert set(data) == {"job_id", "status", "message"}
        assert data["status"] == "pending" and data["message"] == "Job queued for processing"
        deadline = time.monotonic() + 60
        while True:
            job: dict[str, Any] = json.loads(
                subprocess.run(
                    ["curl", "-s", "-H", "X-API-Key: dev-key-change-me", f"http://localhost:{port}/api/v1/jobs/{data['job_id']}"],
                    capture_output=True, text=True, timeout=30,
                ).stdout
            )
            if job["status"] in ("completed", "failed"):
                break
            assert time.monotonic() < deadline
            await asyncio.sleep(0.2)
        assert job["status"] == "completed", job
        out_path = tmp_path / "data" / "buckets" / "my-bucket" / "resized.jpg"
        image = pyvips.Image.new_from_file(str(out_path))
        assert (image.width, image.height) == (800, 600)
    finally:
        server.stop()
