"""A lean HTTP/1.1 load generator: ``python -m bench.loadgen --port P --path /x --body JSON``.

Many keep-alive connections, each sending the next request as soon as the answer to
the last one is in. It is written on bare asyncio protocols rather than a full HTTP
client so that, sharing the CPU with the server under test, it takes as little of it
as it can. Prints one JSON object: requests answered per status, and the rate.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time
from collections import Counter


class Conn(asyncio.Protocol):
    def __init__(self, request: bytes, stats: Counter[int], state: dict[str, float], done: asyncio.Future[None]):
        self.request = request
        self.stats = stats
        self.state = state
        self.done = done
        self.buf = b""
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        self.transport.write(self.request)  # type: ignore[union-attr]

    def data_received(self, data: bytes) -> None:
        self.buf += data
        while True:
            end = self.buf.find(b"\r\n\r\n")
            if end < 0:
                return
            head = self.buf[:end]
            length = 0
            for line in head.split(b"\r\n")[1:]:
                name, _, value = line.partition(b":")
                if name.strip().lower() == b"content-length":
                    length = int(value)
            if len(self.buf) < end + 4 + length:
                return
            status = int(head[9:12])
            self.buf = self.buf[end + 4 + length :]
            now = time.monotonic()
            self.state["answered"] += 1
            if self.state["measure_from"] <= now < self.state["measure_to"]:
                self.stats[status] += 1
            if now >= self.state["measure_to"]:
                self.transport.close()  # type: ignore[union-attr]
                return
            self.transport.write(self.request)  # type: ignore[union-attr]

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.done.done():
            self.done.set_result(None)


async def run(port: int, path: str, body: bytes, headers: dict[str, str], connections: int, duration: float, warmup: float) -> dict[str, object]:
    head = f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nContent-Length: {len(body)}\r\n"
    head += "".join(f"{k}: {v}\r\n" for k, v in headers.items())
    request = head.encode() + b"\r\n" + body
    loop = asyncio.get_running_loop()
    stats: Counter[int] = Counter()
    start = time.monotonic()
    state = {"measure_from": start + warmup, "measure_to": start + warmup + duration, "answered": 0}
    waits = []
    for _ in range(connections):
        done: asyncio.Future[None] = loop.create_future()
        await loop.create_connection(lambda d=done: Conn(request, stats, state, d), "127.0.0.1", port)
        waits.append(done)
    await asyncio.wait_for(asyncio.gather(*waits), timeout=warmup + duration + 60)
    ok = sum(n for s, n in stats.items() if 200 <= s < 300)
    return {"statuses": {str(k): v for k, v in stats.items()}, "ok": ok, "rate": ok / duration, "duration_s": duration,
            "answered": state["answered"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--path", required=True)
    parser.add_argument("--body", required=True, help="request body (JSON text)")
    parser.add_argument("--header", action="append", default=[], help="Name: value")
    parser.add_argument("--connections", type=int, default=64)
    parser.add_argument("--duration", type=float, default=5.0)
    parser.add_argument("--warmup", type=float, default=1.0)
    args = parser.parse_args()
    headers = dict(h.split(": ", 1) for h in args.header)
    headers.setdefault("Content-Type", "application/json")
    result = asyncio.run(run(args.port, args.path, args.body.encode(), headers, args.connections, args.duration, args.warmup))
    print(json.dumps(result))


if __name__ == "__main__":
    main()
