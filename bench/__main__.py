"""``python -m bench [--quick] [--only NAME ...]``: run the benchmarks, print the table,
write bench/out/results.json."""

from __future__ import annotations

import argparse
import asyncio
import importlib
import logging
import resource
import sys
import tempfile
import time
import traceback
from pathlib import Path

from .harness import Context, Row, machine_facts, markdown, table, write_json

MEASUREMENTS = ["submit", "images", "small", "video", "sse", "memory", "nodes"]
OUT = Path(__file__).resolve().parent / "out"


async def main_async(args: argparse.Namespace) -> int:
    names = args.only or MEASUREMENTS
    facts = machine_facts()
    facts["mode"] = "quick" if args.quick else "full"
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, min(hard, 8192)), hard))  # SSE: 1000+ sockets
    rows: list[Row] = []
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="mend-bench-") as tmp:
        work = Path(tmp)
        media = Path(args.media) if args.media else work / "media"
        media.mkdir(parents=True, exist_ok=True)
        ctx = Context(quick=args.quick, work=work, media=media, facts=facts)
        for name in names:
            module = importlib.import_module(f"bench.{name}")
            print(f"[bench] {name} …", file=sys.stderr, flush=True)
            t0 = time.monotonic()
            try:
                got = await module.run(ctx)
            except Exception as exc:
                traceback.print_exc()
                got = [Row(name, "", note=f"not measured: the benchmark failed ({type(exc).__name__}: {exc})")]
            print(f"[bench] {name} done in {time.monotonic() - t0:.0f} s", file=sys.stderr, flush=True)
            rows.extend(got)
    elapsed = time.monotonic() - started
    facts["loadavg_at_end"] = Path("/proc/loadavg").read_text().split()[:3]
    print()
    print(table(rows))
    print(f"\n{facts['date_utc']} · {facts.get('cpu')} · nproc {facts['nproc']} · {elapsed:.0f} s")
    out = Path(args.out)
    write_json(out, facts, rows, elapsed)
    out.with_suffix(".md").write_text(markdown(rows) + "".join(f"\n- {r.name}: {r.note}" for r in rows if r.note) + "\n")
    print(f"results: {out}")
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    parser.add_argument("--quick", action="store_true", help="shorter runs, fewer jobs (about 2 minutes)")
    parser.add_argument("--only", action="append", choices=MEASUREMENTS, metavar="NAME",
                        help=f"run only this measurement (repeatable): {', '.join(MEASUREMENTS)}")
    parser.add_argument("--out", default=str(OUT / "results.json"), help="where to write the JSON results")
    parser.add_argument("--media", default="", help="directory to cache generated media between runs")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    return asyncio.run(main_async(args))


if __name__ == "__main__":
    sys.exit(main())
