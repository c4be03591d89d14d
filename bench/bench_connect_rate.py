"""Connection rate with and without a PROXY header, side by side against one broker process.

One broker runs three TCP listeners: plain, ``proxy_protocol: true`` fed v1 headers, and the same
fed v2 headers. A client process opens connections with ``--concurrency`` in flight, each doing
[PROXY header +] CONNECT -> CONNACK -> DISCONNECT; rounds alternate between the three kinds so that
machine noise hits them alike. Prints connections/s per kind and the ratio to plain.

    python bench/bench_connect_rate.py [--connections N] [--rounds R] [--quick]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from listeners.proxy_protocol import build_v1, build_v2  # noqa: E402

CONFIG = """\
listeners:
  tcp:
    default: {bind: "127.0.0.1:0"}
    pp: {bind: "127.0.0.1:0", proxy_protocol: true}
  ws:
    default: {enable: false}
admin: {listen: ""}
"""


def connect_packet(client_id: bytes) -> bytes:
    body = b"\x00\x04MQTT\x04\x02\x00\x3c" + len(client_id).to_bytes(2, "big") + client_id
    return bytes([0x10, len(body)]) + body


async def one(port: int, header: bytes, index: int) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(header + connect_packet(b"bench-%d" % index))
    connack = await reader.readexactly(4)
    assert connack == b"\x20\x02\x00\x00", connack
    writer.write(b"\xe0\x00")  # DISCONNECT
    await writer.drain()
    writer.close()
    await writer.wait_closed()


async def run_round(port: int, header_of: object, connections: int, concurrency: int) -> float:
    semaphore = asyncio.Semaphore(concurrency)

    async def guarded(index: int) -> None:
        async with semaphore:
            header = header_of(index) if callable(header_of) else b""
            await one(port, header, index)

    started = time.perf_counter()
    await asyncio.gather(*(guarded(index) for index in range(connections)))
    return connections / (time.perf_counter() - started)


async def main(connections: int, rounds: int, concurrency: int) -> None:
    workdir = Path(tempfile.mkdtemp())
    (workdir / "broker.yaml").write_text(CONFIG)
    proc = subprocess.Popen(
        [sys.executable, "-m", "broker", "serve", "--config", "broker.yaml", "--log-level", "info"],
        cwd=workdir,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )
    assert proc.stderr is not None
    ports: dict[str, int] = {}
    for line in proc.stderr:
        match = re.search(r"realip-broker ready: (.*)$", line)
        if match:
            for item in match.group(1).split():
                name, _, hostport = item.partition("=")
                ports[name] = int(hostport.rpartition(":")[2])
            break
    # Keep draining the broker's log so that it never blocks on a full pipe.
    drain = asyncio.get_running_loop().run_in_executor(None, lambda: [None for _ in proc.stderr])  # type: ignore[union-attr]

    v1 = build_v1("203.0.113.10", "10.0.0.1", 40000, 1883)
    v2 = build_v2(src_addr="203.0.113.10", dst_addr="10.0.0.1", src_port=40000, dst_port=1883)
    kinds = {
        "plain": (ports["tcp:default"], None),
        "PROXY v1": (ports["tcp:pp"], lambda _i: v1),
        "PROXY v2": (ports["tcp:pp"], lambda _i: v2),
    }
    rates: dict[str, list[float]] = {kind: [] for kind in kinds}
    await run_round(ports["tcp:default"], None, min(200, connections), concurrency)  # warm-up
    for _ in range(rounds):
        for kind, (port, header_of) in kinds.items():
            rates[kind].append(await run_round(port, header_of, connections, concurrency))
    proc.terminate()
    proc.wait()
    await drain
    plain = statistics.median(rates["plain"])
    print(
        f"connection rate, {connections} connections x {rounds} rounds, "
        f"{concurrency} in flight (median conn/s):"
    )
    for kind, values in rates.items():
        median = statistics.median(values)
        print(f"  {kind:<9} {median:8.0f} conn/s   ratio to plain {median / plain:.3f}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--connections", type=int, default=2000)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--concurrency", type=int, default=50)
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    if args.quick:
        args.connections, args.rounds = 300, 2
    asyncio.run(main(args.connections, args.rounds, args.concurrency))
