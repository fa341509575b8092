"""Raw baseline for streaming a large S3 object: aiobotocore alone, 1 MB chunks to a file.

``python -m bench.stream_raw ENDPOINT BUCKET KEY DEST`` prints JSON: RSS before and the
peak RSS while streaming, sampled every 20 ms.
"""

from __future__ import annotations

import asyncio
import json
import sys

from .harness import rss_mb


async def main(endpoint: str, bucket: str, key: str, dest: str) -> dict[str, float]:
    import os

    from aiobotocore.session import get_session

    pid = os.getpid()
    session = get_session()
    async with session.create_client(
        "s3", endpoint_url=endpoint, region_name="us-east-1", aws_access_key_id="testing", aws_secret_access_key="testing"
    ) as client:
        await client.head_object(Bucket=bucket, Key="small")  # warm the connection
        before = rss_mb(pid)
        peak = before
        done = asyncio.Event()

        async def sample() -> None:
            nonlocal peak
            while not done.is_set():
                peak = max(peak, rss_mb(pid))
                await asyncio.sleep(0.02)

        sampler = asyncio.create_task(sample())
        resp = await client.get_object(Bucket=bucket, Key=key)
        async with resp["Body"] as body:
            with open(dest, "wb") as fh:
                while chunk := await body.read(1024 * 1024):
                    fh.write(chunk)
        done.set()
        await sampler
    return {"before_mb": before, "peak_mb": peak}


if __name__ == "__main__":
    print(json.dumps(asyncio.run(main(*sys.argv[1:5]))))
