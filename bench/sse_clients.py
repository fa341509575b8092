"""Many Server-Sent Events subscribers in one process, on bare asyncio protocols.

``python -m bench.sse_clients --port P --path /x --n 1000 [--header 'Name: value']``
opens n streams, prints ``READY`` once every stream has delivered its first event or
comment, then records the moment (time.time()) each stream receives a message
containing ``cancelled`` and prints them as one JSON list.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time


class Sub(asyncio.Protocol):
    def __init__(self, request: bytes, ready: asyncio.Future[None], got: asyncio.Future[float]):
        self.request, self.ready, self.got = request, ready, got
        self.buf = b""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport
        transport.write(self.request)  # type: ignore[attr-defined]

    def data_received(self, data: bytes) -> None:
        self.buf += data
        if not self.ready.done():
            head = self.buf.find(b"\r\n\r\n")
            if head >= 0 and b"\n\n" in self.buf[head + 4 :]:
                self.ready.set_result(None)
                self.buf = b""
            return
        if b"cancelled" in self.buf and not self.got.done():
            self.got.set_result(time.time())
            self.transport.close()

    def connection_lost(self, exc: Exception | None) -> None:
        for fut in (self.ready, self.got):
            if not fut.done():
                fut.set_exception(ConnectionError("stream closed early"))


async def run(port: int, path: str, n: int, headers: list[str]) -> list[float]:
    loop = asyncio.get_running_loop()
    request = (f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nAccept: text/event-stream\r\n"
               + "".join(h + "\r\n" for h in headers) + "\r\n").encode()
    readies, gots = [], []
    for _ in range(n):
        ready, got = loop.create_future(), loop.create_future()
        await loop.create_connection(lambda r=ready, g=got: Sub(request, r, g), "127.0.0.1", port)
        readies.append(ready)
        gots.append(got)
    await asyncio.wait_for(asyncio.gather(*readies), 120)
    sys.stdout.write("READY\n")
    sys.stdout.flush()
    results = await asyncio.wait_for(asyncio.gather(*gots, return_exceptions=True), 120)
    return [r for r in results if isinstance(r, float)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--path", required=True)
    parser.add_argument("--n", type=int, default=1000)
    parser.add_argument("--header", action="append", default=[])
    args = parser.parse_args()
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, min(hard, args.n + 256)), hard))
    print(json.dumps(asyncio.run(run(args.port, args.path, args.n, args.header))))


if __name__ == "__main__":
    main()
